"""The node's HTTP API (FastAPI)."""

from .app import NodeView, create_app

__all__ = ["NodeView", "create_app"]
