"""Print the node API's OpenAPI document (``python -m p2prc._openapi``)."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["openapi_document"]


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document of a node's API, independent of any one node."""
    from .api.app import create_app
    from .config import DEFAULT_PORT, NodeConfig
    from .identity import Identity
    from .state import State

    class _Schema:
        identity = Identity.generate()
        config = NodeConfig(name="schema")
        home_path = Path(".")
        port = DEFAULT_PORT
        started_at = 0.0

        def __init__(self, state: State) -> None:
            self.state = state

        def close(self) -> None:
            """Not used when only the schema is built."""

    with tempfile.TemporaryDirectory() as tmp:
        state = State(Path(tmp) / "state.db")
        try:
            app = create_app(_Schema(state))  # type: ignore[arg-type]
            return app.openapi()
        finally:
            state.close()


if __name__ == "__main__":
    sys.stdout.write(json.dumps(openapi_document(), indent=2, sort_keys=True) + "\n")
