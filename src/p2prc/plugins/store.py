"""Installed plugins: a directory per plugin with ``site.yml`` and ``plugin.toml``.

``plugin.toml``::

    name = "http-share"
    summary = "Serve a directory of the container over HTTP"
    [variables]
    port = "port to serve on (default 8000)"

The original P2PRC's ``description.txt`` is accepted as the summary when there is no
``plugin.toml``. A pull stages into a hidden directory beside the plugins (a ``git clone``
for a URL; a plain copy, without git, for a local directory), validates it, and renames it
into place, so a failed pull leaves nothing half-installed. A plugin holds only directories,
regular files and symlinks that stay inside it: Ansible reads its files on this machine, so
a link to ``~/.ssh`` or the node key would hand them to every container it runs on.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
import subprocess
import tomllib
from pathlib import Path

from ..errors import InvalidRequest, NotFound, P2PRCError, PluginError
from ..models import PluginInfo

__all__ = ["PluginStore", "validate_name"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_URL = re.compile(r"^(https?|ssh|git|file)://[^\s]+$|^[\w.-]+@[\w.-]+:[^\s]+$")
_CLONE_TIMEOUT = 120


def validate_name(name: str) -> str:
    """A plugin name: letters, digits, '.', '_' and '-'; never a path."""
    if not _NAME.match(name) or name in (".", ".."):
        raise InvalidRequest(f"{name!r} is not a plugin name (letters, digits, . _ -)")
    return name


class PluginStore:
    """The plugins in one directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def list(self) -> list[PluginInfo]:
        """Every valid plugin; broken directories are skipped, not fatal."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in sorted(self.directory.iterdir()):
            if path.name.startswith(".") or not path.is_dir():
                continue
            try:
                found.append(_describe(path, path.name))
            except P2PRCError:
                continue
        return found

    def get(self, name: str) -> PluginInfo:
        path = self.directory / validate_name(name)
        if not path.is_dir():
            raise NotFound(f"no plugin {name!r}; see 'p2prc plugin list'")
        return _describe(path, name)

    def remove(self, name: str) -> None:
        info = self.get(name)
        shutil.rmtree(info.path)

    def pull(self, source: str) -> PluginInfo:
        """Install a plugin from a git URL (cloned) or a local directory (copied)."""
        url = _source(source)
        local = not _URL.match(url)
        if not local and shutil.which("git") is None:
            raise PluginError(
                f"git is not installed; it is needed to pull {url} (a local directory is "
                "copied without it)"
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        staging = self.directory / f".pull-{secrets.token_hex(4)}"
        try:
            if local:
                _check_tree(Path(url), url)
                _copy(Path(url), staging)
            else:
                _clone(url, staging)
            _check_tree(staging, url)
            guess = re.sub(r"\.git$", "", url.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1])
            info = _describe(staging, guess)
            target = self.directory / validate_name(info.name)
            if target.exists():
                raise PluginError(f"a plugin named {info.name!r} is installed; remove it first")
            os.rename(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return self.get(info.name)


def _source(source: str) -> str:
    if source.startswith("-"):
        raise InvalidRequest(f"{source!r} is not a git URL or path")
    if _URL.match(source):
        return source
    path = Path(source).expanduser()
    if path.is_dir():
        return str(path.resolve())
    raise InvalidRequest(f"{source!r} is neither a git URL nor a local directory")


def _check_tree(root: Path, source: str) -> None:
    """Refuse what a plugin may not hold: special files, and symlinks leaving ``root``."""
    top = root.resolve()
    for folder, dirs, files in os.walk(root, onerror=_unreadable):
        dirs[:] = [name for name in dirs if name != ".git"]  # never copied, never used
        for name in [*dirs, *files]:
            if name == ".git":
                continue
            path = Path(folder, name)
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                target = Path(os.path.realpath(path))
                if target != top and top not in target.parents:
                    where = path.relative_to(root)
                    raise PluginError(f"{source}: {where} links outside the plugin")
            elif not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                where = path.relative_to(root)
                raise PluginError(f"{source}: {where} is not a regular file or directory")


def _copy(source: Path, target: Path) -> None:
    try:
        shutil.copytree(source, target, symlinks=True, ignore=shutil.ignore_patterns(".git"))
    except (OSError, shutil.Error) as exc:
        raise PluginError(f"cannot copy {source}: {exc}") from None


def _unreadable(exc: OSError) -> None:
    raise PluginError(f"cannot read {exc.filename}: {exc.strerror}")


def _clone(url: str, target: Path) -> None:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true"}
    try:
        result = subprocess.run(
            ["git", "clone", "--quiet", "--depth", "1", "--", url, str(target)],
            capture_output=True,
            text=True,
            timeout=_CLONE_TIMEOUT,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise PluginError(f"git clone of {url} took longer than {_CLONE_TIMEOUT} s") from None
    if result.returncode != 0:
        detail = result.stderr.strip().splitlines()[-1:] or ["failed"]
        raise PluginError(f"{url} is not a git repository I can clone: {detail[0]}")


def _describe(path: Path, default_name: str) -> PluginInfo:
    if not (path / "site.yml").is_file():
        raise PluginError(f"{default_name}: no site.yml playbook")
    name, summary, variables = default_name, "", {}
    manifest = path / "plugin.toml"
    if manifest.is_file():
        try:
            data = tomllib.loads(manifest.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise PluginError(f"{default_name}: plugin.toml is not valid TOML: {exc}") from None
        name = str(data.get("name", default_name))
        summary = str(data.get("summary", ""))
        raw = data.get("variables", {})
        if not isinstance(raw, dict):
            raise PluginError(f"{default_name}: [variables] must be a table")
        variables = {str(key): str(value) for key, value in raw.items()}
    elif (path / "description.txt").is_file():
        summary = (path / "description.txt").read_text(errors="replace").strip()[:200]
    validate_name(name)
    return PluginInfo(name=name, summary=summary, variables=variables, path=str(path))
