"""``python -m p2prc.attach [--home DIR] NAME [--port P]``: the ProxyCommand of ``p2prc ssh``.

ssh starts it for every connection, so it loads only what a route needs (no CLI, no API
server, no Docker); ``p2prc ssh --proxy NAME`` does the same through the CLI.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import resolve_home
from ..tunnel.streams import proxy_main
from .proxy import run_proxy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m p2prc.attach", description=__doc__)
    parser.add_argument("--home", type=Path, default=None, help="the node's home")
    parser.add_argument("--port", type=int, default=None, help="a port of the host (default SSH)")
    parser.add_argument("name", help="the attached host's name")
    args = parser.parse_args(argv)
    if args.port is not None and not 1 <= args.port <= 65535:
        parser.error("--port must be 1-65535")
    return proxy_main(run_proxy(resolve_home(args.home), args.name, args.port))


if __name__ == "__main__":
    sys.exit(main())
