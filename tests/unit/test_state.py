import sqlite3
import time
from pathlib import Path

import pytest

from p2prc.errors import StateError
from p2prc.state import SCHEMA_VERSION, State


def test_creates_schema_in_wal_mode(tmp_path: Path) -> None:
    with State(tmp_path / "s.db") as state:
        assert state.version == SCHEMA_VERSION
        assert state.get_meta("application") == "p2prc"
    db = sqlite3.connect(tmp_path / "s.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_reopen_keeps_data(tmp_path: Path) -> None:
    with State(tmp_path / "s.db") as state:
        state.set_meta("k", "v")
    with State(tmp_path / "s.db") as state:
        assert state.get_meta("k") == "v"


def test_corrupt_file_is_refused_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    path.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(StateError, match="not a p2prc state database"):
        State(path)
    assert path.read_bytes() == b"this is not sqlite at all" * 100


def test_foreign_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE invoices (id INTEGER)")
    db.commit()
    db.close()
    with pytest.raises(StateError, match="another program"):
        State(path)
    db = sqlite3.connect(path)
    assert db.execute("SELECT name FROM sqlite_master").fetchall() == [("invoices",)]
    db.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    State(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    db.commit()
    db.close()
    with pytest.raises(StateError, match="newer"):
        State(path)


def test_nonces_are_remembered_and_expire(tmp_path: Path) -> None:
    with State(tmp_path / "s.db") as state:
        assert state.remember_nonce("a" * 32, time.time() + 60, limit=10)
        assert not state.remember_nonce("a" * 32, time.time() + 60, limit=10)
        assert state.remember_nonce("b" * 32, time.time() - 1, limit=10)
        assert state.remember_nonce("b" * 32, time.time() + 60, limit=10)


def test_nonce_limit(tmp_path: Path) -> None:
    with State(tmp_path / "s.db") as state:
        for index in range(3):
            assert state.remember_nonce(f"{index:032x}", time.time() + 60, limit=3)
        with pytest.raises(OverflowError):
            state.remember_nonce("f" * 32, time.time() + 60, limit=3)


async def test_closing_mixins_start_and_close_once() -> None:
    from p2prc._closing import AsyncClosing, Closing, Component

    calls: list[str] = []

    class Sync(Closing):
        def close(self) -> None:
            calls.append("close")

    class Async(AsyncClosing):
        async def aclose(self) -> None:
            calls.append("aclose")

    class Started(Component):
        async def start(self) -> None:
            calls.append("start")

        async def aclose(self) -> None:
            calls.append("stop")

    with Sync() as sync:
        assert isinstance(sync, Sync)
    async with Async(), Started():
        assert calls == ["close", "start"]
    assert calls == ["close", "start", "stop", "aclose"]
