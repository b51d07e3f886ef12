"""The default container image: pulled base or offline debootstrap, then the sshd layer.

Two ways to get the base, both supported: pull ``debian:bookworm-slim`` where a registry
is reachable, or build it offline with debootstrap from the Debian mirror this machine's
apt is configured with (read at run time, never written down) and ``docker import`` it.
Every external program runs from an argument list; nothing goes through a shell.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import ContainerError, InvalidRequest, RuntimeUnavailable
from ..models import IMAGE_REFERENCE
from .docker import DEFAULT_DOCKER_HOST, _check_reachable, _docker_errors

__all__ = [
    "BASE_OFFLINE",
    "BASE_PULL",
    "DEFAULT_IMAGE",
    "IMAGE_VERSION",
    "apt_mirror",
    "base_tag_for",
    "bootstrap_base",
    "build_default_image",
    "build_offered_image",
    "debootstrap_command",
    "ensure_default_image",
    "ensure_package_image",
    "image_exists",
    "image_version",
    "package_names",
    "reporting",
]

log = logging.getLogger(__name__)

DEFAULT_IMAGE = "p2prc/sshd:latest"
BASE_PULL = "debian:bookworm-slim"
BASE_OFFLINE = "p2prc/base:bookworm"
# The sshd layer's version (its Dockerfile label); an older default image gets this layer
# rebuilt on its base, e.g. for the entrypoint that needs no DAC_OVERRIDE.
IMAGE_VERSION = "2"
_VERSION_LABEL = "org.p2prc.image-version"
# The extra Debian packages an image was bootstrapped with (sorted, comma-separated).
_PACKAGES_LABEL = "org.p2prc.packages"
_PACKAGES = ["openssh-server", "python3", "sudo", "ca-certificates", "iproute2", "procps"]
_DEBIAN_PATH = re.compile(r"/debian/?$")
# Debian policy 5.6.1: lower case letters, digits, '+', '-', '.'; two characters at least,
# starting with a letter or digit. The names reach debootstrap as one argument, never a shell.
_PACKAGE_NAME = re.compile(r"[a-z0-9][a-z0-9+.-]{1,99}")
_MAX_PACKAGES = 64
# Where the steps of a build go besides the log (``p2prc images``: a spinner or lines).
_progress: ContextVar[Callable[[str], None] | None] = ContextVar("_progress", default=None)


@contextlib.contextmanager
def reporting(progress: Callable[[str], None]) -> Iterator[None]:
    """Send each step of the builds run inside (debootstrap, import, layers) to ``progress``."""
    token = _progress.set(progress)
    try:
        yield
    finally:
        _progress.reset(token)


def _step(text: str) -> None:
    log.info("%s", text)
    progress = _progress.get()
    if progress is not None:
        progress(text)


def apt_mirror(apt_dir: Path = Path("/etc/apt")) -> str:
    """The main Debian archive URL from apt's sources (deb822 or one-line format)."""
    candidates: list[str] = []
    for path in sorted((apt_dir / "sources.list.d").glob("*.sources")):
        candidates += _deb822_uris(path.read_text(errors="replace"))
    for path in [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list"))]:
        if path.is_file():
            candidates += _one_line_uris(path.read_text(errors="replace"))
    for uri in candidates:
        if _DEBIAN_PATH.search(uri) and "security" not in uri:
            return uri
    raise ContainerError(f"no Debian mirror found in {apt_dir}; cannot bootstrap offline")


def _deb822_uris(text: str) -> list[str]:
    uris: list[str] = []
    for stanza in text.split("\n\n"):
        fields = dict(
            line.split(":", 1) for line in stanza.splitlines() if ":" in line and line[:1] != "#"
        )
        if "deb" in fields.get("Types", "deb").split():
            uris += fields.get("URIs", "").split()
    return uris


def _one_line_uris(text: str) -> list[str]:
    uris = []
    for line in text.splitlines():
        words = [w for w in line.split() if not w.startswith("[")]
        if len(words) >= 3 and words[0] == "deb":
            uris.append(words[1])
    return uris


def _client() -> Any:
    import docker

    _check_reachable(DEFAULT_DOCKER_HOST)
    with _docker_errors():
        return docker.DockerClient(base_url=DEFAULT_DOCKER_HOST, timeout=600)


def image_exists(tag: str) -> bool:
    """Whether the local Docker daemon has ``tag``."""
    import docker.errors

    client = _client()
    try:
        with _docker_errors():
            client.images.get(tag)
    except docker.errors.ImageNotFound:
        return False
    except ContainerError:
        return False
    finally:
        client.close()
    return True


def image_version(tag: str) -> str | None:
    """The sshd layer version label of ``tag`` (None when absent or unlabelled)."""
    version = _labels(tag).get(_VERSION_LABEL)
    return str(version) if version is not None else None


def _labels(tag: str) -> dict[str, Any]:
    import docker.errors

    client = _client()
    try:
        with _docker_errors():
            return dict(client.images.get(tag).labels or {})
    except (docker.errors.ImageNotFound, ContainerError):
        return {}
    finally:
        client.close()


def package_names(text: str | Iterable[str]) -> list[str]:
    """Extra Debian package names from ``a,b`` (or a list), checked, sorted, without repeats."""
    words = text.split(",") if isinstance(text, str) else list(text)
    names = sorted({word.strip() for word in words if word.strip()})
    for name in names:
        if not _PACKAGE_NAME.fullmatch(name):
            raise InvalidRequest(f"{name!r} is not a Debian package name (like povray)")
    if len(names) > _MAX_PACKAGES:
        raise InvalidRequest(f"at most {_MAX_PACKAGES} extra packages")
    return [name for name in names if name not in _PACKAGES]


def base_tag_for(tag: str) -> str:
    """The offline base an image with extra packages is built on: ``lab/render:1`` ->
    ``lab/render-base:1``."""
    if not re.match(IMAGE_REFERENCE, tag) or "@" in tag:
        raise InvalidRequest(f"{tag!r} is not an image reference like lab/render:1")
    name, colon, version = tag.rpartition(":")
    if not colon or "/" in version:
        name, version = tag, "latest"
    return f"{name}-base:{version}"


def debootstrap_command(root: Path, mirror: str, packages: Iterable[str] = ()) -> list[str]:
    """The debootstrap argument list for a minbase bookworm with the default packages and
    ``packages`` (checked by :func:`package_names`)."""
    extra = package_names(list(packages))
    if not mirror.startswith(("http://", "https://", "file:/")):
        raise ContainerError(f"{mirror!r} is not a mirror URL")
    return [
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join([*_PACKAGES, *extra])}",
        "bookworm",
        str(root),
        mirror,
    ]


def bootstrap_base(
    tag: str = BASE_OFFLINE, *, mirror: str | None = None, packages: Iterable[str] = ()
) -> None:
    """Build a base image offline: debootstrap a minimal bookworm (plus ``packages``) and
    import it."""
    if shutil.which("debootstrap") is None:
        raise ContainerError("debootstrap is not installed (apt-get install debootstrap)")
    if shutil.which("docker") is None:
        raise RuntimeUnavailable("the docker command is not installed")
    extra = package_names(list(packages))
    mirror = mirror or apt_mirror()
    with tempfile.TemporaryDirectory(prefix="p2prc-rootfs-") as tmp:
        root = Path(tmp) / "root"
        _step(f"debootstrap bookworm from {mirror} into {root}")
        _run(debootstrap_command(root, mirror, extra), "debootstrap")
        _step(f"importing the root file system as {tag}")
        _import(root, tag, extra)


def _import(root: Path, tag: str, packages: list[str] | None = None) -> None:
    tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    assert tar.stdout is not None
    label = ["--change", f"LABEL {_PACKAGES_LABEL}={','.join(packages)}"] if packages else []
    try:
        result = subprocess.run(
            ["docker", "import", *label, "-", tag],
            stdin=tar.stdout,
            capture_output=True,
            text=True,
            check=False,
        )
    finally:
        tar.stdout.close()
        tar.wait()
    if result.returncode != 0 or tar.returncode != 0:
        raise ContainerError(f"docker import failed: {result.stderr.strip()[-500:]}")


def _run(command: list[str], what: str) -> None:
    """Run ``command``, each line of its output a step; its last lines name a failure."""
    lines: collections.deque[str] = collections.deque(maxlen=20)
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            if line.strip():
                lines.append(line.strip())
                _step(f"{what}: {line.strip()}")
    if process.returncode != 0:
        tail = "\n".join(lines)[-800:]
        raise ContainerError(f"{what} failed ({process.returncode}): {tail}")


def _build(client: Any, tag: str, **options: Any) -> None:
    """``docker build`` (classic builder) with each of its steps reported."""
    for chunk in client.api.build(tag=tag, rm=True, forcerm=True, decode=True, **options):
        if not isinstance(chunk, dict):
            continue
        if "error" in chunk:
            raise ContainerError(f"docker build of {tag} failed: {str(chunk['error']).strip()}")
        line = str(chunk.get("stream", "")).strip()
        if line.startswith("Step "):
            _step(f"{tag}: {line}")


def pull_base(tag: str = BASE_PULL) -> None:
    """Pull the public base image."""
    _step(f"pulling {tag}")
    client = _client()
    try:
        with _docker_errors():
            repository, _, version = tag.partition(":")
            client.images.pull(repository, tag=version or "latest")
    finally:
        client.close()


def build_default_image(base: str, tag: str = DEFAULT_IMAGE) -> None:
    """Build the sshd image on ``base`` with the classic builder."""
    context = resources.files("p2prc.containers") / "sshd"
    client = _client()
    try:
        _step(f"building the sshd layer of {tag} on {base}")
        with resources.as_file(context) as path, _docker_errors():
            _build(client, tag, path=str(path), buildargs={"BASE": base})
    finally:
        client.close()


def build_offered_image(context: Path, tag: str) -> None:
    """Build an image from the owner's Dockerfile directory (classic builder)."""
    if not re.match(IMAGE_REFERENCE, tag):
        raise InvalidRequest(f"{tag!r} is not an image reference like lab/render:1")
    if not (context / "Dockerfile").is_file():
        raise InvalidRequest(f"{context} has no Dockerfile")
    client = _client()
    try:
        _step(f"building {tag} from {context}")
        with _docker_errors():
            _build(client, tag, path=str(context))
    finally:
        client.close()


def ensure_default_image(*, offline: bool | None = None, force: bool = False) -> str:
    """Make sure the default image exists; returns how it was made (or 'present').

    ``offline=None`` tries the registry first and falls back to debootstrap.
    """
    if image_exists(DEFAULT_IMAGE) and not force:
        if image_version(DEFAULT_IMAGE) == IMAGE_VERSION:
            return "present"
        for base in (BASE_OFFLINE, BASE_PULL):
            if image_exists(base):
                build_default_image(base)
                return "updated"
    base = BASE_OFFLINE if offline else BASE_PULL
    if offline is not True and not image_exists(BASE_PULL):
        try:
            pull_base()
        except ContainerError as exc:
            if offline is False:
                raise
            log.info("cannot pull %s (%s); bootstrapping offline", BASE_PULL, exc)
            base = BASE_OFFLINE
    elif offline is None:
        base = BASE_PULL
    if base == BASE_OFFLINE and (force or not image_exists(BASE_OFFLINE)):
        bootstrap_base()
    build_default_image(base)
    return "offline" if base == BASE_OFFLINE else "pulled"


def ensure_package_image(tag: str, packages: Iterable[str], *, force: bool = False) -> str:
    """Make sure ``tag`` exists as the default image plus Debian ``packages``, built offline
    (debootstrap, import as its own base, the sshd layer); returns how (or 'present')."""
    extra = package_names(list(packages))
    if not extra:
        raise InvalidRequest("name the extra packages, like --packages povray,imagemagick")
    if tag == DEFAULT_IMAGE:
        raise InvalidRequest(f"{DEFAULT_IMAGE} keeps the default packages; name yours with --tag")
    base = base_tag_for(tag)
    wanted = ",".join(extra)
    if not force and _labels(tag).get(_PACKAGES_LABEL) == wanted:
        if image_version(tag) == IMAGE_VERSION:
            return "present"
        build_default_image(base, tag)
        return "updated"
    if force or _labels(base).get(_PACKAGES_LABEL) != wanted:
        bootstrap_base(base, packages=extra)
    build_default_image(base, tag)
    return "offline"
