"""``with`` and ``async with`` for anything with a ``close``/``aclose``, written once."""

from __future__ import annotations

from types import TracebackType
from typing import Self

__all__ = ["AsyncClosing", "Closing", "Component"]


class Closing:
    """``with thing:`` closes it on the way out; subclasses define ``close``."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncClosing:
    """``async with thing:`` closes it on the way out; subclasses define ``aclose``.

    One that must start first overrides ``__aenter__`` (start, then ``return self``).
    """

    async def aclose(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class Component(AsyncClosing):
    """``async with thing:`` starts it, and closes it on the way out.

    Subclasses define ``start`` and ``aclose`` (a node, gossip, a service, a relay).
    """

    async def start(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self
