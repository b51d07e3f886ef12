"""A task: what to run on the pool, from flags or a ``task.toml`` file.

``task.toml``::

    image = "p2prc/sshd:latest"
    nodes = 2
    workdir = "scene"             # uploaded into each rank's ~/work (relative to this file)
    setup = "pip install -r requirements.txt"
    run = ["python3", "render.py"] # a list is an argv; a string runs with sh -c
    outputs = ["frames"]           # relative to ~/work, brought back when the job ends
    time_limit = "2h"
    retries = 1
    peers = ["bob"]                # optional: pin the peers
    [resources]
    cpus = 2
    memory = "4GiB"
    gpus = 0
    [env]
    QUALITY = "high"

A task never carries a shell command built by p2prc from its values: the commands are the
user's own, everything else (environment, paths) is quoted where the job layer uses it.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..config import parse_duration, parse_size
from ..errors import InvalidRequest
from ..models import IMAGE_REFERENCE

__all__ = ["Resources", "Task", "check_workdir", "load_task", "parse_task"]

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
# Names the job layer sets itself; a task may not override them.
_RESERVED_ENV = "P2PRC_"
_MAX_COMMAND = 64 * 1024
_MAX_OUTPUTS = 64


class Resources(BaseModel):
    """What each rank needs from its peer; unset means the peer's defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpus: float | None = Field(default=None, gt=0, le=1024, allow_inf_nan=False)
    memory: str | None = Field(default=None, max_length=32, description="512MiB, 2GiB, ...")
    gpus: int = Field(default=0, ge=0, le=64)
    disk: str | None = Field(
        default=None,
        max_length=32,
        description="Refused for now: a peer gives each container the disk its own config sets",
    )

    @field_validator("memory", "disk")
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        if value is not None and parse_size_or_none(value) is None:
            raise ValueError(f"{value!r} is not a positive size like 512MiB or 2GiB")
        return value

    # A container create has no disk size to pass on (each peer's containers.disk sets it):
    # refused rather than accepted and silently ignored.
    @field_validator("disk")
    @classmethod
    def _no_disk(cls, value: str | None) -> str | None:
        if value is not None:
            raise ValueError(
                "a rank's disk cannot be asked for: each peer gives its containers the disk "
                "its own config sets (containers.disk); leave resources.disk out"
            )
        return value

    @property
    def memory_bytes(self) -> int | None:
        return None if self.memory is None else parse_size(self.memory)

    @property
    def disk_bytes(self) -> int | None:
        return None if self.disk is None else parse_size(self.disk)


def parse_size_or_none(value: str) -> int | None:
    """Bytes of a positive size, else None."""
    try:
        size = parse_size(value)
    except ValueError:
        return None
    return size if size > 0 else None


Command = str | list[str]


class Task(BaseModel):
    """A job's description: image, resources, commands, files and placement."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: str | None = Field(default=None, max_length=255, pattern=IMAGE_REFERENCE)
    resources: Resources = Field(default_factory=Resources)
    setup: Command | None = Field(default=None, description="Runs before run, in ~/work")
    run: Command = Field(description="A string run by sh -c, or an argv list")
    env: dict[str, str] = Field(default_factory=dict, max_length=128)
    workdir: str | None = Field(
        default=None, max_length=4096, description="Local directory uploaded to ~/work"
    )
    outputs: list[str] = Field(default_factory=list, max_length=_MAX_OUTPUTS)
    nodes: int = Field(default=1, ge=1, le=64)
    ports: int = Field(default=0, ge=0, le=64, description="Extra TCP ports per rank")
    time_limit: str | float | None = Field(default=None, description="90, 30m, 2h, 1d")
    retries: int = Field(default=0, ge=0, le=16)
    peers: list[str] | None = Field(default=None, max_length=64)
    keep: bool = Field(default=False, description="Leave the containers when the job ends")

    @field_validator("setup", "run")
    @classmethod
    def _command(cls, value: Command | None) -> Command | None:
        if value is None:
            return None
        if isinstance(value, str):
            if not value.strip():
                raise ValueError("the command is empty")
            size = len(value)
        else:
            if not value:
                raise ValueError("the command list is empty")
            if not value[0]:
                raise ValueError("the command's program is empty")
            size = sum(len(word) for word in value)
        if size > _MAX_COMMAND or "\0" in "".join([value] if isinstance(value, str) else value):
            raise ValueError("the command is too long or holds a NUL byte")
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if not _ENV_NAME.match(name):
                raise ValueError(f"{name!r} is not an environment variable name")
            if name.startswith(_RESERVED_ENV):
                raise ValueError(f"{name!r}: P2PRC_* variables are set by the job layer")
            if "\0" in text or len(text) > 32 * 1024:
                raise ValueError(f"{name}: the value is too long or holds a NUL byte")
        return value

    @field_validator("outputs")
    @classmethod
    def _outputs(cls, value: list[str]) -> list[str]:
        return [output_path(path) for path in value]

    @field_validator("time_limit")
    @classmethod
    def _time_limit(cls, value: str | float | None) -> str | float | None:
        if value is None:
            return None
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        if not 0 < seconds < 366 * 86400:
            raise ValueError("the time limit must be positive and under a year")
        return value

    @field_validator("peers")
    @classmethod
    def _peers(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or any(not p.strip() or len(p) > 300 for p in value)):
            raise ValueError("peers must be a non-empty list of peer names or addresses")
        return value

    @property
    def time_limit_s(self) -> float | None:
        return None if self.time_limit is None else parse_duration(self.time_limit)


def output_path(text: str) -> str:
    """A path relative to the container's work directory, normalised; never absolute or '..'."""
    if not text or "\0" in text or len(text) > 1024:
        raise ValueError(f"{text!r} is not an output path")
    path = PurePosixPath(text)
    if path.is_absolute() or text.startswith("~"):
        raise ValueError(f"{text!r}: outputs are relative to the work directory")
    if ".." in path.parts:
        raise ValueError(f"{text!r}: '..' may not appear in an output path")
    normal = str(path)
    if normal == ".":
        raise ValueError(f"{text!r}: name a file or directory inside the work directory")
    return normal


def parse_task(data: dict[str, Any], *, base: Path | None = None) -> Task:
    """A task from its parsed fields; a relative workdir is taken from ``base``."""
    try:
        task = Task.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequest(f"invalid task: {_describe(exc)}") from None
    if task.workdir is not None:
        folder = Path(task.workdir).expanduser()
        if not folder.is_absolute():
            folder = (base or Path.cwd()) / folder
        task = task.model_copy(update={"workdir": str(check_workdir(folder))})
    return task


def load_task(path: Path) -> Task:
    """Read a ``task.toml``; every problem is an ``InvalidRequest`` naming the key."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidRequest(f"{path}: no such task file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"{path}: cannot read it: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidRequest(f"{path} is not valid TOML: {exc}") from None
    try:
        return parse_task(data, base=path.parent)
    except InvalidRequest as exc:
        raise InvalidRequest(f"{path}: {exc}") from None


def check_workdir(folder: Path) -> Path:
    """The absolute directory to upload, once nothing in it leaves it or is a special file."""
    try:
        mode = folder.lstat().st_mode
    except OSError:
        raise InvalidRequest(f"workdir {folder}: no such directory") from None
    if not stat.S_ISDIR(mode):
        raise InvalidRequest(f"workdir {folder} is not a directory (a link or a file)")
    top = folder.resolve()
    for parent, dirs, files in os.walk(top, onerror=_unreadable):
        for name in [*dirs, *files]:
            entry = Path(parent, name)
            where = entry.relative_to(top)
            kind = entry.lstat().st_mode
            if stat.S_ISLNK(kind):
                target = Path(os.path.realpath(entry))
                if target != top and top not in target.parents:
                    raise InvalidRequest(f"workdir {folder}: {where} links outside it")
            elif not (stat.S_ISDIR(kind) or stat.S_ISREG(kind)):
                raise InvalidRequest(f"workdir {folder}: {where} is not a file or directory")
    return top


def _unreadable(exc: OSError) -> None:
    raise InvalidRequest(f"workdir: cannot read {exc.filename}: {exc.strerror}")


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error.get("loc", ()) if not isinstance(part, int))
        # A union's members show up as extra parts ("run.str"): the key is what matters.
        where = re.sub(r"\.(str|list\[str\])$", "", where)
        message = error.get("msg", "invalid")
        if error.get("type") == "extra_forbidden":
            message = "unknown key"
        message = message.removeprefix("Value error, ")
        problems.append(f"{where or 'task'}: {message}")
    return "; ".join(dict.fromkeys(problems))
