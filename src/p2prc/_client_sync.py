"""``Client``: the blocking twin of ``AsyncClient``, derived from it.

Every operation is written once, as a coroutine method of ``AsyncClient``; ``Client``
gets each one through ``_blocking``, which runs it to completion on the client's private
``asyncio.Runner`` and copies its name, docstring and signature (``functools.wraps``).
``tests/unit/test_client_sync.py`` fails when an async method has no sync twin.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import httpx

from ._client_async import AsyncClient
from ._closing import Closing
from .attach.client import BlockingAttachedAPI
from .cluster.client import BlockingClustersAPI
from .config import Home
from .identity import Identity
from .jobs.client import BlockingJob, BlockingJobsAPI
from .jobs.task import Task

__all__ = ["Client"]

_P = ParamSpec("_P")
_R = TypeVar("_R")
_T = TypeVar("_T")


def _blocking(
    method: Callable[Concatenate[AsyncClient, _P], Coroutine[Any, Any, _R]],
) -> Callable[Concatenate[Client, _P], _R]:
    """The blocking form of an ``AsyncClient`` method, for the body of ``Client``.

    ``Client().peers()`` has the parameters and result type of ``AsyncClient.peers``
    (mypy follows the ``ParamSpec``); ``help()`` and ``inspect.signature`` show its
    docstring and signature through ``__wrapped__``.
    """

    @functools.wraps(method)
    def blocking(self: Client, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        return self._run(method(self._async, *args, **kwargs))

    return blocking


class Client(Closing):
    """The blocking twin of ``AsyncClient``, for scripts and the CLI.

    Each call runs the ``AsyncClient`` method of the same name on a private
    ``asyncio.Runner``, so it refuses to run inside a running event loop (use
    ``AsyncClient`` there). Progress callbacks are called from that runner, as with
    ``AsyncClient``: plain functions and coroutine functions both work.
    """

    # Explicit, the twin of AsyncClient.__init__ (mypy cannot derive a constructor): the
    # AsyncClient (and its httpx pool) must be built inside the runner, whose loop it binds to.
    def __init__(
        self,
        base_url: str | None = None,
        *,
        home: Home | Path | str | None = None,
        identity: Identity | None = None,
        audience: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float | httpx.Timeout = 30.0,
    ) -> None:
        self._runner = asyncio.Runner()
        try:
            self._async = self._run(
                _construct(
                    AsyncClient,
                    base_url,
                    home=home,
                    identity=identity,
                    audience=audience,
                    transport=transport,
                    timeout=timeout,
                )
            )
        except BaseException:
            self._runner.close()
            raise
        self.base_url = self._async.base_url

    def __repr__(self) -> str:
        return f"<Client {self.base_url}>"

    health = _blocking(AsyncClient.health)
    status = _blocking(AsyncClient.status)
    specs = _blocking(AsyncClient.specs)
    whoami = _blocking(AsyncClient.whoami)
    shutdown = _blocking(AsyncClient.shutdown)
    images = _blocking(AsyncClient.images)

    create_container = _blocking(AsyncClient.create_container)
    containers = _blocking(AsyncClient.containers)
    remove_container = _blocking(AsyncClient.remove_container)
    create_on_peer = _blocking(AsyncClient.create_on_peer)
    tracked = _blocking(AsyncClient.tracked)
    remove_tracked = _blocking(AsyncClient.remove_tracked)

    peers = _blocking(AsyncClient.peers)
    resolve = _blocking(AsyncClient.resolve)
    add_peer = _blocking(AsyncClient.add_peer)
    sync_peers = _blocking(AsyncClient.sync_peers)
    remove_peer = _blocking(AsyncClient.remove_peer)
    set_metadata = _blocking(AsyncClient.set_metadata)
    exchange = _blocking(AsyncClient.exchange)
    speedtest = _blocking(AsyncClient.speedtest)
    reachability = _blocking(AsyncClient.reachability)

    create_group = _blocking(AsyncClient.create_group)
    groups = _blocking(AsyncClient.groups)
    group = _blocking(AsyncClient.group)
    add_to_group = _blocking(AsyncClient.add_to_group)
    remove_from_group = _blocking(AsyncClient.remove_from_group)
    delete_group = _blocking(AsyncClient.delete_group)

    plugins = _blocking(AsyncClient.plugins)
    pull_plugin = _blocking(AsyncClient.pull_plugin)
    remove_plugin = _blocking(AsyncClient.remove_plugin)
    plugin_runs = _blocking(AsyncClient.plugin_runs)
    run_plugin = _blocking(AsyncClient.run_plugin)

    map_port = _blocking(AsyncClient.map_port)
    mappings = _blocking(AsyncClient.mappings)
    unmap_port = _blocking(AsyncClient.unmap_port)

    @property
    def jobs(self) -> BlockingJobsAPI:
        """The node's jobs: ``submit``, ``list``, ``get``, ``cancel``, ``download``."""
        return BlockingJobsAPI(self, self._async.jobs)

    @property
    def clusters(self) -> BlockingClustersAPI:
        """The node's Dask clusters: ``create``, ``list``, ``get``, ``scale``, ``remove``."""
        return BlockingClustersAPI(self, self._async.clusters)

    @property
    def attached(self) -> BlockingAttachedAPI:
        """Attached hosts: ``list``, ``get``, ``attach``, ``detach``, ``allow``."""
        return BlockingAttachedAPI(self, self._async.attached)

    # Explicit: the twin of AsyncClient.run answers a blocking handle, not a Job.
    def run(self, task: Task) -> BlockingJob:
        """Submit ``task`` (``POST /jobs``); the ``Job`` has ``logs``, ``wait``, ``results``."""
        return self.jobs.run(task)

    # Explicit: the twin of ``aclose`` also closes the runner, and is named ``close``.
    def close(self) -> None:
        """Close the connection pool and the private event loop."""
        self._run(self._async.aclose())
        self._runner.close()

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        try:
            return self._runner.run(coro)
        except RuntimeError:
            coro.close()  # refused inside a running loop: no "never awaited" warning
            raise


async def _construct(factory: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
    # httpx binds its connection pool to the loop that first uses it: build it inside the runner.
    return factory(*args, **kwargs)
