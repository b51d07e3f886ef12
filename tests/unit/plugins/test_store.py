"""Plugin directories: validation, the original description.txt, and clean failures."""

from pathlib import Path

import pytest

from p2prc.errors import InvalidRequest, NotFound, PluginError
from p2prc.plugins.runner import inventory
from p2prc.plugins.store import PluginStore, validate_name

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "..", "", "a b", "x" * 80, "-rf"])
def test_bad_names(name: str) -> None:
    with pytest.raises(InvalidRequest):
        validate_name(name)


def test_original_layout_and_shipped_plugin(tmp_path: Path) -> None:
    store = PluginStore(tmp_path / "plugins")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "site.yml").write_text("- hosts: all\n  tasks: []\n")
    (legacy / "description.txt").write_text("An original P2PRC plugin\n")
    assert store.pull(str(legacy)).summary == "An original P2PRC plugin"
    shipped = store.pull(str(REPO / "plugins" / "http-share"))
    assert "http_port" in shipped.variables
    assert [p.name for p in store.list()] == ["http-share", "legacy"]
    store.remove("legacy")
    with pytest.raises(NotFound):
        store.get("legacy")


@pytest.mark.parametrize(
    ("files", "error"),
    [
        ({}, "site.yml"),
        ({"site.yml": "", "plugin.toml": "name = [broken"}, "TOML"),
        ({"site.yml": "", "plugin.toml": 'name = "../escape"'}, "plugin name"),
    ],
)
def test_bad_plugins_leave_nothing(tmp_path: Path, files: dict[str, str], error: str) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for name, text in files.items():
        (source / name).write_text(text)
    store = PluginStore(tmp_path / "plugins")
    with pytest.raises((PluginError, InvalidRequest), match=error):
        store.pull(str(source))
    assert list((tmp_path / "plugins").iterdir()) == []


def test_inventory_holds_paths_not_secrets(tmp_path: Path) -> None:
    from p2prc.models import ContainerView, PortMapping, SshAccess, TrackedContainer

    view = ContainerView(
        id="abc123abc123", name="p2prc-x", peer="a" * 32, image="i",
        ssh=SshAccess(host="192.0.2.7", port=32770, user="p2prc"),
        ports=[PortMapping(container_port=8000, host_port=32771)],
        gpu=False, cpus=1, memory=1, owner="b" * 32, created_at=0,
    )  # fmt: skip
    hosts = inventory(
        [TrackedContainer(container=view, peer_address="x")], tmp_path / "key", tmp_path / "kh"
    )
    host = hosts["all"]["hosts"]["c-abc123abc123"]
    assert host["ansible_host"] == "192.0.2.7"
    assert host["ansible_port"] == 32770
    assert host["ansible_ssh_private_key_file"] == str(tmp_path / "key")
    assert "HostKeyAlias=p2prc-abc123abc123" in host["ansible_ssh_common_args"]
    assert "StrictHostKeyChecking=accept-new" in host["ansible_ssh_common_args"]
    pinned = view.ssh.model_copy(update={"host_key": "ssh-ed25519 AAAA"})
    strict = inventory(
        [TrackedContainer(container=view.model_copy(update={"ssh": pinned}), peer_address="x")],
        tmp_path / "key",
        tmp_path / "kh",
    )
    assert (
        "StrictHostKeyChecking=yes"
        in strict["all"]["hosts"]["c-abc123abc123"]["ansible_ssh_common_args"]
    )


def test_inventory_yaml_marks_every_string_unsafe(tmp_path: Path) -> None:
    from ansible.parsing.utils.yaml import from_yaml  # type: ignore[import-untyped]

    from p2prc.plugins.runner import inventory_yaml

    hosts = {"all": {"hosts": {"c-1": {"ansible_user": 'a"b\\c\n', "ansible_port": 22}}}}
    text = inventory_yaml(hosts)
    assert '"ansible_user": !unsafe "a\\"b\\\\c\\n"' in text
    assert '"ansible_port": 22' in text
    loaded = from_yaml(text)
    assert loaded["all"]["hosts"]["c-1"] == {"ansible_user": 'a"b\\c\n', "ansible_port": 22}
