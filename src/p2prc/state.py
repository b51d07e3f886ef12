"""The node's SQLite database: schema, migrations and small typed accessors.

One file per home, in WAL mode. ``PRAGMA user_version`` is the schema version
and the ``meta`` table's ``application`` row marks the file as ours, so a
corrupt file, another program's database or one from a newer p2prc is refused
with a clear error instead of being replaced.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from pathlib import Path

from ._closing import Closing
from .errors import StateError

__all__ = ["SCHEMA_VERSION", "State"]

_APPLICATION = "p2prc"

# Each entry migrates from version i to i + 1; never edit one that has shipped.
_MIGRATIONS: list[str] = [
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE seen_nonces (
        nonce TEXT PRIMARY KEY,
        expires REAL NOT NULL
    );
    CREATE INDEX seen_nonces_expires ON seen_nonces (expires);
    """,
    # 2: containers this node hosts for peers, and containers it created on peers.
    """
    CREATE TABLE hosted_containers (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        view TEXT NOT NULL,
        expires_at REAL
    );
    CREATE INDEX hosted_containers_owner ON hosted_containers (owner);
    CREATE TABLE tracked_containers (
        id TEXT NOT NULL,
        peer TEXT NOT NULL,
        peer_address TEXT NOT NULL,
        view TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (peer, id)
    );
    """,
    # 3: the peer table (signed records, the claim behind each non-alive state, RTT).
    """
    CREATE TABLE peers (
        node_id TEXT PRIMARY KEY,
        record BLOB NOT NULL,
        claim BLOB,
        rtt_ms REAL
    );
    """,
    # 4: groups of tracked containers, and plugin runs with their output.
    """
    CREATE TABLE container_groups (id TEXT PRIMARY KEY, created_at REAL NOT NULL);
    CREATE TABLE group_members (
        group_id TEXT NOT NULL REFERENCES container_groups (id) ON DELETE CASCADE,
        peer TEXT NOT NULL,
        container_id TEXT NOT NULL,
        PRIMARY KEY (group_id, peer, container_id)
    );
    CREATE TABLE plugin_runs (
        id TEXT PRIMARY KEY,
        plugin TEXT NOT NULL,
        target TEXT NOT NULL,
        started_at REAL NOT NULL,
        finished_at REAL,
        ok INTEGER,
        summary TEXT,
        output TEXT
    );
    """,
    # 5: local ports this node published (map-port), restored after a restart.
    """
    CREATE TABLE port_mappings (
        port INTEGER PRIMARY KEY,
        public_host TEXT NOT NULL,
        public_port INTEGER NOT NULL,
        relay TEXT NOT NULL,
        domain TEXT
    );
    """,
    # 6: UDP mappings beside TCP ones: the key becomes (port, udp).
    """
    CREATE TABLE port_mappings_v6 (
        port INTEGER NOT NULL,
        udp INTEGER NOT NULL DEFAULT 0,
        public_host TEXT NOT NULL,
        public_port INTEGER NOT NULL,
        relay TEXT NOT NULL,
        domain TEXT,
        PRIMARY KEY (port, udp)
    );
    INSERT INTO port_mappings_v6 (port, udp, public_host, public_port, relay, domain)
        SELECT port, 0, public_host, public_port, relay, domain FROM port_mappings;
    DROP TABLE port_mappings;
    ALTER TABLE port_mappings_v6 RENAME TO port_mappings;
    """,
    # 7: each nonce remembers the key that used it and its budget pool (per-key budgets).
    """
    ALTER TABLE seen_nonces ADD COLUMN key TEXT NOT NULL DEFAULT '';
    ALTER TABLE seen_nonces ADD COLUMN pool TEXT NOT NULL DEFAULT '';
    CREATE INDEX seen_nonces_key ON seen_nonces (key, expires);
    CREATE INDEX seen_nonces_pool ON seen_nonces (pool, expires);
    """,
    # 8: who asked for each mapping ('' is the node's owner): a peer changes only its own.
    """
    ALTER TABLE port_mappings ADD COLUMN owner TEXT NOT NULL DEFAULT '';
    """,
    # 9: jobs this node submitted: the task, its state and where each rank runs.
    """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        task TEXT NOT NULL,
        state TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL,
        finished_at REAL,
        placements TEXT NOT NULL DEFAULT '[]'
    );
    CREATE INDEX jobs_created ON jobs (created_at);
    """,
    # 10: invites this node gave out: the SHA-256 of each secret, its expiry and uses left.
    """
    CREATE TABLE invites (
        digest TEXT PRIMARY KEY,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        uses_left INTEGER NOT NULL,
        redeemed_by TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX invites_expires ON invites (expires_at);
    """,
    # 11: the roles an invite's redeemer is trusted for (JSON list; NULL: all of them).
    """
    ALTER TABLE invites ADD COLUMN roles TEXT;
    """,
    # 12: Dask clusters this node owns (the view as JSON beside the columns it is found
    # by), and their workers, each with its container (the scheduler is in the view).
    """
    CREATE TABLE clusters (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        state TEXT NOT NULL,
        spec TEXT NOT NULL,
        view TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX clusters_created ON clusters (created_at);
    CREATE TABLE cluster_members (
        cluster_id TEXT NOT NULL REFERENCES clusters (id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        seq INTEGER NOT NULL,
        view TEXT NOT NULL,
        PRIMARY KEY (cluster_id, name)
    );
    """,
    # 13: attached hosts (#16): this gateway's own rows (the LAN address stays here), the
    # signed records pulled from other gateways, and the remote port maps of attached hosts.
    """
    CREATE TABLE attached_hosts (
        name TEXT PRIMARY KEY,
        address TEXT NOT NULL,
        ssh_port INTEGER NOT NULL,
        user TEXT NOT NULL DEFAULT '',
        ports TEXT NOT NULL DEFAULT '[]',
        host_key TEXT NOT NULL,
        allow TEXT NOT NULL DEFAULT '[]',
        arch TEXT NOT NULL DEFAULT '',
        os TEXT NOT NULL DEFAULT '',
        cores INTEGER NOT NULL DEFAULT 0,
        memory INTEGER NOT NULL DEFAULT 0,
        created REAL NOT NULL,
        version INTEGER NOT NULL
    );
    CREATE TABLE attached_records (
        gateway TEXT NOT NULL,
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        record BLOB NOT NULL,
        PRIMARY KEY (gateway, name)
    );
    CREATE TABLE attached_maps (
        name TEXT NOT NULL,
        port INTEGER NOT NULL,
        listen_port INTEGER NOT NULL,
        public_host TEXT NOT NULL DEFAULT '',
        public_port INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (name, port)
    );
    """,
]

SCHEMA_VERSION = len(_MIGRATIONS)


class State(Closing):
    """An open state database."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = self._open(path)

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        existed = path.exists() and path.stat().st_size > 0
        try:
            _make_private(path)
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except (sqlite3.Error, OSError) as exc:
            raise StateError(f"cannot open {path}: {exc}") from None
        try:
            _check_and_migrate(db, path, existed)
            _make_private(path)  # SQLite made the -wal and -shm files by now
        except BaseException:
            db.close()
            raise
        return db

    def close(self) -> None:
        self._db.close()

    @property
    def connection(self) -> sqlite3.Connection:
        """The open connection, in autocommit mode, for each feature's own store."""
        return self._db

    @property
    def version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def remember_nonce(
        self,
        nonce: str,
        expires: float,
        limit: int,
        *,
        key: str = "",
        pool: str = "",
        key_limit: int | None = None,
    ) -> bool:
        """Record a nonce; False if it was seen before.

        Refuses (``OverflowError``) past ``key_limit`` live nonces of ``key`` or ``limit``
        live nonces in ``pool``, so one key's flood never uses up another pool's room.
        """
        now = time.time()
        db = self._db
        db.execute("DELETE FROM seen_nonces WHERE expires < ?", (now,))
        if db.execute("SELECT 1 FROM seen_nonces WHERE nonce = ?", (nonce,)).fetchone():
            return False
        if key_limit is not None and _live(db, "key", key, now) >= key_limit:
            raise OverflowError("too many signed requests from this key in the replay window")
        if _live(db, "pool", pool, now) >= limit:
            raise OverflowError("too many signed requests in the replay window")
        db.execute(
            "INSERT INTO seen_nonces (nonce, expires, key, pool) VALUES (?, ?, ?, ?)",
            (nonce, expires, key, pool),
        )
        return True


def _live(db: sqlite3.Connection, column: str, value: str, now: float) -> int:
    # Served by the (column, expires) index: counts only that key's or pool's rows.
    query = f"SELECT count(*) FROM seen_nonces WHERE {column} = ? AND expires >= ?"
    return int(db.execute(query, (value, now)).fetchone()[0])


def _make_private(path: Path) -> None:
    """The database and its -wal and -shm files: 0600, created so if missing."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    for file in (path, path.with_name(f"{path.name}-wal"), path.with_name(f"{path.name}-shm")):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(file, 0o600)


def _check_and_migrate(db: sqlite3.Connection, path: Path, existed: bool) -> None:
    try:
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    except sqlite3.DatabaseError as exc:
        raise StateError(f"{path} is not a p2prc state database ({exc})") from None
    if existed and version == 0 and tables:
        raise StateError(f"{path} belongs to another program (no p2prc schema); move it away")
    if version > SCHEMA_VERSION:
        raise StateError(
            f"{path} has schema version {version}, newer than this p2prc's {SCHEMA_VERSION}"
        )
    if version > 0:
        row = db.execute("SELECT value FROM meta WHERE key = 'application'").fetchone()
        if row is None or row[0] != _APPLICATION:
            raise StateError(f"{path} is not a p2prc state database")
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute("PRAGMA foreign_keys = ON")
    for number in range(version, SCHEMA_VERSION):
        with db:
            db.execute("BEGIN")
            for statement in _MIGRATIONS[number].split(";"):
                if statement.strip():
                    db.execute(statement)
            if number == 0:
                db.execute(
                    "INSERT INTO meta (key, value) VALUES ('application', ?)", (_APPLICATION,)
                )
            db.execute(f"PRAGMA user_version = {number + 1}")
