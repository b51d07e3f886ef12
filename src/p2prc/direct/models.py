"""What ``GET /paths`` answers: how this node reaches each peer it talks to."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

__all__ = ["ForwardEvent", "ForwardRequest", "PathInfo", "PathKind"]

# direct: a direct path is up; relay: through the peer's relay; public: the peer's plain API
# (no relay involved); none: no way known.
PathKind = Literal["direct", "relay", "public", "none"]


class PathInfo(BaseModel):
    """One peer's path: the one in use, and what is known of the others."""

    node_id: str
    name: str = ""
    kind: PathKind
    via: str = Field(default="", description="The relay's node id when kind is relay.")
    rtt_ms: float | None = Field(default=None, description="Round trip of the path in use.")
    direct_rtt_ms: float | None = None
    relay_rtt_ms: float | None = Field(
        default=None, description="Round trip through the relay (or to the plain API)."
    )
    since: float | None = Field(default=None, description="Wall clock the path came up.")
    attempts: int = Field(default=0, description="Direct attempts made so far.")
    last_error: str = Field(default="", description="Why the last attempt or path ended.")
    streams: int = Field(default=0, description="Streams open on the direct path.")


class ForwardRequest(BaseModel):
    """``POST /paths/forward``: a local port of this node that reaches ``port`` of a peer."""

    peer: str = Field(min_length=1, max_length=300, description="Name, id prefix or address.")
    port: int = Field(ge=1, le=65535)
    local: int = Field(default=0, ge=0, le=65535, description="0: any free port.")
    bind: str = Field(default="127.0.0.1", max_length=64)


class ForwardEvent(BaseModel):
    """One line of the forward's answer: ``listening`` first, then a ``beat`` now and then
    (the forward lasts while the caller reads)."""

    event: Literal["listening", "beat"]
    local: str = ""
    peer: str = ""
    port: int = 0
    path: PathKind = "none"
    via: str = ""
    connections: int = 0
