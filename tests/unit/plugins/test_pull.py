"""Pulling plugins: a local directory is copied without git; URLs need git, and say so;
nothing but directories, regular files and symlinks that stay inside is installed."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from p2prc.errors import PluginError
from p2prc.plugins.store import PluginStore

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def no_git(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A PATH without git, as on a stock Debian 12."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert shutil.which("git") is None


def _plugin(path: Path, name: str = "demo") -> Path:
    path.mkdir()
    (path / "site.yml").write_text("- hosts: all\n  tasks: []\n")
    (path / "plugin.toml").write_text(f'name = "{name}"\n')
    return path


def test_a_local_directory_needs_no_git(no_git: None, tmp_path: Path) -> None:
    store = PluginStore(tmp_path / "plugins")
    info = store.pull(str(REPO / "plugins" / "http-share"))
    assert info.name == "http-share"
    assert (Path(info.path) / "site.yml").is_file()


def test_a_relative_local_directory(
    no_git: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    store = PluginStore(tmp_path / "plugins")
    assert store.pull("./plugins/http-share").name == "http-share"


def test_a_url_without_git_is_a_clear_error(no_git: None, tmp_path: Path) -> None:
    store = PluginStore(tmp_path / "plugins")
    with pytest.raises(PluginError, match="git is not installed; it is needed to pull"):
        store.pull("https://example.invalid/plugin.git")


def test_a_local_git_checkout_is_copied_without_its_git_directory(tmp_path: Path) -> None:
    source = _plugin(tmp_path / "repo")
    if shutil.which("git") is not None:
        subprocess.run(["git", "-C", str(source), "init", "-q"], check=True)
    else:
        (source / ".git").mkdir()
    info = PluginStore(tmp_path / "plugins").pull(str(source))
    assert not (Path(info.path) / ".git").exists()


@pytest.mark.parametrize("target", ["/etc/passwd", "../outside", "sub/../../outside"])
def test_symlinks_leaving_the_plugin_are_refused(tmp_path: Path, target: str) -> None:
    source = _plugin(tmp_path / "src")
    (tmp_path / "outside").write_text("secret")
    (source / "sub").mkdir()
    os.symlink(target, source / "files")
    store = PluginStore(tmp_path / "plugins")
    with pytest.raises(PluginError, match="links outside the plugin"):
        store.pull(str(source))
    assert list((tmp_path / "plugins").iterdir()) == []


def test_a_symlink_to_the_node_key_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "home" / "identity" / "id_ed25519"
    key.parent.mkdir(parents=True)
    key.write_text("PRIVATE")
    source = _plugin(tmp_path / "src")
    (source / "files").mkdir()
    os.symlink(key, source / "files" / "key")
    with pytest.raises(PluginError, match="files/key links outside"):
        PluginStore(tmp_path / "plugins").pull(str(source))


def test_symlinks_inside_the_plugin_are_kept(tmp_path: Path) -> None:
    source = _plugin(tmp_path / "src")
    (source / "files").mkdir()
    (source / "files" / "a.txt").write_text("a")
    os.symlink("files/a.txt", source / "alias.txt")
    info = PluginStore(tmp_path / "plugins").pull(str(source))
    alias = Path(info.path) / "alias.txt"
    assert alias.is_symlink()
    assert alias.read_text() == "a"


def test_special_files_are_refused(tmp_path: Path) -> None:
    source = _plugin(tmp_path / "src")
    os.mkfifo(source / "pipe")  # copying would block on it forever
    with pytest.raises(PluginError, match="pipe is not a regular file"):
        PluginStore(tmp_path / "plugins").pull(str(source))
    assert list((tmp_path / "plugins").iterdir()) == []
