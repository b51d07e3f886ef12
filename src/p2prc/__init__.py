"""p2prc: a peer-to-peer compute network.

Anything not listed in ``__all__`` is internal and may change without notice.
"""

__version__ = "0.1.0"

import importlib as _importlib
from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

from .errors import (
    AddressInUse,
    ApiError,
    AuthError,
    ConfigError,
    ContainerError,
    ContainerNotFound,
    DomainTaken,
    GpuUnavailable,
    IdentityError,
    ImageNotFound,
    InvalidRequest,
    JobError,
    JobNotFound,
    LimitExceeded,
    NodeAlreadyRunning,
    NodeError,
    NodeNotRunning,
    NotFound,
    NotTrusted,
    OwnerOnly,
    P2PRCError,
    PeerError,
    PeerNotFound,
    PeerProtocolError,
    PeerTimeout,
    PeerUnreachable,
    PluginError,
    QuotaExceeded,
    RateLimited,
    RelayUnavailable,
    RequestReplayed,
    RuntimeUnavailable,
    SignatureExpired,
    SignatureInvalid,
    StateError,
    TunnelError,
    WrongAudience,
)

if _TYPE_CHECKING:  # the names below load on first use (module __getattr__): a CLI command or
    # a ProxyCommand that needs none of them starts without FastAPI, Docker or the node
    from ._home import init_home
    from .client import AsyncClient, Client
    from .config import ContainerConfig, Home, NodeConfig, Timeouts, TrustConfig
    from .containers.runtime import ContainerRuntime, FakeRuntime
    from .identity import Identity
    from .jobs.client import Job, JobsAPI
    from .jobs.models import JobState, JobView
    from .jobs.task import Task, load_task
    from .models import (
        CallerInfo,
        ContainerGroup,
        ContainerView,
        CreateContainer,
        Health,
        ImageList,
        MappedPort,
        NodeStatus,
        PeerView,
        PluginInfo,
        PluginRun,
        Specs,
        SyncResult,
        TrackedContainer,
    )
    from .node import Node

_LAZY = {
    "AsyncClient": "client",
    "CallerInfo": "models",
    "Client": "client",
    "ContainerConfig": "config",
    "ContainerGroup": "models",
    "ContainerRuntime": "containers.runtime",
    "ContainerView": "models",
    "CreateContainer": "models",
    "FakeRuntime": "containers.runtime",
    "Health": "models",
    "Home": "config",
    "Identity": "identity",
    "ImageList": "models",
    "Job": "jobs.client",
    "JobState": "jobs.models",
    "JobView": "jobs.models",
    "JobsAPI": "jobs.client",
    "MappedPort": "models",
    "Node": "node",
    "NodeConfig": "config",
    "NodeStatus": "models",
    "PeerView": "models",
    "PluginInfo": "models",
    "PluginRun": "models",
    "Specs": "models",
    "SyncResult": "models",
    "Task": "jobs.task",
    "Timeouts": "config",
    "TrackedContainer": "models",
    "TrustConfig": "config",
    "init_home": "_home",
    "load_task": "jobs.task",
}


def __getattr__(name: str) -> _Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


# Twin of errors.__all__ (and of each module's own): re-exported by name, for type checkers.
__all__ = [
    "AddressInUse",
    "ApiError",
    "AsyncClient",
    "AuthError",
    "CallerInfo",
    "Client",
    "ConfigError",
    "ContainerConfig",
    "ContainerError",
    "ContainerGroup",
    "ContainerNotFound",
    "ContainerRuntime",
    "ContainerView",
    "CreateContainer",
    "DomainTaken",
    "FakeRuntime",
    "GpuUnavailable",
    "Health",
    "Home",
    "Identity",
    "IdentityError",
    "ImageList",
    "ImageNotFound",
    "InvalidRequest",
    "Job",
    "JobError",
    "JobNotFound",
    "JobState",
    "JobView",
    "JobsAPI",
    "LimitExceeded",
    "MappedPort",
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
    "PeerNotFound",
    "PeerProtocolError",
    "PeerTimeout",
    "PeerUnreachable",
    "PeerView",
    "PluginError",
    "PluginInfo",
    "PluginRun",
    "QuotaExceeded",
    "RateLimited",
    "RelayUnavailable",
    "RequestReplayed",
    "RuntimeUnavailable",
    "SignatureExpired",
    "SignatureInvalid",
    "Specs",
    "StateError",
    "SyncResult",
    "Task",
    "Timeouts",
    "TrackedContainer",
    "TrustConfig",
    "TunnelError",
    "WrongAudience",
    "__version__",
    "init_home",
    "load_task",
]
