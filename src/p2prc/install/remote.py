"""``p2prc install-node user@host``: set up a p2prc node on a machine given only SSH.

Order (nothing is written there until every check passed): the local node must run (it
makes the invite); the SSH host key is checked (the user's ``~/.ssh/known_hosts`` when it
knows the host, else the home's, else pinned there on first contact; a changed key is
refused); ``python3 --version`` and a fixed probe script tell the Python, venv, disk and
platform; the wheels that fit are planned (``wheels.plan_wheels``); then the wheels go over
SFTP, a venv is made, pip installs offline, ``p2prc init`` and ``config set`` run, the node
starts (user systemd, else ``supervise``), joins this node with a one-use invite, and
stops again unless ``start``. Every remote command is a fixed text with ``shlex.quote``d
paths and values that were checked here first; every step has a time bound. A failure
after the directory was made removes what this run made (a reinstall keeps the node's home).
"""

from __future__ import annotations

import asyncio
import getpass
import hashlib
import ipaddress
import json
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
import platformdirs
from pydantic import BaseModel

from .._client_async import AsyncClient
from ..config import Home
from ..containers import hostkeys
from ..errors import InstallFailed, InvalidRequest
from ..peers.invites import TrustAPI
from .probe import MIN_PYTHON, PROBE, Probe, parse_probe, parse_version
from .wheels import WheelPlan, plan_wheels, target_of

__all__ = ["InstallRequest", "InstalledNode", "install_node", "parse_destination", "stop_node"]

Say = Callable[[str], None]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_USER = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._-]{0,31}$")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?$")
_DIR = re.compile(r"^[A-Za-z0-9._/~+-]{1,200}$")
_PYTHON = re.compile(r"^[A-Za-z0-9._/+-]{1,200}$")
_CONNECT = 15.0
_QUICK = 30.0
_VENV = 180.0
_PIP = 600.0
_UP = 60.0
_MIN_FREE = 400 * 1024 * 1024
_INVITE_TTL = 300.0
_TOTAL = 1800.0  # the whole install, whatever each step's own bound
_JOIN = (
    "import sys; from p2prc.cli import main; "
    "main(['--home', sys.argv[1], '--json', 'join', sys.stdin.readline().strip()])"
)
_UNIT_SAFE = re.compile(r"^/[A-Za-z0-9._/+-]{1,300}$")


@dataclass
class InstallRequest:
    destination: str
    ssh_port: int = 22
    identity_file: Path | None = None
    directory: str = "~/.p2prc-node"
    port: int | None = None
    name: str | None = None
    listen: str | None = None
    start: bool = False
    python: str = "python3"
    wheel_dirs: list[Path] = field(default_factory=list)


class InstalledNode(BaseModel):
    name: str
    node_id: str
    api: str
    host: str
    directory: str
    service: str  # "systemd", "supervised" or "stopped"
    pid: int | None = None
    joined: str = ""
    host_key: str = ""


def parse_destination(text: str) -> tuple[str, str]:
    """``(user, host)`` from ``user@host`` or ``host``; every part checked."""
    user, sep, host = text.rpartition("@")
    if not sep:
        user = getpass.getuser()
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not _USER.match(user):
        raise InvalidRequest(f"{user!r} is not a user name")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _DNS.match(host):
            raise InvalidRequest(f"{host!r} is not an IP address or a host name") from None
    return user, host


def _checked(request: InstallRequest) -> tuple[str, str]:
    user, host = parse_destination(request.destination)
    if not 1 <= request.ssh_port <= 65535:
        raise InvalidRequest("--ssh-port takes 1-65535")
    if request.port is not None and not 1 <= request.port <= 65535:
        raise InvalidRequest("--port takes 1-65535")
    if request.name is not None and not _NAME.match(request.name):
        raise InvalidRequest("--name: 1-63 letters, digits, '.', '_' or '-'")
    if not _DIR.match(request.directory) or ".." in request.directory.split("/"):
        raise InvalidRequest("--dir: a path of letters, digits and . _ / ~ + - (no '..')")
    if not _PYTHON.match(request.python) or request.python.startswith("-"):
        raise InvalidRequest("--python: a command name or path")
    if request.listen is not None:
        try:
            ipaddress.ip_address(request.listen)
        except ValueError:
            raise InvalidRequest("--listen takes an IP address") from None
    return user, host


def _known(path: Path, host: str, port: int) -> list[asyncssh.SSHKey]:
    try:
        known = asyncssh.read_known_hosts(str(path))
    except (OSError, ValueError):
        return []
    return list(known.match(host, host, port)[0])


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value if isinstance(value, str) else ""


def _known_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


async def _host_keys(
    home: Home, host: str, port: int, say: Say
) -> tuple[list[asyncssh.SSHKey], str]:
    """The keys the host must show: those this user's or this home's known_hosts holds for
    it (any algorithm), else the one it shows now, pinned in the home's (first contact)."""
    mine = Path.home() / ".ssh" / "known_hosts"
    for where, path in (
        ("your ~/.ssh/known_hosts", mine),
        ("this node's known_hosts", home.known_hosts),
    ):
        keys = _known(path, host, port)
        if keys:
            return keys, where
    try:
        key = await asyncio.wait_for(asyncssh.get_server_host_key(host, port), _CONNECT)
    except (OSError, asyncssh.Error, TimeoutError) as exc:
        raise InstallFailed(f"cannot reach SSH at {host} port {port}: {_reason(exc)}") from None
    if key is None:
        raise InstallFailed(f"{host} port {port} sent no SSH host key")
    line = key.export_public_key("openssh").decode().split()
    hostkeys.pin(home.known_hosts, _known_name(host, port), f"{line[0]} {line[1]}")
    say(f"first contact with {host}: host key {key.get_fingerprint()} pinned")
    return [key], "this node's known_hosts"


def _changed(
    host: str, port: int, where: str, shown: asyncssh.SSHKey | None = None
) -> InstallFailed:
    now = f"; it shows {shown.get_fingerprint()}" if shown is not None else ""
    return InstallFailed(
        f"the SSH host key of {host} port {port} changed ({where} holds another{now}); refused"
    )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {_CONNECT:.0f} s"
    return str(exc) or type(exc).__name__


async def _connect(
    request: InstallRequest, user: str, host: str, keys: list[asyncssh.SSHKey], where: str
) -> asyncssh.SSHClientConnection:
    options: dict[str, Any] = {}
    if request.identity_file is not None:
        options = {"client_keys": [str(request.identity_file)], "agent_path": None}
    try:
        return await asyncio.wait_for(
            asyncssh.connect(
                host, request.ssh_port, username=user, known_hosts=(keys, [], []),
                connect_timeout=_CONNECT, login_timeout=_CONNECT, **options,
            ),
            2 * _CONNECT,
        )  # fmt: skip
    except asyncssh.PermissionDenied:
        hint = "check -i KEY" if request.identity_file else "give -i KEY or load it into ssh-agent"
        raise InstallFailed(f"{user}@{host} refused the login: {hint}") from None
    except asyncssh.HostKeyNotVerifiable:
        raise _changed(host, request.ssh_port, where) from None
    except (OSError, asyncssh.Error) as exc:
        # The known keys' algorithms only were offered: a host that has none of them
        # closes or resets the connection. Its key of any algorithm tells whether it changed.
        if isinstance(exc, TimeoutError):
            raise InstallFailed(f"cannot log in to {user}@{host}: {_reason(exc)}") from None
        try:
            shown = await asyncio.wait_for(
                asyncssh.get_server_host_key(host, request.ssh_port), _CONNECT
            )
        except (OSError, asyncssh.Error, TimeoutError):
            shown = None
        if shown is not None and all(k.public_data != shown.public_data for k in keys):
            raise _changed(host, request.ssh_port, where, shown) from None
        raise InstallFailed(f"cannot log in to {user}@{host}: {_reason(exc)}") from None
    except ValueError as exc:  # a key file that does not parse
        raise InstallFailed(f"-i {request.identity_file}: {exc}") from None


class _Remote:
    """Fixed commands on one connection, each with a time bound."""

    def __init__(self, conn: asyncssh.SSHClientConnection, host: str) -> None:
        self.conn = conn
        self.host = host

    async def run(
        self, command: str, *, limit: float = _QUICK, input: str | None = None
    ) -> asyncssh.SSHCompletedProcess:
        try:
            return await asyncio.wait_for(self.conn.run(command, input=input, check=False), limit)
        except TimeoutError:
            raise InstallFailed(
                f"{self.host}: a step did not finish within {limit:.0f} s"
            ) from None
        except (OSError, asyncssh.Error) as exc:
            raise InstallFailed(f"{self.host}: the connection failed: {_reason(exc)}") from None

    async def check(
        self, command: str, what: str, *, limit: float = _QUICK, input: str | None = None
    ) -> str:
        result = await self.run(command, limit=limit, input=input)
        if result.exit_status != 0:
            tail = _text(result.stderr or result.stdout)[-2000:].strip()
            raise InstallFailed(f"{self.host}: {what} failed (exit {result.exit_status}): {tail}")
        return _text(result.stdout)


def _refusal(host: str, user: str, port: int, missing: list[str]) -> InstallFailed:
    name = re.sub(r"[^A-Za-z0-9-]", "-", host.split(".")[0] if not host[0].isdigit() else host)
    attach = f"p2prc attach {name.strip('-')[:40] or 'host'} --host {host}"
    attach += f" --ssh-port {port}" if port != 22 else ""
    attach += f" --user {user}"
    return InstallFailed(
        f"{host} cannot run a p2prc node: {'; '.join(missing)}. "
        f"Reach it through a node on its LAN instead: {attach}"
    )


async def _probe(remote: _Remote, request: InstallRequest, user: str) -> Probe:
    python = shlex.quote(request.python)
    host, port = remote.host, request.ssh_port
    found = await remote.run(f"{python} --version")
    version = parse_version(f"{_text(found.stdout)} {_text(found.stderr)}")
    if found.exit_status != 0 or version is None:
        raise _refusal(host, user, port, [f"no Python ({request.python} does not run)"])
    if version < MIN_PYTHON:
        shown = f"{version[0]}.{version[1]}"
        raise _refusal(host, user, port, [f"Python {shown} ({request.python}); p2prc needs 3.11+"])
    answer = await remote.run(f"{python} -I - {shlex.quote(request.directory)}", input=PROBE)
    try:
        probe = parse_probe(_text(answer.stdout))
    except ValueError as exc:
        raise _refusal(
            host, user, port, [f"{request.python} did not run the probe ({exc})"]
        ) from None
    return probe


def _plan(probe: Probe, request: InstallRequest, host: str, user: str) -> WheelPlan:
    try:
        target = target_of(probe.raw)
    except ValueError as exc:
        raise InstallFailed(f"{host}: {exc}") from None
    cache = Path(platformdirs.user_cache_dir("p2prc")) / "wheels"
    plan = plan_wheels(target, cache, request.wheel_dirs)
    missing = []
    if not probe.venv:  # reported with everything else that is missing, all at once
        why = probe.venv_why
        missing.append(f"Python's venv/ensurepip ({why}; on Debian: apt install python3-venv)")
    missing += plan.missing
    need = max(_MIN_FREE, 6 * plan.size)
    if probe.free < need:
        missing.append(
            f"disk: {probe.free // 2**20} MiB free for {probe.directory}, needs {need // 2**20} MiB"
        )
    if missing:
        if plan.missing:
            platform = target.platforms()[:1] or ["manylinux_2_17_" + target.machine]
            missing.append(
                f"for {target.describe()}: pip download --only-binary=:all: --no-deps "
                f"--python-version {target.version[0]}.{target.version[1]} "
                f"--platform {platform[0]} NAME==VERSION -d DIR, then --wheels DIR"
            )
        raise _refusal(host, user, request.ssh_port, missing)
    return plan


def _unit_name(directory: str) -> str:
    return f"p2prc-node-{hashlib.sha256(directory.encode()).hexdigest()[:8]}.service"


async def install_node(request: InstallRequest, home: Home, say: Say) -> InstalledNode:
    """Install, configure, join and (with ``start``) keep running a node over SSH."""
    user, host = _checked(request)
    async with AsyncClient(home=home) as local:
        await local.status()  # NodeNotRunning before anything is touched there
        keys, where = await _host_keys(home, host, request.ssh_port, say)
        conn = await _connect(request, user, host, keys, where)
        async with conn:
            shown = conn.get_server_host_key()
            remote = _Remote(conn, host)
            probe = await _probe(remote, request, user)
            say(f"{host}: Python {probe.raw.get('version')} on {probe.raw.get('machine')}, "
                f"{probe.free // 2**20} MiB free")  # fmt: skip
            plan = await asyncio.to_thread(_plan, probe, request, host, user)
            try:
                async with asyncio.timeout(_TOTAL):
                    result = await _install(remote, local, request, probe, plan, say)
            except BaseException as exc:
                if not probe.exists:
                    await _remove(conn, probe.directory)
                if isinstance(exc, asyncssh.ChannelOpenError):
                    raise InstallFailed(f"{host}: no SFTP there ({exc.reason})") from None
                if isinstance(exc, TimeoutError):
                    raise InstallFailed(f"{host}: not done within {_TOTAL:.0f} s") from None
                if isinstance(exc, (OSError, asyncssh.Error)):
                    raise InstallFailed(f"{host}: {_reason(exc)}") from None
                raise
    result.host_key = "" if shown is None else shown.get_fingerprint()
    return result


async def _remove(conn: asyncssh.SSHClientConnection, directory: str) -> None:
    try:
        async with asyncio.timeout(_QUICK):
            await conn.run(
                f"{shlex.quote(directory)}/venv/bin/python -m p2prc.install.supervise stop "
                f"{shlex.quote(directory + '/home')}",
                check=False,
            )
            async with conn.start_sftp_client() as sftp:
                if await sftp.exists(directory):
                    await sftp.rmtree(directory)
    except (OSError, asyncssh.Error, TimeoutError):
        pass  # best effort; the caller's error says what failed


async def _install(
    remote: _Remote,
    local: AsyncClient,
    request: InstallRequest,
    probe: Probe,
    plan: WheelPlan,
    say: Say,
) -> InstalledNode:
    q = shlex.quote
    base = probe.directory
    venv, node_home, wheels = f"{base}/venv", f"{base}/home", f"{base}/wheels"
    python = f"{q(venv)}/bin/python"
    cli = f"{python} -m p2prc --home {q(node_home)} --json"
    if probe.installed:
        say(f"{remote.host}: stopping the node installed in {base} (its home is kept)")
        await _stop(remote, probe, base)
    async with remote.conn.start_sftp_client() as sftp:
        await sftp.makedirs(wheels, exist_ok=True)
        if await sftp.exists(venv):
            await sftp.rmtree(venv)
        say(f"{remote.host}: copying {len(plan.wheels)} wheels ({plan.size // 2**20} MiB)")
        await asyncio.wait_for(sftp.put([str(w.path) for w in plan.wheels], wheels), _PIP)
        async with sftp.open(f"{wheels}/requirements.txt", "w") as file:
            await file.write("".join(f"{pin}\n" for pin in plan.pins))
    say(f"{remote.host}: python -m venv, pip install (offline)")
    await remote.check(f"{q(request.python)} -m venv {q(venv)}", "python -m venv", limit=_VENV)
    await remote.check(
        f"{python} -m pip install --no-index --disable-pip-version-check --no-input -q "
        f"--find-links {q(wheels)} -r {q(wheels + '/requirements.txt')}",
        "pip install",
        limit=_PIP,
    )
    async with remote.conn.start_sftp_client() as sftp:
        await sftp.rmtree(wheels)
    await remote.check(f"{cli} init", "p2prc init")
    for key, value in (("name", request.name), ("port", request.port), ("host", request.listen)):
        if value is not None:
            await remote.check(f"{cli} config set {key} {q(str(value))}", f"config set {key}")
    service = await _start(remote, probe, base, python, say)
    try:
        status = await _wait_up(remote, cli)
        invitation = await TrustAPI(local).invite(_INVITE_TTL, 1)
        # The token goes on stdin, never on a command line another user there could read.
        join = f"{python} -I -c {q(_JOIN)} {q(node_home)}"
        answer = await remote.check(join, "p2prc join", input=invitation.token + "\n")
        joined = json.loads(answer.splitlines()[-1])
    finally:
        if not request.start:
            await _stop(remote, probe, base)
            service = "stopped"
    pid = None
    if service == "supervised":
        pid = json.loads(await remote.check(
            f"{python} -m p2prc.install.supervise status {q(node_home)}", "supervise status"
        )).get("pid")  # fmt: skip
    return InstalledNode(
        name=str(status.get("name", "")),
        node_id=str(status.get("node_id", "")),
        api=str(status.get("api", "")),
        host=remote.host,
        directory=base,
        service=service,
        pid=pid if isinstance(pid, int) else None,
        joined=str(joined.get("name", "")),
    )


async def _start(remote: _Remote, probe: Probe, base: str, python: str, say: Say) -> str:
    q = shlex.quote
    node_home = f"{base}/home"
    if probe.systemd:
        if not _UNIT_SAFE.match(base):
            raise InstallFailed(
                f"{remote.host}: {base!r} has characters a systemd unit line cannot hold; "
                "give another --dir"
            )
        unit = _unit_name(base)
        text = (
            f"[Unit]\nDescription=p2prc node ({base})\nAfter=network-online.target\n\n"
            f"[Service]\nExecStart={base}/venv/bin/python -m p2prc --home {node_home} start\n"
            "Restart=always\nRestartSec=5\n\n[Install]\nWantedBy=default.target\n"
        )
        units = f"{probe.home}/.config/systemd/user"
        async with remote.conn.start_sftp_client() as sftp:
            await sftp.makedirs(units, exist_ok=True)
            async with sftp.open(f"{units}/{unit}", "w") as file:
                await file.write(text)
        await remote.check("systemctl --user daemon-reload", "systemctl --user daemon-reload")
        await remote.check(f"systemctl --user enable --now {q(unit)}", "systemctl --user enable")
        linger = await remote.run("loginctl enable-linger")
        if linger.exit_status != 0:
            say(f"{remote.host}: loginctl enable-linger was refused: the node stops at logout")
        say(f"{remote.host}: started under systemd --user as {unit}")
        return "systemd"
    await remote.check(
        f"{python} -m p2prc.install.supervise start {q(node_home)}", "starting the supervisor"
    )
    say(
        f"{remote.host}: no user systemd: started under a supervisor "
        f"(its pid in {node_home}/supervisor.pid)"
    )
    return "supervised"


async def _stop(remote: _Remote, probe: Probe, base: str) -> None:
    q = shlex.quote
    unit = _unit_name(base)
    if probe.systemd:
        await remote.run(f"systemctl --user disable --now {q(unit)}")
    await remote.run(
        f"{q(base)}/venv/bin/python -m p2prc.install.supervise stop {q(base + '/home')}"
    )


async def _wait_up(remote: _Remote, cli: str) -> dict[str, Any]:
    """The node's status once its API answers (at most ``_UP`` seconds)."""
    deadline = asyncio.get_running_loop().time() + _UP
    while True:
        result = await remote.run(f"{cli} status")
        if result.exit_status == 0:
            try:
                data = json.loads(_text(result.stdout).splitlines()[0])
            except (ValueError, IndexError):
                data = None
            if isinstance(data, dict):
                return data
        if asyncio.get_running_loop().time() > deadline:
            tail = _text(result.stderr)[-1000:].strip()
            raise InstallFailed(
                f"{remote.host}: the node did not come up within {_UP:.0f} s: {tail}"
            )
        await asyncio.sleep(1.0)


async def stop_node(request: InstallRequest, home: Home, say: Say) -> dict[str, Any]:
    """Stop the node ``install-node`` started there (systemd unit and/or supervisor)."""
    user, host = _checked(request)
    keys, where = await _host_keys(home, host, request.ssh_port, say)
    conn = await _connect(request, user, host, keys, where)
    async with conn:
        remote = _Remote(conn, host)
        probe = await _probe(remote, request, user)
        if not probe.installed:
            raise InstallFailed(f"{host}: no node installed in {probe.directory}")
        await _stop(remote, probe, probe.directory)
    return {"host": host, "directory": probe.directory, "stopped": True}
