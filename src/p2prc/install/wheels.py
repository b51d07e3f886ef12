"""The wheels a new node installs from: p2prc from this checkout, its dependencies as here.

Offline and exact: every dependency of p2prc (its requirements, followed through their
own, markers evaluated for the *remote* interpreter) is pinned to the version installed
in this environment. A dependency's wheel comes from a wheel directory the user gave
(``--wheels``), else it is rebuilt from this environment's installed files when the tags
it was installed under fit the remote (the way ``scripts/test-debian12`` builds its wheel
cache, but without the network). Only pure wheels and manylinux/musllinux ones fit: a
wheel built on this machine (``linux_x86_64``) is never sent. p2prc itself is packed from
the source tree this module runs from.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata as metadata
import io
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import InvalidRequirement, Requirement
from packaging.tags import Tag, compatible_tags, cpython_tags, parse_tag
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

__all__ = ["Target", "Wheel", "WheelPlan", "plan_wheels", "target_of"]

_SKIPPED_DIST_FILES = {"INSTALLER", "REQUESTED", "RECORD", "direct_url.json"}
_MAX_PROBE_TEXT = 200


@dataclass(frozen=True)
class Target:
    """The remote interpreter, as its probe described it."""

    version: tuple[int, int]
    implementation: str
    abiflags: str
    machine: str
    libc: str
    libc_version: tuple[int, int]
    markers: dict[str, str] = field(default_factory=dict, hash=False, compare=False)

    def describe(self) -> str:
        libc = f"{self.libc} {self.libc_version[0]}.{self.libc_version[1]}" if self.libc else "?"
        return (
            f"{self.implementation} {self.version[0]}.{self.version[1]} on {self.machine} ({libc})"
        )

    def platforms(self) -> list[str]:
        """Platform tags this machine takes, newest first; never a bare ``linux_*``."""
        arch = self.machine
        major, minor = self.libc_version
        if self.libc == "glibc" and major == 2:
            tags = [f"manylinux_2_{m}_{arch}" for m in range(minor, 4, -1)]
            legacy = [(17, "manylinux2014"), (12, "manylinux2010"), (5, "manylinux1")]
            return tags + [f"{name}_{arch}" for need, name in legacy if minor >= need]
        if self.libc == "musl" and major == 1:
            return [f"musllinux_1_{m}_{arch}" for m in range(minor, -1, -1)]
        return []

    def tags(self) -> set[Tag]:
        platforms = self.platforms()
        interpreter = f"cp{self.version[0]}{self.version[1]}"
        if self.implementation != "cpython":
            interpreter = f"py{self.version[0]}{self.version[1]}"
        tags = set(compatible_tags(self.version, interpreter, platforms))
        if platforms and self.implementation == "cpython":
            abi = f"cp{self.version[0]}{self.version[1]}{self.abiflags}"
            tags |= set(cpython_tags(self.version, [abi], platforms))
        return tags


def target_of(probe: dict[str, object]) -> Target:
    """A ``Target`` from the remote probe's JSON (untrusted: every field checked)."""

    def text(key: str) -> str:
        value = probe.get(key, "")
        if not isinstance(value, str) or len(value) > _MAX_PROBE_TEXT:
            raise ValueError(f"the probe's {key!r} is not a short text")
        return value

    def pair(value: str) -> tuple[int, int]:
        match = re.fullmatch(r"(\d{1,3})\.(\d{1,4})(?:\.\S*)?", value)
        return (int(match[1]), int(match[2])) if match else (0, 0)

    markers = probe.get("markers", {})
    if not isinstance(markers, dict) or len(markers) > 32:
        raise ValueError("the probe's markers are not a small map")
    clean = {}
    for key, value in markers.items():
        if not isinstance(key, str) or not isinstance(value, str) or len(value) > 200:
            raise ValueError("the probe's markers are not texts")
        clean[key] = value
    machine = text("machine")
    if not re.fullmatch(r"[A-Za-z0-9_]{1,32}", machine):
        raise ValueError(f"the probe's machine {machine!r} is not an architecture name")
    return Target(
        version=pair(text("version")),
        implementation=text("implementation"),
        abiflags=re.sub(r"[^a-z]", "", text("abiflags"))[:4],
        machine=machine,
        libc=text("libc"),
        libc_version=pair(text("libc_version")),
        markers=clean,
    )


@dataclass(frozen=True)
class Wheel:
    name: str
    version: str
    path: Path


@dataclass
class WheelPlan:
    """What to send: the wheels, the pins for pip, and what is missing (with why)."""

    wheels: list[Wheel] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    @property
    def pins(self) -> list[str]:
        return [f"{wheel.name}=={wheel.version}" for wheel in self.wheels]

    @property
    def size(self) -> int:
        return sum(wheel.path.stat().st_size for wheel in self.wheels)


def plan_wheels(
    target: Target, cache: Path, wheel_dirs: list[Path], *, root: str = "p2prc"
) -> WheelPlan:
    """The wheels of ``root`` (packed from source) and everything it needs on ``target``."""
    plan = WheelPlan()
    cache.mkdir(parents=True, exist_ok=True)
    found = _wheel_files(wheel_dirs)
    wanted = target.tags()
    plan.wheels.append(_pack_source(root, cache))
    for name, requirement in _closure(root, target):
        wheel = _fitting(name, requirement, found, wanted) or _from_installed(
            name, requirement, wanted, cache
        )
        if isinstance(wheel, str):
            plan.missing.append(wheel)
        else:
            plan.wheels.append(wheel)
    if plan.missing and target.version != _here():
        plan.missing.append(
            f"the machine runs Python {target.version[0]}.{target.version[1]}, this one"
            f" {_here()[0]}.{_here()[1]}: binary wheels built for this Python do not fit there"
        )
    return plan


def _here() -> tuple[int, int]:
    import sys

    return sys.version_info[:2]


def _closure(root: str, target: Target) -> list[tuple[str, Requirement]]:
    """Every distribution ``root`` needs on ``target`` (canonical name, first requirement)."""
    seen: dict[str, Requirement] = {}
    queue: list[tuple[str, frozenset[str]]] = [(root, frozenset())]
    extras_done: set[tuple[str, str]] = set()
    while queue:
        name, extras = queue.pop(0)
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue  # reported by the caller when no wheel is found either
        for line in requires:
            try:
                requirement = Requirement(line)
            except InvalidRequirement:
                continue
            if not _applies(requirement.marker, target, extras):
                continue
            key = canonicalize_name(requirement.name)
            new_extras = {e for e in requirement.extras if (key, e) not in extras_done}
            extras_done |= {(key, e) for e in new_extras}
            if key not in seen:
                seen[key] = requirement
                queue.append((key, frozenset(requirement.extras)))
            elif new_extras:
                queue.append((key, frozenset(new_extras)))
    return sorted(seen.items())


def _applies(marker: Marker | None, target: Target, extras: frozenset[str]) -> bool:
    if marker is None:
        return True
    environment = dict(target.markers)
    for extra in extras or {""}:
        environment["extra"] = extra
        if marker.evaluate(environment):
            return True
    return False


def _wheel_files(directories: list[Path]) -> list[tuple[str, Version, frozenset[Tag], Path]]:
    files = []
    for directory in directories:
        for path in sorted(directory.glob("*.whl")):
            try:
                name, version, _build, tags = parse_wheel_filename(path.name)
            except (InvalidWheelFilename, InvalidVersion):
                continue
            files.append((str(name), version, tags, path))
    return files


def _installed_version(name: str) -> str | None:
    try:
        return metadata.distribution(name).version
    except metadata.PackageNotFoundError:
        return None


def _fitting(
    name: str,
    requirement: Requirement,
    found: list[tuple[str, Version, frozenset[Tag], Path]],
    wanted: set[Tag],
) -> Wheel | None:
    """A wheel from the user's directories: the installed version, else the newest that fits."""
    here = _installed_version(name)
    candidates = [
        (version, path)
        for wheel_name, version, tags, path in found
        if wheel_name == name and tags & wanted and requirement.specifier.contains(version, True)
    ]
    if here is not None:
        candidates = [(v, p) for v, p in candidates if v == Version(here)]
    if not candidates:
        return None
    version, path = max(candidates)
    return Wheel(name, str(version), path)


def _from_installed(
    name: str, requirement: Requirement, wanted: set[Tag], cache: Path
) -> Wheel | str:
    """This environment's installed copy as a wheel, or why it cannot be one."""
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return f"{requirement}: needed there but not installed here; give its wheel with --wheels"
    installed_tags = [
        tag for line in (dist.read_text("WHEEL") or "").splitlines()
        if line.startswith("Tag:") for tag in parse_tag(line[4:].strip())
    ]  # fmt: skip
    fit = [tag for tag in installed_tags if tag in wanted]
    if not fit:
        shown = ", ".join(str(tag) for tag in installed_tags) or "not from a wheel"
        return f"{name} {dist.version} (here: {shown}): no wheel that fits; give one with --wheels"
    stem = f"{_file_name(name)}-{dist.version}-{fit[0]}"
    path = cache / f"{stem}.whl"
    if not path.exists():
        files = []
        for item in dist.files or []:
            parts = item.parts
            if ".." in parts or "__pycache__" in parts or item.suffix == ".pyc":
                continue  # scripts and data outside site-packages: pip makes the scripts
            if (
                len(parts) == 2
                and parts[0].endswith(".dist-info")
                and parts[1] in _SKIPPED_DIST_FILES
            ):
                continue
            source = Path(str(dist.locate_file(item)))
            if source.is_file():
                files.append((str(item).replace(os.sep, "/"), source))
        info = next((p for p, _ in files if p.endswith(".dist-info/METADATA")), None)
        if info is None:
            return f"{name} {dist.version}: its installed files have no METADATA"
        _write_wheel(path, files, [], info.rsplit("/", 1)[0])
    return Wheel(name, dist.version, path)


def _pack_source(root: str, cache: Path) -> Wheel:
    """``root`` (p2prc) from the tree this code runs from, with its installed metadata."""
    import importlib

    module = importlib.import_module(root)
    package = Path(str(module.__file__)).parent
    dist = metadata.distribution(root)
    info = f"{_file_name(root)}-{dist.version}.dist-info"
    files = []
    for source in sorted(package.rglob("*")):
        relative = source.relative_to(package.parent)
        if "__pycache__" in relative.parts or source.suffix == ".pyc" or not source.is_file():
            continue
        files.append((relative.as_posix(), source))
    generated = [
        (f"{info}/METADATA", (dist.read_text("METADATA") or "").encode()),
        (f"{info}/WHEEL", b"Wheel-Version: 1.0\nGenerator: p2prc\nRoot-Is-Purelib: true\n"
         b"Tag: py3-none-any\n"),
        (f"{info}/entry_points.txt", (dist.read_text("entry_points.txt") or "").encode()),
    ]  # fmt: skip
    path = cache / f"{_file_name(root)}-{dist.version}-py3-none-any.whl"
    _write_wheel(path, files, generated, info)
    return Wheel(root, dist.version, path)


def _file_name(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name)


def _write_wheel(
    path: Path, files: list[tuple[str, Path]], generated: list[tuple[str, bytes]], info: str
) -> None:
    """A wheel zip with a fresh RECORD; written beside and renamed, so never half there."""
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    partial = path.with_name(f".{path.name}.partial")
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as archive:
        entries = [(name, source.read_bytes(), source.stat().st_mode) for name, source in files]
        entries += [(name, data, 0o644) for name, data in generated]
        for name, data, mode in entries:
            entry = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            entry.external_attr = (mode & 0xFFFF) << 16
            entry.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(entry, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            writer.writerow([name, f"sha256={digest.decode()}", len(data)])
        writer.writerow([f"{info}/RECORD", "", ""])
        archive.writestr(
            zipfile.ZipInfo(f"{info}/RECORD", (2020, 1, 1, 0, 0, 0)), record.getvalue()
        )
    partial.replace(path)
