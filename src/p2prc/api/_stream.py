"""NDJSON answers: a node task reports events, the caller reads them one line each.

The task belongs to the node, not to the request: it runs to its end even if the caller
disconnects, so a container is never left half-created and a plugin run is still saved.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, Protocol, TypeVar

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

__all__ = ["NDJSON", "Report", "Spawn", "ndjson", "reported", "task_stream"]

NDJSON = "application/x-ndjson"

EventT = TypeVar("EventT", bound=BaseModel)
# Puts one event on the stream; safe to call from any thread.
Report = Callable[[EventT], None]


class Spawn(Protocol):
    """Runs a task owned by the node (``Node.spawn``)."""

    def __call__(self, coro: Coroutine[Any, Any, None], *, name: str) -> asyncio.Task[None]: ...


def reported(
    spawn: Spawn, work: Callable[[Report[EventT]], Coroutine[Any, Any, None]], *, name: str
) -> AsyncIterator[EventT]:
    """Run ``work`` as a node task (``spawn(coro, name=...)``); iterate what it reports."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[EventT | None] = asyncio.Queue()

    def report(event: EventT) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, event)

    async def run() -> None:
        try:
            await work(report)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, None)

    spawn(run(), name=name)

    async def events() -> AsyncIterator[EventT]:
        while (event := await queue.get()) is not None:
            yield event

    return events()


def task_stream(
    spawn: Spawn,
    work: Callable[[Report[EventT]], Coroutine[Any, Any, None]],
    *,
    name: str,
    first: EventT | None = None,
) -> StreamingResponse:
    """Answer with ``first`` (sent at once), then each event ``work`` reports, as NDJSON."""
    return ndjson(reported(spawn, work, name=name), first=first)


def ndjson(events: AsyncIterator[EventT], *, first: EventT | None = None) -> StreamingResponse:
    """Answer with ``first`` (sent at once), then each of ``events``, one JSON line each."""

    async def lines() -> AsyncIterator[bytes]:
        if first is not None:
            yield _line(first)
        async for event in events:
            yield _line(event)

    return StreamingResponse(lines(), media_type=NDJSON)


def _line(event: BaseModel) -> bytes:
    return event.model_dump_json(exclude_none=True).encode() + b"\n"
