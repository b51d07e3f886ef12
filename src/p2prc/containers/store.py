"""SQLite records of hosted containers (this node's) and tracked ones (on peers)."""

from __future__ import annotations

import sqlite3

from ..errors import ContainerNotFound, InvalidRequest
from ..models import ContainerView, TrackedContainer

__all__ = ["ContainerStore", "pick_tracked"]


class ContainerStore:
    """Typed access to the two container tables."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def add_hosted(self, view: ContainerView) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO hosted_containers (id, owner, view, expires_at) "
            "VALUES (?, ?, ?, ?)",
            (view.id, view.owner, view.model_dump_json(), view.expires_at),
        )

    def remove_hosted(self, container_id: str) -> None:
        self._db.execute("DELETE FROM hosted_containers WHERE id = ?", (container_id,))

    def hosted(self, owner: str | None = None) -> list[ContainerView]:
        if owner is None:
            rows = self._db.execute("SELECT view FROM hosted_containers ORDER BY rowid")
        else:
            rows = self._db.execute(
                "SELECT view FROM hosted_containers WHERE owner = ? ORDER BY rowid", (owner,)
            )
        return [ContainerView.model_validate_json(row[0]) for row in rows]

    def get_hosted(self, container_id: str) -> ContainerView | None:
        row = self._db.execute(
            "SELECT view FROM hosted_containers WHERE id = ?", (container_id,)
        ).fetchone()
        return None if row is None else ContainerView.model_validate_json(row[0])

    def expired(self, now: float) -> list[str]:
        rows = self._db.execute(
            "SELECT id FROM hosted_containers WHERE expires_at IS NOT NULL AND expires_at <= ?",
            (now,),
        )
        return [str(row[0]) for row in rows]

    def add_tracked(self, tracked: TrackedContainer) -> None:
        view = tracked.container
        self._db.execute(
            "INSERT OR REPLACE INTO tracked_containers (id, peer, peer_address, view, created_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (view.id, view.peer, tracked.peer_address, view.model_dump_json(), view.created_at),
        )

    def tracked(self) -> list[TrackedContainer]:
        rows = self._db.execute(
            "SELECT view, peer_address FROM tracked_containers ORDER BY created_at"
        )
        return [
            TrackedContainer(
                container=ContainerView.model_validate_json(view), peer_address=address
            )
            for view, address in rows
        ]

    def find_tracked(self, prefix: str) -> list[TrackedContainer]:
        """Tracked containers whose id or name starts with ``prefix``."""
        return [
            item
            for item in self.tracked()
            if item.container.id.startswith(prefix) or item.container.name == prefix
        ]

    def prune_tracked(self, now: float) -> int:
        """Forget tracked containers whose lease has run out on their peer."""
        cursor = self._db.execute(
            "DELETE FROM tracked_containers WHERE json_extract(view, '$.expires_at') <= ?",
            (now,),
        )
        return cursor.rowcount

    def one_tracked(self, prefix: str) -> TrackedContainer:
        """The one tracked container with this id prefix or name."""
        return pick_tracked(self.find_tracked(prefix), prefix)

    def remove_tracked(self, peer: str, container_id: str) -> None:
        self._db.execute(
            "DELETE FROM tracked_containers WHERE peer = ? AND id = ?", (peer, container_id)
        )


def pick_tracked(tracked: list[TrackedContainer], prefix: str) -> TrackedContainer:
    """The one container among ``tracked`` with this id prefix or name; clear errors else."""
    matches = [
        item
        for item in tracked
        if item.container.id.startswith(prefix) or item.container.name == prefix
    ]
    if not matches:
        raise ContainerNotFound(f"no tracked container {prefix!r}; see 'p2prc container list'")
    if len(matches) > 1:
        raise InvalidRequest(f"{prefix!r} matches {len(matches)} containers; give more of the id")
    return matches[0]
