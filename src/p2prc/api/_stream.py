"""NDJSON answers: a node task reports events, the caller reads them one line each.

The task belongs to the node, not to the request: it runs to its end even if the caller
disconnects, so a container is never left half-created and a plugin run is still saved.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from .._aio import Report, Spawn, reported

__all__ = ["NDJSON", "ndjson", "task_stream"]

NDJSON = "application/x-ndjson"

EventT = TypeVar("EventT", bound=BaseModel)


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
