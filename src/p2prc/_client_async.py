"""``AsyncClient``: the library API to a node's HTTP API (``p2prc.client`` re-exports it).

Requests that change state are signed with the home's node key; errors come back as the
same exception classes the node raised. The blocking ``Client`` is derived from this class
in ``_client_sync``: an operation is written here once.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import re
import ssl
import time
from collections.abc import AsyncGenerator, Callable, Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError

from ._closing import AsyncClosing
from ._match import unique_peer
from .config import Home, join_address, resolve_home, split_address
from .errors import (
    InvalidRequest,
    NodeNotRunning,
    P2PRCError,
    PeerProtocolError,
    PeerTimeout,
    PeerUnreachable,
    WrongNode,
    error_class,
    validation_message,
)
from .identity import Identity
from .models import (
    CallerInfo,
    ContainerGroup,
    ContainerView,
    CreateContainer,
    CreateEvent,
    GroupMember,
    Health,
    ImageList,
    MappedPort,
    MapPortRequest,
    MetadataUpdate,
    NodeStatus,
    PeerAddress,
    PeerView,
    PluginEvent,
    PluginInfo,
    PluginRun,
    PluginRunRequest,
    Reachability,
    ReachabilityRequest,
    RemoteCreate,
    Specs,
    SyncResult,
    TrackedContainer,
)

if TYPE_CHECKING:
    from .attach.client import AttachedAPI
    from .cluster.client import ClustersAPI
    from .jobs.client import Job, JobsAPI
    from .jobs.task import Task

__all__ = ["AsyncClient", "ProgressCallback", "is_address", "local_api_url", "peer_url"]

ModelT = TypeVar("ModelT", bound=BaseModel)

_UNSIGNED_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# A GET carrying this header is signed too (reads of private data, such as /tracked).
_SIGN_HEADER = "P2PRC-Sign"
# GET /peers pages: the most one answer holds, and how many pages a client follows.
_PEER_PAGE = 1024
_MAX_PEER_PAGES = 64

ProgressCallback = Callable[[str], Any]


def peer_url(address: str) -> str:
    """A base URL from ``host:port``, ``[v6]:port``, a bare host or a full URL."""
    if address.startswith(("http://", "https://")):
        return address.rstrip("/")
    try:
        host, port = split_address(address)
    except ValueError as exc:
        raise PeerUnreachable(str(exc)) from None
    return f"http://{join_address(host, port)}"


def _pinned(base_url: str, audience: str | None) -> tuple[str, str | None]:
    """The URL for httpx, and the node id its TLS certificate must hold, if any.

    ``https://<node id>@host:port`` (a NAT'd node's ``public_api`` in its signed record)
    names the node; so does ``audience`` for any ``https`` URL. The node id is checked
    against the server's key during the handshake, before the request is sent.
    """
    url = httpx.URL(base_url)
    if url.scheme != "https":
        return base_url, None
    named = url.username
    if named and audience is not None and named != audience:
        raise WrongNode(f"{base_url} names node {named}, not {audience}")
    return (str(url.copy_with(username=None, password=None)).rstrip("/"), named or audience or None)


_ADDRESS = re.compile(r"^(https?://|\[.*\](:\d+)?$|[^:\s]+:\d{1,5}$)")


def is_address(text: str) -> bool:
    """Whether ``text`` is a URL or ``host:port`` rather than a peer name or id."""
    return bool(_ADDRESS.match(text.strip()))


def local_api_url(home: Home) -> str:
    """The API address the running node of ``home`` wrote down."""
    try:
        return str(json.loads(home.runtime_file.read_text())["api"])
    except (OSError, ValueError, KeyError, TypeError):
        raise NodeNotRunning(
            f"no node is running for {home.path}; start one with 'p2prc start'"
        ) from None


def _local_node_id(home: Home) -> str | None:
    """The node id the running node of ``home`` wrote down with its address, if any."""
    try:
        node_id = json.loads(home.runtime_file.read_text()).get("node_id")
    except (OSError, ValueError, AttributeError):
        return None
    return node_id if isinstance(node_id, str) and node_id else None


class _SignatureAuth(httpx.Auth):
    """Signs state-changing requests for the node they are sent to.

    The audience is the expected node id when the caller knows it (from that node's
    signed peer record), so a server cannot have us sign requests for another node by
    claiming its id. Otherwise it is learned once per origin from ``GET /status``.

    Async only (the sync ``Client`` runs ``AsyncClient``): the probe that learns the
    node's id is read here, while the signed request's answer may be a stream.
    """

    def __init__(self, identity: Identity | None, audience: str | None = None) -> None:
        self._identity = identity
        self._audience = audience
        self._audiences: dict[tuple[str, str, int | None], str] = {}

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        raise RuntimeError("p2prc signs requests only in AsyncClient (Client wraps it).")

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        wants_signature = request.headers.pop(_SIGN_HEADER, None) is not None
        unsigned = request.method in _UNSIGNED_METHODS and not wants_signature
        if unsigned or self._identity is None:
            yield request
            return
        origin = (request.url.scheme, request.url.host, request.url.port)
        audience = self._audience or self._audiences.get(origin)
        if audience is None:
            probe = httpx.Request("GET", request.url.copy_with(raw_path=b"/status"))
            response = yield probe
            await response.aread()
            audience = _node_id_from(response)
            self._audiences[origin] = audience
        body = await request.aread()
        target = request.url.raw_path.decode("ascii")
        request.headers.update(
            self._identity.signed_headers(request.method, target, audience, body)
        )
        yield request


def _node_id_from(response: httpx.Response) -> str:
    if response.status_code != 200:
        _raise_for_error(response)
    try:
        return str(response.json()["node_id"])
    except (ValueError, KeyError, TypeError):
        raise PeerProtocolError(f"{response.url} did not say which node it is") from None


def _raise_for_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        error = response.json()["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        raise PeerProtocolError(
            f"{response.request.url} answered HTTP {response.status_code} without an error body"
        ) from None
    raise error_class(code)(message)


class AsyncClient(AsyncClosing):
    """Talks to one node's API; by default the running node of this home."""

    # Twin: Client.__init__ in _client_sync takes the same parameters (written out for mypy).
    def __init__(
        self,
        base_url: str | None = None,
        *,
        home: Home | Path | str | None = None,
        identity: Identity | None = None,
        audience: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float | httpx.Timeout = 30.0,
    ) -> None:
        """``audience``: the node id expected at ``base_url``; requests are signed for it.

        ``timeout``: seconds (connecting gets at most 5 of them), or an ``httpx.Timeout``.
        """
        self._home = home if isinstance(home, Home) else resolve_home(home)
        self.audience = audience
        self._local = base_url is None
        self.base_url = local_api_url(self._home) if base_url is None else peer_url(base_url)
        if base_url is None and audience is None:
            audience = self.audience = _local_node_id(self._home)  # no /status probe
        url, pin = _pinned(self.base_url, audience)
        if pin is not None and audience is None:
            audience = self.audience = pin  # TLS proves the node: sign for it, no probe
        if identity is None and self._home.identity_key.exists():
            identity = Identity.load(self._home.identity_dir)
        verify: ssl.SSLContext | bool = not url.startswith("http://")  # CA store: ~50 ms
        if pin is not None:
            from .tunnel.tls import pinned_context  # TLS helpers load only when a peer uses TLS

            verify = pinned_context(pin)
        self._http = httpx.AsyncClient(
            base_url=url,
            auth=_SignatureAuth(identity, audience),
            transport=transport,
            verify=verify,
            timeout=timeout
            if isinstance(timeout, httpx.Timeout)
            else httpx.Timeout(timeout, connect=min(timeout, 5.0)),
            trust_env=False,
        )

    def __repr__(self) -> str:
        return f"<AsyncClient {self.base_url}>"

    async def health(self) -> Health:
        """``GET /health``."""
        return await self._call("GET", "/health", Health)

    async def status(self) -> NodeStatus:
        """``GET /status``: the node's id, name, version and addresses."""
        status = await self._call("GET", "/status", NodeStatus)
        if self.audience is not None and status.node_id != self.audience:
            raise WrongNode(
                f"{self.base_url} says it is node {status.node_id}, not {self.audience}"
            )
        return status

    async def specs(self) -> Specs:
        """``GET /specs``: CPU, memory, disk and GPUs."""
        return await self._call("GET", "/specs", Specs)

    async def whoami(self) -> CallerInfo:
        """``POST /whoami``: check that the node accepts this home's signed requests."""
        return await self._call("POST", "/whoami", CallerInfo)

    async def shutdown(self) -> None:
        """``POST /shutdown``: stop the node (only its own key may)."""
        await self._call("POST", "/shutdown", Health)

    async def images(self) -> ImageList:
        """``GET /images``: the images this node offers."""
        return await self._call("GET", "/images", ImageList)

    async def create_container(
        self, spec: CreateContainer | None = None, *, progress: ProgressCallback | None = None
    ) -> ContainerView:
        """``POST /containers``: a container on this node for the caller."""
        body = (spec or CreateContainer()).model_dump(mode="json", exclude_none=True)
        return await self._stream_create("/containers", body, progress)

    async def containers(self) -> list[ContainerView]:
        """``GET /containers``: the caller's containers on this node (signed)."""
        response = await self._request("GET", "/containers", signed=True)
        return _validate_list(ContainerView, response, self.base_url)

    async def remove_container(self, container_id: str) -> None:
        """``DELETE /containers/ID``."""
        await self._request("DELETE", f"/containers/{_path_part(container_id)}")

    async def create_on_peer(
        self,
        peer: str,
        spec: CreateContainer | None = None,
        *,
        progress: ProgressCallback | None = None,
    ) -> ContainerView:
        """Ask this (local) node to create a container on ``peer`` and track it."""
        body = RemoteCreate(peer=peer, spec=spec or CreateContainer())
        return await self._stream_create(
            "/tracked", body.model_dump(mode="json", exclude_none=True), progress
        )

    async def tracked(self) -> list[TrackedContainer]:
        """Containers this node created on peers (the original --tc)."""
        response = await self._request("GET", "/tracked", signed=True)
        return _validate_list(TrackedContainer, response, self.base_url)

    async def remove_tracked(self, container_id: str) -> None:
        """Remove a tracked container (id or unique prefix) on its peer."""
        await self._request("DELETE", f"/tracked/{_path_part(container_id)}")

    async def peers(self) -> list[PeerView]:
        """``GET /peers``, every page: the node's view of the network, itself, then by name."""
        views: dict[str, PeerView] = {}
        after = ""
        for _ in range(_MAX_PEER_PAGES):
            query = f"?limit={_PEER_PAGE}" + (f"&after={after}" if after else "")
            response = await self._request("GET", f"/peers{query}")
            page = _validate_list(PeerView, response, self.base_url)
            fresh = [view for view in page if view.node_id not in views]
            views.update((view.node_id, view) for view in fresh)
            if len(page) < _PEER_PAGE or not fresh:
                break
            after = quote(page[-1].node_id, safe="")
        return sorted(views.values(), key=lambda view: (not view.me, view.name, view.node_id))

    async def resolve(self, peer: str) -> str:
        """API base URL of ``peer``: a URL, ``host:port``, a peer name or a node id prefix."""
        if is_address(peer):
            return peer_url(peer)
        views = [view for view in await self.peers() if not view.me]
        return unique_peer(peer, views, ident=lambda v: v.node_id, name=lambda v: v.name).api

    async def add_peer(self, address: str) -> SyncResult:
        """Exchange tables with ``address`` now (bootstrap)."""
        return await self._call(
            "POST", "/peers", SyncResult, PeerAddress(address=address).model_dump()
        )

    async def sync_peers(self) -> SyncResult:
        """Exchange tables with a few known nodes now."""
        return await self._call("POST", "/peers/sync", SyncResult)

    async def remove_peer(self, node_id: str) -> None:
        """Forget a peer."""
        await self._request("DELETE", f"/peers/{_path_part(node_id)}")

    async def set_metadata(self, text: str, custom: dict[str, str] | None = None) -> PeerView:
        """Set this node's metadata; it spreads to every node."""
        body = MetadataUpdate(text=text, custom=custom).model_dump(exclude_none=True)
        return await self._call("POST", "/meta", PeerView, body)

    async def exchange(self, payload: bytes) -> bytes:
        """Push-pull: send our table (msgpack), get theirs."""
        with self._transport_errors():
            response = await self._http.post(
                "/peers/exchange", content=payload, headers={"content-type": "application/msgpack"}
            )
        _raise_for_error(response)
        return response.content

    async def speedtest(self, size: int = 8 * 1024 * 1024) -> float:
        """Download ``size`` bytes from the node; returns megabits per second."""
        start = time.perf_counter()
        received = 0
        with self._transport_errors():
            async with self._http.stream(
                "GET", "/peers/speedtest", params={"size": size}, headers={_SIGN_HEADER: "1"}
            ) as response:
                if response.status_code >= 400:
                    await response.aread()
                    _raise_for_error(response)
                async for chunk in response.aiter_bytes():
                    received += len(chunk)
        elapsed = max(time.perf_counter() - start, 1e-9)
        return received * 8 / elapsed / 1e6

    async def create_group(self) -> ContainerGroup:
        """A new, empty group of tracked containers."""
        return await self._call("POST", "/groups", ContainerGroup)

    async def groups(self) -> list[ContainerGroup]:
        """Every group of tracked containers."""
        response = await self._request("GET", "/groups", signed=True)
        return _validate_list(ContainerGroup, response, self.base_url)

    async def group(self, group_id: str) -> ContainerGroup:
        """One group."""
        path = f"/groups/{_path_part(group_id)}"
        response = await self._request("GET", path, signed=True)
        return _validate(ContainerGroup, response, self.base_url)

    async def add_to_group(self, group_id: str, container: str) -> ContainerGroup:
        """Add a tracked container to a group."""
        body = GroupMember(container=container).model_dump()
        return await self._call(
            "POST", f"/groups/{_path_part(group_id)}/members", ContainerGroup, body
        )

    async def remove_from_group(self, group_id: str, container: str) -> ContainerGroup:
        """Take a container out of a group."""
        path = f"/groups/{_path_part(group_id)}/members/{_path_part(container)}"
        return await self._call("DELETE", path, ContainerGroup)

    async def delete_group(self, group_id: str) -> None:
        """Delete a group."""
        await self._request("DELETE", f"/groups/{_path_part(group_id)}")

    async def plugins(self) -> list[PluginInfo]:
        """Installed plugins."""
        response = await self._request("GET", "/plugins", signed=True)
        return _validate_list(PluginInfo, response, self.base_url)

    async def pull_plugin(self, source: str) -> PluginInfo:
        """Install a plugin from git."""
        return await self._call("POST", "/plugins", PluginInfo, {"source": source})

    async def remove_plugin(self, name: str) -> None:
        """Uninstall a plugin."""
        await self._request("DELETE", f"/plugins/{_path_part(name)}")

    async def plugin_runs(self) -> list[PluginRun]:
        """Every plugin run."""
        response = await self._request("GET", "/plugin-runs", signed=True)
        return _validate_list(PluginRun, response, self.base_url)

    async def run_plugin(
        self,
        name: str,
        target: str,
        variables: dict[str, str] | None = None,
        *,
        progress: Callable[[PluginEvent], Any] | None = None,
    ) -> PluginRun:
        """Run a plugin on a tracked container or group; ``progress`` gets each host event."""
        body = PluginRunRequest(target=target, variables=variables or {}).model_dump()
        path = f"/plugins/{_path_part(name)}/run"
        async with contextlib.aclosing(self.post_ndjson(path, body, unbounded=True)) as lines:
            async for line in lines:
                event = PluginEvent.model_validate_json(line)
                if event.run is not None:
                    return event.run
                if progress is not None:
                    result = progress(event)
                    if inspect.isawaitable(result):
                        await result
        raise PeerProtocolError(f"{self.base_url}{path}: the run ended without a result")

    async def map_port(
        self, port: int, domain: str | None = None, *, udp: bool = False
    ) -> MappedPort:
        """Publish one of the node's local ports (through its relay when behind NAT)."""
        request = MapPortRequest(port=port, domain=domain, udp=udp)
        body = request.model_dump(exclude_none=True, exclude_defaults=True)
        return await self._call("POST", "/map-port", MappedPort, body)

    async def mappings(self) -> list[MappedPort]:
        """The node's published ports."""
        response = await self._request("GET", "/map-port", signed=True)
        return _validate_list(MappedPort, response, self.base_url)

    async def unmap_port(self, port: int, *, udp: bool = False) -> None:
        """Stop publishing a port."""
        await self._request("DELETE", f"/map-port/{int(port)}" + ("?udp=true" if udp else ""))

    async def reachability(self, port: int) -> Reachability:
        """Ask this node whether it can connect back to us on ``port``."""
        body = ReachabilityRequest(port=port).model_dump()
        return await self._call("POST", "/reachability", Reachability, body)

    @property
    def jobs(self) -> JobsAPI:
        """The node's jobs: ``submit``, ``list``, ``get``, ``cancel``, ``download``."""
        from .jobs.client import JobsAPI  # here: jobs.client imports this module

        return JobsAPI(self)

    @property
    def clusters(self) -> ClustersAPI:
        """The node's Dask clusters: ``create``, ``list``, ``get``, ``scale``, ``remove``."""
        from .cluster.client import ClustersAPI  # here: cluster.client imports this module

        return ClustersAPI(self)

    @property
    def attached(self) -> AttachedAPI:
        """Attached hosts: ``list``, ``get``, ``attach``, ``detach``, ``allow``."""
        from .attach.client import AttachedAPI  # here: attach.client imports this module

        return AttachedAPI(self)

    async def run(self, task: Task) -> Job:
        """Submit ``task`` (``POST /jobs``); the ``Job`` has ``logs``, ``wait``, ``results``."""
        return await self.jobs.run(task)

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def _call(
        self,
        method: str,
        path: str,
        model: type[ModelT],
        body: Any = None,
        *,
        signed: bool = False,
        http_timeout: httpx.Timeout | None = None,
    ) -> ModelT:
        """One request whose answer is ``model`` (the feature clients' calls too)."""
        response = await self._request(method, path, body, signed=signed, http_timeout=http_timeout)
        return _validate(model, response, f"{self.base_url}{path}")

    async def _request(
        self,
        method: str,
        path: str,
        json_body: Any = None,
        *,
        signed: bool = False,
        http_timeout: httpx.Timeout | None = None,
    ) -> httpx.Response:
        """One request, its error answer raised; ``signed`` by the owner's key,
        ``http_timeout`` for a slow route (else the client's)."""
        headers = {_SIGN_HEADER: "1"} if signed else None
        wait = httpx.USE_CLIENT_DEFAULT if http_timeout is None else http_timeout
        with self._transport_errors():
            response = await self._http.request(
                method, path, json=json_body, headers=headers, timeout=wait
            )
        _raise_for_error(response)
        return response

    async def _stream_create(
        self, path: str, body: Any, progress: ProgressCallback | None
    ) -> ContainerView:
        async with contextlib.aclosing(self.post_ndjson(path, body)) as lines:
            async for line in lines:
                view = await _handle_event(line, progress, self.base_url)
                if view is not None:
                    return view
        raise PeerProtocolError(f"{self.base_url}{path}: the stream ended without a result")

    async def post_ndjson(
        self, path: str, body: Any, *, unbounded: bool = False
    ) -> AsyncGenerator[str, None]:
        """The non-empty lines of a POST's NDJSON answer (feature clients' progress)."""
        timeout = None if unbounded else httpx.USE_CLIENT_DEFAULT
        with self._transport_errors():
            async with self._http.stream("POST", path, json=body, timeout=timeout) as response:
                if response.status_code >= 400:
                    await response.aread()
                    _raise_for_error(response)
                async for line in response.aiter_lines():
                    if line.strip():
                        yield line

    @contextlib.contextmanager
    def _transport_errors(self) -> Iterator[None]:
        try:
            yield
        except P2PRCError:
            raise
        except httpx.TimeoutException:
            raise PeerTimeout(f"{self.base_url} did not answer in time") from None
        except httpx.TransportError as exc:
            if self._local:
                raise NodeNotRunning(
                    f"the node of {self._home.path} does not answer at {self.base_url}; "
                    "start one with 'p2prc start'"
                ) from None
            raise PeerUnreachable(f"{self.base_url}: {exc or type(exc).__name__}") from None
        except httpx.HTTPError as exc:  # an answer httpx cannot read (bad encoding, redirects)
            raise PeerProtocolError(f"{self.base_url}: {exc or type(exc).__name__}") from None


async def _handle_event(
    line: str, progress: ProgressCallback | None, base_url: str
) -> ContainerView | None:
    try:
        event = CreateEvent.model_validate_json(line)
    except ValidationError as exc:
        raise PeerProtocolError(f"{base_url}: bad progress line: {_problem(exc)}") from None
    if event.event == "progress" and event.message and progress is not None:
        result = progress(event.message)
        if inspect.isawaitable(result):
            await result
    elif event.event == "error" and event.error:
        code, message = event.error.get("code", ""), event.error.get("message", "")
        raise error_class(code)(message)
    elif event.event == "created" and event.container is not None:
        return event.container
    return None


def _validate_list(model: type[ModelT], response: httpx.Response, base_url: str) -> list[ModelT]:
    try:
        items = response.json()
        if not isinstance(items, list):
            raise TypeError("expected a list")
        return [model.model_validate(item) for item in items]
    except (ValueError, TypeError) as exc:  # a ValidationError is a ValueError
        raise PeerProtocolError(f"{base_url}: unexpected answer: {_problem(exc)}") from None


def _model_of(model: type[ModelT], given: ModelT | None, fields: dict[str, Any]) -> ModelT:
    """A feature call's request: the model given, or one made of its fields as keywords
    (``InvalidRequest`` for both at once or for fields that do not validate)."""
    if given is not None and fields:
        raise InvalidRequest(f"give one {model.__name__} or its fields, not both")
    try:
        return given or model.model_validate(fields)
    except ValidationError as exc:
        raise InvalidRequest(validation_message(exc)) from None


def _validate(model: type[ModelT], response: httpx.Response, where: str) -> ModelT:
    try:
        return model.model_validate_json(response.content)
    except ValidationError as exc:
        raise PeerProtocolError(f"{where}: unexpected answer: {_problem(exc)}") from None


def _problem(exc: Exception) -> str:
    return validation_message(exc) if isinstance(exc, ValidationError) else str(exc)


def _path_part(text: str) -> str:
    if not text or any(c in text for c in "/?#%") or text in (".", ".."):
        raise InvalidRequest(f"{text!r} is not a container id")
    return text
