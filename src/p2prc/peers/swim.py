"""SWIM failure detection and gossip dissemination as a sans-IO state machine.

Feed it datagrams with :meth:`Swim.receive` and call :meth:`Swim.tick` often (every
~50 ms); both return the datagrams to send. Each protocol period it probes one member
(round-robin over a shuffled list), asks ``indirect`` others to probe when the direct
probe times out, and suspects the member if nobody got an answer. A suspicion becomes a
death after a Lifeguard-style timeout that shrinks as other nodes confirm it. Updates
(records and claims) ride on every message, each sent a bounded number of times, and
``fanout`` members also get a gossip-only message every ``gossip_interval`` (not stretched
by local health, as in memberlist). Something new (a record, a claim) does not wait for
that round: the next :meth:`Swim.push` (every ``receive`` and ``tick`` ends with one) sends
it to ``fanout`` proven members at once, at most once per gossip interval, so a change
crosses the cluster in a few round trips; a member just learned and not yet
proven gets its bare ping at once too (at most ``fanout`` such pings a period).

Every datagram is signed by its sender; datagrams from unknown or forged senders are
counted and dropped.

No amplification: a record can name any address, so a member is only *proven* once a
signed datagram of its own came from the address we would send to, or it acked a ping
(random sequence number) we sent there. Probes, ping-req helpers, relayed pings, gossip
fanout and piggybacked updates go only to proven members. An unproven member gets at most
``_INTRO_TRIES`` bare pings a minute (one a period at most, none to dead or gone members)
and is suspected when they all go unanswered; its silence says nothing about our own
health, so it does not raise Lifeguard's awareness.

Members behind NAT: their advertised address is private, so datagrams to them go to the
address their own datagrams last came from (the NAT's mapping), and a node that is itself
behind NAT pings every member at least every ``keepalive`` seconds, which keeps those
mappings open (Linux drops an idle UDP mapping after 30 s).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import PeerProtocolError
from ..identity import Identity
from .broadcasts import Broadcasts
from .records import Claim, PeerRecord, claim_from_fields, record_from_fields, retransmit_limit
from .table import Member, MemberState, PeerTable, Verdict
from .wire import MAX_DATAGRAM, SIGNATURE, open_datagram, seal

__all__ = ["MAX_DATAGRAM", "Outgoing", "Swim", "SwimSettings"]

_HEADER_BUDGET = 200
_MAX_AWARENESS = 8
_INTRO_TRIES = 3
# Datagrams a second one source address may have read: at least this, and at least
# this many a protocol period.
_SOURCE_RATE = 50.0
_SOURCE_PER_PERIOD = 10
_MAX_SOURCES = 4096
_INTRO_WINDOW = 60.0


@dataclass(frozen=True, slots=True)
class SwimSettings:
    """Protocol timing; the defaults follow memberlist's LAN profile scaled to 200 ms."""

    period: float = 0.2
    probe_timeout: float = 0.1
    indirect: int = 3
    fanout: int = 3
    suspicion_mult: float = 4.0
    suspicion_max_factor: float = 3.0
    retransmit_mult: int = 4
    keepalive: float = 10.0
    # memberlist's GossipInterval (200 ms on a LAN); 0: the probe period.
    gossip_interval: float = 0.0

    @property
    def gossip_every(self) -> float:
        return self.gossip_interval or self.period


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A datagram to send to ``address``."""

    address: tuple[str, int]
    data: bytes


@dataclass(slots=True)
class _Probe:
    target: str
    seq: int
    sent: float
    indirect_sent: bool = False
    acked: bool = False


@dataclass(slots=True)
class _Relay:
    """A ping we send on behalf of another node (ping-req)."""

    requester: str
    requester_seq: int
    expires: float
    source: tuple[str, int] | None = None


@dataclass(slots=True)
class _Ping:
    """A ping we sent: an ack for its sequence number proves the address it went to."""

    target: str
    address: tuple[str, int]
    sent: float
    intro: bool


@dataclass(slots=True)
class Stats:
    """Counters, for tests, benchmarks and the API."""

    sent: int = 0
    received: int = 0
    bytes_sent: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    # Datagrams that could not be sent (no route, wrong address family), by reason.
    unsent: Counter[str] = field(default_factory=Counter)


class Swim:
    """The protocol for one node."""

    def __init__(
        self,
        identity: Identity,
        table: PeerTable,
        settings: SwimSettings | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._identity = identity
        self.table = table
        self.settings = settings or SwimSettings()
        self._rng = rng or random.Random()
        self._probe: _Probe | None = None
        self._order: list[str] = []
        self._next_period = self._next_gossip = self._next_push = 0.0
        self._relays: dict[int, _Relay] = {}
        self._queue = Broadcasts()
        # Datagrams to send at the next push (bare pings to members just learned), and the
        # token bucket of such pings (``fanout`` a period).
        self._outbox: list[Outgoing] = []
        self._intro_tokens = (float(self.settings.fanout), 0.0)
        self._pushing = False
        # Lifeguard local health: 0 (healthy) .. _MAX_AWARENESS; missed acks and having to
        # refute raise it, answered probes lower it; it stretches our own timeouts, so a
        # starved node stops accusing healthy ones.
        self.awareness = 0
        self.stats = Stats()
        # Called with the version our new record must exceed; the default re-signs ours.
        self.on_refute: Callable[[int], None] | None = None
        self.on_change: Callable[[str], None] | None = None
        self.on_rtt: Callable[[str, float], None] | None = None
        # Where each member's datagrams last came from, and when we last sent to it.
        self._seen: dict[str, tuple[str, int]] = {}
        self._sent_at: dict[str, float] = {}
        self._clock = 0.0
        # Members' proven addresses; pings awaiting an ack; unproven members' recent pings
        # and unanswered ones (see the module docstring).
        self._proven: dict[str, tuple[str, int]] = {}
        self._pings: dict[int, _Ping] = {}
        self._tries: dict[str, list[float]] = {}
        self._misses: Counter[str] = Counter()
        self._unspread: set[str] = set()
        self._buckets: dict[tuple[str, int], tuple[float, float]] = {}
        # Nodes that take part (us and the members that proved their address), counted
        # once a period: what suspicion timeouts and retransmits scale with, so records
        # that never answer do not slow failure detection.
        self._cluster = len(table) + 1

    # Inputs ---------------------------------------------------------------------------

    def broadcast_record(self, record: PeerRecord) -> None:
        """Spread a record (ours after a change, or one we learned)."""
        priority = 0 if record.node_id == self.table.me.node_id else 2
        self._enqueue(f"r:{record.node_id}", [0, *record.body(), record.signature], priority)

    def broadcast_claim(self, claim: Claim) -> None:
        ours = claim.target == self.table.me.node_id
        priority = 1 if ours or self.proven(claim.target) else 3
        self._enqueue(f"c:{claim.target}", [1, *claim.body(), claim.signature], priority)

    def tick(self, now: float) -> list[Outgoing]:
        """Advance timers; returns what to send."""
        self._clock = now
        out: list[Outgoing] = []
        probe = self._probe
        waiting = probe is not None and not probe.acked and not probe.indirect_sent
        timeout = self.settings.probe_timeout * (self.awareness + 1)
        if probe is not None and waiting and now - probe.sent >= timeout:
            probe.indirect_sent = True
            out += self._ping_requests(probe)
        self._expire_suspicions(now)
        if now >= self._next_period:
            self._next_period = now + self.settings.period * (self.awareness + 1)
            self._cluster = 1 + sum(1 for m in self.table.alive() if self.proven(m.record.node_id))
            self._finish_probe(now)
            self._finish_intros(now)
            out += self._start_probe(now)
            out += self._introduce(now)
            out += self._keepalives(now)
        if now >= self._next_gossip:
            self._next_gossip = now + self.settings.gossip_every
            out += self._gossip()
        self._relays = {s: r for s, r in self._relays.items() if r.expires > now}
        return out + self.push(now)

    def push(self, now: float, heard_from: str = "") -> list[Outgoing]:
        """What must go now: bare pings to members just learned and, when something new
        is queued, a gossip round to ``fanout`` proven members (at most one such round
        per gossip interval, so gossip traffic at most doubles; a later change waits),
        not to ``heard_from``, the member that just told us."""
        out, self._outbox = self._outbox, []
        if self._queue.fresh and now >= self._next_push:
            self._next_push = now + self.settings.gossip_every
            self._pushing = True
            try:
                out += self._gossip(heard_from)
            finally:
                self._pushing = False
            self._queue.mark_pushed()
        return out

    def proven(self, node_id: str) -> bool:
        """Whether the member has shown it really listens where we would send to it."""
        member = self.table.get(node_id)
        address = self._proven.get(node_id)
        return member is not None and address is not None and address == self._destination(member)

    def receive(
        self, data: bytes, now: float, source: tuple[str, int] | None = None
    ) -> list[Outgoing]:
        """Handle one datagram; returns replies (an ack goes back to ``source``, so a
        node behind NAT hears it through the NAT's mapping)."""
        if source is not None and not self._within_budget(source, now):
            self.stats.dropped["over the per-source rate"] += 1
            return []
        try:
            sender, kind, seq, target, updates = open_datagram(data, self.table.public_key)
        except PeerProtocolError as exc:
            self.stats.dropped[str(exc)] += 1
            return []
        self.stats.received += 1
        self._clock = now
        member = self.table.get(sender)
        if member is not None:
            member.heard = now
        if source is not None:
            self._seen[sender] = source
            if member is not None and source == self._destination(member):
                self._prove(sender, source)
        self._apply_updates(updates, now, sender)
        return self._answer(sender, kind, seq, target, source, now) + self.push(now, sender)

    def _answer(
        self, sender: str, kind: str, seq: int, target: str, source: Any, now: float
    ) -> list[Outgoing]:
        if kind == "ping":
            return self._send(sender, ["ack", seq, ""], source)
        if kind == "ack":
            return self._on_ack(sender, seq, target, now)
        if kind == "ping_req" and target and self.proven(target) and self.proven(sender):
            seq_out = self._next_seq()
            expires = now + self.settings.period * 2
            self._relays[seq_out] = _Relay(sender, seq, expires, source)
            return self._ping(target, seq_out, now)
        return []

    def _within_budget(self, source: tuple[str, int], now: float) -> bool:
        """A token bucket per source address, checked before any signature: an honest
        member sends us a few datagrams a period, a flood is cut to this rate."""
        rate = max(_SOURCE_RATE, _SOURCE_PER_PERIOD / self.settings.period)
        tokens, last = self._buckets.get(source, (2 * rate, now))
        tokens = min(2 * rate, tokens + (now - last) * rate)
        allowed = tokens >= 1
        self._buckets[source] = (tokens - 1 if allowed else tokens, now)
        if len(self._buckets) > _MAX_SOURCES:
            self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < 10}
        return allowed

    # Probing --------------------------------------------------------------------------

    def _next_seq(self) -> int:
        """A fresh random sequence number: an ack for it proves our ping got there."""
        seq = self._rng.getrandbits(48) + 1
        while seq in self._pings or seq in self._relays:
            seq = self._rng.getrandbits(48) + 1
        return seq

    def _ping(self, target: str, seq: int, now: float) -> list[Outgoing]:
        member = self.table.get(target)
        if member is None:
            return []
        address = self._destination(member)
        if address is None:
            return []
        intro = not self.proven(target)
        if intro:
            tries = self._tries.setdefault(target, [])
            tries[:] = [t for t in tries if now - t < _INTRO_WINDOW]
            if len(tries) >= _INTRO_TRIES or (tries and now - tries[-1] < self.settings.period):
                return []
            tries.append(now)
        self._pings[seq] = _Ping(target, address, now, intro)
        return self._send(target, ["ping", seq, ""])

    def _start_probe(self, now: float) -> list[Outgoing]:
        target = self._next_target()
        if target is None:
            self._probe = None
            return []
        seq = self._next_seq()
        self._probe = _Probe(target, seq, now)
        return self._ping(target, seq, now)

    def _next_target(self) -> str | None:
        """Round-robin over the proven members not known to be dead or gone."""
        while self._order:
            candidate = self._order.pop()
            member = self.table.get(candidate)
            alive = member is not None and member.state <= MemberState.SUSPECT
            if alive and self.proven(candidate):
                return candidate
        self._order = [
            m.record.node_id for m in self.table.alive() if self.proven(m.record.node_id)
        ]
        self._rng.shuffle(self._order)
        # Once per round: forget what we hold about members no longer known.
        known = self.table.get
        self._seen = {k: v for k, v in self._seen.items() if known(k) is not None}
        self._sent_at = {k: v for k, v in self._sent_at.items() if known(k) is not None}
        self._proven = {k: v for k, v in self._proven.items() if known(k) is not None}
        self._tries = {k: v for k, v in self._tries.items() if known(k) is not None}
        self._misses = Counter({k: v for k, v in self._misses.items() if known(k) is not None})
        self._unspread = {k for k in self._unspread if known(k) is not None}
        return self._order.pop() if self._order else None

    def _introduce(self, now: float) -> list[Outgoing]:
        """One bare ping a period to an unproven member that has tries left."""
        candidates = [
            m.record.node_id
            for m in self.table.alive()
            if not self.proven(m.record.node_id) and self._may_try(m.record.node_id, now)
        ]
        if not candidates:
            return []
        target = min(candidates, key=lambda node_id: len(self._tries.get(node_id, ())))
        return self._ping(target, self._next_seq(), now)

    def _introduce_now(self, node_id: str, now: float) -> None:
        """A bare ping at once to a member just learned (its tries and a bucket of
        ``fanout`` a period bound them), so it proves its address without waiting."""
        rate = self.settings.fanout / self.settings.period
        tokens, last = self._intro_tokens
        tokens = min(float(self.settings.fanout), tokens + (now - last) * rate)
        if tokens >= 1 and self._may_try(node_id, now):
            tokens -= 1
            self._outbox += self._ping(node_id, self._next_seq(), now)
        self._intro_tokens = (tokens, now)

    def _may_try(self, node_id: str, now: float) -> bool:
        tries = [t for t in self._tries.get(node_id, ()) if now - t < _INTRO_WINDOW]
        return len(tries) < _INTRO_TRIES and (not tries or now - tries[-1] >= self.settings.period)

    def _finish_intros(self, now: float) -> None:
        """Count unanswered pings to unproven members; suspect one when all went unanswered."""
        horizon = self.settings.period * (self.awareness + 1)
        for seq, ping in list(self._pings.items()):
            if now - ping.sent < horizon:
                continue
            del self._pings[seq]
            if not ping.intro or self.proven(ping.target):
                continue
            self._misses[ping.target] += 1
            member = self.table.get(ping.target)
            if self._misses[ping.target] >= _INTRO_TRIES and member is not None:
                self._misses.pop(ping.target)
                if member.state is MemberState.ALIVE:
                    claim = Claim("suspect", ping.target, member.record.version, "")
                    self.apply_claim(claim.signed(self._identity), now)

    def _keepalives(self, now: float) -> list[Outgoing]:
        """Behind NAT: ping members not sent to for ``keepalive`` s (a few per period)."""
        if self.table.me.behind_nat is not True:
            return []
        stale = [
            m.record.node_id
            for m in self.table.alive()
            if now - self._sent_at.get(m.record.node_id, -math.inf) >= self.settings.keepalive
        ]
        out: list[Outgoing] = []
        for target in stale:
            if len(out) >= 8:
                break
            out += self._ping(target, self._next_seq(), now)
        return out

    def _ping_requests(self, probe: _Probe) -> list[Outgoing]:
        helpers = [
            m.record.node_id
            for m in self.table.alive()
            if m.record.node_id != probe.target and self.proven(m.record.node_id)
        ]
        out: list[Outgoing] = []
        for helper in self._rng.sample(helpers, min(self.settings.indirect, len(helpers))):
            out += self._send(helper, ["ping_req", probe.seq, probe.target])
        return out

    def _prove(self, node_id: str, address: tuple[str, int]) -> None:
        if self._proven.get(node_id) == address:
            return
        self._proven[node_id] = address
        self._tries.pop(node_id, None)
        self._misses.pop(node_id, None)
        member = self.table.get(node_id)
        if member is not None and node_id in self._unspread:
            self._unspread.discard(node_id)
            self.broadcast_record(member.record)
        if member is not None and member.claim is not None:
            self.broadcast_claim(member.claim)  # so it hears that it must refute

    def _on_ack(self, sender: str, seq: int, target: str, now: float) -> list[Outgoing]:
        ping = self._pings.get(seq)
        if ping is not None and ping.target == sender:
            del self._pings[seq]
            self._prove(sender, ping.address)
        relay = self._relays.pop(seq, None)
        if relay is not None:
            return self._send(relay.requester, ["ack", relay.requester_seq, sender], relay.source)
        probe = self._probe
        answered = probe is not None and probe.seq == seq and not probe.acked
        if probe is not None and answered and probe.target in (sender, target):
            probe.acked = True
            if sender == probe.target and self.on_rtt is not None:
                self.on_rtt(sender, (now - probe.sent) * 1000)
        return []

    def _finish_probe(self, now: float) -> None:
        probe = self._probe
        if probe is None:
            return
        if probe.acked:
            self.awareness = max(0, self.awareness - 1)
            return
        member = self.table.get(probe.target)
        if member is None or not self.proven(probe.target):
            return  # never sent, or to an unproven address: says nothing about our health
        self.awareness = min(_MAX_AWARENESS, self.awareness + 1)
        if member.state is not MemberState.ALIVE:
            return
        claim = Claim("suspect", probe.target, member.record.version, "").signed(self._identity)
        self.apply_claim(claim, now)

    def _expire_suspicions(self, now: float) -> None:
        for member in list(self.table.members.values()):
            if member.state is not MemberState.SUSPECT:
                continue
            if now - member.state_since >= self._suspicion_timeout(self._confirmations(member)):
                claim = Claim("dead", member.record.node_id, member.state_version, "")
                self.apply_claim(claim.signed(self._identity), now)

    def _confirmations(self, member: Member) -> int:
        """Independent suspicions beyond the first (Lifeguard), counting only ours and those
        of members that proved their address: any key can sign a suspicion, so keys a
        stranger made up shorten nothing."""
        me = self.table.me.node_id
        return max(0, sum(1 for by in member.suspecters if by == me or self.proven(by)) - 1)

    def _suspicion_timeout(self, confirmations: int) -> float:
        """Lifeguard: start at max, shrink toward min as independent suspicions arrive."""
        settings = self.settings
        members = max(self._cluster, 2)
        low = settings.suspicion_mult * math.log10(members) * settings.period
        low = max(low, settings.period * 2)
        high = low * settings.suspicion_max_factor
        expected = settings.indirect
        fraction = math.log(confirmations + 1) / math.log(expected + 1)
        return max(low, high - (high - low) * min(fraction, 1.0))

    # Updates --------------------------------------------------------------------------

    def _apply_updates(self, updates: list[Any], now: float, sender: str) -> None:
        for update in updates:
            try:
                if not isinstance(update, list) or not update or update[0] not in (0, 1):
                    raise PeerProtocolError("bad update")
                if update[0] == 0:
                    self.apply_record(record_from_fields(update[1:]), now, sender)
                else:
                    self.apply_claim(claim_from_fields(update[1:]), now)
            except PeerProtocolError as exc:
                self.stats.dropped[str(exc)] += 1

    def apply_record(self, record: PeerRecord, now: float, introducer: str | None = None) -> None:
        """Merge a record handed to us by ``introducer`` (see ``PeerTable.apply_record``)."""
        verdict = self.table.apply_record(record, now, introducer)
        if verdict is Verdict.CHANGED:
            member = self.table.get(record.node_id)
            if self.proven(record.node_id) or (member is not None and member.trusted):
                self.broadcast_record(record)
            else:
                # Spread by gossip once it proves its address: a record naming a third
                # party (or nobody) never rides our datagrams.
                self._unspread.add(record.node_id)
            if not self.proven(record.node_id):
                self._introduce_now(record.node_id, now)
            self._changed(record.node_id)
        elif verdict is Verdict.REFUTE:
            self._refute(record.version)

    def apply_claim(self, claim: Claim, now: float) -> None:
        verdict = self.table.apply_claim(claim, now)
        if verdict is Verdict.CHANGED:
            self.broadcast_claim(claim)
            self._changed(claim.target)
        elif verdict is Verdict.REFUTE:
            self._refute(claim.version)

    def _refute(self, doubted: int) -> None:
        """Someone doubts us, or holds a newer record of us: sign a newer one."""
        self.awareness = min(_MAX_AWARENESS, self.awareness + 1)
        if self.on_refute is not None:
            self.on_refute(doubted)
            return
        me = self.table.me
        if not self.table.plausible(doubted + 1):
            return  # never sign a version from the far future (nor near the codec's bound)
        self.table.me = replace(me, version=max(me.version, doubted) + 1).signed(self._identity)
        self.broadcast_record(self.table.me)

    def _changed(self, node_id: str) -> None:
        if self.on_change is not None:
            self.on_change(node_id)

    def _enqueue(self, key: str, item: list[Any], priority: int) -> None:
        self._queue.add(key, item, priority)

    def _piggyback(self, budget: int) -> list[list[Any]]:
        """Updates for one datagram; during a push, only those not pushed yet."""
        limit = retransmit_limit(self._cluster, self.settings.retransmit_mult)
        return self._queue.take(budget, limit, fresh=self._pushing)

    def _gossip(self, skip: str = "") -> list[Outgoing]:
        """A gossip-only datagram to ``fanout`` proven members (not ``skip``)."""
        if not self._queue:
            return []
        members = [
            m.record.node_id
            for m in self.table.alive()
            if m.record.node_id != skip and self.proven(m.record.node_id)
        ]
        out: list[Outgoing] = []
        for target in self._rng.sample(members, min(self.settings.fanout, len(members))):
            out += self._send(target, ["gossip", 0, ""])
        return out

    # Wire -----------------------------------------------------------------------------

    def _send(
        self, target: str, message: list[Any], address: tuple[str, int] | None = None
    ) -> list[Outgoing]:
        member = self.table.get(target)
        destination = address or (self._destination(member) if member is not None else None)
        if member is None or destination is None:
            return []
        self._sent_at[target] = self._clock
        # Updates ride only to proven addresses: a bare ping or ack is no bigger than what
        # made us send it, so nobody can aim our traffic at a third party.
        proven = self._proven.get(target) == destination
        budget = MAX_DATAGRAM - _HEADER_BUDGET - SIGNATURE
        updates = self._piggyback(budget) if proven else []
        body = [self._identity.node_id, *message, updates]
        data = seal(self._identity, body)
        self.stats.sent += 1
        self.stats.bytes_sent += len(data)
        return [Outgoing(destination, data)]

    def _destination(self, member: Member) -> tuple[str, int] | None:
        """Where datagrams to a member go: behind NAT, where its own last came from."""
        record = member.record
        seen = self._seen.get(record.node_id) if record.behind_nat else None
        if seen is not None:
            return seen
        return (record.host, record.gossip_port) if record.host and record.gossip_port else None
