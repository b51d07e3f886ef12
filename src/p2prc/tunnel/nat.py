"""``NatState``: whether this node is behind NAT, the one copy gossip and the mapper read.

Configured (``behind_nat = true`` / ``false``), or with ``"auto"`` detected: trusted
peers are asked to connect back to the node's API port (``POST /reachability``); behind
NAT when none of those that answer can. Only peers the owner vouched for
(``trust.allow``, ``relay.use``) are asked and believed: a stranger's "unreachable"
would push the node onto a relay of its choosing. The same peers are the node's relays.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING

from ..config import NodeConfig
from ..errors import P2PRCError
from ..identity import node_id_of, parse_public_key
from ..peers.link import PeerLink, PeerTarget
from ..trust import TrustPolicy

if TYPE_CHECKING:
    from ..peers.table import Member

__all__ = ["Ask", "NatState", "dial_back", "relay_id"]

log = logging.getLogger(__name__)

# Detection rounds, and seconds between them while no trusted peer has answered yet
# (trusted peers arrive by gossip): about two minutes, then the node stays "unknown".
_ROUNDS = 60
_ROUND_INTERVAL = 2.0
# Trusted peers asked each round.
_ASKED = 3

Ask = Callable[["Member"], Awaitable[bool]]
"""Ask one member whether it can connect back to us (``True``: it could)."""


class NatState:
    """Whether this node is behind NAT: configured, else what trusted peers found."""

    def __init__(self, config: NodeConfig, trust: TrustPolicy | None = None) -> None:
        self.configured = config.behind_nat
        self.detected: bool | None = None
        # Set once whether this node is behind NAT is known (configured or detected).
        self.known = asyncio.Event()
        if self.configured != "auto":
            self.known.set()
        self._trust = trust
        self._relay_use = frozenset(relay_id(entry) for entry in config.relay.use)
        self._listed = bool(config.trust.allow) or bool(self._relay_use)
        self._listeners: list[Callable[[], None]] = []

    def __repr__(self) -> str:
        value = {None: "unknown", True: "behind NAT", False: "public"}[self.value]
        return f"<NatState [{value} | {'configured' if self.configured != 'auto' else 'auto'}]>"

    @property
    def value(self) -> bool | None:
        """Configured, else detected; ``None`` while unknown (what the signed record says)."""
        if self.configured != "auto":
            return bool(self.configured)
        return self.detected

    @property
    def behind_nat(self) -> bool:
        """Configured, else what NAT detection found (unknown counts as public)."""
        return bool(self.value)

    def trusts(self, node_id: str) -> bool:
        """Whether this node believes ``node_id``'s NAT answers and takes it as a relay:
        a key the owner listed in ``trust.allow``, or an entry of ``relay.use``."""
        if node_id in self._relay_use:
            return True
        return self._trust is not None and self._trust.listed(node_id)

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` whenever ``value`` changes."""
        self._listeners.append(listener)

    def set_detected(self, behind_nat: bool) -> None:
        """Record what NAT detection found; ``known`` is set from now on."""
        before = self.value
        self.detected = behind_nat
        self.known.set()
        if self.value is not before:
            for listener in list(self._listeners):
                listener()

    async def settled(self, limit: float, alive: Iterable[Member] = ()) -> None:
        """Wait up to ``limit`` seconds for detection, when anyone could answer it."""
        if self.known.is_set():
            return
        # Only trusted peers answer NAT checks and relay: with none among ``alive`` and
        # none listed by the owner, there is nothing to wait for (it counts as public).
        if self._listed or any(self.trusts(m.record.node_id) for m in alive):
            with contextlib.suppress(TimeoutError):  # undetected after that: treat as public
                async with asyncio.timeout(limit):
                    await self.known.wait()

    async def detect(
        self,
        alive: Callable[[], Iterable[Member]],
        ask: Ask,
        *,
        rounds: int = _ROUNDS,
        interval: float = _ROUND_INTERVAL,
    ) -> None:
        """Ask up to three trusted, public members of ``alive()`` a round until one answers;
        behind NAT when none of those that answered could connect back."""
        for _ in range(rounds):
            peers = [
                m
                for m in alive()
                if m.record.behind_nat is not True and self.trusts(m.record.node_id)
            ][:_ASKED]
            answers = []
            for member in peers:
                try:
                    answers.append(await ask(member))
                except P2PRCError as exc:
                    log.debug("NAT check via %s failed: %s", member.record.name, exc)
            if answers:
                self.set_detected(not any(answers))
                log.info("NAT detection: %s", "behind NAT" if not any(answers) else "reachable")
                return
            await asyncio.sleep(interval)


def dial_back(link: PeerLink, api_url: Callable[[Member], str], port: int) -> Ask:
    """An ``Ask`` that has a member's API connect back to our ``port`` (through the
    node's peer link, so each request is signed and bounded by ``[timeouts]``)."""

    async def ask(member: Member) -> bool:
        target = PeerTarget(api_url(member), member.record.node_id)
        # Never over a direct path: the asked node must see where our connections come from
        # (over a path they come from its loopback, and it refuses).
        async with link.connect(target, direct=False) as peer:
            return (await peer.reachability(port)).reachable

    return ask


def relay_id(entry: str) -> str:
    """A ``relay.use`` entry (a node id, or a public key) as a node id."""
    text = entry.strip()
    if len(text) == 32 and not text.strip("0123456789abcdef"):
        return text
    return node_id_of(parse_public_key(text))
