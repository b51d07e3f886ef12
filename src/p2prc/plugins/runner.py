"""Run a plugin's playbook with ansible-runner against tracked containers.

The inventory is built in memory from the containers' SSH addresses and the node's key
path (the key itself is never copied); ansible-runner's working directory is a private
temporary directory removed afterwards. Nothing is passed through a shell.
"""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import PluginError
from ..models import HostResult, PluginInfo, PluginRun, TrackedContainer

__all__ = ["host_name", "inventory", "run_playbook"]

EventCallback = Callable[[str, str, str], None]
_STATUS = {
    "runner_on_ok": "ok",
    "runner_on_failed": "failed",
    "runner_on_unreachable": "unreachable",
    "runner_on_skipped": "skipped",
}


def host_name(item: TrackedContainer) -> str:
    return f"c-{item.container.id}"


def inventory(items: list[TrackedContainer], key: Path, known_hosts: Path) -> dict[str, Any]:
    """An Ansible inventory for these containers, logging in with the node's key."""
    hosts: dict[str, Any] = {}
    for item in items:
        view = item.container
        ssh_options = [
            "-o", "IdentitiesOnly=yes",
            "-o", "StrictHostKeyChecking=accept-new",
            "-o", f"UserKnownHostsFile={known_hosts}",
            "-o", f"HostKeyAlias=p2prc-{view.id}",
        ]  # fmt: skip
        hosts[host_name(item)] = {
            "ansible_host": view.ssh.host,
            "ansible_port": view.ssh.port,
            "ansible_user": view.ssh.user,
            "ansible_ssh_private_key_file": str(key),
            "ansible_ssh_common_args": shlex.join(ssh_options),
            "ansible_python_interpreter": "/usr/bin/python3",
        }
    return {"all": {"hosts": hosts}}


def run_playbook(
    plugin: PluginInfo,
    items: list[TrackedContainer],
    variables: dict[str, str],
    *,
    key: Path,
    known_hosts: Path,
    run_id: str,
    target: str,
    on_event: EventCallback,
) -> PluginRun:
    """Run ``site.yml`` of ``plugin`` on every container; blocks (call it in a thread)."""
    try:
        import ansible_runner
    except ImportError:
        raise PluginError("ansible-runner is not installed (pip install ansible-runner)") from None
    started = time.time()
    output: list[str] = []

    def handle(event: dict[str, Any]) -> bool:
        if event.get("stdout"):
            output.append(str(event["stdout"]))
        status = _STATUS.get(str(event.get("event")))
        data = event.get("event_data") or {}
        if status is not None:
            on_event(str(data.get("host", "")), str(data.get("task", "")), status)
        return True

    # ansible-runner finds ansible-playbook on PATH only: put this interpreter's bin first.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    with tempfile.TemporaryDirectory(prefix="p2prc-ansible-") as private:
        runner = ansible_runner.run(
            private_data_dir=private,
            project_dir=plugin.path,
            playbook="site.yml",
            inventory=inventory(items, key, known_hosts),
            extravars=dict(variables),
            envvars={"PATH": path, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_RETRY_FILES_ENABLED": "0"},
            quiet=True,
            event_handler=handle,
            timeout=3600,
        )
        stats = runner.stats or {}
    hosts = {host_name(item): _host_result(stats, host_name(item)) for item in items}
    ok = runner.status == "successful" and all(
        r.failed == 0 and r.unreachable == 0 for r in hosts.values()
    )
    return PluginRun(
        id=run_id,
        plugin=plugin.name,
        target=target,
        started_at=started,
        finished_at=time.time(),
        ok=ok,
        hosts=hosts,
        output="\n".join(output)[-200_000:],
    )


def _host_result(stats: dict[str, Any], host: str) -> HostResult:
    def count(key: str) -> int:
        return int((stats.get(key) or {}).get(host, 0))

    return HostResult(
        ok=count("ok"),
        changed=count("changed"),
        failed=count("failures"),
        unreachable=count("dark"),
        skipped=count("skipped"),
    )
