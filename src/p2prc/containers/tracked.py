"""Containers this node created on its peers: created there, tracked here, removed there.

The owner's side of a container on a peer. What the peer answers is checked before it
is stored (``ContainerStore.add_tracked``), and its SSH host key is pinned in the home's
``known_hosts``. Used alike by the ``/tracked`` routes and by other services (jobs).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import ContainerNotFound
from ..models import ContainerView, CreateContainer, TrackedContainer
from ..peers.link import PeerLink, PeerTarget
from . import hostkeys
from .groups import GroupStore
from .service import Progress
from .store import ContainerStore

__all__ = ["TrackedContainers"]

log = logging.getLogger(__name__)


class TrackedContainers:
    """Creates containers on peers through the peer link and keeps track of them.

    ``db`` is the node's state; ``known_hosts`` the home's file of pinned SSH host keys;
    ``me`` where this node's own API is now (its containers on itself are removed there,
    not at the address they were made at: the node may listen elsewhere since).
    """

    def __init__(
        self,
        link: PeerLink,
        db: sqlite3.Connection,
        known_hosts: Path,
        clock: Callable[[], float] = time.time,
        *,
        me: Callable[[], PeerTarget] | None = None,
    ) -> None:
        self._link = link
        self._me = me
        self._store = ContainerStore(db)
        self._groups = GroupStore(db)
        self._known_hosts = known_hosts
        self._clock = clock

    def __repr__(self) -> str:
        return f"<TrackedContainers [{len(self._store.tracked())} tracked]>"

    def resolve(self, peer: str) -> PeerTarget:
        """The peer ``peer`` names (see ``PeerLink.resolve``); ``PeerNotFound`` if none."""
        return self._link.resolve(peer)

    async def create_on_peer(
        self,
        peer: str | PeerTarget,
        spec: CreateContainer | None = None,
        progress: Progress | None = None,
    ) -> ContainerView:
        """Create a container on ``peer`` and track it; returns the peer's checked view.

        ``peer`` is what the user typed (a peer name, a unique node id prefix, or
        ``host:port``) or a target already resolved; ``progress`` is awaited with each
        progress message of the peer. Raises ``PeerNotFound`` for an unknown name, the
        peer's own error (``QuotaExceeded``, ``ImageNotFound`` ...) as it sent it, and
        ``PeerProtocolError`` for an answer that cannot be tracked (nothing is stored).
        """
        target = self.resolve(peer) if isinstance(peer, str) else peer
        async with self._link.connect(target) as client:
            # Keyed by the node we asked: its signed record's id, else its own word.
            asked = client.audience or (await client.status()).node_id
            view = await client.create_container(spec, progress=progress)
        # A refused view is not removed on the peer: a signed DELETE for an id the peer
        # chose is just what a liar would want from us.
        self._track(TrackedContainer(container=view, peer_address=target.url), asked)
        return view

    def list(self) -> list[TrackedContainer]:
        """Every tracked container; those whose lease ran out are forgotten first."""
        self._store.prune_tracked(self._clock())
        return self._store.tracked()

    def get(self, container: str) -> TrackedContainer:
        """The one tracked container with this name or id prefix (``ContainerNotFound``)."""
        return self._store.one_tracked(container)

    async def remove(self, container: str) -> str:
        """Remove a tracked container (name or id prefix) on its peer, then forget it.

        Returns the container's id. A container its peer no longer has is forgotten too;
        a peer that cannot be reached raises (``PeerUnreachable``) and nothing is forgotten.
        """
        item = self.get(container)
        view = item.container
        target: PeerTarget | str = item.peer_address
        if self._me is not None and (me := self._me()).node_id == view.peer:
            target = me
        async with self._link.connect(target) as client:
            try:
                await client.remove_container(view.id)
            except ContainerNotFound:
                log.info("container %s was already gone on its peer", view.id)
        self._store.remove_tracked(view.peer, view.id)
        self._groups.forget_container(view.peer, view.id)
        hostkeys.unpin(self._known_hosts, hostkeys.alias(view.id))
        return view.id

    def _track(self, tracked: TrackedContainer, asked: str) -> None:
        """Check and store a container the peer ``asked`` made for us; pin its host key."""
        self._store.add_tracked(tracked, peer=asked)
        view = tracked.container
        if view.ssh.host_key:
            hostkeys.pin(self._known_hosts, hostkeys.alias(view.id), view.ssh.host_key)
