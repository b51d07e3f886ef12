"""Owner-only routes for groups of tracked containers and Ansible plugins."""

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from ..config import NodeConfig
from ..containers.groups import GroupStore
from ..containers.store import ContainerStore
from ..errors import InvalidRequest, P2PRCError
from ..models import (
    CallerInfo,
    ContainerGroup,
    GroupMember,
    PluginEvent,
    PluginInfo,
    PluginRun,
    PluginRunRequest,
    TrackedContainer,
)
from ..plugins.runner import run_playbook
from ..plugins.runs import RunStore
from ..plugins.store import PluginStore
from ..state import State
from .auth import RequestVerifier

__all__ = ["router"]

log = logging.getLogger(__name__)


class PluginNode(Protocol):
    @property
    def config(self) -> NodeConfig: ...
    @property
    def state(self) -> State: ...
    @property
    def home_path(self) -> Path: ...
    def spawn(self, coro: Coroutine[Any, Any, None], *, name: str) -> asyncio.Task[None]: ...


def router(node: PluginNode, verifier: RequestVerifier) -> APIRouter:
    """Routes under /groups, /plugins and /plugin-runs (all for the node's owner)."""
    routes = APIRouter(tags=["plugins"])
    Owner = Annotated[CallerInfo, Depends(verifier.owner)]

    def groups() -> GroupStore:
        return GroupStore(node.state.connection)

    def plugins() -> PluginStore:
        configured = node.config.plugin_path
        return PluginStore(Path(configured) if configured else node.home_path / "plugins")

    def tracked() -> ContainerStore:
        return ContainerStore(node.state.connection)

    @routes.post("/groups")
    async def create_group(caller: Owner) -> ContainerGroup:
        """A new, empty group (the original --cgroup)."""
        return groups().create()

    @routes.get("/groups")
    async def list_groups(caller: Owner) -> list[ContainerGroup]:
        """Every group (the original --groups)."""
        return groups().all()

    @routes.get("/groups/{group_id}")
    async def show_group(group_id: str, caller: Owner) -> ContainerGroup:
        return groups().get(group_id)

    @routes.post("/groups/{group_id}/members")
    async def add_member(group_id: str, body: GroupMember, caller: Owner) -> ContainerGroup:
        """Add a tracked container (the original --group G --id C)."""
        store = groups()
        store.get(group_id)
        return store.add(group_id, tracked().one_tracked(body.container))

    @routes.delete("/groups/{group_id}/members/{container}")
    async def remove_member(group_id: str, container: str, caller: Owner) -> ContainerGroup:
        """Take a container out of a group (the original --group G --rmcgroup --id C)."""
        return groups().remove(group_id, tracked().one_tracked(container))

    @routes.delete("/groups/{group_id}")
    async def delete_group(group_id: str, caller: Owner) -> dict[str, str]:
        """Delete a group; its containers stay (the original --rmgroup)."""
        groups().delete(group_id)
        return {"deleted": group_id}

    @routes.get("/plugins")
    async def list_plugins(caller: Owner) -> list[PluginInfo]:
        """Installed plugins (the original --vp)."""
        return plugins().list()

    @routes.post("/plugins")
    async def pull_plugin(body: dict[str, str], caller: Owner) -> PluginInfo:
        """Install a plugin from a git URL or a local repository (the original --pp)."""
        source = body.get("source", "")
        if not isinstance(source, str) or not source or len(source) > 1000:
            raise InvalidRequest("give the plugin's git URL or path as 'source'")
        return await asyncio.to_thread(plugins().pull, source)

    @routes.delete("/plugins/{name}")
    async def remove_plugin(name: str, caller: Owner) -> dict[str, str]:
        """Uninstall a plugin (the original --rp)."""
        plugins().remove(name)
        return {"removed": name}

    @routes.get("/plugin-runs")
    async def runs(caller: Owner) -> list[PluginRun]:
        """Every plugin run with its per-host summary and output."""
        return RunStore(node.state.connection).all()

    @routes.post("/plugins/{name}/run", response_model=PluginEvent)
    async def run(name: str, body: PluginRunRequest, caller: Owner) -> StreamingResponse:
        """Run a plugin on a tracked container or a group; answers NDJSON progress."""
        plugin = plugins().get(name)
        items = _targets(body.target)
        return StreamingResponse(
            _run_stream(plugin, items, body), media_type="application/x-ndjson"
        )

    def _targets(target: str) -> list[TrackedContainer]:
        if target.startswith("grp"):
            group = groups().get(target)
            if not group.containers:
                raise InvalidRequest(f"group {target} has no containers")
            return group.containers
        return [tracked().one_tracked(target)]

    async def _run_stream(
        plugin: PluginInfo, items: list[TrackedContainer], body: PluginRunRequest
    ) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[PluginEvent] = asyncio.Queue()
        run_id = f"run{secrets.token_hex(6)}"

        def on_event(host: str, task: str, status: str) -> None:
            event = PluginEvent(event="progress", host=host, task=task, status=status)
            loop.call_soon_threadsafe(queue.put_nowait, event)

        finished: list[PluginEvent] = []

        async def work() -> None:
            try:
                result = await asyncio.to_thread(
                    run_playbook,
                    plugin,
                    items,
                    body.variables,
                    key=node.home_path / "identity" / "id_ed25519",
                    known_hosts=node.home_path / "known_hosts",
                    run_id=run_id,
                    target=body.target,
                    on_event=on_event,
                )
            except Exception as exc:  # a failed run, not a failed node: logged, then recorded
                if not isinstance(exc, P2PRCError):
                    log.exception("plugin %s crashed", plugin.name)
                result = PluginRun(
                    id=run_id, plugin=plugin.name, target=body.target,
                    started_at=time.time(), finished_at=time.time(), ok=False,
                    output=str(exc) if isinstance(exc, P2PRCError) else f"internal error: {exc!r}",
                )  # fmt: skip
            RunStore(node.state.connection).save(result)
            finished.append(PluginEvent(event="finished", run=result))

        # A node task: the run ends and is saved even if the caller goes away.
        task = node.spawn(work(), name="plugin-run")
        while not task.done() or not queue.empty():
            getter = asyncio.ensure_future(queue.get())
            try:
                done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not getter.done():
                    getter.cancel()
            if getter in done:
                yield getter.result().model_dump_json(exclude_none=True).encode() + b"\n"
        await task
        yield finished[0].model_dump_json(exclude_none=True).encode() + b"\n"

    return routes
