"""The exception tree of p2prc.

Every error raised on purpose is a ``P2PRCError``. Each class carries the HTTP
``status`` the API answers with and a stable ``code`` that travels in the error
body ``{"error": {"code": ..., "message": ...}}``; the client maps the code back
to the same class, so callers catch the same exceptions locally and remotely::

    P2PRCError                      internal (500)
    +-- ConfigError                 config_error (400)
    +-- IdentityError               identity_error (500)
    +-- StateError                  state_error (500)
    +-- InvalidRequest              invalid_request (422)
    |   +-- RequestTooLarge         too_large (413)
    |   +-- NameTaken               name_taken (409): a peer or another attached host has it
    +-- NotFound                    not_found (404)
    |   +-- PeerNotFound            peer_not_found (404): no record has that name or id
    |   +-- JobNotFound             job_not_found (404): the node submitted no such job
    |   +-- ClusterNotFound         cluster_not_found (404): the node owns no such cluster
    |   +-- AttachedNotFound        attached_not_found (404): no attached host has that name
    +-- NodeError                   node_error (500)
    |   +-- NodeNotRunning          node_not_running (503)
    |   +-- NodeAlreadyRunning      node_already_running (409)
    |   +-- AddressInUse            address_in_use (409)
    |   +-- ClusterError            cluster_error (409): a Dask cluster cannot start or do that
    +-- AuthError                   unauthenticated (401)
    |   +-- SignatureInvalid        bad_signature (401)
    |   +-- SignatureExpired        signature_expired (401)
    |   +-- RequestReplayed         replayed_request (401)
    |   +-- WrongAudience           wrong_audience (401)
    |   +-- NotTrusted              not_trusted (403)
    |   +-- OwnerOnly               owner_only (403)
    |   +-- AttachRefused           attach_refused (403): key not allowed or port not attached
    +-- RateLimited                 rate_limited (429)
    +-- PeerError                   peer_error (502)
    |   +-- PeerUnreachable         peer_unreachable (502)
    |   +-- PeerTimeout             peer_timeout (504), also a TimeoutError
    |   +-- PeerProtocolError       peer_protocol_error (502)
    +-- ContainerError              container_error (500)
    |   +-- RuntimeUnavailable      runtime_unavailable (503)
    |   +-- ImageNotFound           image_not_found (422)
    |   +-- ContainerNotFound       container_not_found (404)
    |   +-- GpuUnavailable          gpu_unavailable (422)
    |   +-- LimitExceeded           limit_exceeded (422)
    |   +-- QuotaExceeded           quota_exceeded (429)
    +-- PluginError                 plugin_error (422)
    +-- AttachFailed                attach_failed (422): host unreachable, not SSH, key changed
    +-- JobError                    job_error (409): the job cannot do that in its state
    +-- TunnelError                 tunnel_error (502)
    |   +-- TunnelProtocolError     tunnel_protocol_error (502)
    |   +-- RelayUnavailable        relay_unavailable (503)
    |   +-- WrongNode               wrong_node (502): the far end is not the pinned node
    |   +-- DomainTaken             domain_taken (409): another node holds that domain
    +-- ApiError                    api_error (502): an answer with an unknown code

Programmer errors (starting a node twice, using a closed client) are
``RuntimeError`` or ``TypeError``, never part of this tree.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

# Twin: p2prc/__init__.py imports and lists the public classes again by name (for type
# checkers and IDEs, which do not follow a computed list).
__all__ = [
    "AddressInUse",
    "ApiError",
    "AttachFailed",
    "AttachRefused",
    "AttachedNotFound",
    "AuthError",
    "ClusterError",
    "ClusterNotFound",
    "ConfigError",
    "ContainerError",
    "ContainerNotFound",
    "DomainTaken",
    "GpuUnavailable",
    "IdentityError",
    "ImageNotFound",
    "InstallFailed",
    "InvalidRequest",
    "JobError",
    "JobNotFound",
    "LimitExceeded",
    "NameTaken",
    "NodeAlreadyRunning",
    "NodeError",
    "NodeNotRunning",
    "NotFound",
    "NotTrusted",
    "OwnerOnly",
    "P2PRCError",
    "PeerError",
    "PeerNotFound",
    "PeerProtocolError",
    "PeerTimeout",
    "PeerUnreachable",
    "PluginError",
    "PunchFailed",
    "QuotaExceeded",
    "RateLimited",
    "RelayUnavailable",
    "RequestReplayed",
    "RequestTooLarge",
    "RuntimeUnavailable",
    "SignatureExpired",
    "SignatureInvalid",
    "StateError",
    "TunnelError",
    "TunnelProtocolError",
    "WrongAudience",
    "WrongNode",
    "error_class",
    "map_exceptions",
    "validation_message",
]


class P2PRCError(Exception):
    """Base class for every error p2prc raises on purpose."""

    status: int = 500
    code: str = "internal"

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def to_body(self) -> dict[str, dict[str, str]]:
        """The JSON error body the API answers with."""
        return {"error": {"code": self.code, "message": self.message}}


class ConfigError(P2PRCError):
    """The configuration is invalid, or a key or value given for it is."""

    status = 400
    code = "config_error"


class IdentityError(P2PRCError):
    """The node's key pair is missing, unreadable or malformed."""

    code = "identity_error"


class StateError(P2PRCError):
    """The state database is corrupt, foreign or from a newer p2prc."""

    code = "state_error"


class InvalidRequest(P2PRCError):
    """A request's parameters or body do not validate."""

    status = 422
    code = "invalid_request"


class RequestTooLarge(InvalidRequest):
    """A request's body is larger than its route accepts."""

    status = 413
    code = "too_large"


class NameTaken(InvalidRequest):
    """The name belongs to a peer, or to another attached host (another host key)."""

    status = 409
    code = "name_taken"


class NotFound(P2PRCError):
    """The thing asked for does not exist."""

    status = 404
    code = "not_found"


class PeerNotFound(NotFound):
    """No peer in the signed table has that name or node id prefix (never a DNS name)."""

    code = "peer_not_found"


class JobNotFound(NotFound):
    """The node submitted no job with that id (or prefix)."""

    code = "job_not_found"


class ClusterNotFound(NotFound):
    """The node owns no Dask cluster with that id, id prefix or name."""

    code = "cluster_not_found"


class AttachedNotFound(NotFound):
    """No attached host has that name (on this gateway, or in the merged view)."""

    code = "attached_not_found"


class NodeError(P2PRCError):
    """The local node cannot be started, reached or stopped."""

    code = "node_error"


class NodeNotRunning(NodeError):
    """No node is running for this home."""

    status = 503
    code = "node_not_running"


class NodeAlreadyRunning(NodeError):
    """A node is already running for this home."""

    status = 409
    code = "node_already_running"


class AddressInUse(NodeError):
    """The address the node should listen on is taken."""

    status = 409
    code = "address_in_use"


class ClusterError(NodeError):
    """A Dask cluster could not start, or cannot do that in its state."""

    status = 409
    code = "cluster_error"


# Twins on purpose: every family below has the shape of this one and of ContainerError
# (docstring, status, code): the tree is data, read back by error_class().
class AuthError(P2PRCError):
    """A state-changing request is not signed."""

    status = 401
    code = "unauthenticated"


class SignatureInvalid(AuthError):
    """The request's signature does not verify against its key."""

    code = "bad_signature"


class SignatureExpired(AuthError):
    """The request's timestamp is outside the accepted window."""

    code = "signature_expired"


class RequestReplayed(AuthError):
    """The request's nonce was already used."""

    code = "replayed_request"


class WrongAudience(AuthError):
    """The request was signed for another node."""

    code = "wrong_audience"


class NotTrusted(AuthError):
    """The caller's key is not allowed by this node's trust policy."""

    status = 403
    code = "not_trusted"


class OwnerOnly(AuthError):
    """Only the node's own key may do this."""

    status = 403
    code = "owner_only"


class AttachRefused(AuthError):
    """A gateway refuses the route: the key is not allowed for that host, or the port is not
    attached (one answer for both, so a gateway is no scanner of its LAN)."""

    status = 403
    code = "attach_refused"


class RateLimited(P2PRCError):
    """Too many requests; try again later."""

    status = 429
    code = "rate_limited"


class PeerError(P2PRCError):
    """Talking to another node failed."""

    status = 502
    code = "peer_error"


class PeerUnreachable(PeerError):
    """Could not connect to a node, or the connection dropped."""

    code = "peer_unreachable"


class PeerTimeout(PeerError, TimeoutError):
    """A node did not answer within the configured timeout."""

    status = 504
    code = "peer_timeout"


class PeerProtocolError(PeerError):
    """A node answered with something that cannot be understood."""

    code = "peer_protocol_error"


# Twin of the AuthError family above (the same three-line shape on purpose).
class ContainerError(P2PRCError):
    """A container could not be created, found or removed."""

    code = "container_error"


class RuntimeUnavailable(ContainerError):
    """The container runtime (the Docker daemon) is not reachable."""

    status = 503
    code = "runtime_unavailable"


class ImageNotFound(ContainerError):
    """The image asked for is not offered by this node."""

    status = 422
    code = "image_not_found"


class ContainerNotFound(ContainerError):
    """No such container, or not one of the caller's."""

    status = 404
    code = "container_not_found"


class GpuUnavailable(ContainerError):
    """A GPU was asked for on a node without a GPU runtime."""

    status = 422
    code = "gpu_unavailable"


class LimitExceeded(ContainerError):
    """A resource asked for is above this node's maximum."""

    status = 422
    code = "limit_exceeded"


class QuotaExceeded(ContainerError):
    """The caller, or the node, already runs as many containers as allowed."""

    status = 429
    code = "quota_exceeded"


class PluginError(P2PRCError):
    """A plugin could not be installed, found or run."""

    status = 422
    code = "plugin_error"


class AttachFailed(P2PRCError):
    """A host cannot be attached or reached: unreachable, not an SSH server, its host key
    changed, or no gateway routes to it."""

    status = 422
    code = "attach_failed"


class InstallFailed(P2PRCError):
    """``install-node`` cannot set up a node on that machine: no login, no Python 3.11+
    with venv, too little disk, no wheel that fits it, or a step there failed."""

    status = 422
    code = "install_failed"


class JobError(P2PRCError):
    """The job cannot do that in its state (no results yet, say)."""

    status = 409
    code = "job_error"


class TunnelError(P2PRCError):
    """A relay or tunnel failed."""

    status = 502
    code = "tunnel_error"


class TunnelProtocolError(TunnelError):
    """The other end of a tunnel sent something malformed."""

    code = "tunnel_protocol_error"


class RelayUnavailable(TunnelError):
    """No relay could be reached."""

    status = 503
    code = "relay_unavailable"


class DomainTaken(TunnelError):
    """Another node already holds the domain on that relay."""

    status = 409
    code = "domain_taken"


class WrongNode(TunnelError):
    """The far end is not the node expected: another TLS key, or another id in /status."""

    code = "wrong_node"


class PunchFailed(TunnelError):
    """Hole punching found no direct path: no observed address, a NAT that changes ports,
    a peer that refused, or no connection before the deadline."""

    status = 409
    code = "punch_failed"


class ApiError(P2PRCError):
    """A node answered with an error code this version does not know."""

    status = 502
    code = "api_error"


def _all_subclasses(cls: type[P2PRCError]) -> Iterator[type[P2PRCError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)


def error_class(code: str) -> type[P2PRCError]:
    """The exception class for an error code, ``ApiError`` when unknown."""
    classes: list[type[P2PRCError]] = [P2PRCError, *_all_subclasses(P2PRCError)]
    by_code = {cls.code: cls for cls in classes}
    return by_code.get(code, ApiError)


@contextlib.contextmanager
def map_exceptions(mapping: Mapping[type[BaseException], type[P2PRCError]]) -> Iterator[None]:
    """Translate foreign exceptions into ours, keeping the cause; first match wins."""
    try:
        yield
    except P2PRCError:
        raise
    except Exception as exc:
        for source, target in mapping.items():
            if isinstance(exc, source):
                raise target(str(exc) or type(exc).__name__) from exc
        raise


class _Invalid(Protocol):
    def errors(self) -> Sequence[Any]: ...


def validation_message(exc: _Invalid, *, where: str = "") -> str:
    """One line for a pydantic (or FastAPI request) validation error: ``loc: msg; ...``."""
    problems = []
    for error in exc.errors():
        loc = ".".join(str(part) for part in error.get("loc", ())) or where
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        problems.append(f"{loc}: {message}" if loc else message)
    return "; ".join(problems) or "invalid request"
