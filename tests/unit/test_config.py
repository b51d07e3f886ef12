import json
from pathlib import Path

import pytest

from p2prc.config import Home, NodeConfig, import_original, load, resolve_home, set_value
from p2prc.errors import ConfigError
from p2prc.identity import Identity
from p2prc.node import init_home


def test_defaults(home: Home) -> None:
    config = load(home)
    assert config.port == 8088
    assert config.trust.mode == "allowlist"
    assert config.behind_nat == "auto"
    assert config.bootstrap == []


def test_home_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("P2PRC_HOME", str(tmp_path / "x"))
    assert resolve_home().path == tmp_path / "x"
    assert resolve_home(tmp_path / "y").path == tmp_path / "y"


def test_init_is_idempotent_and_keeps_identity(home: Home) -> None:
    before = Identity.load(home.identity_dir).node_id
    config_text = home.config_file.read_text()
    init_home(home)
    assert Identity.load(home.identity_dir).node_id == before
    assert home.config_file.read_text() == config_text
    assert (home.identity_dir / "id_ed25519").stat().st_mode & 0o777 == 0o600
    assert home.plugins_dir.is_dir()


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("port", "9000", 9000),
        ("trust.mode", "open", "open"),
        ("behind_nat", "true", True),
        ("bootstrap", "10.0.0.1:8088, [::1]:9000", ["10.0.0.1:8088", "[::1]:9000"]),
        ("custom.team", "render-farm", None),
        ("name", "lab-node-1", "lab-node-1"),
    ],
)
def test_set_valid_values(home: Home, key: str, value: str, expected: object) -> None:
    config = set_value(home, key, value)
    assert load(home) == config
    if key == "custom.team":
        assert config.custom == {"team": "render-farm"}
    else:
        current: object = config.model_dump()
        for part in key.split("."):
            assert isinstance(current, dict)
            current = current[part]
        assert current == expected


@pytest.mark.parametrize(
    ("key", "value", "mentions"),
    [
        ("port", "0", "port"),
        ("port", "70000", "port"),
        ("port", "eighty", "port"),
        ("colour", "blue", "unknown key 'colour'"),
        ("trust.mode", "everyone", "trust.mode"),
        ("trust.allow", "not-a-key", "trust.allow"),
        ("name", "bad name; rm -rf /", "name"),
        ("host", "example.com", "host"),
        ("bootstrap", "host:99999", "bootstrap"),
        ("trust.clock_skew", "-1", "trust.clock_skew"),
    ],
)
def test_invalid_values_leave_file_unchanged(
    home: Home, key: str, value: str, mentions: str
) -> None:
    before = home.config_file.read_bytes()
    with pytest.raises(ConfigError) as info:
        set_value(home, key, value)
    assert mentions in str(info.value)
    assert "\n" not in str(info.value)
    assert home.config_file.read_bytes() == before


def test_malformed_toml_is_a_clear_error_and_not_replaced(home: Home) -> None:
    home.config_file.write_text("port = [unclosed\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(home)
    with pytest.raises(ConfigError):
        set_value(home, "port", "9000")
    with pytest.raises(ConfigError):
        init_home(home)
    assert home.config_file.read_text() == "port = [unclosed\n"


def test_unknown_key_in_file_is_rejected(home: Home) -> None:
    home.config_file.write_text(home.config_file.read_text() + "\nsurprise = 1\n")
    with pytest.raises(ConfigError, match="surprise"):
        load(home)


def test_trust_allow_accepts_openssh_and_raw_keys(home: Home) -> None:
    identity = Identity.generate()
    line = identity.openssh_public_key("bob")
    config = set_value(home, "trust.allow", json.dumps([line, identity.public_key_b64]))
    assert config.trust.allow == [line, identity.public_key_b64]


def _write_original(tmp_path: Path, **fields: object) -> Path:
    table = {
        "ip_address": [
            {"Name": "Node1", "IPV4": "217.76.63.222", "ServerPort": "8078", "NAT": False},
            {"Name": "self", "IPV4": "0.0.0.0", "ServerPort": "8088"},
            {"Name": "v6", "IPV4": "", "IPV6": "2001:db8::1", "ServerPort": "8088"},
        ]
    }
    (tmp_path / "ip_table.json").write_text(json.dumps(table))
    original = {
        "MachineName": "oldbox-Ab12Cd3",
        "IPTable": "ip_table.json",
        "ServerPort": "8090",
        "BehindNAT": False,
        "PluginPath": "/opt/plugins",
        "CustomConfig": {"gpu_pool": "a"},
        "UnsafeMode": True,
        "PemFile": "cert.pem",
        **fields,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(original))
    return path


def test_import_original_config(home: Home, tmp_path: Path) -> None:
    config, notes = import_original(home, _write_original(tmp_path))
    assert config.name == "oldbox-Ab12Cd3"
    assert config.port == 8090
    assert config.behind_nat is False
    assert config.plugin_path == "/opt/plugins"
    assert config.custom == {"gpu_pool": "a"}
    assert config.trust.mode == "open"
    assert config.bootstrap == ["217.76.63.222:8078", "[2001:db8::1]:8088"]
    assert any("PemFile: ignored" in note for note in notes)
    assert load(home) == config


def test_import_bad_original_leaves_config(home: Home, tmp_path: Path) -> None:
    before = home.config_file.read_bytes()
    bad = _write_original(tmp_path, ServerPort="70000")
    with pytest.raises(ConfigError, match="port"):
        import_original(home, bad)
    (tmp_path / "garbage.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        import_original(home, tmp_path / "garbage.json")
    with pytest.raises(ConfigError):
        import_original(home, tmp_path / "missing.json")
    assert home.config_file.read_bytes() == before


def test_config_model_is_frozen() -> None:
    config = NodeConfig(name="a")
    with pytest.raises(ValueError, match="frozen"):
        config.port = 1
