"""The peer table and its merge rules. Sans-IO: no sockets, no clock of its own.

Records merge by version (the highest signed version wins). A member's state is the
maximum of ``(version, rank)`` over everything heard: a record gives ``(v, alive)``,
a claim gives ``(v, suspect|dead|left)``; ``alive < suspect < dead < left``. Both merges
are commutative, associative and idempotent, so every interleaving of the same updates
gives the same table. A newer record (a higher version) beats every claim about an older
one, which is how a suspected or restarted node comes back.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field

from ..errors import PeerProtocolError
from .records import Claim, PeerRecord

__all__ = ["Member", "MemberState", "PeerTable", "Verdict"]


class MemberState(enum.IntEnum):
    """Ordered: a higher state wins at the same version."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


_CLAIM_STATES = {"suspect": MemberState.SUSPECT, "dead": MemberState.DEAD, "left": MemberState.LEFT}


class Verdict(enum.Enum):
    """What applying an update did."""

    CHANGED = "changed"
    UNCHANGED = "unchanged"
    REJECTED = "rejected"
    REFUTE = "refute"  # someone doubts us, or holds a newer record of us: sign a newer one


@dataclass(slots=True)
class Member:
    """One known node."""

    record: PeerRecord
    state: MemberState = MemberState.ALIVE
    state_version: int = 0
    state_since: float = 0.0
    rtt_ms: float | None = None
    suspecters: set[str] = field(default_factory=set)
    claim: Claim | None = None

    @property
    def confirmations(self) -> int:
        """Independent suspicions beyond the first (Lifeguard)."""
        return max(0, len(self.suspecters) - 1)

    @property
    def key(self) -> tuple[int, int]:
        return (self.state_version, int(self.state))


class PeerTable:
    """Every node this node knows, with its state; ``me`` is kept apart."""

    def __init__(self, me: PeerRecord) -> None:
        self.me = me
        self.members: dict[str, Member] = {}
        self.rejected: Counter[str] = Counter()
        # Highest state heard about nodes whose record has not arrived yet (bounded).
        self._pending: dict[str, tuple[int, int]] = {}

    def __len__(self) -> int:
        return len(self.members)

    def get(self, node_id: str) -> Member | None:
        return self.members.get(node_id)

    def alive(self) -> list[Member]:
        """Members not known to be dead or gone."""
        return [m for m in self.members.values() if m.state <= MemberState.SUSPECT]

    def public_key(self, node_id: str) -> bytes | None:
        if node_id == self.me.node_id:
            return self.me.public_key
        member = self.members.get(node_id)
        return None if member is None else member.record.public_key

    def apply_record(self, record: PeerRecord, now: float = 0.0) -> Verdict:
        """Merge a record (its signature is checked here)."""
        known = self.members.get(record.node_id)
        if known is not None and record.version <= known.record.version:
            # Cannot change anything: skip the signature check (retransmits are common).
            if record.version < known.record.version:
                self.rejected["stale"] += 1
                return Verdict.REJECTED
            return Verdict.UNCHANGED
        try:
            record.verify()
        except PeerProtocolError:
            self.rejected["bad_signature"] += 1
            return Verdict.REJECTED
        if record.node_id == self.me.node_id:
            return Verdict.REFUTE if record.version > self.me.version else Verdict.UNCHANGED
        member = self.members.get(record.node_id)
        if member is None:
            member = Member(record, state_version=record.version, state_since=now)
            self.members[record.node_id] = member
            pending = self._pending.pop(record.node_id, None)
            if pending is not None:
                self._raise_state(member, pending, now)
            return Verdict.CHANGED
        if record.version < member.record.version:
            self.rejected["stale"] += 1
            return Verdict.REJECTED
        if record.version == member.record.version:
            return Verdict.UNCHANGED
        member.record = record
        if self._raise_state(member, (record.version, MemberState.ALIVE), now):
            member.claim = None
        return Verdict.CHANGED

    def apply_claim(self, claim: Claim, now: float = 0.0) -> Verdict:
        """Merge a signed suspect/dead/left claim (its signature is checked here)."""
        state = _CLAIM_STATES.get(claim.kind)
        if state is None or (state is MemberState.LEFT and claim.by != claim.target):
            self.rejected["bad_claim"] += 1
            return Verdict.REJECTED
        if not self._may_matter(claim, state):
            return Verdict.UNCHANGED  # retransmits are common: skip the signature check
        try:
            claim.verify()
        except PeerProtocolError:
            self.rejected["bad_signature"] += 1
            return Verdict.REJECTED
        if claim.target == self.me.node_id:
            refute = claim.version >= self.me.version and state is not MemberState.LEFT
            return Verdict.REFUTE if refute else Verdict.UNCHANGED
        member = self.members.get(claim.target)
        if member is None:
            key = (claim.version, int(state))
            if key > self._pending.get(claim.target, (-1, -1)) and len(self._pending) < 4096:
                self._pending[claim.target] = key
            return Verdict.UNCHANGED
        if member.state is state and member.state_version == claim.version:
            if state is MemberState.SUSPECT:
                member.suspecters.add(claim.by)
            return Verdict.UNCHANGED
        changed = self._raise_state(member, (claim.version, state), now)
        if changed:
            member.claim = claim
            if state is MemberState.SUSPECT:
                member.suspecters.add(claim.by)
        return Verdict.CHANGED if changed else Verdict.UNCHANGED

    def _may_matter(self, claim: Claim, state: MemberState) -> bool:
        """Whether a claim could change anything (only then is its signature checked)."""
        if claim.target == self.me.node_id:
            return claim.version >= self.me.version
        member = self.members.get(claim.target)
        if member is None:
            return True
        key = (claim.version, int(state))
        if key > member.key:
            return True
        suspicion = state is MemberState.SUSPECT and key == member.key
        return suspicion and claim.by not in member.suspecters

    def claims(self) -> list[Claim]:
        """The claims behind every non-alive state, for anti-entropy."""
        return [m.claim for m in self.members.values() if m.claim is not None]

    def forget(self, node_id: str) -> bool:
        return self.members.pop(node_id, None) is not None

    def snapshot(self) -> dict[str, tuple[int, int, int]]:
        """Node id -> (record version, state version, state): what convergence compares."""
        return {
            node_id: (m.record.version, m.state_version, int(m.state))
            for node_id, m in self.members.items()
        }

    @staticmethod
    def _raise_state(member: Member, key: tuple[int, int], now: float) -> bool:
        if key <= member.key:
            return False
        member.state_version, member.state = key[0], MemberState(key[1])
        member.state_since = now
        member.suspecters = set()
        return True
