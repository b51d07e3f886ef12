"""The one lookup of a thing by what a user typed: its exact name, or a unique id prefix."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

from .errors import InvalidRequest, NotFound, P2PRCError, PeerNotFound

__all__ = ["unique_peer", "unique_prefix"]

T = TypeVar("T")


def unique_prefix(
    typed: str,
    candidates: Iterable[T],
    *,
    ident: Callable[[T], str],
    name: Callable[[T], str | None] = lambda item: None,
    what: str,
    missing: type[P2PRCError] = NotFound,
    see: str = "",
) -> T:
    """The one candidate named ``typed``, else the one whose id starts with it (any case).

    Nothing matching is ``missing``; more than one is ``InvalidRequest``. ``what`` is
    the singular noun for messages, ``see`` the command that lists the candidates.
    """
    items = list(candidates)
    text = typed.strip()
    hint = f"; see '{see}'" if see else ""
    if not text:
        raise missing(f"no {what} given{hint}")
    matches = [item for item in items if name(item) == text]
    if not matches:
        prefix = text.lower()
        matches = [item for item in items if ident(item).lower().startswith(prefix)]
    if len(matches) > 1:
        raise InvalidRequest(f"{typed!r} matches {len(matches)} {what}s; give more of the id")
    if not matches:
        raise missing(f"no {what} named {typed!r} or with that id{hint}")
    return matches[0]


def unique_peer(
    typed: str,
    candidates: Iterable[T],
    *,
    ident: Callable[[T], str],
    name: Callable[[T], str | None],
) -> T:
    """``unique_prefix`` for peers: by name, else node id prefix; ``PeerNotFound`` if none."""
    return unique_prefix(
        typed,
        candidates,
        ident=ident,
        name=name,
        what="peer",
        missing=PeerNotFound,
        see="p2prc peers list",
    )
