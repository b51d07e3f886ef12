"""p2prc: a peer-to-peer compute network.

Anything not listed in ``__all__`` is internal and may change without notice.
"""

__version__ = "0.1.0"

from .client import AsyncClient, Client
from .config import Home, NodeConfig, Timeouts, TrustConfig
from .errors import (
    AddressInUse,
    ApiError,
    AuthError,
    ConfigError,
    IdentityError,
    InvalidRequest,
    NodeAlreadyRunning,
    NodeError,
    NodeNotRunning,
    NotFound,
    NotTrusted,
    OwnerOnly,
    P2PRCError,
    PeerError,
    PeerProtocolError,
    PeerTimeout,
    PeerUnreachable,
    RateLimited,
    RequestReplayed,
    SignatureExpired,
    SignatureInvalid,
    StateError,
    WrongAudience,
)
from .identity import Identity
from .models import CallerInfo, Health, NodeStatus, Specs
from .node import Node, init_home

__all__ = [
    "AddressInUse",
    "ApiError",
    "AsyncClient",
    "AuthError",
    "CallerInfo",
    "Client",
    "ConfigError",
    "Health",
    "Home",
    "Identity",
    "IdentityError",
    "InvalidRequest",
    "Node",
    "NodeAlreadyRunning",
    "NodeConfig",
    "NodeError",
    "NodeNotRunning",
    "NodeStatus",
    "NotFound",
    "NotTrusted",
    "OwnerOnly",
    "P2PRCError",
    "PeerError",
    "PeerProtocolError",
    "PeerTimeout",
    "PeerUnreachable",
    "RateLimited",
    "RequestReplayed",
    "SignatureExpired",
    "SignatureInvalid",
    "Specs",
    "StateError",
    "Timeouts",
    "TrustConfig",
    "WrongAudience",
    "__version__",
    "init_home",
]
