"""Making a node's home and asking whether a node holds it: what the CLI needs without
loading the node itself (``p2prc.node`` re-exports both)."""

from __future__ import annotations

import fcntl
import os

from .config import Home, NodeConfig
from .identity import Identity
from .state import State

__all__ = ["home_locked", "init_home"]


def init_home(home: Home, config: NodeConfig | None = None) -> tuple[NodeConfig, Identity]:
    """Create the home's files that are missing; never replaces anything that exists."""
    from .config import load, save

    home.make_private()
    if home.config_file.exists():
        config = load(home)
    else:
        config = config or NodeConfig()
        save(home, config)
    identity = Identity.load_or_create(home.identity_dir, comment=f"p2prc@{config.name}")
    State(home.state_file).close()
    return config, identity


def home_locked(home: Home) -> bool:
    """Whether a node holds this home's lock right now."""
    try:
        fd = os.open(home.lock_file, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
