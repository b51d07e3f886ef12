"""``p2prc container cp``: a progress bar on a terminal, plain lines elsewhere."""

import asyncio
import sys
from dataclasses import asdict

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from ..client import Client
from ..containers.copy import CopyProgress, CopyResult, Remote, download, parse_sides, upload
from ..containers.store import pick_tracked
from ..direct.ssh import proxy_argv
from ._common import Options, emit, err

__all__ = ["copy_files"]


class _Bar:
    """A rich progress bar for the whole copy, naming the file in flight."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._task: TaskID | None = None

    def begin(self, files: int, total: int) -> None:
        self._task = self._progress.add_task(f"{files} files", total=total)

    def file(self, path: str, size: int) -> None:
        if self._task is not None:
            self._progress.update(self._task, description=path)

    def advance(self, count: int) -> None:
        if self._task is not None:
            self._progress.advance(self._task, count)


class _Lines:
    """One line per file on stderr (stdout keeps the result alone)."""

    def begin(self, files: int, total: int) -> None:
        err.print(f"copying {files} files, {total} bytes", markup=False)

    def file(self, path: str, size: int) -> None:
        err.print(f"  {path} ({size} bytes)", markup=False)

    def advance(self, count: int) -> None:
        pass


def copy_files(options: Options, src: str, dst: str) -> None:
    """Copy between this machine and a tracked container; either side ``ID:PATH``."""
    source, target = parse_sides(src, dst)
    remote = source if isinstance(source, Remote) else target
    assert isinstance(remote, Remote)
    with Client(home=options.home) as client:
        item = pick_tracked(client.tracked(), remote.container)
    view, key = item.container, options.home.identity_key
    # By the best path: the node's direct path to the peer when up, else the address.
    proxy = proxy_argv(options.home.path, view)

    def run(progress: CopyProgress) -> CopyResult:
        if isinstance(source, Remote):
            assert not isinstance(target, Remote)
            return asyncio.run(
                download(view, key, source.path, target, progress, proxy_command=proxy)
            )
        assert isinstance(target, Remote)
        return asyncio.run(upload(view, key, source, target.path, progress, proxy_command=proxy))

    if options.json or not sys.stdout.isatty():
        result = run(_Lines())
    else:
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=err, transient=True) as bar:
            result = run(_Bar(bar))
    data = asdict(result)
    where = f"{view.id[:12]}:{data['target']}" if isinstance(target, Remote) else data["target"]
    human = (
        f"copied {data['files']} files ({data['bytes']} bytes) to {where} "
        f"in {data['seconds']:.1f} s"
    )
    emit(options, data, human)
