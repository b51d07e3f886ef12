"""Small asyncio helpers shared by the components that own background tasks."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, Protocol, TypeVar

__all__ = ["CrashHandler", "Report", "Spawn", "TaskSet", "log_crash", "reported"]

log = logging.getLogger(__name__)

# Told about a task that ended with an exception (never about one that was cancelled).
CrashHandler = Callable[[asyncio.Task[Any], BaseException], None]


def log_crash(task: asyncio.Task[Any], exc: BaseException) -> None:
    """The handler for library use: log the crash with its traceback."""
    log.error("background task %s crashed", task.get_name(), exc_info=exc)


class TaskSet:
    """Background tasks a component owns: tracked while they run, cancelled on close.

    A task that ends with an exception is reaped at once: its exception is retrieved (so
    asyncio never prints "Task exception was never retrieved") and handed to
    ``on_crash``, which a node uses to log it and stop.
    """

    def __init__(self, on_crash: CrashHandler = log_crash) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._on_crash = on_crash

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(
        self,
        coroutine: Coroutine[Any, Any, Any],
        name: str | None = None,
        *,
        contained: bool = False,
    ) -> asyncio.Task[Any]:
        """Run ``coroutine`` as a task that is forgotten when it finishes.

        ``contained``: a task that serves one connection of a peer (a relayed or direct
        stream): a crash of it is logged with its traceback and ends only it, as a server's
        connection handler's does, instead of going to ``on_crash`` (which stops a node).
        """
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(functools.partial(self._reap, contained=contained))
        return task

    def _reap(self, task: asyncio.Task[Any], *, contained: bool = False) -> None:
        self._tasks.discard(task)
        if task.cancelled() or (exc := task.exception()) is None:
            return
        if contained:
            log.error("task %s failed; its connection is closed", task.get_name(), exc_info=exc)
            return
        try:
            self._on_crash(task, exc)
        except Exception:  # a broken handler must not hide the crash it was told of
            log.exception("crash handler failed for %s", task.get_name())
            log_crash(task, exc)

    async def cancel_all(self) -> None:
        """Cancel every task (and any a cancelled task spawned) and wait for them to end."""
        for _ in range(100):  # bounded: each round only meets tasks spawned while cancelling
            tasks = list(self._tasks)
            if not tasks:
                return
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


EventT = TypeVar("EventT")
# Puts one event on a stream; safe to call from any thread.
Report = Callable[[EventT], None]


class Spawn(Protocol):
    """Runs a task owned by the node (``Node.spawn``)."""

    def __call__(self, coro: Coroutine[Any, Any, None], *, name: str) -> asyncio.Task[None]: ...


def reported(
    spawn: Spawn, work: Callable[[Report[EventT]], Coroutine[Any, Any, None]], *, name: str
) -> AsyncIterator[EventT]:
    """Run ``work`` as a node task (``spawn(coro, name=...)``); iterate what it reports.

    The task belongs to the node, not to the reader: it runs to its end even if nobody
    reads any more.
    """
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
