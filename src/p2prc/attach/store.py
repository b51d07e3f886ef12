"""Attached hosts in the node's SQLite database (tables of state migration 13).

``attached_hosts``: this gateway's own rows (the LAN address and the allow list stay here);
``attached_records``: the signed records pulled from other gateways, a whole gateway's set
replaced at once; ``attached_maps``: remote port maps of attached hosts (``map-port
--remote``). A stored record that no longer decodes is dropped on read, never trusted.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from dataclasses import dataclass
from typing import Any

from ..errors import PeerProtocolError
from .records import AttachedRecord, decode_attached

__all__ = ["AttachStore", "AttachedMap", "AttachedRow"]

log = logging.getLogger(__name__)

_COLUMNS = (
    "name, address, ssh_port, user, ports, host_key, allow, arch, os, cores, memory, created, "
    "version"
)


@dataclass(frozen=True, slots=True)
class AttachedRow:
    """One host this gateway attached."""

    name: str
    address: str
    ssh_port: int
    host_key: str
    created: float
    version: int
    user: str = ""
    ports: tuple[int, ...] = ()
    allow: tuple[str, ...] = ()
    arch: str = ""
    os: str = ""
    cores: int = 0
    memory: int = 0

    def values(self) -> tuple[Any, ...]:
        return (
            self.name,
            self.address,
            self.ssh_port,
            self.user,
            json.dumps(list(self.ports)),
            self.host_key,
            json.dumps(list(self.allow)),
            self.arch,
            self.os,
            self.cores,
            self.memory,
            self.created,
            self.version,
        )


@dataclass(frozen=True, slots=True)
class AttachedMap:
    """A port of an attached host mapped through this gateway (``map-port --remote``)."""

    name: str
    port: int
    listen_port: int
    public_host: str = ""
    public_port: int = 0


def _row(values: tuple[Any, ...]) -> AttachedRow:
    (name, address, ssh_port, user, ports, host_key, allow, arch, os_, cores, memory, created,
     version) = values  # fmt: skip
    return AttachedRow(
        name=str(name),
        address=str(address),
        ssh_port=int(ssh_port),
        user=str(user),
        ports=tuple(int(port) for port in json.loads(ports)),
        host_key=str(host_key),
        allow=tuple(str(entry) for entry in json.loads(allow)),
        arch=str(arch),
        os=str(os_),
        cores=int(cores),
        memory=int(memory),
        created=float(created),
        version=int(version),
    )


class AttachStore:
    """Typed access to the attach tables."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    # This gateway's own rows ----------------------------------------------------------

    def rows(self) -> list[AttachedRow]:
        """Every host this gateway attached, oldest first."""
        cursor = self._db.execute(f"SELECT {_COLUMNS} FROM attached_hosts ORDER BY created, name")
        return [_row(values) for values in cursor.fetchall()]

    def row(self, name: str) -> AttachedRow | None:
        cursor = self._db.execute(f"SELECT {_COLUMNS} FROM attached_hosts WHERE name = ?", (name,))
        values = cursor.fetchone()
        return None if values is None else _row(values)

    def add(self, row: AttachedRow) -> None:
        """Store a new row; a name already attached here is refused by the primary key."""
        marks = ", ".join("?" * 13)
        self._db.execute(f"INSERT INTO attached_hosts ({_COLUMNS}) VALUES ({marks})", row.values())

    def set_allow(self, name: str, allow: tuple[str, ...]) -> None:
        self._db.execute(
            "UPDATE attached_hosts SET allow = ? WHERE name = ?", (json.dumps(list(allow)), name)
        )

    def set_version(self, version: int) -> None:
        """Every own row is (re-)signed at ``version``."""
        self._db.execute("UPDATE attached_hosts SET version = ?", (version,))

    def remove(self, name: str) -> bool:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM attached_maps WHERE name = ?", (name,))
            cursor = self._db.execute("DELETE FROM attached_hosts WHERE name = ?", (name,))
        return cursor.rowcount > 0

    # Records pulled from other gateways ------------------------------------------------

    def foreign(self) -> list[AttachedRecord]:
        """Every stored record of another gateway that still decodes (others are dropped)."""
        cursor = self._db.execute("SELECT gateway, name, record FROM attached_records")
        records, bad = [], []
        for gateway, name, blob in cursor.fetchall():
            try:
                record = decode_attached(bytes(blob))
            except PeerProtocolError:
                bad.append((gateway, name))
                continue
            if (record.gateway, record.name) != (gateway, name):
                bad.append((gateway, name))
                continue
            records.append(record)
        for gateway, name in bad:
            log.warning("dropping a stored attached record that does not verify: %s", name)
            self._db.execute(
                "DELETE FROM attached_records WHERE gateway = ? AND name = ?", (gateway, name)
            )
        return records

    def replace_gateway(self, gateway: str, records: list[AttachedRecord]) -> None:
        """``gateway``'s set is now exactly ``records`` (each verified by the caller)."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM attached_records WHERE gateway = ?", (gateway,))
            self._db.executemany(
                "INSERT INTO attached_records (gateway, name, version, record) VALUES (?, ?, ?, ?)",
                [(gateway, r.name, r.version, r.encode()) for r in records],
            )

    def drop_gateway(self, gateway: str) -> int:
        cursor = self._db.execute("DELETE FROM attached_records WHERE gateway = ?", (gateway,))
        return cursor.rowcount

    def gateways(self) -> dict[str, int]:
        """Each other gateway with stored records, and the highest version held of it."""
        cursor = self._db.execute(
            "SELECT gateway, MAX(version) FROM attached_records GROUP BY gateway"
        )
        return {str(gateway): int(version) for gateway, version in cursor.fetchall()}

    def foreign_count(self, excluding: str = "") -> int:
        cursor = self._db.execute(
            "SELECT COUNT(*) FROM attached_records WHERE gateway != ?", (excluding,)
        )
        return int(cursor.fetchone()[0])

    # Remote port maps (map-port --remote) -----------------------------------------------

    def maps(self, name: str | None = None) -> list[AttachedMap]:
        query = "SELECT name, port, listen_port, public_host, public_port FROM attached_maps"
        args: tuple[str, ...] = ()
        if name is not None:
            query, args = query + " WHERE name = ?", (name,)
        cursor = self._db.execute(query + " ORDER BY name, port", args)
        return [
            AttachedMap(str(n), int(p), int(lp), str(ph), int(pp)) for n, p, lp, ph, pp in cursor
        ]

    def save_map(self, entry: AttachedMap) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO attached_maps "
            "(name, port, listen_port, public_host, public_port) VALUES (?, ?, ?, ?, ?)",
            (entry.name, entry.port, entry.listen_port, entry.public_host, entry.public_port),
        )

    def delete_map(self, name: str, port: int) -> bool:
        cursor = self._db.execute(
            "DELETE FROM attached_maps WHERE name = ? AND port = ?", (name, port)
        )
        return cursor.rowcount > 0
