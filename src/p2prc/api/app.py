"""Routes of the node's HTTP API and the one error-to-response table."""

import contextlib
import json
import logging
import re
import time
from pathlib import Path
from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..config import NodeConfig
from ..errors import P2PRCError, RateLimited, RequestTooLarge, validation_message
from ..identity import Identity
from ..models import CallerInfo, Health, NodeStatus, Specs
from ..peers.gossip import MAX_EXCHANGE_BYTES
from ..specs import collect_specs, own_addresses
from ..state import State
from . import cluster, containers, jobs, metrics, overview, peers, plugins, trust, tunnel, ui
from .attach import router as attach_routes
from .attach_map import router as attach_map_routes
from .auth import Owner, Peer, RequestVerifier
from .direct import DirectNode
from .direct import router as direct_routes
from .punch import PunchNode
from .punch import router as punch_routes

__all__ = ["NodeView", "RequestLimits", "body_limit", "create_app"]

log = logging.getLogger(__name__)

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}


# Each router names what it needs in its own Protocol (ContainerNode, PeerNode, ...);
# NodeView is their union plus what create_app itself uses (an overlap is one property).
class NodeView(
    containers.ContainerNode,
    peers.PeerNode,
    plugins.PluginNode,
    tunnel.TunnelNode,
    DirectNode,
    PunchNode,
    Protocol,
):
    """What the API needs from a node."""

    # Twin of jobs.service.JobNode's first four: each Protocol lists what its own code reads.
    @property
    def identity(self) -> Identity: ...
    @property
    def config(self) -> NodeConfig: ...
    @property
    def state(self) -> State: ...
    @property
    def home_path(self) -> Path: ...
    @property
    def port(self) -> int: ...
    @property
    def started_at(self) -> float: ...
    def close(self) -> None: ...
    def component_health(self) -> dict[str, str]: ...


# Request bodies are bounded before they are read: 64 KiB fits every route's model (a
# container create with eight RSA-16384 keys is under 24 KiB), except these.
_DEFAULT_BODY_LIMIT = 64 * 1024
_PLUGIN_RUN = re.compile(r"^/plugins/[^/]+/run$")
_PLUGIN_RUN_BODY_LIMIT = 1024 * 1024
# Answers that cost the node much memory or bandwidth: at most this many at once.
_CONCURRENT = {("GET", "/peers/speedtest"): 2}


def body_limit(method: str, path: str) -> int:
    """How many body bytes a request to this route may carry."""
    if method == "POST" and path == "/peers/exchange":
        return MAX_EXCHANGE_BYTES
    if method == "POST" and _PLUGIN_RUN.match(path):
        return _PLUGIN_RUN_BODY_LIMIT
    return _DEFAULT_BODY_LIMIT


class RequestLimits:
    """ASGI middleware: refuses oversized bodies before reading them, and bounds costly routes.

    A declared ``Content-Length`` over the route's limit is refused at once; a chunked
    body is read only up to the limit. What passes reaches the app as one message, so
    nothing behind this middleware ever holds more than the limit.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._running = dict.fromkeys(_CONCURRENT, 0)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = str(scope["method"]), str(scope["path"])
        limit = body_limit(method, path)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _refuse(send, RequestTooLarge(_too_large(method, path, limit)))
            return
        try:
            body = await _read_body(receive, limit)
        except _Disconnected:
            return
        if body is None:
            await _refuse(send, RequestTooLarge(_too_large(method, path, limit)))
            return
        route = (method, path)
        if route not in _CONCURRENT:
            await self.app(scope, _replay(body, receive), send)
            return
        if self._running[route] >= _CONCURRENT[route]:
            await _refuse(send, RateLimited(f"{method} {path} is busy; try again shortly"))
            return
        self._running[route] += 1
        try:
            await self.app(scope, _replay(body, receive), send)
        finally:
            self._running[route] -= 1


class _Disconnected(Exception):
    """The client went away before its body was complete."""


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            with contextlib.suppress(ValueError):
                return int(value)
    return None


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None once it grows past ``limit`` (the rest is never read)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise _Disconnected
        chunk = bytes(message.get("body", b""))
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives the buffered body first, then the connection's own events."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed


def _too_large(method: str, path: str, limit: int) -> str:
    return f"the body of {method} {path} may be at most {limit} bytes"


async def _refuse(send: Send, error: P2PRCError) -> None:
    """Answer with our error body and close: the unread rest of the request is dropped."""
    body = json.dumps(error.to_body()).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(P2PRCError)
    async def _ours(request: Request, exc: P2PRCError) -> JSONResponse:
        return JSONResponse(exc.to_body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, "invalid_request", validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error(500, "internal", "internal error; see the node's log")


def create_app(node: NodeView) -> FastAPI:
    """The ASGI application serving one node."""
    app = FastAPI(
        title="p2prc node API",
        version=__version__,
        description=(
            "Read routes are open. State-changing routes need a request signed with the "
            "caller's Ed25519 node key (P2PRC-Key, P2PRC-Audience, P2PRC-Timestamp, "
            "P2PRC-Nonce, P2PRC-Signature) and pass the node's trust policy."
        ),
        docs_url=None,
        redoc_url=None,
    )
    _install_error_handlers(app)
    app.add_middleware(RequestLimits)
    app.state.verifier = RequestVerifier(node.identity, node.config.trust, node.state)

    @app.get("/health", tags=["read"])
    async def health() -> Health:
        """Liveness (answers as soon as the node serves) and each component's state."""
        components = node.component_health()
        if all(state == "ok" for state in components.values()):
            return Health(components=components)
        return Health(ok=False, status="degraded", components=components)

    public_key = node.identity.openssh_public_key(node.config.name)

    @app.get("/status", tags=["read"])
    async def status(request: Request) -> NodeStatus:
        """Who this node is and where it listens."""
        now = time.time()
        return NodeStatus.model_construct(
            node_id=node.identity.node_id,
            name=node.config.name,
            version=__version__,
            api=str(request.base_url).rstrip("/"),
            addresses=own_addresses(),
            port=node.port,
            public_key=public_key,
            uptime_s=round(now - node.started_at, 3),
            started_at=node.started_at,
            trust_mode=node.config.trust.mode,
        )

    @app.get("/specs", tags=["read"])
    async def specs() -> Specs:
        """CPU, memory, disk and GPUs of this machine (the original /server_info)."""
        return await run_in_threadpool(collect_specs, node.home_path)

    @app.post("/whoami", tags=["signed"])
    async def whoami(caller: Peer) -> CallerInfo:
        """Check that this node accepts the caller's signed requests."""
        return caller

    @app.post("/shutdown", status_code=202, tags=["signed"])
    async def shutdown(caller: Owner) -> Health:
        """Stop the node; only its own key may ask."""
        log.info("shutdown requested by the owner")
        node.close()
        return Health()

    app.include_router(containers.router(node))
    app.include_router(peers.router(node))
    app.include_router(plugins.router(node))
    app.include_router(tunnel.router(node))
    app.include_router(jobs.router(node))
    app.include_router(cluster.router(node))
    app.include_router(direct_routes(node))
    app.include_router(punch_routes(node))
    app.include_router(attach_routes(node))
    app.include_router(attach_map_routes(node))
    metrics.install(app, node, app.state.verifier)
    app.include_router(trust.router(node, app.state.verifier))
    app.include_router(ui.router(node))
    app.include_router(overview.router(node))
    return app
