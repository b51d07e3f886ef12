"""Run a plugin's playbook with ansible-runner against tracked containers and attached hosts.

The inventory is built from the containers' SSH addresses and the node's key path (the
key itself is never copied); ansible-runner's working directory is a private temporary
directory removed afterwards. Nothing is passed through a shell. An attached host is the
inventory host ``a-<name>``, reached the way ``p2prc ssh`` reaches it: ``ssh`` options from
``attach.proxy.ssh_options`` (ProxyCommand through p2prc and a gateway, the signed record's
host key pinned under its alias, StrictHostKeyChecking=yes, the node's key only).

Every inventory value came from a peer or may contain what one chose, and Ansible
templates inventory strings on this machine: the inventory is written as YAML with each
string tagged ``!unsafe`` (never templated), and values holding template syntax are
refused outright.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..attach import proxy
from ..attach.models import AttachedHost
from ..containers import hostkeys
from ..errors import PluginError
from ..models import HostResult, PluginInfo, PluginRun, TrackedContainer

__all__ = ["attached_host_name", "host_name", "inventory", "inventory_yaml", "run_playbook"]

EventCallback = Callable[[str, str, str], None]
_TEMPLATE_MARKS = ("{", "%", "#")
_STATUS = {
    "runner_on_ok": "ok",
    "runner_on_failed": "failed",
    "runner_on_unreachable": "unreachable",
    "runner_on_skipped": "skipped",
}


def host_name(item: TrackedContainer) -> str:
    return f"c-{item.container.id}"


def attached_host_name(host: AttachedHost) -> str:
    return f"a-{host.name}"


def inventory(
    items: list[TrackedContainer],
    key: Path,
    known_hosts: Path,
    attached: list[AttachedHost] | None = None,
    home: Path | None = None,
) -> dict[str, Any]:
    """An Ansible inventory for these containers and attached hosts (``home``: the node's
    home directory, whose key, known_hosts and ``p2prc ssh --proxy`` reach them)."""
    hosts: dict[str, Any] = {}
    for item in items:
        view = item.container
        checking = "yes" if view.ssh.host_key else "accept-new"
        ssh_options = [
            "-o", "IdentitiesOnly=yes",
            "-o", f"StrictHostKeyChecking={checking}",
            "-o", f"UserKnownHostsFile={known_hosts}",
            "-o", f"HostKeyAlias={hostkeys.alias(view.id)}",
        ]  # fmt: skip
        host = {
            "ansible_host": view.ssh.host,
            "ansible_port": view.ssh.port,
            "ansible_user": view.ssh.user,
            "ansible_ssh_private_key_file": str(key),
            "ansible_ssh_common_args": shlex.join(ssh_options),
            "ansible_python_interpreter": "/usr/bin/python3",
        }
        _refuse_templates(host_name(item), host)
        hosts[host_name(item)] = host
    if attached and home is None:
        raise PluginError("attached hosts need the node's home for their ssh options")
    for target in attached or []:
        assert home is not None
        entry: dict[str, Any] = {"ansible_host": target.name, "ansible_port": target.ssh_port}
        if target.user:
            entry["ansible_user"] = target.user
        entry["ansible_ssh_common_args"] = shlex.join(proxy.ssh_options(home, target))
        entry["ansible_python_interpreter"] = "auto_silent"
        _refuse_templates(attached_host_name(target), entry)
        hosts[attached_host_name(target)] = entry
    return {"all": {"hosts": hosts}}


def inventory_yaml(hosts: dict[str, Any]) -> str:
    """``inventory``'s answer as YAML, every string value tagged ``!unsafe``."""
    lines = ["all:", "  hosts:"]
    for name, variables in hosts["all"]["hosts"].items():
        lines.append(f"    {json.dumps(name)}:")
        for variable, value in variables.items():
            # A JSON string is a YAML double-quoted scalar; ints cannot hold templates.
            tag = "" if isinstance(value, int) else "!unsafe "
            lines.append(f"      {json.dumps(variable)}: {tag}{json.dumps(value)}")
    return "\n".join(lines) + "\n"


def _refuse_templates(name: str, host: dict[str, Any]) -> None:
    for variable, value in [("host", name), *host.items()]:
        if isinstance(value, str) and any(mark in value for mark in _TEMPLATE_MARKS):
            raise PluginError(
                f"{name}: {variable} {value!r} holds template syntax ({{, % or #); refused"
            )


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
    attached: list[AttachedHost] | None = None,
    home: Path | None = None,
) -> PluginRun:
    """Run ``site.yml`` of ``plugin`` on every container and attached host; blocks (call it
    in a thread)."""
    try:
        import ansible_runner
    except ImportError:
        raise PluginError("ansible-runner is not installed (pip install ansible-runner)") from None
    hosts = inventory(items, key, known_hosts, attached, home)
    for item in items:
        if item.container.ssh.host_key:
            hostkeys.pin(
                known_hosts, hostkeys.alias(item.container.id), item.container.ssh.host_key
            )
    for host in attached or []:
        assert home is not None
        proxy.pin_host_key(home, host)
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
        hosts_file = Path(private) / "inventory" / "hosts.yml"
        hosts_file.parent.mkdir(mode=0o700)
        hosts_file.write_text(inventory_yaml(hosts))
        runner = ansible_runner.run(
            private_data_dir=private,
            project_dir=plugin.path,
            playbook="site.yml",
            inventory=str(hosts_file),
            extravars=dict(variables),
            envvars={
                "PATH": path,
                "ANSIBLE_NOCOLOR": "1",
                "ANSIBLE_RETRY_FILES_ENABLED": "0",
                # ssh's shared connections of this run only: another run (another node
                # of the same user, another key) never rides on one that logged in here.
                "ANSIBLE_SSH_CONTROL_PATH_DIR": str(Path(private) / "cp"),
            },
            quiet=True,
            event_handler=handle,
            timeout=3600,
        )
        stats = runner.stats or {}
    names = [host_name(item) for item in items]
    names += [attached_host_name(host) for host in attached or []]
    results = {name: _host_result(stats, name) for name in names}
    ok = runner.status == "successful" and all(
        r.failed == 0 and r.unreachable == 0 for r in results.values()
    )
    return PluginRun(
        id=run_id,
        plugin=plugin.name,
        target=target,
        started_at=started,
        finished_at=time.time(),
        ok=ok,
        hosts=results,
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
