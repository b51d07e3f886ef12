"""The Dask image: the default image plus the exact Dask stack of this environment.

Dask needs the same versions of its packages (and the same Python minor) on the client,
the scheduler and every worker. Containers cannot reach a package index, so the host's
pip fetches wheels for the image's platform and Python into a cache, installs them into a
directory with ``--target``, and the Dockerfile copies that directory to ``/opt/dask/site``;
``/opt/dask/bin/dask`` runs the image's ``python3 -m dask`` on it. The versions travel in
the ``org.p2prc.dask-versions`` label, so a node compares them before it starts anything.
Every program runs from an argument list; the values written into the Dockerfile are
checked version strings only.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import importlib.metadata
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import platformdirs

from ..containers import images
from ..containers.docker import _docker_errors
from ..errors import ClusterError, ContainerError, InvalidRequest

__all__ = [
    "PACKAGES",
    "VERSIONS_LABEL",
    "dask_image",
    "dask_image_tag",
    "dockerfile",
    "ensure_dask_image",
    "image_versions",
    "is_dask_tag",
    "local_versions",
    "manylinux_platforms",
    "pip_command",
    "version_mismatch",
    "wheel_cache",
]

log = logging.getLogger(__name__)

# The packages whose versions must agree between client, scheduler and workers.
PACKAGES = ("dask", "distributed", "numpy", "pandas", "cloudpickle", "msgpack", "tornado", "toolz")
VERSIONS_LABEL = "org.p2prc.dask-versions"
_IMAGE = "dask"
DASK_HOME = "/opt/dask"
# PEP 440 release versions with pre/post/dev parts, no local part and no epoch: they are
# written into the Dockerfile's label and reach pip as ``name==version``.
_VERSION = re.compile(
    r"[0-9]{1,6}(\.[0-9]{1,6}){0,4}((a|b|rc)[0-9]{1,6})?(\.post[0-9]{1,6})?(\.dev[0-9]{1,6})?"
)
_PYTHON = re.compile(r"3\.[0-9]{1,2}")
# glibc manylinux tags, newest first; Debian bookworm has glibc 2.36.
_GLIBC_MINORS = range(36, 16, -1)
_MACHINES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}
_INSTALL_HINT = "pip install 'p2prc[dask]'"


def local_versions() -> dict[str, str]:
    """The Python minor and the versions of the Dask stack in this environment."""
    versions = {"python": f"{sys.version_info[0]}.{sys.version_info[1]}"}
    missing = []
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    if missing:
        raise ClusterError(
            f"Dask clusters need {', '.join(missing)} in this Python environment "
            f"({sys.executable}); install them with: {_INSTALL_HINT}"
        )
    return versions


def _checked(versions: Mapping[str, str]) -> dict[str, str]:
    wanted = {"python", *PACKAGES}
    if set(versions) != wanted:
        extra = sorted(set(versions) - wanted)
        lacking = sorted(wanted - set(versions))
        raise InvalidRequest(f"Dask image versions: missing {lacking}, unknown {extra}")
    if not isinstance(versions["python"], str) or not _PYTHON.fullmatch(versions["python"]):
        raise InvalidRequest(f"{versions['python']!r} is not a Python version like 3.11")
    for name in PACKAGES:
        value = versions[name]
        if not isinstance(value, str) or not _VERSION.fullmatch(value):
            raise InvalidRequest(f"{value!r} is not a release version of {name} (like 2024.8.0)")
    return {name: versions[name] for name in sorted(wanted)}


_TAG = re.compile(rf"p2prc/dask:(?:{_VERSION.pattern})-py(?:{_PYTHON.pattern})")


def is_dask_tag(tag: str) -> bool:
    """Whether ``tag`` is a Dask image's: ``p2prc/dask:<distributed>-py<minor>`` exactly."""
    return _TAG.fullmatch(tag) is not None


def dask_image_tag(versions: Mapping[str, str]) -> str:
    """The image tag for ``versions``: ``p2prc/dask:<distributed>-py<python>``."""
    checked = _checked(versions)
    return f"p2prc/dask:{checked['distributed']}-py{checked['python']}"


def manylinux_platforms(machine: str | None = None) -> list[str]:
    """The pip ``--platform`` tags a Debian bookworm on ``machine`` runs, newest first."""
    raw = machine if machine is not None else platform.machine()
    arch = _MACHINES.get(raw.lower())
    if arch is None:
        raise ClusterError(
            f"Dask images are built for x86_64 and aarch64 only, not {raw!r} "
            "(no manylinux wheels to put in them)"
        )
    tags = [f"manylinux_2_{minor}_{arch}" for minor in _GLIBC_MINORS]
    return [*tags, f"manylinux2014_{arch}"]


def wheel_cache() -> Path:
    """Where the wheels for Dask images are kept, so a rebuild needs no network."""
    return Path(platformdirs.user_cache_dir("p2prc", appauthor=False)) / "wheels"


def pip_command(
    versions: Mapping[str, str],
    *,
    wheels: Path,
    target: Path | None = None,
    machine: str | None = None,
) -> list[str]:
    """The pip argument list: ``download`` into ``wheels`` (network), or, with ``target``,
    ``install`` from ``wheels`` alone into ``target``."""
    checked = _checked(versions)
    python = checked["python"]
    abi = "cp" + python.replace(".", "")
    if target is None:
        head = ["download", "--dest", str(wheels)]
    else:
        head = ["install", "--target", str(target), "--no-index", "--find-links", str(wheels)]
    platforms = [arg for tag in manylinux_platforms(machine) for arg in ("--platform", tag)]
    return [
        sys.executable,
        "-m",
        "pip",
        *head,
        "--disable-pip-version-check",
        "--no-input",
        "--progress-bar",
        "off",
        "--only-binary=:all:",
        *platforms,
        "--python-version",
        python,
        "--implementation",
        "cp",
        "--abi",
        abi,
        *(f"{name}=={checked[name]}" for name in PACKAGES),
    ]


def dockerfile(versions: Mapping[str, str], base: str = images.DEFAULT_IMAGE) -> str:
    """The Dockerfile of the Dask image on ``base`` (the versions are its only values)."""
    checked = _checked(versions)
    label = json.dumps(json.dumps(checked, sort_keys=True))
    return (
        f"# The p2prc Dask image: {base} plus the Dask stack in {DASK_HOME}/site.\n"
        f"FROM {base}\n"
        f"COPY site {DASK_HOME}/site\n"
        f"COPY bin {DASK_HOME}/bin\n"
        # -B: the check writes no .pyc into a layer of its own.
        f"RUN PYTHONPATH={DASK_HOME}/site python3 -B -c "
        "'import dask, distributed, numpy, pandas' && "
        f"{DASK_HOME}/bin/dask --version\n"
        f'LABEL org.p2prc.image="{_IMAGE}" {VERSIONS_LABEL}={label}\n'
    )


# The image's python3 runs with the site directory first on its path; nothing else changes.
_WRAPPER = """#!/bin/sh
export PYTHONPATH={home}/site${{PYTHONPATH:+:$PYTHONPATH}}
exec python3 {args}"$@"
"""


def image_versions(tag: str) -> dict[str, str] | None:
    """The Dask versions ``tag`` was built with (None when absent or unlabelled)."""
    text = images._labels(tag).get(VERSIONS_LABEL)
    if not isinstance(text, str):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        return None
    return {str(k): v for k, v in value.items()}


def version_mismatch(local: Mapping[str, str], image: Mapping[str, str] | None) -> str | None:
    """A sentence naming every package whose version differs (None when they agree)."""
    if image is None:
        return "the Dask image has no version label; rebuild it with ensure_dask_image"
    names = ["python", *PACKAGES]
    names += sorted((set(local) | set(image)) - set(names))
    differ = [
        f"{name} {local.get(name, 'missing')} here but {image.get(name, 'missing')} in the image"
        for name in names
        if local.get(name) != image.get(name)
    ]
    if not differ:
        return None
    return "Dask versions differ: " + "; ".join(differ) + " (they must be equal)"


def _image_python(base: str) -> str:
    client = images._client()
    try:
        with _docker_errors():
            out = client.containers.run(
                base,
                ["-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                entrypoint="python3",
                remove=True,
                network_mode="none",
            )
    finally:
        client.close()
    return bytes(out).decode(errors="replace").strip()


def _pip(command: list[str], what: str) -> None:
    try:
        images._run(command, what)
    except (ContainerError, OSError) as exc:
        raise ClusterError(
            f"{what} for the Dask image failed; the host needs pip and a package index, or "
            f"the wheels in {wheel_cache()} (a machine without network: run 'p2prc images "
            "bootstrap --dask' there while it has network, or copy that folder from one that "
            f"has it, such as the cluster owner's): {exc}"
        ) from exc


def _fill_site(versions: Mapping[str, str], site: Path) -> None:
    wheels = wheel_cache()
    wheels.mkdir(parents=True, exist_ok=True)
    install = pip_command(versions, wheels=wheels, target=site)
    quiet = subprocess.run(install, capture_output=True, text=True, check=False)
    if quiet.returncode == 0:
        images._step(f"Dask packages installed from the wheel cache {wheels}")
        return
    shutil.rmtree(site, ignore_errors=True)
    images._step(f"downloading the Dask wheels into {wheels}")
    _pip(pip_command(versions, wheels=wheels), "pip download")
    _pip(install, "pip install")


def _write_context(context: Path, versions: Mapping[str, str]) -> None:
    bin_dir = context / "bin"
    bin_dir.mkdir()
    for name, args in (("dask", "-m dask "), ("python", "")):
        wrapper = bin_dir / name
        wrapper.write_text(_WRAPPER.format(home=DASK_HOME, args=args))
    # Console scripts pip wrote point at the host's interpreter: the wrappers replace them.
    shutil.rmtree(context / "site" / "bin", ignore_errors=True)
    (context / "Dockerfile").write_text(dockerfile(versions))
    # COPY keeps the modes: everything readable (and the wrappers runnable) by any user,
    # without a chmod layer that would double the image.
    for root, dirs, files in os.walk(context):
        for name in dirs:
            os.chmod(Path(root) / name, 0o755)
        for name in files:
            path = Path(root) / name
            os.chmod(path, 0o755 if path.parent == bin_dir else 0o644)


@contextlib.contextmanager
def _maybe_reporting(progress: Callable[[str], None] | None) -> Iterator[None]:
    if progress is None:
        yield
    else:
        with images.reporting(progress):
            yield


def _current(tag: str, versions: Mapping[str, str]) -> bool:
    return image_versions(tag) == dict(versions) and images.image_version(tag) == (
        images.IMAGE_VERSION
    )


def _build_replacing(tag: str, context: Path) -> None:
    """Build ``tag`` from ``context``; the image it replaces goes unless a container uses it."""
    import docker.errors

    client = images._client()
    try:
        with _docker_errors():
            old = _image_id(client, tag)
            images._build(client, tag, path=str(context))
            if old is not None and old != _image_id(client, tag):
                with contextlib.suppress(docker.errors.APIError):
                    client.images.remove(old)
    finally:
        client.close()


def _image_id(client: Any, tag: str) -> str | None:
    import docker.errors

    try:
        return str(client.images.get(tag).id)
    except docker.errors.ImageNotFound:
        return None


def ensure_dask_image(
    *,
    versions: Mapping[str, str] | None = None,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> str:
    """Make sure the Dask image for ``versions`` (default: this environment's) exists on
    the current default image; returns its tag."""
    checked = _checked(versions if versions is not None else local_versions())
    tag = dask_image_tag(checked)
    with _maybe_reporting(progress):
        if not force and _current(tag, checked):
            return tag
        with _build_lock():
            # Another process (or thread) may have built it while this one waited.
            if force or not _current(tag, checked):
                _build_dask_image(tag, checked)
    if not _current(tag, checked):
        raise ClusterError(f"{tag} was built but its labels do not name the versions asked")
    return tag


@contextlib.contextmanager
def _build_lock() -> Iterator[None]:
    """One Dask image build at a time on this machine (they share the wheel cache)."""
    path = wheel_cache().parent / "dask-image.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    # Closing the file releases the lock, also when the build fails.
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            images._step("waiting for another build of the Dask image")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _build_dask_image(tag: str, checked: dict[str, str]) -> None:
    images.ensure_default_image()
    python = _image_python(images.DEFAULT_IMAGE)
    if python != checked["python"]:
        raise ClusterError(
            f"{images.DEFAULT_IMAGE} has Python {python} but the Dask versions are for "
            f"Python {checked['python']}; Dask needs the same Python minor everywhere, so "
            f"run the client from a Python {python} environment"
        )
    with tempfile.TemporaryDirectory(prefix="p2prc-dask-") as tmp:
        context = Path(tmp)
        _fill_site(checked, context / "site")
        _write_context(context, checked)
        images._step(f"building {tag} on {images.DEFAULT_IMAGE}")
        _build_replacing(tag, context)


async def dask_image(
    image: str | None, say: Callable[[str], Awaitable[None]]
) -> tuple[str, dict[str, str]]:
    """The image named (its versions checked when it has them), else this environment's
    Dask image, built if missing; a ``ClusterError`` when the versions differ."""
    loop = asyncio.get_running_loop()

    def report(line: str) -> None:  # from the building thread, in order
        async def one() -> None:
            await say(line)

        asyncio.run_coroutine_threadsafe(one(), loop).result()

    local = local_versions()
    if image is None:
        image = await asyncio.to_thread(ensure_dask_image, progress=report)
    found = await asyncio.to_thread(image_versions, image)
    if found is None:
        await say(f"image {image} names no Dask versions; they are not checked")
        return image, {}
    mismatch = version_mismatch(local, found)
    if mismatch is not None:
        raise ClusterError(f"{image}: {mismatch}")
    return image, found
