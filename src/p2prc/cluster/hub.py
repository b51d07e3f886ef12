"""The SSH hub of a Dask cluster: every Dask connection is an SSH channel through this node.

For each member (the scheduler, each worker) the hub keeps one SSH connection to its
container, with the container's pinned host key. Each port a member serves gets a local
listener ``127.0.0.1:V`` here (forwarded to the port inside its container) and, when it is
shared, a remote forward of the same number ``V`` in every member's container, so that
``tls://127.0.0.1:V`` names that member everywhere: on this host and in each container.
No Dask port is ever published, and a peer behind NAT is reached the way its container's
SSH already is (through its relay).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh

from .._aio import CrashHandler, TaskSet, log_crash
from .._closing import AsyncClosing
from ..containers.sftp import Route, login, ssh_errors
from ..errors import ClusterError
from ..models import ContainerView

__all__ = ["Hub", "Member", "OnLost"]

log = logging.getLogger(__name__)

# Told the member's name and why its connection (or its watched process) ended.
OnLost = Callable[[str, str], None]

_DIR = ".p2prc-dask"
# Runs detached in its own session: its pid first, then the member's process.
_RUN = f"""\
cd "$HOME/{_DIR}" || exit 1
echo $$ > pid.tmp && mv pid.tmp pid
export DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION=True
exec {{command}} >> log 2>&1 < /dev/null
"""
# Only setsid goes to the background: a backgrounded list would hold the channel open.
_START = f'cd "$HOME/{_DIR}" && : > log && {{ setsid sh run.sh > /dev/null 2>&1 < /dev/null & }}'
# Ends when the member's process does.
_WATCH = (
    f'cd "$HOME/{_DIR}" && while [ ! -s pid ]; do sleep 0.1; done; '
    'exec tail --pid="$(cat pid)" -f /dev/null'
)
_ALIVE = f'cd "$HOME/{_DIR}" && {{ [ ! -s pid ] || kill -0 "$(cat pid)"; }}'
_POLL = 0.25
_TAIL = 2000


@dataclass(eq=False)
class Member:
    """One member's connection and the local port of each of its inner ports."""

    name: str
    view: ContainerView
    conn: asyncssh.SSHClientConnection
    # Inner port -> the port V on this host (and, for shared ones, in every container).
    ports: dict[int, int] = field(default_factory=dict)
    shared: set[int] = field(default_factory=set)
    listeners: list[asyncssh.SSHListener] = field(default_factory=list)
    # Remote forwards in this member's container: the port V -> its listener.
    remote: dict[int, asyncssh.SSHListener] = field(default_factory=dict)
    leaving: bool = False

    def __repr__(self) -> str:
        return f"<Member {self.name} {self.view.id} ports={self.ports}>"

    def port(self, inner: int) -> int:
        """The port ``V`` this host reaches the member's ``inner`` port at."""
        return self.ports[inner]

    def shared_ports(self) -> list[int]:
        return [self.ports[inner] for inner in sorted(self.shared)]


class Hub(AsyncClosing):
    """The members of one cluster and the forwards between them."""

    def __init__(
        self,
        key_file: Path,
        on_lost: OnLost = lambda name, why: None,
        on_crash: CrashHandler = log_crash,
        route: Route | None = None,
    ) -> None:
        self._key_file = key_file
        self._route = route  # the peer's direct path when up (``sftp.login``)
        self._on_lost = on_lost
        self._members: dict[str, Member] = {}
        self._tasks = TaskSet(on_crash)
        # Held while a member's forwards are made: a member added meanwhile must see it.
        self._forwarding = asyncio.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"<Hub [{len(self._members)} members]>"

    def __contains__(self, name: str) -> bool:
        return name in self._members

    def member(self, name: str) -> Member:
        return self._members[name]

    async def add(
        self, name: str, view: ContainerView, shared: Sequence[int], local: Sequence[int] = ()
    ) -> Member:
        """Log in to ``view``'s container and forward its ports: each of ``shared`` here and
        in every member's container, each of ``local`` here only; the other members'
        shared ports are forwarded into the new container too."""
        if self._closed:
            raise ClusterError("the cluster is closed")
        if name in self._members:
            raise ValueError(f"member {name!r} is already in the hub")
        conn = await login(view, self._key_file, route=self._route)
        member = Member(name, view, conn, shared=set(shared))
        try:
            with ssh_errors(view, "forward the ports of"):
                for inner in [*shared, *local]:
                    listener = await conn.forward_local_port("127.0.0.1", 0, "127.0.0.1", inner)
                    member.listeners.append(listener)
                    member.ports[inner] = listener.get_port()
                async with self._forwarding:
                    others = list(self._members.values())
                    self._members[name] = member
                    for other in others:
                        for port in other.shared_ports():
                            await _forward_into(member, port)
                    for other in others:
                        for port in member.shared_ports():
                            await _forward_into(other, port)
        except BaseException:
            if name in self._members:
                await self.remove(name)
            else:
                await self._drop(member)
            raise
        self._tasks.spawn(self._watch(member), f"hub-watch-{name}")
        return member

    async def launch(
        self, name: str, files: dict[str, bytes], command: str, ready: str, limit: float
    ) -> None:
        """Put ``files`` in the member's ``~/.p2prc-dask`` (0600, the folder 0700), start
        ``command`` there detached, and wait until its log shows ``ready``; a
        ``ClusterError`` with the log's tail when it exits or ``limit`` seconds pass."""
        member = self._members[name]
        files = {**files, "run.sh": _RUN.format(command=command).encode()}
        with ssh_errors(member.view, "start Dask in"):
            async with member.conn.start_sftp_client() as sftp:
                await sftp.makedirs(_DIR, exist_ok=True)
                await sftp.chmod(_DIR, 0o700)
                for file_name, data in files.items():
                    path = f"{_DIR}/{file_name}"
                    attrs = asyncssh.SFTPAttrs(permissions=0o600)
                    async with sftp.open(path, "wb", attrs) as file:
                        await file.write(data)
                    await sftp.chmod(path, 0o600)
                result = await member.conn.run(_START, check=False, timeout=30)
                if result.exit_status != 0:
                    raise ClusterError(f"container {member.view.id}: {name} did not start")
                await _ready(member, sftp, ready, limit)

    def watch(self, name: str, command: str = _WATCH) -> None:
        """Run ``command`` on the member's connection (by default: until its launched
        process ends); its end counts as the member lost."""
        member = self._members[name]

        async def run() -> None:
            try:
                result = await member.conn.run(command, check=False)
            except (asyncssh.Error, OSError) as exc:
                why = f"its process cannot be watched: {exc}"
            except Exception as exc:
                # asyncssh raises AttributeError and the like for a channel opened on a
                # connection that closes under it: that is the member gone, not a bug.
                why = f"its connection ended while watched ({type(exc).__name__})"
            else:
                why = f"its process ended (exit status {result.exit_status})"
            if not self._closed and not member.leaving:
                self._lost(member, why)

        self._tasks.spawn(run(), f"hub-process-{name}")

    async def remove(self, name: str) -> None:
        """Close the member's listeners, its forwards in other containers and its connection."""
        member = self._members.pop(name, None)
        if member is None:
            return
        member.leaving = True
        for other in self._members.values():
            for port in member.shared_ports():
                listener = other.remote.pop(port, None)
                if listener is not None:
                    listener.close()
        await self._drop(member)

    async def aclose(self) -> None:
        """Close every listener and connection; no member is reported lost."""
        self._closed = True
        for member in self._members.values():
            member.leaving = True
        for name in list(self._members):
            await self.remove(name)
        await self._tasks.cancel_all()

    async def _watch(self, member: Member) -> None:
        await member.conn.wait_closed()
        if not member.leaving and not self._closed:
            self._lost(member, "its SSH connection was lost")

    def _lost(self, member: Member, why: str) -> None:
        if member.leaving:
            return
        member.leaving = True
        log.info("cluster member %s (container %s): %s", member.name, member.view.id, why)
        self._on_lost(member.name, why)

    async def _drop(self, member: Member) -> None:
        member.leaving = True
        for listener in [*member.listeners, *member.remote.values()]:
            listener.close()
        member.conn.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await member.conn.wait_closed()


async def _ready(member: Member, sftp: asyncssh.SFTPClient, mark: str, limit: float) -> None:
    text = ""
    try:
        async with asyncio.timeout(limit):
            while True:
                async with sftp.open(f"{_DIR}/log", "rb") as file:
                    data = await file.read()
                text = data.decode(errors="replace") if isinstance(data, bytes) else data
                if mark in text:
                    return
                alive = await member.conn.run(_ALIVE, check=False)
                if alive.exit_status != 0:
                    raise ClusterError(f"{member.name} exited while starting: {_tail(text)}")
                await asyncio.sleep(_POLL)
    except TimeoutError:
        raise ClusterError(
            f"{member.name} did not start within {limit:g} s: {_tail(text)}"
        ) from None


def _tail(text: str) -> str:
    lines = text[-_TAIL:].strip().splitlines()
    return " | ".join(lines[-8:]) or "(its log is empty)"


async def _forward_into(member: Member, port: int) -> None:
    """A remote forward of ``port`` in ``member``'s container to the same port here."""
    try:
        listener = await member.conn.forward_remote_port("127.0.0.1", port, "127.0.0.1", port)
    except asyncssh.ChannelListenError as exc:
        raise ClusterError(
            f"container {member.view.id} cannot listen on 127.0.0.1:{port}: {exc}"
        ) from None
    member.remote[port] = listener
