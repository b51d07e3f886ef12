"""Task files and flags: good tasks parse; every bad input is a clear InvalidRequest."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from p2prc.errors import InvalidRequest
from p2prc.jobs.task import load_task, parse_task


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "task.toml"
    path.write_text(text)
    return path


def test_a_full_task_file(tmp_path: Path) -> None:
    (tmp_path / "scene").mkdir()
    (tmp_path / "scene" / "a.txt").write_text("x")
    os.symlink("a.txt", tmp_path / "scene" / "inside")
    task = load_task(
        _write(
            tmp_path,
            """
            image = "p2prc/sshd:latest"
            nodes = 3
            workdir = "scene"
            setup = "true"
            run = ["python3", "-c", "print(1)"]
            outputs = ["frames/", "./log.txt"]
            time_limit = "2h"
            retries = 2
            peers = ["bob", "127.0.0.1:8088"]
            [resources]
            cpus = 1.5
            memory = "512MiB"
            gpus = 1
            [env]
            QUALITY = "high"
            """,
        )
    )
    assert task.nodes == 3
    assert task.workdir == str((tmp_path / "scene").resolve())
    assert task.outputs == ["frames", "log.txt"]
    assert task.time_limit_s == 7200
    assert task.resources.memory_bytes == 512 * 1024**2
    assert task.run == ["python3", "-c", "print(1)"]
    assert task.env == {"QUALITY": "high"}


def test_the_short_form() -> None:
    task = parse_task({"run": "echo hi"})
    assert (task.nodes, task.retries, task.workdir) == (1, 0, None)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('run = "x"\nbogus = 1', "bogus: unknown key"),
        ('run = "x"\n[resources]\nram = "1g"', "resources.ram: unknown key"),
        ('run = "x"\n[resources]\ncpus = -1', "resources.cpus"),
        ('run = "x"\n[resources]\ngpus = -2', "resources.gpus"),
        ('run = "x"\n[resources]\nmemory = "-5g"', "resources.memory"),
        ('run = "x"\n[resources]\nmemory = "lots"', "resources.memory"),
        ("run = []", "run: "),
        ('run = "   "', "run: "),
        ('run = [""]', "run: "),
        ('setup = ""\nrun = "x"', "setup: "),
        ('run = "x"\nnodes = 0', "nodes"),
        ('run = "x"\nretries = -1', "retries"),
        ('run = "x"\ntime_limit = "soon"', "time_limit"),
        ('run = "x"\ntime_limit = 0', "time_limit"),
        ('run = "x"\noutputs = ["/etc/passwd"]', "outputs"),
        ('run = "x"\noutputs = ["../up"]', "outputs"),
        ('run = "x"\noutputs = ["a/../../b"]', "outputs"),
        ('run = "x"\noutputs = ["~/x"]', "outputs"),
        ('run = "x"\noutputs = ["."]', "outputs"),
        ('run = "x"\nenv = { "A B" = "1" }', "env"),
        ('run = "x"\nenv = { P2PRC_NODE_RANK = "7" }', "env"),
        ('run = "x"\npeers = []', "peers"),
        ('run = "x"\nimage = "bad image;rm -rf /"', "image"),
        ("nodes = 2", "run: Field required"),
        ('run = "x"\nworkdir = "missing"', "no such directory"),
    ],
)
def test_bad_task_files(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        load_task(_write(tmp_path, text))
    assert key in str(caught.value)
    assert str(tmp_path / "task.toml") in str(caught.value)


def test_not_toml(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="not valid TOML"):
        load_task(_write(tmp_path, "run = ["))


def test_no_task_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="no such task file"):
        load_task(tmp_path / "nope.toml")


def test_a_workdir_with_a_link_outside_is_refused(tmp_path: Path) -> None:
    (tmp_path / "w").mkdir()
    os.symlink("/etc", tmp_path / "w" / "etc")
    with pytest.raises(InvalidRequest, match="etc links outside it"):
        parse_task({"run": "x", "workdir": str(tmp_path / "w")})


def test_a_workdir_with_a_relative_link_escaping_is_refused(tmp_path: Path) -> None:
    (tmp_path / "w" / "sub").mkdir(parents=True)
    os.symlink("../../", tmp_path / "w" / "sub" / "up")
    with pytest.raises(InvalidRequest, match="links outside it"):
        parse_task({"run": "x", "workdir": str(tmp_path / "w")})


def test_a_workdir_that_is_a_link_or_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    (tmp_path / "file").write_text("x")
    for bad in ("link", "file"):
        with pytest.raises(InvalidRequest, match="not a directory"):
            parse_task({"run": "x", "workdir": str(tmp_path / bad)})


def test_a_workdir_with_a_fifo_is_refused(tmp_path: Path) -> None:
    (tmp_path / "w").mkdir()
    os.mkfifo(tmp_path / "w" / "pipe")
    with pytest.raises(InvalidRequest, match="pipe is not a file or directory"):
        parse_task({"run": "x", "workdir": str(tmp_path / "w")})


def test_a_disk_size_is_refused_not_ignored() -> None:
    with pytest.raises(InvalidRequest, match=r"resources\.disk: a rank's disk cannot be asked"):
        parse_task({"run": "x", "resources": {"disk": "20GiB"}})
