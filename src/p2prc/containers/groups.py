"""Groups of tracked containers (possibly on different peers) and attached hosts, in SQLite.

An attached host's membership is a ``group_members`` row whose ``peer`` is ``ATTACHED``
(never a node id: those are 32 hex digits) and whose ``container_id`` is the host's name;
the name is looked up when a plugin runs, so a host that was detached since is reported
then.
"""

from __future__ import annotations

import secrets
import sqlite3
import time

from ..errors import InvalidRequest, NotFound
from ..models import ContainerGroup, TrackedContainer
from .store import ContainerStore

__all__ = ["ATTACHED", "GroupStore"]

ATTACHED = "attached"


class GroupStore:
    """Create, fill, empty and delete groups; members are tracked containers."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._containers = ContainerStore(db)

    def create(self) -> ContainerGroup:
        group_id = f"grp{secrets.token_hex(6)}"
        self._db.execute(
            "INSERT INTO container_groups (id, created_at) VALUES (?, ?)", (group_id, time.time())
        )
        return self.get(group_id)

    def get(self, group_id: str) -> ContainerGroup:
        row = self._db.execute(
            "SELECT id, created_at FROM container_groups WHERE id = ?", (group_id,)
        ).fetchone()
        if row is None:
            raise NotFound(f"no group {group_id!r}; see 'p2prc group list'")
        members = {
            (peer, container_id)
            for peer, container_id in self._db.execute(
                "SELECT peer, container_id FROM group_members WHERE group_id = ?", (group_id,)
            )
        }
        containers = [
            item
            for item in self._containers.tracked()
            if (item.container.peer, item.container.id) in members
        ]
        attached = sorted(name for peer, name in members if peer == ATTACHED)
        return ContainerGroup(
            id=row[0], created_at=row[1], containers=containers, attached=attached
        )

    def all(self) -> list[ContainerGroup]:
        rows = self._db.execute("SELECT id FROM container_groups ORDER BY created_at")
        return [self.get(row[0]) for row in rows]

    def add(self, group_id: str, item: TrackedContainer) -> ContainerGroup:
        self.get(group_id)
        self._db.execute(
            "INSERT OR IGNORE INTO group_members (group_id, peer, container_id) VALUES (?, ?, ?)",
            (group_id, item.container.peer, item.container.id),
        )
        return self.get(group_id)

    def remove(self, group_id: str, item: TrackedContainer) -> ContainerGroup:
        group = self.get(group_id)
        if all(member.container.id != item.container.id for member in group.containers):
            raise InvalidRequest(f"container {item.container.id} is not in group {group_id}")
        self._db.execute(
            "DELETE FROM group_members WHERE group_id = ? AND peer = ? AND container_id = ?",
            (group_id, item.container.peer, item.container.id),
        )
        return self.get(group_id)

    def add_attached(self, group_id: str, name: str) -> ContainerGroup:
        """Put the attached host ``name`` (already checked to exist) into a group."""
        self.get(group_id)
        self._db.execute(
            "INSERT OR IGNORE INTO group_members (group_id, peer, container_id) VALUES (?, ?, ?)",
            (group_id, ATTACHED, name),
        )
        return self.get(group_id)

    def remove_attached(self, group_id: str, name: str) -> ContainerGroup:
        group = self.get(group_id)
        if name not in group.attached:
            raise InvalidRequest(f"attached host {name} is not in group {group_id}")
        self._db.execute(
            "DELETE FROM group_members WHERE group_id = ? AND peer = ? AND container_id = ?",
            (group_id, ATTACHED, name),
        )
        return self.get(group_id)

    def delete(self, group_id: str) -> None:
        self.get(group_id)
        self._db.execute("DELETE FROM container_groups WHERE id = ?", (group_id,))

    def forget_container(self, peer: str, container_id: str) -> None:
        """A removed container leaves every group."""
        self._db.execute(
            "DELETE FROM group_members WHERE peer = ? AND container_id = ?", (peer, container_id)
        )
