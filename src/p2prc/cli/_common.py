"""Options, output and consoles shared by every command."""

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from pydantic import BaseModel
from rich.console import Console

from ..config import Home, resolve_home

__all__ = ["Options", "emit", "err", "options_of", "out"]

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


@dataclass
class Options:
    """Global options, shared by every command."""

    json: bool = False
    debug: bool = False
    home_arg: Path | None = None

    @property
    def home(self) -> Home:
        return resolve_home(self.home_arg)


def options_of(ctx: typer.Context) -> Options:
    root = ctx.find_root()
    if not isinstance(root.obj, Options):
        root.obj = Options()
    return root.obj


def emit(options: Options, data: Any, human: Any = None) -> None:
    """Print ``data`` as JSON with --json, else ``human`` (or a plain rendering)."""
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json")
    if options.json:
        # One compact line per result, so scripts can read results as JSON Lines.
        sys.stdout.write(json.dumps(data) + "\n")
        sys.stdout.flush()
    elif human is not None:
        out.print(human)
    else:
        out.print(json.dumps(data, indent=2))
