"""``p2prc generate NAME --module M``: a new Python project that embeds a p2prc node.

The original ``--gen NAME --mod M`` copied P2PRC's Go tree into a new module. The Python
way is a small project that depends on p2prc and starts ``p2prc.Node`` in its own event
loop, with its own home and default config, and tests that pass out of the box.
"""

from __future__ import annotations

import keyword
import re
from pathlib import Path

from .errors import InvalidRequest

__all__ = ["generate"]

_PROJECT = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,62}$")
_MODULE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

_PYPROJECT = """\
[build-system]
requires = ["hatchling>=1.21"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "0.1.0"
description = "{name}: an application on an embedded p2prc node"
requires-python = ">=3.11"
dependencies = ["p2prc"]

[project.scripts]
{name} = "{module}.app:main"

[tool.hatch.build.targets.wheel]
packages = ["src/{module}"]

[tool.pytest.ini_options]
testpaths = ["tests"]
"""

_APP = '''\
"""{name}: an application built on an embedded p2prc node."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import p2prc

# This application's own node home and defaults; several apps can run side by side.
DEFAULT_HOME = Path(os.environ.get("{env}_HOME", Path.home() / ".{name}"))
DEFAULT_PORT = 8090


def default_config() -> p2prc.NodeConfig:
    """The node config this application starts with when its home is new."""
    return p2prc.NodeConfig(name="{name}", port=DEFAULT_PORT, custom={{"application": "{name}"}})


async def run(home: Path = DEFAULT_HOME, port: int | None = None) -> None:
    """Start the embedded node and serve until SIGINT or SIGTERM."""
    node_home = p2prc.Home(home)
    config, identity = p2prc.init_home(node_home, default_config())
    async with p2prc.Node(config, node_home, identity=identity, port=port) as node:
        print(f"{name}: node {{node.identity.node_id}} at {{node.api_url}}", flush=True)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, node.close)
        await node.wait_closed()


def main() -> None:
    """Console entry point."""
    asyncio.run(run())
'''

_TEST = '''\
"""{name} starts an embedded p2prc node that answers its API."""

import asyncio
from pathlib import Path

import p2prc
from {module}.app import default_config


async def _check(home: Path) -> None:
    node_home = p2prc.Home(home)
    config, identity = p2prc.init_home(node_home, default_config())
    runtime = p2prc.FakeRuntime()
    async with p2prc.Node(
        config, node_home, identity=identity, host="127.0.0.1", port=0, runtime=runtime
    ) as node:
        async with p2prc.AsyncClient(home=node_home) as client:
            status = await client.status()
            assert status.node_id == node.identity.node_id
            assert status.name == "{name}"
            peers = await client.peers()
            assert peers[0].me


def test_embedded_node(tmp_path: Path) -> None:
    asyncio.run(_check(tmp_path / "home"))
'''

_README = """\
# {name}

An application on an embedded p2prc node.

    pip install -e .          # needs p2prc installed (or installable) in the environment
    {name}                    # starts the node; its home is ~/.{name} ({env}_HOME)
    python -m pytest          # the tests start a node on a free port

Edit `src/{module}/app.py`: `run()` owns the node; use `p2prc.AsyncClient` to talk to it
or to peers, and `node.config.custom` for your own settings.
"""


def generate(name: str, module: str | None, parent: Path) -> Path:
    """Write the project ``parent/name``; refuses to touch an existing directory."""
    module = module or name.replace("-", "_").lower()
    if not _PROJECT.match(name):
        raise InvalidRequest(f"{name!r} is not a project name (letters, digits, '-', '_')")
    if not _MODULE.match(module) or keyword.iskeyword(module) or module == "p2prc":
        raise InvalidRequest(f"{module!r} is not a usable Python module name")
    root = parent / name
    if root.exists():
        raise InvalidRequest(f"{root} exists; choose another name or directory")
    values = {"name": name, "module": module, "env": re.sub(r"\W", "_", name).upper()}
    files = {
        "pyproject.toml": _PYPROJECT,
        "README.md": _README,
        f"src/{module}/__init__.py": '"""{name}."""\n',
        f"src/{module}/app.py": _APP,
        "tests/test_app.py": _TEST,
    }
    for relative, template in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template.format(**values))
    return root
