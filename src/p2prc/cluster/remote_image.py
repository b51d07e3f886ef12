"""The Dask image on a peer: the owner asks (``ensure_on_peer``), the peer makes it.

A cluster's workers run in containers on other nodes, from the image of exactly the
owner's versions. Before it creates a worker there the owner's node sends those versions
to ``POST /images/dask``; the peer checks them (``image._checked``: strict versions, the
exact package set, its own image's Python), answers at once when it has the image and
else builds it, streaming progress. Against a trusted but hostile caller a node keeps at
most ``MAX_TAGS`` Dask images (a new one past that is refused, naming them: the operator
removes one with ``docker rmi``; nothing is removed for a peer), builds one at a time, and
stops waiting for a build after ``BUILD_TIMEOUT`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..containers.docker import DEFAULT_DOCKER_HOST, _check_reachable, _docker_errors
from ..errors import (
    ContainerError,
    ImageNotFound,
    InvalidRequest,
    LimitExceeded,
    NotFound,
    NotTrusted,
    P2PRCError,
    PeerError,
    PeerNotFound,
    PeerProtocolError,
    PeerTimeout,
    error_class,
)
from . import image as images

if TYPE_CHECKING:
    from ..containers.runtime import ContainerRuntime
    from ..peers.link import PeerLink

__all__ = [
    "BUILD_TIMEOUT",
    "MAX_TAGS",
    "PATH",
    "DaskImageEvent",
    "DaskImageRequest",
    "DaskImages",
    "ensure_on_peer",
]

PATH = "/images/dask"
MAX_TAGS = 4
BUILD_TIMEOUT = 15 * 60.0
# The owner waits this much longer than the peer does: the peer's own timeout is the answer.
_GRACE = 60.0
_MESSAGE = 300

Progress = Callable[[str], Awaitable[None]]


class DaskImageRequest(BaseModel):
    """The versions of the Dask image a peer asks this node to have."""

    model_config = ConfigDict(extra="forbid")

    versions: dict[str, str] = Field(
        max_length=32,
        description="The Python minor and the version of each Dask package (as the image labels)",
    )


class DaskImageEvent(BaseModel):
    """One line of the NDJSON answer of ``POST /images/dask``."""

    event: Literal["progress", "ready", "error"]
    message: str | None = None
    tag: str | None = None
    error: dict[str, str] | None = None


class Builder(Protocol):
    """How a node makes Dask images (blocking calls, run in a thread)."""

    def python(self) -> str:
        """The Python minor of the image Dask images are built on."""
        ...

    def current(self, tag: str, versions: Mapping[str, str]) -> bool:
        """Whether ``tag`` exists, built with exactly ``versions``."""
        ...

    def build(self, versions: Mapping[str, str], progress: Callable[[str], None]) -> str:
        """Build the image of ``versions``; its tag."""
        ...


class DockerBuilder:
    """Dask images on this node's Docker (``cluster.image``); built on the default daemon
    only (where ``cluster.image`` builds), found on any."""

    def __init__(self, docker_host: str = DEFAULT_DOCKER_HOST) -> None:
        self._host = docker_host

    def python(self) -> str:
        from ..containers import images as base

        self._check_default()
        base.ensure_default_image()
        return images._image_python(base.DEFAULT_IMAGE)

    def current(self, tag: str, versions: Mapping[str, str]) -> bool:
        if self._host == DEFAULT_DOCKER_HOST:
            return images._current(tag, versions)
        return _labelled(self._host, tag) == json.dumps(dict(versions), sort_keys=True)

    def build(self, versions: Mapping[str, str], progress: Callable[[str], None]) -> str:
        self._check_default()
        return images.ensure_dask_image(versions=versions, progress=progress)

    def _check_default(self) -> None:
        if self._host != DEFAULT_DOCKER_HOST:
            raise ImageNotFound(
                f"this node's Docker is {self._host}, and Dask images are built on "
                f"{DEFAULT_DOCKER_HOST} only: build it there and 'docker save | docker load' it"
            )


def _labelled(docker_host: str, tag: str) -> str | None:
    """The Dask versions label of ``tag`` on ``docker_host``, as canonical JSON."""
    import docker.errors

    import docker

    _check_reachable(docker_host)
    with _docker_errors():
        client = docker.DockerClient(base_url=docker_host, timeout=30)
    try:
        with _docker_errors():
            text = (client.images.get(tag).labels or {}).get(images.VERSIONS_LABEL)
        value = json.loads(text) if isinstance(text, str) else None
    except (docker.errors.ImageNotFound, ContainerError, ValueError):
        return None
    finally:
        client.close()
    return json.dumps(value, sort_keys=True) if isinstance(value, dict) else None


@dataclass(eq=False)
class _Build:
    tag: str
    done: asyncio.Future[str]
    listeners: list[Callable[[str], None]] = field(default_factory=list)


@dataclass(frozen=True)
class Prepared:
    """A checked request: its versions and tag, and whether the image is already here."""

    versions: dict[str, str]
    tag: str
    ready: bool


class DaskImages:
    """This node's Dask images for its peers: checked, bounded, built one at a time."""

    def __init__(
        self,
        runtime: ContainerRuntime,
        builder: Builder | None = None,
        *,
        max_tags: int = MAX_TAGS,
        timeout: float = BUILD_TIMEOUT,
    ) -> None:
        self._runtime = runtime
        self.builder: Builder = builder or DockerBuilder()
        self._max = max_tags
        self._timeout = timeout
        self._python: str | None = None
        self._building: _Build | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        now = self._building.tag if self._building else "idle"
        return f"<DaskImages [{now}]>"

    async def prepare(self, versions: Mapping[str, str]) -> Prepared:
        """Check a request before any answer starts; raises what refuses it."""
        checked = images._checked(versions)
        tag = images.dask_image_tag(checked)
        self._check_python(checked)
        if await asyncio.to_thread(self.builder.current, tag, checked):
            return Prepared(checked, tag, ready=True)
        building = self._building
        if building is not None and building.tag != tag:
            raise LimitExceeded(
                f"this node builds one Dask image at a time and builds {building.tag} now; "
                "try again in a few minutes"
            )
        kept = sorted({t for t in await self._runtime.images() if images.is_dask_tag(t)})
        if tag not in kept and building is None and len(kept) >= self._max:
            raise LimitExceeded(
                f"this node keeps at most {self._max} Dask images and has {', '.join(kept)}; "
                "its operator can remove one no container uses with 'docker rmi TAG'"
            )
        return Prepared(checked, tag, ready=False)

    async def ensure(self, prepared: Prepared, progress: Callable[[str], None]) -> str:
        """Make the image of a prepared request (joining a build of the same tag); its tag."""
        if prepared.ready:
            return prepared.tag
        if self._python is None:
            self._python = await asyncio.to_thread(self.builder.python)
        self._check_python(prepared.versions)
        build = self._building
        if build is None:
            build = self._start(prepared)
        elif build.tag != prepared.tag:  # another request started one since it was checked
            raise LimitExceeded(f"this node builds {build.tag} now; try again in a few minutes")
        else:
            progress(f"waiting for the build of {build.tag} that runs here")
        build.listeners.append(progress)
        try:
            async with asyncio.timeout(self._timeout):
                return await asyncio.shield(build.done)
        except TimeoutError:
            raise ImageNotFound(
                f"building {prepared.tag} took more than {self._timeout:g} s; it goes on "
                "here (one build at a time), ask again later"
            ) from None
        finally:
            with contextlib.suppress(ValueError):
                build.listeners.remove(progress)

    def _start(self, prepared: Prepared) -> _Build:
        loop = asyncio.get_running_loop()
        build = _Build(prepared.tag, loop.create_future())
        # Nobody may be waiting any more (timed out): the outcome is still read.
        build.done.add_done_callback(lambda done: done.cancelled() or done.exception())

        def report(line: str) -> None:  # in the building thread
            for listener in list(build.listeners):
                listener(line)

        async def building() -> None:
            try:
                tag = await asyncio.to_thread(self.builder.build, prepared.versions, report)
            except asyncio.CancelledError:
                build.done.cancel()
                raise
            except Exception as exc:  # handed to every waiter
                build.done.set_exception(exc)
            else:
                build.done.set_result(tag)
            finally:
                # The slot is free only when the thread ended, also after a waiter's timeout.
                self._building = None
                self._tasks.discard(task)

        self._building = build
        task = loop.create_task(building(), name=f"dask-image-{prepared.tag}")
        self._tasks.add(task)
        return build

    def _check_python(self, versions: Mapping[str, str]) -> None:
        if self._python is not None and versions["python"] != self._python:
            raise InvalidRequest(
                f"Dask images here have Python {self._python}, not {versions['python']}: "
                "Dask needs the same Python minor everywhere"
            )


async def ensure_on_peer(
    link: PeerLink, peer: str, name: str, versions: Mapping[str, str], progress: Progress
) -> str | None:
    """Have ``peer`` make the Dask image of ``versions`` (at once when it has it); its tag.

    None when the peer has no such route (an older node: its own config decides). A peer's
    refusal is an ``ImageNotFound`` (or its own container, trust or peer error), which
    placement skips like a refused create.
    """
    who = name or peer
    tag = images.dask_image_tag(versions)
    await progress(f"{who}: making sure it has {tag}")
    body = DaskImageRequest(versions=dict(versions)).model_dump()
    wait = BUILD_TIMEOUT + _GRACE
    try:
        async with asyncio.timeout(wait):
            target = link.resolve(peer)
            async with link.connect(target) as client:
                # The narrowest helper there is: AsyncClient has no public NDJSON call.
                lines = client.post_ndjson(PATH, body, unbounded=True)
                async with contextlib.aclosing(lines):
                    async for line in lines:
                        event = _event(line, client.base_url)
                        if event.event == "progress" and event.message:
                            await progress(f"{who}: {_clean(event.message)}")
                        elif event.event == "error":
                            error = event.error or {}
                            code = error.get("code", "")
                            raise _refusal(error_class(code)(error.get("message", "")), who, tag)
                        elif event.event == "ready":
                            if event.tag != tag:
                                raise PeerProtocolError(f"{who} made {event.tag!r}, not {tag}")
                            return tag
        raise PeerProtocolError(f"{who}: the answer of {PATH} ended without the image")
    except TimeoutError:
        raise PeerTimeout(f"{who} did not make {tag} within {wait:g} s") from None
    except _PASSED:
        raise
    except NotFound:  # an HTTP 404: the route is missing, a node from before it
        return None
    except P2PRCError as exc:
        raise _refusal(exc, who, tag) from exc


# Errors placement skips as they are; any other refusal of a peer becomes ImageNotFound.
_PASSED = (ContainerError, PeerError, NotTrusted, PeerNotFound)


def _refusal(exc: P2PRCError, who: str, tag: str) -> P2PRCError:
    if isinstance(exc, _PASSED):
        return exc
    return ImageNotFound(f"{who} could not make {tag}: {exc.code}: {exc}")


def _event(line: str, base_url: str) -> DaskImageEvent:
    try:
        return DaskImageEvent.model_validate_json(line)
    except ValidationError:
        raise PeerProtocolError(f"{base_url}{PATH}: a line that is no image event") from None


def _clean(text: str) -> str:
    """A peer's message, printable and short."""
    printable = "".join(c if c.isprintable() else " " for c in text)
    return printable[:_MESSAGE]
