"""The peer table and its merge rules. Sans-IO: no sockets, no clock of its own.

Records merge by version (the highest signed version wins). A member's state is the
maximum of ``(version, rank)`` over everything heard: a record gives ``(v, alive)``,
a claim gives ``(v, suspect|dead|left)``; ``alive < suspect < dead < left``. Both merges
are commutative, associative and idempotent, so every interleaving of the same updates
gives the same table. A newer record (a higher version) beats every claim about an older
one, which is how a suspected or restarted node comes back.

What a stranger can make the table hold is bounded: a claim may not name a version above
the record it is about (SWIM only suspects an incarnation it has seen; claims ahead of
the record are held pending, if plausibly dated, until the record arrives), nothing dated
beyond the wall clock plus the allowed skew is taken, the table holds at most
``max_members`` members, and each introducer (the node that handed us records) may add at
most ``new_per_minute`` new members a minute. Members introduced by, or keyed by, a listed
key (the node's own or one in ``trust.allow``) are never crowded out by the others.
"""

from __future__ import annotations

import enum
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from .._rate import SlidingWindow
from ..errors import PeerProtocolError
from .records import Claim, PeerRecord, plausible_version

__all__ = ["STORED", "Member", "MemberState", "PeerTable", "Verdict"]

# The introducer of records loaded from our own database: not rate-limited, and trusted
# only when the record's own key is listed. ``None`` (the default) is a local source the
# owner chose (bootstrap nodes, an address given to ``peers add``): trusted, not limited.
STORED = ""
_PENDING_MAX = 4096
_PENDING_VERSIONS = 8
_RATE_WINDOW = 60.0


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
    # Introduced by a listed key (or keyed by one): never evicted to make room.
    trusted: bool = False
    # When we last heard from it (a datagram of its own, or a newer record of it), on the
    # clock the updates are dated by; ``None``: only from our database.
    heard: float | None = None

    @property
    def confirmations(self) -> int:
        """Independent suspicions beyond the first (Lifeguard)."""
        return max(0, len(self.suspecters) - 1)

    @property
    def key(self) -> tuple[int, int]:
        return (self.state_version, int(self.state))


class PeerTable:
    """Every node this node knows, with its state; ``me`` is kept apart."""

    def __init__(
        self,
        me: PeerRecord,
        *,
        max_members: int = 1024,
        new_per_minute: int = 64,
        listed: Callable[[str], bool] = lambda node_id: False,
        wall: Callable[[], float] = time.time,
        skew: float = 60.0,
    ) -> None:
        self.me = me
        self.members: dict[str, Member] = {}
        self.rejected: Counter[str] = Counter()
        self.max_members = max_members
        self.new_per_minute = new_per_minute
        self._listed = listed
        self._wall = wall
        self._skew = skew
        # Called with the id of a member dropped to make room (to delete it from storage).
        self.on_evict: Callable[[str], None] | None = None
        # Highest plausible state heard about nodes whose record (or whose record at that
        # version) has not arrived yet (bounded).
        self._pending: dict[str, dict[int, tuple[int, Claim]]] = {}
        # When each introducer last added new members (bounded: idle ones are dropped).
        self._introduced = SlidingWindow(new_per_minute, _RATE_WINDOW, max_keys=4 * max_members)

    def __len__(self) -> int:
        return len(self.members)

    def plausible(self, version: int) -> bool:
        """Whether a version is not dated beyond our wall clock plus the allowed skew."""
        return plausible_version(version, self._wall(), self._skew)

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

    def apply_record(
        self, record: PeerRecord, now: float = 0.0, introducer: str | None = None
    ) -> Verdict:
        """Merge a record (its signature is checked here) handed to us by ``introducer``
        (a node id; ``None``: a local source the owner chose; ``STORED``: our database)."""
        known = self.members.get(record.node_id)
        if known is not None and record.version <= known.record.version:
            # Cannot change anything: skip the signature check (retransmits are common).
            if record.version < known.record.version:
                self.rejected["stale"] += 1
                return Verdict.REJECTED
            return Verdict.UNCHANGED
        if not self.plausible(record.version):
            self.rejected["future"] += 1
            return Verdict.REJECTED
        if known is None and record.node_id != self.me.node_id:
            refused = self._refuse_newcomer(record, now, introducer)
            if refused:
                self.rejected[refused] += 1  # before the costly signature check
                return Verdict.REJECTED
        if not self._verified(record):
            return Verdict.REJECTED
        if record.node_id == self.me.node_id:
            return Verdict.REFUTE if record.version > self.me.version else Verdict.UNCHANGED
        member = self.members.get(record.node_id)
        if member is None:
            return self._admit(record, now, introducer)
        member.record = record
        if introducer != STORED:
            member.heard = now
        if self._raise_state(member, (record.version, MemberState.ALIVE), now):
            member.claim = None
        self._apply_pending(member, now)
        return Verdict.CHANGED

    def _verified(self, signed: PeerRecord | Claim) -> bool:
        """Whether its signature verifies; counted as ``bad_signature`` if not."""
        try:
            signed.verify()
        except PeerProtocolError:
            self.rejected["bad_signature"] += 1
            return False
        return True

    def _trusted(self, record: PeerRecord, introducer: str | None) -> bool:
        if introducer is None or self._listed(record.node_id):
            return True
        return bool(introducer) and self._listed(introducer)

    def _refuse_newcomer(self, record: PeerRecord, now: float, introducer: str | None) -> str:
        """Why a new member would be refused (cheap checks only), or empty."""
        if self._trusted(record, introducer):
            return ""
        if len(self.members) >= self.max_members and not any(
            not m.trusted and m.state >= MemberState.DEAD for m in self.members.values()
        ):
            return "table_full"
        if introducer and self._introduced.spent(introducer, now):
            return "introducer_rate"
        return ""

    def _admit(self, record: PeerRecord, now: float, introducer: str | None) -> Verdict:
        """Add a new member if there is room and its introducer has not used its share."""
        trusted = self._trusted(record, introducer)
        if len(self.members) >= self.max_members and not self._make_room(trusted):
            self.rejected["table_full"] += 1
            return Verdict.REJECTED
        if introducer and not trusted and not self._introduced.take(introducer, now):
            self.rejected["introducer_rate"] += 1
            return Verdict.REJECTED
        heard = None if introducer == STORED else now
        member = Member(
            record, state_version=record.version, state_since=now, trusted=trusted, heard=heard
        )
        self.members[record.node_id] = member
        self._apply_pending(member, now)
        return Verdict.CHANGED

    def _make_room(self, trusted: bool) -> bool:
        """Evict an untrusted member (for a trusted newcomer any, else a dead or gone one)."""
        floor = MemberState.ALIVE if trusted else MemberState.DEAD
        candidates = [m for m in self.members.values() if not m.trusted and m.state >= floor]
        if not candidates:
            return False
        victim = max(candidates, key=lambda m: (int(m.state), -m.state_since))
        del self.members[victim.record.node_id]
        if self.on_evict is not None:
            self.on_evict(victim.record.node_id)
        return True

    def _apply_pending(self, member: Member, now: float) -> None:
        """Apply the held claims the member's record has now reached."""
        held = self._pending.get(member.record.node_id)
        if not held:
            return
        ready = [(v, state, claim) for v, (state, claim) in held.items()]
        ready = [item for item in ready if item[0] <= member.record.version]
        for version, _, _ in ready:
            del held[version]
        if not held:
            del self._pending[member.record.node_id]
        if ready:
            version, state, claim = max(ready, key=lambda item: (item[0], item[1]))
            if self._raise_state(member, (version, state), now):
                member.claim = claim
                if state == MemberState.SUSPECT:
                    member.suspecters.add(claim.by)

    def _hold(self, claim: Claim, state: MemberState) -> None:
        """Keep a claim about a record not seen yet (a few versions per target, bounded)."""
        held = self._pending.get(claim.target)
        if held is None:
            if len(self._pending) >= _PENDING_MAX:
                return
            held = self._pending[claim.target] = {}
        if held.get(claim.version, (-1, claim))[0] < state:
            held[claim.version] = (int(state), claim)
        while len(held) > _PENDING_VERSIONS:
            del held[min(held)]

    def apply_claim(self, claim: Claim, now: float = 0.0) -> Verdict:
        """Merge a signed suspect/dead/left claim (its signature is checked here)."""
        state = _CLAIM_STATES.get(claim.kind)
        if state is None or (state is MemberState.LEFT and claim.by != claim.target):
            self.rejected["bad_claim"] += 1
            return Verdict.REJECTED
        if not self._may_matter(claim, state):
            return Verdict.UNCHANGED  # retransmits are common: skip the signature check
        if not self.plausible(claim.version):
            self.rejected["future"] += 1
            return Verdict.REJECTED
        if claim.target == self.me.node_id and claim.version > self.me.version:
            # Nobody has seen that version of us: a lie, not a reason to refute.
            self.rejected["claim_ahead"] += 1
            return Verdict.REJECTED
        if not self._verified(claim):
            return Verdict.REJECTED
        if claim.target == self.me.node_id:
            refute = state is not MemberState.LEFT
            return Verdict.REFUTE if refute else Verdict.UNCHANGED
        member = self.members.get(claim.target)
        if member is None or claim.version > member.record.version:
            # About a record we have not seen (yet): hold it until that record arrives.
            self._hold(claim, state)
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
        self._pending.pop(node_id, None)
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
