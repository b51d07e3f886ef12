"""AttachStore: own rows, a gateway's whole set replaced at once, maps, and the reserved
custom keys users cannot set in config."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from p2prc.attach.records import AttachedRecord
from p2prc.attach.store import AttachedMap, AttachedRow, AttachStore
from p2prc.config import Home, NodeConfig, save, set_value
from p2prc.errors import ConfigError
from p2prc.identity import Identity
from p2prc.state import State

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICseTfn0fT/bt2pdLk2DoidFbZcTCwfsvb7TXblxDSTw"


def _row(name: str, created: float) -> AttachedRow:
    return AttachedRow(
        name, "10.0.0.2", 22, KEY, created, 1, user="pi", ports=(80, 443), allow=("a" * 32,),
        arch="aarch64", os="Linux", cores=4, memory=2**33,
    )  # fmt: skip


def test_rows_and_maps(tmp_path: Path) -> None:
    with State(tmp_path / "state.db") as state:
        store = AttachStore(state.connection)
        store.add(_row("b", 2.0))
        store.add(_row("a", 1.0))
        with pytest.raises(sqlite3.IntegrityError):
            store.add(_row("a", 3.0))
        assert [r.name for r in store.rows()] == ["a", "b"]  # oldest first
        assert store.row("a") == _row("a", 1.0)
        store.set_allow("a", ())
        store.set_version(7)
        row = store.row("a")
        assert row is not None
        assert row.allow == ()
        assert row.version == 7
        store.save_map(AttachedMap("a", 80, 40080, "203.0.113.1", 50080))
        store.save_map(AttachedMap("b", 80, 40081))
        assert [m.listen_port for m in store.maps("a")] == [40080]
        assert len(store.maps()) == 2
        assert store.remove("a")  # its maps go with it
        assert not store.remove("a")
        assert [m.name for m in store.maps()] == ["b"]
        assert store.delete_map("b", 80)
        assert store.maps() == []


def test_a_gateways_set_is_replaced_whole(tmp_path: Path) -> None:
    gateway, other = Identity.generate(), Identity.generate()
    now = int(time.time() * 1000)

    def record(identity: Identity, name: str, version: int) -> AttachedRecord:
        unsigned = AttachedRecord(name, identity.node_id, identity.public_key, version, KEY)
        return unsigned.signed(identity)

    with State(tmp_path / "state.db") as state:
        store = AttachStore(state.connection)
        store.replace_gateway(
            gateway.node_id, [record(gateway, "x", now), record(gateway, "y", now)]
        )
        store.replace_gateway(other.node_id, [record(other, "x", now + 1)])
        assert store.gateways() == {gateway.node_id: now, other.node_id: now + 1}
        store.replace_gateway(gateway.node_id, [record(gateway, "z", now + 2)])
        names = sorted((r.gateway == gateway.node_id, r.name) for r in store.foreign())
        assert names == [(False, "x"), (True, "z")]
        assert store.foreign_count(excluding=other.node_id) == 1
        assert store.drop_gateway(gateway.node_id) == 1
        assert [r.name for r in store.foreign()] == ["x"]
        # A record stored under another gateway's id than its own is dropped on read.
        state.connection.execute("UPDATE attached_records SET gateway = ?", (gateway.node_id,))
        assert store.foreign() == []


def test_config_refuses_reserved_custom_keys(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    home.make_private()
    save(home, NodeConfig())
    with pytest.raises(ConfigError, match="reserved"):
        set_value(home, "custom.p2prc.attached", "1")
    assert set_value(home, "custom.colour", "blue").custom == {"colour": "blue"}
