"""One rank's container over SSH (asyncssh): upload, start detached, follow, download.

The rank runs detached from the SSH connection (``setsid``), writing its output to
``~/.p2prc-job/log`` and its exit status to ``~/.p2prc-job/exit``, so a dropped connection
or a restarted submitting node only has to reattach: follow the log from the offset it
had kept, then read the exit status. The host key is the one the peer's signed answer
named; an unknown or different key is refused, never learnt.
"""

from __future__ import annotations

import contextlib
import logging
import posixpath
import shlex
import stat
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Self

import asyncssh

from .._closing import AsyncClosing
from ..containers.sftp import BLOCK as _BLOCK
from ..containers.sftp import REQUESTS as _REQUESTS
from ..containers.sftp import Route, login
from ..containers.sftp import ssh_errors as _ssh_errors
from ..errors import InvalidRequest, JobError, PeerUnreachable
from ..models import ContainerView
from .task import Command, Task

__all__ = ["RankSession", "ResultBudget", "job_script"]

log = logging.getLogger(__name__)

WORK = "work"
_JOB = ".p2prc-job"
# A line longer than this is cut into pieces: a rank without newlines cannot fill memory.
MAX_LINE = 64 * 1024
_MAX_DEPTH = 64

OnLine = Callable[[str, int], Awaitable[None]]
OnProgress = Callable[[int], None]


def _command(command: Command) -> str:
    """The user's own command, as one shell word list (a string runs with ``sh -c``)."""
    if isinstance(command, str):
        return f"sh -c {shlex.quote(command)}"
    return shlex.join(command)


def job_script(task: Task, env: Mapping[str, str]) -> str:
    """The rank's script: every value quoted, the commands the user's own."""
    lines = ['cd "$HOME/work" || exit 97']
    for name, value in {**task.env, **env}.items():
        lines.append(f"export {name}={shlex.quote(value)}")
    if task.setup is not None:
        lines.append(f"{_command(task.setup)} || exit $?")
    lines.append(f"exec {_command(task.run)}")
    return "\n".join(lines) + "\n"


# Runs detached: records its pid (its own session, so a kill reaches every child), then
# the rank's exit status, written whole by a rename, and an "oom" file when the kernel's
# OOM killer struck inside the container meanwhile (cgroup v2 memory.events, else v1).
_WRAPPER = f"""\
cd "$HOME/{_JOB}" || exit 1
echo $$ > pid.tmp && mv pid.tmp pid
ooms() {{
    cat /sys/fs/cgroup/memory.events /sys/fs/cgroup/memory/memory.oom_control 2>/dev/null |
        sed -n 's/^oom_kill //p' | head -n 1
}}
before=$(ooms)
sh run.sh >> log 2>&1 < /dev/null
code=$?
[ "$(ooms)" = "$before" ] || : > oom
echo $code > exit.tmp && mv exit.tmp exit
"""

# Only setsid goes to the background: a backgrounded list would hold the channel open.
_START = f'cd "$HOME/{_JOB}" && : > log && {{ setsid sh wrap.sh > /dev/null 2>&1 < /dev/null & }}'


def _follow(offset: int) -> str:
    # tail exits once the rank's process ends, after printing what is left.
    return (
        f'cd "$HOME/{_JOB}" && while [ ! -s pid ]; do sleep 0.1; done; '
        f'exec tail -s 0.2 -c +{int(offset) + 1} --pid="$(cat pid)" -F log 2>/dev/null'
    )


class ResultBudget:
    """The bytes a job's results may still take on the submitting node (all ranks)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.left = limit

    def take(self, size: int, where: str) -> None:
        """Count ``size`` more bytes of ``where``; a ``JobError`` past the limit."""
        if size > self.left:
            self.left = 0
            raise JobError(
                f"the results passed the limit of {self.limit / 1024**3:g} GiB at {where}; "
                "the rest is not brought back"
            )
        self.left -= size


class RankSession(AsyncClosing):
    """An SSH connection to one rank's container, as the container's user."""

    def __init__(
        self,
        view: ContainerView,
        key_file: Path,
        *,
        timeout: float = 30.0,
        route: Route | None = None,
    ) -> None:
        if not view.ssh.host_key:
            raise PeerUnreachable(
                f"container {view.id} came without an SSH host key; refusing to log in blind"
            )
        self.view = view
        self._key_file = key_file
        self._timeout = timeout
        self._route = route  # the peer's direct path when up (``sftp.login``)
        self._conn: asyncssh.SSHClientConnection | None = None
        self._sftp: asyncssh.SFTPClient | None = None

    def __repr__(self) -> str:
        return f"<RankSession {self.view.ssh.user}@{self.view.ssh.host}:{self.view.ssh.port}>"

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def connect(self) -> None:
        self._conn = await login(self.view, self._key_file, route=self._route)
        try:
            self._sftp = await self._conn.start_sftp_client()
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            await self.aclose()
            raise PeerUnreachable(f"cannot log in to container {self.view.id}: {exc}") from None

    async def aclose(self) -> None:
        if self._sftp is not None:
            self._sftp.exit()
            self._sftp = None
        if self._conn is not None:
            self._conn.close()
            with contextlib.suppress(Exception):
                await self._conn.wait_closed()
            self._conn = None

    @property
    def _connection(self) -> asyncssh.SSHClientConnection:
        if self._conn is None:
            raise RuntimeError("The session is not connected.")
        return self._conn

    @property
    def sftp(self) -> asyncssh.SFTPClient:
        if self._sftp is None:
            raise RuntimeError("The session is not connected.")
        return self._sftp

    async def upload(self, workdir: str | None, progress: OnProgress | None = None) -> None:
        """The work directory, streamed file by file into ``~/work`` (links copied as links)."""
        with _ssh_errors(self.view, "upload"):
            if await self.sftp.exists(WORK):
                raise InvalidRequest(f"container {self.view.id} already has a ~/{WORK}")
            if workdir is None:
                await self.sftp.mkdir(WORK)
                return

            done: dict[bytes, int] = {}

            def handler(src: bytes, _dst: bytes, copied: int, _total: int) -> None:
                if progress is not None:
                    progress(copied - done.get(src, 0))
                    done[src] = copied

            await self.sftp.put(
                workdir,
                WORK,
                recurse=True,
                follow_symlinks=False,
                progress_handler=handler,
                block_size=_BLOCK,
                max_requests=_REQUESTS,
            )

    async def start(self, script: str) -> None:
        """Write the rank's script and start it detached."""
        with _ssh_errors(self.view, "start"):
            await self.sftp.makedirs(_JOB, exist_ok=True)
            for name, text in (("run.sh", script), ("wrap.sh", _WRAPPER)):
                async with self.sftp.open(f"{_JOB}/{name}", "w") as file:
                    await file.write(text)
            result = await self._connection.run(_START, check=False, timeout=self._timeout)
            if result.exit_status != 0:
                raise PeerUnreachable(f"container {self.view.id}: the job did not start")

    async def follow(self, offset: int, on_line: OnLine) -> int:
        """Call ``on_line(line, offset_after)`` for each log line until the rank ends."""
        with _ssh_errors(self.view, "follow the log of"):
            process = await self._connection.create_process(_follow(offset), encoding=None)
            pending = b""
            while chunk := await process.stdout.read(65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for raw in lines:
                    offset += len(raw) + 1
                    await on_line(raw.decode(errors="replace"), offset)
                while len(pending) >= MAX_LINE:
                    piece, pending = pending[:MAX_LINE], pending[MAX_LINE:]
                    offset += len(piece)
                    await on_line(piece.decode(errors="replace"), offset)
            if pending:
                offset += len(pending)
                await on_line(pending.decode(errors="replace"), offset)
            await process.wait()
        return offset

    async def exit_code(self) -> tuple[int | None, bool]:
        """The rank's exit status (None when it ended without one), and whether the OOM
        killer struck in its container while it ran."""
        with _ssh_errors(self.view, "read the exit status of"):
            oom = await self.sftp.exists(f"{_JOB}/oom")
            try:
                async with self.sftp.open(f"{_JOB}/exit", "r") as file:
                    text = str(await file.read(32))
            except asyncssh.SFTPNoSuchFile:
                return None, oom
        try:
            return int(text.strip()), oom
        except ValueError:
            return None, oom

    async def kill(self) -> None:
        """Stop the rank's processes (its whole session)."""
        command = f'cd "$HOME/{_JOB}" && [ -s pid ] && kill -KILL -- "-$(cat pid)"'
        with contextlib.suppress(asyncssh.Error, OSError, TimeoutError):
            await self._connection.run(command, check=False, timeout=self._timeout)

    async def download(
        self, outputs: list[str], target: Path, note: Callable[[str], None], budget: ResultBudget
    ) -> int:
        """Bring back each output under ``target``; links are refused, never followed.

        Every byte counts against ``budget``: past it, a ``JobError`` (the file cut off
        is removed, those before it kept)."""
        count = 0
        with _ssh_errors(self.view, "download from"):
            for output in outputs:
                remote = posixpath.join(WORK, output)
                count += await self._fetch(remote, target / output, note, budget, 0)
        return count

    async def _fetch(
        self,
        remote: str,
        local: Path,
        note: Callable[[str], None],
        budget: ResultBudget,
        depth: int,
    ) -> int:
        where = remote.removeprefix(f"{WORK}/")
        if depth > _MAX_DEPTH:
            note(f"output {where} is nested more than {_MAX_DEPTH} deep; skipped")
            return 0
        try:
            attrs = await self.sftp.lstat(remote)
        except asyncssh.SFTPNoSuchFile:
            note(f"output {where} does not exist")
            return 0
        mode = attrs.permissions or 0
        if stat.S_ISLNK(mode):
            note(f"output {where} is a symbolic link; not followed")
            return 0
        if stat.S_ISREG(mode):
            if not _claim(local):
                note(f"output {where} came from another rank too; kept the first")
                return 0
            await self._get(remote, local, budget, where, attrs.size or 0)
            return 1
        if not stat.S_ISDIR(mode):
            note(f"output {where} is not a file or directory; skipped")
            return 0
        if not _make_dir(local):
            note(f"output {where} is a directory here and a file from another rank; skipped")
            return 0
        count = 0
        for entry in await self.sftp.readdir(remote):
            name = str(entry.filename)
            if name in (".", "..") or "/" in name or "\0" in name:
                continue
            child = posixpath.join(remote, name)
            count += await self._fetch(child, local / name, note, budget, depth + 1)
        return count

    async def _get(
        self, remote: str, local: Path, budget: ResultBudget, where: str, stated: int
    ) -> None:
        """One file, counted as it arrives (the peer's stated size is only a first look)."""
        budget.take(stated, where)
        counted = stated

        def count(_src: bytes, _dst: bytes, copied: int, _total: int) -> None:
            nonlocal counted
            if copied > counted:
                budget.take(copied - counted, where)
                counted = copied

        try:
            await self.sftp.get(
                remote,
                str(local),
                follow_symlinks=False,
                block_size=_BLOCK,
                max_requests=_REQUESTS,
                progress_handler=count,
            )
        except BaseException:
            _discard(local)
            raise


def _claim(local: Path) -> bool:
    """Whether ``local`` is free for a downloaded file (its directories made so)."""
    if local.exists() or local.is_symlink():
        return False
    return _make_dir(local.parent)


def _discard(local: Path) -> None:
    """Remove a file cut off mid-transfer: a results tree holds only whole files."""
    local.unlink(missing_ok=True)


def _make_dir(local: Path) -> bool:
    """Make a directory of the results tree; False where a file holds its name."""
    try:
        local.mkdir(mode=0o700, parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        return False
    return True
