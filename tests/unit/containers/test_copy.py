"""``container cp``'s sides and local walk, without a container."""

import os
from pathlib import Path

import pytest

from p2prc.containers.copy import Remote, _check_local, _local_target, _walk_local, parse_sides
from p2prc.errors import InvalidRequest, NotFound


@pytest.mark.parametrize(
    ("src", "dst", "expected"),
    [
        ("c4ca00:big.bin", "here", (Remote("c4ca00", "big.bin"), Path("here"))),
        ("./a:b", "c4ca:", (Path("./a:b"), Remote("c4ca", ""))),
        ("/tmp/x", "web:/srv/data", (Path("/tmp/x"), Remote("web", "/srv/data"))),
    ],
)
def test_sides(src: str, dst: str, expected: tuple[object, object]) -> None:
    assert parse_sides(src, dst) == expected


@pytest.mark.parametrize(("src", "dst"), [("a", "b"), ("c1:x", "c2:y"), (":x", "y")])
def test_exactly_one_side_is_a_container(src: str, dst: str) -> None:
    with pytest.raises(InvalidRequest, match="exactly one of SRC and DST"):
        parse_sides(src, dst)


def test_local_walk_parents_first_links_as_links(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    (root / "a").mkdir(parents=True)
    (root / "a" / "f").write_bytes(b"12345")
    (root / "l").symlink_to("/etc/passwd")
    entries = _walk_local(root)
    kinds = [(e.kind, e.rel) for e in entries]
    assert kinds == [("dir", ""), ("dir", "a"), ("file", "a/f"), ("link", "l")]
    assert entries[2].size == 5
    assert entries[3].link == "/etc/passwd"
    with pytest.raises(NotFound, match="no such file"):
        _walk_local(tmp_path / "missing")


def test_download_never_writes_through_a_link(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    os.symlink(tmp_path / "d", tmp_path / "link")
    with pytest.raises(InvalidRequest, match="is a link"):
        _check_local(tmp_path / "link", "file")
    with pytest.raises(InvalidRequest, match="is a directory"):
        _check_local(tmp_path / "d", "file")
    assert _local_target(tmp_path / "d", "tree") == tmp_path / "d" / "tree"
    assert _local_target(tmp_path / "new", "tree") == tmp_path / "new"
    with pytest.raises(NotFound, match="no such directory"):
        _local_target(tmp_path / "nope" / "x", "tree")
