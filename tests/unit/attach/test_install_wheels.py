"""install-node's wheels: which fit the remote Python and platform, packed from here exactly."""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata as metadata
import io
import platform
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.tags import Tag

from p2prc.install.wheels import Target, WheelPlan, _applies, plan_wheels, target_of

MARKERS = {
    "implementation_name": "cpython",
    "implementation_version": "3.11.2",
    "os_name": "posix",
    "platform_machine": "x86_64",
    "platform_release": "6.1.0",
    "platform_system": "Linux",
    "platform_version": "#1 SMP",
    "python_full_version": "3.11.2",
    "platform_python_implementation": "CPython",
    "python_version": "3.11",
    "sys_platform": "linux",
}


def _target(
    version: tuple[int, int] = (3, 11), machine: str = "x86_64", libc: tuple[int, int] = (2, 36)
) -> Target:
    markers = {**MARKERS, "platform_machine": machine}
    markers["python_version"] = f"{version[0]}.{version[1]}"
    markers["python_full_version"] = f"{version[0]}.{version[1]}.0"
    return Target(version, "cpython", "", machine, "glibc", libc, markers)


def test_platforms_are_manylinux_down_to_2_5_never_a_bare_linux_tag() -> None:
    platforms = _target().platforms()
    assert platforms[0] == "manylinux_2_36_x86_64"
    assert "manylinux_2_5_x86_64" in platforms
    assert {"manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"} <= set(platforms)
    assert not any(tag.startswith("linux_") for tag in platforms)
    assert "manylinux_2_34_x86_64" not in _target(libc=(2, 31)).platforms()
    musl = Target((3, 11), "cpython", "", "aarch64", "musl", (1, 2))
    assert musl.platforms() == [
        "musllinux_1_2_aarch64",
        "musllinux_1_1_aarch64",
        "musllinux_1_0_aarch64",
    ]
    unknown = Target((3, 11), "cpython", "", "arm64", "", (0, 0))
    assert unknown.platforms() == []
    assert {tag.platform for tag in unknown.tags()} == {"any"}, "pure wheels only"


def test_tags_follow_the_remote_python_not_this_one() -> None:
    tags = _target((3, 12)).tags()
    assert Tag("py3", "none", "any") in tags
    assert Tag("cp311", "abi3", "manylinux_2_17_x86_64") in tags, "abi3 of an older Python fits"
    assert Tag("cp312", "cp312", "manylinux_2_17_x86_64") in tags
    assert Tag("cp311", "cp311", "manylinux_2_17_x86_64") not in tags
    assert Tag("cp312", "cp312", "linux_x86_64") not in tags
    assert Tag("cp312", "cp312", "manylinux_2_17_aarch64") not in tags


def test_markers_are_evaluated_for_the_remote() -> None:
    old = Requirement('tomli>=1; python_version < "3.11"')
    assert not _applies(old.marker, _target((3, 11)), frozenset())
    assert _applies(old.marker, _target((3, 10)), frozenset())
    extra = Requirement('httptools>=0.6; extra == "standard"')
    assert not _applies(extra.marker, _target(), frozenset())
    assert _applies(extra.marker, _target(), frozenset({"standard"}))


def test_target_of_checks_every_field() -> None:
    good: dict[str, object] = {
        "version": "3.11.2", "implementation": "cpython", "abiflags": "", "machine": "x86_64",
        "libc": "glibc", "libc_version": "2.36", "markers": MARKERS,
    }  # fmt: skip
    target = target_of(good)
    assert (target.version, target.libc_version, target.machine) == ((3, 11), (2, 36), "x86_64")
    for bad in (
        {**good, "machine": "x86_64; rm -rf /"},
        {**good, "version": 3.11},
        {**good, "libc": "g" * 500},
        {**good, "markers": ["python_version"]},
        {**good, "markers": {"python_version": 3}},
        {**good, "markers": {f"k{i}": "v" for i in range(40)}},
    ):
        with pytest.raises(ValueError, match="probe"):
            target_of(bad)


def _here() -> Target:
    machine = platform.machine()
    libc, version = platform.libc_ver()
    major, minor = (int(part) for part in version.split(".")[:2])
    markers = {
        **MARKERS,
        "python_version": f"{sys.version_info[0]}.{sys.version_info[1]}",
        "python_full_version": platform.python_version(),
        "platform_machine": machine,
    }
    return Target(sys.version_info[:2], "cpython", "", machine, libc, (major, minor), markers)


@pytest.fixture(scope="module")
def here_plan(tmp_path_factory: pytest.TempPathFactory) -> tuple[WheelPlan, Path]:
    cache = tmp_path_factory.mktemp("wheels")
    return plan_wheels(_here(), cache, []), cache


def test_this_machine_gets_every_dependency_at_its_installed_version(
    here_plan: tuple[WheelPlan, Path],
) -> None:
    plan, _cache = here_plan
    assert plan.missing == []
    pins = dict(pin.split("==") for pin in plan.pins)
    assert pins["p2prc"] == metadata.version("p2prc")
    for name in ("pydantic-core", "asyncssh", "ansible-core", "uvicorn", "httptools"):
        assert pins[name] == metadata.version(name), name
    assert "pytest" not in pins, "dev tools stay here"
    assert "mypy" not in pins


def test_the_packed_wheels_are_complete_with_a_true_record(
    here_plan: tuple[WheelPlan, Path],
) -> None:
    plan, _cache = here_plan
    for wheel in plan.wheels:
        with zipfile.ZipFile(wheel.path) as archive:
            names = archive.namelist()
            record_name = next(n for n in names if n.endswith(".dist-info/RECORD"))
            rows = list(csv.reader(io.StringIO(archive.read(record_name).decode())))
            assert {row[0] for row in rows} == set(names), wheel.path.name
            for name, digest, size in rows:
                if name == record_name:
                    continue
                data = archive.read(name)
                expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
                assert digest == f"sha256={expected.decode()}"
                assert int(size) == len(data)
            assert not any(n.endswith(".pyc") or "/../" in n or n.startswith("..") for n in names)
            assert not any(n.endswith(("/INSTALLER", "/direct_url.json")) for n in names)
    source = next(w for w in plan.wheels if w.name == "p2prc")
    with zipfile.ZipFile(source.path) as archive:
        packed = set(archive.namelist())
    assert "p2prc/install/supervise.py" in packed
    assert "p2prc-0.1.0.dist-info/entry_points.txt" in packed


def test_another_python_or_platform_names_each_missing_binary_wheel(tmp_path: Path) -> None:
    plan = plan_wheels(_target((3, 12), "aarch64"), tmp_path / "cache", [])
    missing = "\n".join(plan.missing)
    assert "pydantic-core" in missing
    assert "no wheel that fits; give one with --wheels" in missing
    assert "the machine runs Python 3.12" in missing
    assert "ansible-core" not in missing, "a pure wheel fits anywhere"

    given = tmp_path / "given"
    given.mkdir()
    version = metadata.version("pydantic-core")
    (given / f"pydantic_core-{version}-cp312-cp312-manylinux_2_17_aarch64.whl").write_bytes(b"")
    (given / "pydantic_core-0.0.1-cp312-cp312-manylinux_2_17_aarch64.whl").write_bytes(b"")
    (given / "not-a-wheel.whl").write_bytes(b"")
    again = plan_wheels(_target((3, 12), "aarch64"), tmp_path / "cache", [given])
    assert not any("pydantic-core" in line for line in again.missing)
    chosen = next(w for w in again.wheels if w.name == "pydantic-core")
    assert chosen.version == version, "the installed version, not another one there"
