"""Plugin runs: groups of tracked containers and attached hosts, the installed plugins, runs.

The owner's Ansible automation. A run is a node task: it runs to its end, and its record
is saved, even when whoever asked for it stops listening.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from .._aio import Report, Spawn, reported
from ..attach.models import AttachedHost
from ..config import Home
from ..containers.groups import GroupStore
from ..containers.store import ContainerStore
from ..errors import AttachedNotFound, ContainerNotFound, InvalidRequest, P2PRCError
from ..models import (
    ContainerGroup,
    PluginEvent,
    PluginInfo,
    PluginRun,
    PluginRunRequest,
    TrackedContainer,
)
from .runner import run_playbook
from .runs import RunStore
from .store import PluginStore

__all__ = ["PluginRuns"]

log = logging.getLogger(__name__)

Runner = Callable[..., PluginRun]
AttachedLookup = Callable[[str], AttachedHost]
_MAX_SOURCE = 1000


class PluginRuns:
    """Groups, plugins and plugin runs of this node's owner.

    Plugins live in ``plugin_path`` (the config's), else the home's ``plugins``; Ansible
    logs in with the home's node key and pinned host keys. ``spawn(coro, name=...)`` runs
    a task owned by the node. ``attached(name)`` finds an attached host (``AttachedNotFound``
    else); without it, targets are containers only.
    """

    def __init__(
        self,
        db: sqlite3.Connection,
        home: Home,
        plugin_path: str | None = None,
        *,
        spawn: Spawn,
        runner: Runner = run_playbook,
        attached: AttachedLookup | None = None,
    ) -> None:
        self._groups = GroupStore(db)
        self._containers = ContainerStore(db)
        self._runs = RunStore(db)
        self._plugins = PluginStore(Path(plugin_path) if plugin_path else home.plugins_dir)
        self._key = home.identity_key
        self._known_hosts = home.known_hosts
        self._home = home.path
        self._attached = attached
        self._spawn = spawn
        self._runner = runner

    def __repr__(self) -> str:
        return f"<PluginRuns {self._plugins.directory}>"

    # Groups -----------------------------------------------------------------------------

    def create_group(self) -> ContainerGroup:
        """A new, empty group."""
        return self._groups.create()

    def groups(self) -> list[ContainerGroup]:
        """Every group."""
        return self._groups.all()

    def group(self, group_id: str) -> ContainerGroup:
        """One group with its tracked containers (``NotFound``)."""
        return self._groups.get(group_id)

    def add_member(self, group_id: str, member: str) -> ContainerGroup:
        """Add a tracked container (name or id prefix) or an attached host to a group."""
        self._groups.get(group_id)
        found = self._member(member)
        if isinstance(found, TrackedContainer):
            return self._groups.add(group_id, found)
        return self._groups.add_attached(group_id, found.name)

    def remove_member(self, group_id: str, member: str) -> ContainerGroup:
        """Take a tracked container or an attached host out of a group."""
        group = self._groups.get(group_id)
        if member in group.attached:  # a host detached since can still be taken out
            return self._groups.remove_attached(group_id, member)
        return self._groups.remove(group_id, self._containers.one_tracked(member))

    def _member(self, member: str) -> TrackedContainer | AttachedHost:
        """The container or the attached host ``member`` names (an exact name, never both)."""
        try:
            container: TrackedContainer | None = self._containers.one_tracked(member)
        except ContainerNotFound:
            container = None
        host = self._attached_host(member)
        if container is not None and host is not None:
            raise InvalidRequest(
                f"{member!r} names a container and an attached host: give the container's id"
            )
        if container is not None:
            return container
        if host is not None:
            return host
        raise ContainerNotFound(
            f"no tracked container or attached host {member!r}; "
            "see 'p2prc container list' and 'p2prc attached'"
        )

    def _attached_host(self, name: str) -> AttachedHost | None:
        if self._attached is None:
            return None
        try:
            return self._attached(name)
        except AttachedNotFound:
            return None

    def delete_group(self, group_id: str) -> None:
        """Delete a group; its containers stay."""
        self._groups.delete(group_id)

    # Plugins ----------------------------------------------------------------------------

    def plugins(self) -> list[PluginInfo]:
        """Installed plugins."""
        return self._plugins.list()

    async def pull(self, source: str) -> PluginInfo:
        """Install a plugin from a git URL or a local directory."""
        if not isinstance(source, str) or not source or len(source) > _MAX_SOURCE:
            raise InvalidRequest("give the plugin's git URL or path as 'source'")
        return await asyncio.to_thread(self._plugins.pull, source)

    def remove_plugin(self, name: str) -> None:
        """Uninstall a plugin."""
        self._plugins.remove(name)

    # Runs -------------------------------------------------------------------------------

    def runs(self) -> list[PluginRun]:
        """Every plugin run with its per-host summary and output."""
        return self._runs.all()

    async def run(self, name: str, request: PluginRunRequest) -> AsyncIterator[PluginEvent]:
        """Start plugin ``name`` on a tracked container or a group; iterate its events.

        Raises at once for an unknown plugin or target. The events are 'progress' (host,
        task, status) and one 'finished' with the saved run, also when the run failed.
        """
        plugin = self._plugins.get(name)
        items, hosts = self._targets(request.target)
        run_id = f"run{secrets.token_hex(6)}"

        async def work(report: Report[PluginEvent]) -> None:
            def on_event(host: str, task: str, status: str) -> None:
                report(PluginEvent(event="progress", host=host, task=task, status=status))

            result = await self._play(plugin, items, hosts, request, run_id, on_event)
            self._runs.save(result)
            report(PluginEvent(event="finished", run=result))

        return reported(self._spawn, work, name="plugin-run")

    def _targets(self, target: str) -> tuple[list[TrackedContainer], list[AttachedHost]]:
        """The containers and attached hosts a run's target names (a group: its members)."""
        if target.startswith("grp"):
            group = self._groups.get(target)
            if not group.containers and not group.attached:
                raise InvalidRequest(f"group {target} has no containers or attached hosts")
            hosts = []
            for name in group.attached:
                host = self._attached_host(name)
                if host is None:
                    raise InvalidRequest(
                        f"group {target}: attached host {name!r} is not known any more "
                        f"(detached?); take it out with 'p2prc group rm {target} {name}'"
                    )
                hosts.append(host)
            return group.containers, hosts
        found = self._member(target)
        if isinstance(found, TrackedContainer):
            return [found], []
        return [], [found]

    async def _play(
        self,
        plugin: PluginInfo,
        items: list[TrackedContainer],
        hosts: list[AttachedHost],
        request: PluginRunRequest,
        run_id: str,
        on_event: Callable[[str, str, str], None],
    ) -> PluginRun:
        """The run's record: the playbook's result, or what went wrong (never raises)."""
        started = time.time()
        try:
            return await asyncio.to_thread(
                self._runner,
                plugin,
                items,
                request.variables,
                key=self._key,
                known_hosts=self._known_hosts,
                run_id=run_id,
                target=request.target,
                on_event=on_event,
                attached=hosts,
                home=self._home,
            )
        except Exception as exc:  # a failed run, not a failed node: logged, then recorded
            if isinstance(exc, P2PRCError):
                output = str(exc)
            else:
                log.exception("plugin %s crashed", plugin.name)
                output = f"internal error: {exc!r}"
        return PluginRun(
            id=run_id, plugin=plugin.name, target=request.target,
            started_at=started, finished_at=time.time(), ok=False, output=output,
        )  # fmt: skip
