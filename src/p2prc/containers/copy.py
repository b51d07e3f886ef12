"""Files to and from a container over SFTP, as its user, with the pinned host key.

Both directions first walk the source tree (so the size is known and a refused link
stops the copy before anything is written), then copy it entry by entry. Links are
copied as links; on download a link that points outside the copied tree is refused.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import stat
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import asyncssh

from ..errors import ContainerError, InvalidRequest, NotFound
from ..models import ContainerView
from .sftp import BLOCK, REQUESTS, login, ssh_errors

__all__ = ["CopyProgress", "CopyResult", "Remote", "download", "parse_sides", "upload"]

_MAX_DEPTH = 64
Kind = Literal["dir", "file", "link"]


@dataclass(frozen=True, slots=True)
class Remote:
    """``ID:PATH``: a path in a tracked container (``ID`` an id, prefix or name)."""

    container: str
    path: str


def _side(text: str) -> Remote | Path:
    head, sep, tail = text.partition(":")
    # A local path may hold a colon too, but then a slash comes before it (./a:b).
    if sep and head and "/" not in head and "\\" not in head:
        return Remote(head, tail)
    return Path(text)


def parse_sides(src: str, dst: str) -> tuple[Remote | Path, Remote | Path]:
    """SRC and DST of ``container cp``: exactly one of them ``ID:PATH``."""
    source, target = _side(src), _side(dst)
    if isinstance(source, Remote) == isinstance(target, Remote):
        raise InvalidRequest(
            "container cp copies between this machine and a container: "
            "exactly one of SRC and DST must be ID:PATH"
        )
    return source, target


class CopyProgress(Protocol):
    """What a copy reports while it runs."""

    def begin(self, files: int, total: int) -> None: ...
    def file(self, path: str, size: int) -> None: ...
    def advance(self, count: int) -> None: ...


@dataclass(frozen=True, slots=True)
class CopyResult:
    """What one copy moved."""

    target: str
    files: int
    dirs: int
    links: int
    bytes: int
    seconds: float


@dataclass(frozen=True, slots=True)
class _Entry:
    kind: Kind
    rel: str  # "" for the root; posix separators
    size: int = 0
    mode: int = 0o644
    link: str = ""


class _Quiet:
    def begin(self, files: int, total: int) -> None:
        pass

    def file(self, path: str, size: int) -> None:
        pass

    def advance(self, count: int) -> None:
        pass


async def upload(
    view: ContainerView,
    key_file: Path,
    local: Path,
    remote: str,
    progress: CopyProgress | None = None,
    *,
    proxy_command: Sequence[str] | None = None,
) -> CopyResult:
    """Copy the local file or directory ``local`` to ``remote`` in the container
    (``proxy_command``: see ``sftp.login``)."""
    progress = progress or _Quiet()
    entries = _walk_local(local)
    started = time.monotonic()
    conn = await login(view, key_file, proxy_command=proxy_command)
    try:
        with _ssh_errors(view):
            sftp = await conn.start_sftp_client()
            target = await _remote_target(sftp, view, remote or ".", local.name)
            _begin(progress, entries)
            for entry in entries:
                path = posixpath.join(target, entry.rel) if entry.rel else target
                source = local / entry.rel if entry.rel else local
                with _remote_errors(view, path):
                    if entry.kind == "dir":
                        await _remote_dir(sftp, view, path)
                    elif entry.kind == "link":
                        await sftp.symlink(entry.link, path)
                    else:
                        progress.file(entry.rel or local.name, entry.size)
                        await sftp.put(
                            str(source),
                            path,
                            progress_handler=_counter(progress),
                            block_size=BLOCK,
                            max_requests=REQUESTS,
                        )
                        await sftp.chmod(path, entry.mode & 0o777)
            with _remote_errors(view, target):
                target = str(await sftp.realpath(target))
            sftp.exit()
    finally:
        conn.close()
        with contextlib.suppress(Exception):
            await conn.wait_closed()
    return _result(target, entries, started)


async def download(
    view: ContainerView,
    key_file: Path,
    remote: str,
    local: Path,
    progress: CopyProgress | None = None,
    *,
    proxy_command: Sequence[str] | None = None,
) -> CopyResult:
    """Copy ``remote`` (a file or directory in the container) to ``local``
    (``proxy_command``: see ``sftp.login``)."""
    progress = progress or _Quiet()
    started = time.monotonic()
    conn = await login(view, key_file, proxy_command=proxy_command)
    try:
        with _ssh_errors(view):
            sftp = await conn.start_sftp_client()
            with _remote_errors(view, remote or "~"):
                root = str(await sftp.realpath(remote or "."))
            entries = await _walk_remote(sftp, view, root)
            target = _local_target(local, posixpath.basename(root) or "root")
            _begin(progress, entries)
            for entry in entries:
                path = target / entry.rel if entry.rel else target
                source = posixpath.join(root, entry.rel) if entry.rel else root
                _check_local(path, entry.kind)
                with _remote_errors(view, source):
                    if entry.kind == "dir":
                        path.mkdir(mode=0o700, exist_ok=True)
                    elif entry.kind == "link":
                        path.symlink_to(entry.link)
                    else:
                        progress.file(entry.rel or path.name, entry.size)
                        await sftp.get(
                            source,
                            str(path),
                            progress_handler=_counter(progress),
                            block_size=BLOCK,
                            max_requests=REQUESTS,
                        )
                        path.chmod(entry.mode & 0o777)
            sftp.exit()
    finally:
        conn.close()
        with contextlib.suppress(Exception):
            await conn.wait_closed()
    return _result(str(target), entries, started)


def _begin(progress: CopyProgress, entries: list[_Entry]) -> None:
    files = [e for e in entries if e.kind == "file"]
    progress.begin(len(files), sum(e.size for e in files))


def _counter(progress: CopyProgress) -> asyncssh.sftp.SFTPProgressHandler:
    done = 0

    def handler(_src: bytes, _dst: bytes, copied: int, _total: int) -> None:
        nonlocal done
        progress.advance(copied - done)
        done = copied

    return handler


def _result(target: str, entries: list[_Entry], started: float) -> CopyResult:
    def count(kind: Kind) -> int:
        return sum(1 for e in entries if e.kind == kind)

    return CopyResult(
        target=target,
        files=count("file"),
        dirs=count("dir"),
        links=count("link"),
        bytes=sum(e.size for e in entries if e.kind == "file"),
        seconds=round(time.monotonic() - started, 3),
    )


def _walk_local(root: Path) -> list[_Entry]:
    """The local tree under ``root``, parents before children."""
    try:
        info = root.lstat()
    except FileNotFoundError:
        raise NotFound(f"{root}: no such file or directory") from None
    except OSError as exc:
        raise InvalidRequest(f"{root}: {exc.strerror or exc}") from None
    entries: list[_Entry] = []

    def visit(path: Path, rel: str, info: os.stat_result, depth: int) -> None:
        if depth > _MAX_DEPTH:
            raise InvalidRequest(f"{path}: nested more than {_MAX_DEPTH} deep")
        if stat.S_ISLNK(info.st_mode):
            entries.append(_Entry("link", rel, link=os.readlink(path)))
        elif stat.S_ISREG(info.st_mode):
            entries.append(_Entry("file", rel, info.st_size, info.st_mode))
        elif stat.S_ISDIR(info.st_mode):
            entries.append(_Entry("dir", rel, mode=info.st_mode))
            try:
                names = sorted(os.listdir(path))
            except OSError as exc:
                raise InvalidRequest(f"{path}: {exc.strerror or exc}") from None
            for name in names:
                child = path / name
                visit(child, posixpath.join(rel, name) if rel else name, child.lstat(), depth + 1)
        else:
            raise InvalidRequest(f"{path} is not a file, directory or link")

    if stat.S_ISLNK(info.st_mode):  # the root itself: what it points to is what is meant
        info = root.stat()
    visit(root, "", info, 0)
    return entries


async def _walk_remote(sftp: asyncssh.SFTPClient, view: ContainerView, root: str) -> list[_Entry]:
    """The container's tree under ``root`` (absolute), parents before children; a link out
    of the tree is refused before anything is copied."""
    entries: list[_Entry] = []

    async def visit(path: str, rel: str, attrs: asyncssh.SFTPAttrs, depth: int) -> None:
        if depth > _MAX_DEPTH:
            raise InvalidRequest(f"container {view.id}: {path}: nested more than {_MAX_DEPTH} deep")
        mode = attrs.permissions or 0
        if stat.S_ISLNK(mode):
            with _remote_errors(view, path):
                link = str(await sftp.readlink(path))
            pointed = posixpath.normpath(posixpath.join(posixpath.dirname(path), link))
            if not (pointed == root or pointed.startswith(root.rstrip("/") + "/")):
                raise InvalidRequest(
                    f"container {view.id}: {path} is a link to {link}, outside {root}; "
                    "refusing to copy it"
                )
            entries.append(_Entry("link", rel, link=link))
        elif stat.S_ISREG(mode):
            entries.append(_Entry("file", rel, attrs.size or 0, mode))
        elif stat.S_ISDIR(mode):
            entries.append(_Entry("dir", rel, mode=mode))
            with _remote_errors(view, path):
                names = await sftp.readdir(path)
            for item in sorted(names, key=lambda item: str(item.filename)):
                name = str(item.filename)
                if name in (".", "..") or "/" in name or "\0" in name:
                    continue
                child = posixpath.join(path, name)
                await visit(
                    child, posixpath.join(rel, name) if rel else name, item.attrs, depth + 1
                )
        else:
            raise InvalidRequest(f"container {view.id}: {path} is not a file, directory or link")

    with _remote_errors(view, root):
        attrs = await sftp.stat(root)  # the root followed: what it points to is what is meant
    await visit(root, "", attrs, 0)
    return entries


async def _remote_target(
    sftp: asyncssh.SFTPClient, view: ContainerView, remote: str, name: str
) -> str:
    """Where an upload goes: into ``remote`` when it is a directory, else ``remote`` itself."""
    with _remote_errors(view, remote):
        if await sftp.isdir(remote):
            return posixpath.join(remote, name)
    parent = posixpath.dirname(remote.rstrip("/")) or "."
    with _remote_errors(view, parent):
        if not await sftp.isdir(parent):
            raise NotFound(f"container {view.id}: {parent}: no such directory")
    return remote


async def _remote_dir(sftp: asyncssh.SFTPClient, view: ContainerView, path: str) -> None:
    if await sftp.isdir(path):
        return
    if await sftp.exists(path):
        raise InvalidRequest(f"container {view.id}: {path} exists and is not a directory")
    await sftp.mkdir(path)


def _local_target(local: Path, name: str) -> Path:
    """Where a download goes: into ``local`` when it is a directory, else ``local`` itself."""
    if local.is_dir() and not local.is_symlink():
        return local / name
    if not local.parent.is_dir():
        raise NotFound(f"{local.parent}: no such directory")
    return local


def _check_local(path: Path, kind: Kind) -> None:
    """A download never writes through a link, nor over a directory with a file."""
    if path.is_symlink():
        raise InvalidRequest(f"{path} exists and is a link; refusing to write through it")
    if kind == "dir" and path.exists() and not path.is_dir():
        raise InvalidRequest(f"{path} exists and is not a directory")
    if kind != "dir" and path.is_dir():
        raise InvalidRequest(f"{path} exists and is a directory")


@contextlib.contextmanager
def _remote_errors(view: ContainerView, path: str) -> Iterator[None]:
    """SFTP's answers about ``path`` as one-line errors naming it."""
    try:
        yield
    except asyncssh.SFTPNoSuchFile:
        raise NotFound(f"container {view.id}: {path}: no such file or directory") from None
    except asyncssh.SFTPPermissionDenied:
        raise InvalidRequest(
            f"container {view.id}: {path}: permission denied for user {view.ssh.user}"
        ) from None
    except asyncssh.SFTPError as exc:
        raise ContainerError(f"container {view.id}: {path}: {exc.reason or exc}") from None


@contextlib.contextmanager
def _ssh_errors(view: ContainerView) -> Iterator[None]:
    with ssh_errors(view, "copy files to or from"):
        try:
            yield
        except (TimeoutError, ConnectionError):
            raise
        except OSError as exc:  # this machine's side: a local file
            where = f"{exc.filename}: " if exc.filename else ""
            raise InvalidRequest(f"{where}{exc.strerror or exc}") from None
