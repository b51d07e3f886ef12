"""SQLite persistence of the peer table and of this node's own record counter."""

from __future__ import annotations

import sqlite3

import msgpack

from ..errors import PeerProtocolError
from .records import Claim, PeerRecord, claim_from_fields, record_from_fields
from .table import Member

__all__ = ["PeerStore"]


class PeerStore:
    """Typed access to the ``peers`` table."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def save(self, member: Member) -> None:
        record = member.record
        claim = member.claim.encode() if member.claim is not None else None
        self._db.execute(
            "INSERT OR REPLACE INTO peers (node_id, record, claim, rtt_ms) VALUES (?, ?, ?, ?)",
            (record.node_id, record.encode(), claim, member.rtt_ms),
        )

    def delete(self, node_id: str) -> None:
        self._db.execute("DELETE FROM peers WHERE node_id = ?", (node_id,))

    def load(self) -> list[tuple[PeerRecord, Claim | None, float | None]]:
        """Everything stored; rows that no longer decode are skipped, never fatal."""
        rows = []
        for record_bytes, claim_bytes, rtt in self._db.execute(
            "SELECT record, claim, rtt_ms FROM peers"
        ):
            try:
                record = record_from_fields(msgpack.unpackb(record_bytes, raw=False))
                claim = None
                if claim_bytes is not None:
                    claim = claim_from_fields(msgpack.unpackb(claim_bytes, raw=False))
            except (PeerProtocolError, ValueError, TypeError, msgpack.UnpackException):
                continue
            rows.append((record, claim, rtt))
        return rows
