"""SQLite records of hosted containers (this node's) and tracked ones (on peers)."""

from __future__ import annotations

import ipaddress
import logging
import sqlite3
from urllib.parse import urlsplit

from pydantic import ValidationError

from .._match import unique_prefix
from ..errors import ContainerNotFound, PeerProtocolError, validation_message
from ..models import ContainerView, TrackedContainer

__all__ = ["ContainerStore", "check_peer_view", "pick_tracked"]

log = logging.getLogger(__name__)


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

    def add_tracked(self, tracked: TrackedContainer, *, peer: str) -> None:
        """Track a container on ``peer``, the node we asked; never replaces an entry."""
        view = check_peer_view(tracked.container, peer=peer, peer_address=tracked.peer_address)
        # Ids are unique across peers too: they name the container's pinned host key.
        taken = self._db.execute(
            "SELECT 1 FROM tracked_containers WHERE id = ?", (view.id,)
        ).fetchone()
        try:
            if taken:
                raise sqlite3.IntegrityError(view.id)
            self._db.execute(
                "INSERT INTO tracked_containers (id, peer, peer_address, view, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (view.id, peer, tracked.peer_address, view.model_dump_json(), view.created_at),
            )
        except sqlite3.IntegrityError:
            raise PeerProtocolError(
                f"{tracked.peer_address} answered with container id {view.id}, "
                "which is tracked already; nothing changed"
            ) from None

    def tracked(self) -> list[TrackedContainer]:
        rows = self._db.execute(
            "SELECT id, view, peer_address FROM tracked_containers ORDER BY created_at"
        )
        items = []
        for container_id, view, address in rows:
            try:
                container = ContainerView.model_validate_json(view)
            except ValidationError:  # kept, but never used: an older p2prc stored it unchecked
                log.warning(
                    "ignoring tracked container %r: its stored view is invalid", container_id
                )
                continue
            items.append(TrackedContainer(container=container, peer_address=address))
        return items

    def prune_tracked(self, now: float) -> int:
        """Forget tracked containers whose lease has run out on their peer."""
        cursor = self._db.execute(
            "DELETE FROM tracked_containers WHERE json_extract(view, '$.expires_at') <= ?",
            (now,),
        )
        return cursor.rowcount

    def one_tracked(self, prefix: str) -> TrackedContainer:
        """The one tracked container with this name or id prefix."""
        return pick_tracked(self.tracked(), prefix)

    def remove_tracked(self, peer: str, container_id: str) -> None:
        self._db.execute(
            "DELETE FROM tracked_containers WHERE peer = ? AND id = ?", (peer, container_id)
        )


def pick_tracked(tracked: list[TrackedContainer], prefix: str) -> TrackedContainer:
    """The one container among ``tracked`` with this name or id prefix; clear errors else."""
    return unique_prefix(
        prefix,
        tracked,
        ident=lambda item: item.container.id,
        name=lambda item: item.container.name,
        what="container",
        missing=ContainerNotFound,
        see="p2prc container list",
    )


def check_peer_view(view: ContainerView, *, peer: str, peer_address: str) -> ContainerView:
    """``view`` checked as an answer of ``peer`` (its node id) at ``peer_address``."""
    try:  # again: a view built with model_construct skipped its validators
        view = ContainerView.model_validate(view.model_dump())
    except ValidationError as exc:
        message = validation_message(exc)
        raise PeerProtocolError(f"{peer_address}: invalid container view: {message}") from None
    if view.peer != peer:
        raise PeerProtocolError(
            f"{peer_address} answered for node {view.peer}, not for {peer} that we asked"
        )
    _check_ssh_host(view.ssh.host, peer_address)
    return view


def _check_ssh_host(host: str, peer_address: str) -> None:
    """A container's SSH host is the peer we asked, or an IP address (its relay's)."""
    asked = _host_of(peer_address)
    if host.lower() == asked:
        return
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise PeerProtocolError(
            f"{peer_address} gave SSH host {host!r}: neither an IP address nor the host we asked"
        ) from None
    local = address.is_loopback or address.is_link_local
    if address.is_unspecified or address.is_multicast or (local and not _is_local(asked)):
        raise PeerProtocolError(f"{peer_address} gave SSH host {host}, which is not its address")


def _host_of(address: str) -> str:
    text = address if "://" in address else f"http://{address}"
    try:
        host = urlsplit(text).hostname or ""
    except ValueError:
        return ""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.lower()


def _is_local(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_link_local
