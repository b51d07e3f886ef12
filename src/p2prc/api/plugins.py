"""Owner-only routes for groups of tracked containers and Ansible plugins."""

from typing import Protocol

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from ..models import (
    ContainerGroup,
    GroupMember,
    PluginEvent,
    PluginInfo,
    PluginRun,
    PluginRunRequest,
)
from ..plugins.service import PluginRuns
from ._stream import ndjson
from .auth import Owner

__all__ = ["PluginNode", "router"]


class PluginNode(Protocol):
    """What these routes need from a node."""

    @property
    def plugin_runs(self) -> PluginRuns: ...


def router(node: PluginNode) -> APIRouter:
    """Routes under /groups, /plugins and /plugin-runs (all for the node's owner)."""
    routes = APIRouter(tags=["plugins"])
    # Twins on purpose: each route is one call into node.plugin_runs, of one shape.

    @routes.post("/groups")
    async def create_group(caller: Owner) -> ContainerGroup:
        """A new, empty group (the original --cgroup)."""
        return node.plugin_runs.create_group()

    @routes.get("/groups")
    async def list_groups(caller: Owner) -> list[ContainerGroup]:
        """Every group (the original --groups)."""
        return node.plugin_runs.groups()

    @routes.get("/groups/{group_id}")
    async def show_group(group_id: str, caller: Owner) -> ContainerGroup:
        return node.plugin_runs.group(group_id)

    @routes.post("/groups/{group_id}/members")
    async def add_member(group_id: str, body: GroupMember, caller: Owner) -> ContainerGroup:
        """Add a tracked container (the original --group G --id C)."""
        return node.plugin_runs.add_member(group_id, body.container)

    @routes.delete("/groups/{group_id}/members/{container}")
    async def remove_member(group_id: str, container: str, caller: Owner) -> ContainerGroup:
        """Take a container out of a group (the original --group G --rmcgroup --id C)."""
        return node.plugin_runs.remove_member(group_id, container)

    @routes.delete("/groups/{group_id}")
    async def delete_group(group_id: str, caller: Owner) -> dict[str, str]:
        """Delete a group; its containers stay (the original --rmgroup)."""
        node.plugin_runs.delete_group(group_id)
        return {"deleted": group_id}

    @routes.get("/plugins")
    async def list_plugins(caller: Owner) -> list[PluginInfo]:
        """Installed plugins (the original --vp)."""
        return node.plugin_runs.plugins()

    @routes.post("/plugins")
    async def pull_plugin(body: dict[str, str], caller: Owner) -> PluginInfo:
        """Install a plugin from a git URL or a local repository (the original --pp)."""
        return await node.plugin_runs.pull(body.get("source", ""))

    @routes.delete("/plugins/{name}")
    async def remove_plugin(name: str, caller: Owner) -> dict[str, str]:
        """Uninstall a plugin (the original --rp)."""
        node.plugin_runs.remove_plugin(name)
        return {"removed": name}

    @routes.get("/plugin-runs")
    async def runs(caller: Owner) -> list[PluginRun]:
        """Every plugin run with its per-host summary and output."""
        return node.plugin_runs.runs()

    @routes.post("/plugins/{name}/run", response_model=PluginEvent)
    async def run(name: str, body: PluginRunRequest, caller: Owner) -> StreamingResponse:
        """Run a plugin on a tracked container or a group; answers NDJSON progress."""
        return ndjson(await node.plugin_runs.run(name, body))

    return routes
