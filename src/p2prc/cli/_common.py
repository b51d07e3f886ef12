"""Options, output and consoles shared by every command."""

import inspect
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

import typer
from pydantic import BaseModel
from rich.console import Console

from ..config import Home, resolve_home

__all__ = ["Options", "command", "emit", "err", "options_of", "out"]

_F = TypeVar("_F", bound=Callable[..., None])

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


def command(app: typer.Typer, name: str, help: str) -> Callable[[_F], _F]:
    """Register ``fn(options, ...)`` as the command ``name``: options from the context.

    The command takes ``fn``'s other parameters as they are; ``fn`` stays a plain function.
    """

    def register(fn: _F) -> _F:
        hints = get_type_hints(fn, include_extras=True)
        params = [
            param.replace(annotation=hints.get(param.name, param.annotation))
            for param in list(inspect.signature(fn).parameters.values())[1:]
        ]
        first = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD)

        def callback(ctx: typer.Context, **kwargs: Any) -> None:
            fn(options_of(ctx), **kwargs)

        callback.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [first.replace(annotation=typer.Context), *params]
        )
        callback.__annotations__ = {"ctx": typer.Context, **{p.name: p.annotation for p in params}}
        callback.__name__ = callback.__qualname__ = fn.__name__
        callback.__doc__ = help
        app.command(name)(callback)
        return fn

    return register


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
