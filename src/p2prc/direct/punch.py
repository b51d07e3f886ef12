"""Hole punching: two nodes behind NAT open one TCP connection to each other at once.

Each NAT'd node learns its public address from its relay (``Welcome.observed``) and
assumes its NAT keeps the source port of its direct port (it checks that the NAT kept the
port of the tunnel's own connection: ``PortMapper.keeps_ports``). The caller asks the
callee, with a signed ``POST /direct/punch`` through the relay like any call, giving its
observed address, its direct port and how long after receipt the callee should start
(``delay_ms``, from the round trip the caller measured); the callee answers with its own
and starts its half; the caller starts when it reckons the callee does (half the request's
round trip after it was answered, plus the delay). Both bind their direct port
(SO_REUSEADDR + SO_REUSEPORT, as the listener does) and ``connect()`` to the other's
public ip:port until one attempt connects (TCP simultaneous open) or ``PUNCH_SECONDS``
pass. The connected socket goes to ``node.paths.adopt``, which runs the TLS and the
challenge on it: nothing about the peer is believed before that.

Why attempts follow each other closely: a NAT that answers an unsolicited SYN with a
reset (some do, and so do the test bed's) ends each attempt after one round trip, and an
attempt connects only when both SYNs leave their NATs before the other's arrives: a race
won by chance. So a refused attempt is followed by the next after a jittered ``GAP``
(0.5-1.5 ms), in a thread (the event loop rounds its sleeps to milliseconds, which keeps
both sides in step). Measured in the test bed (easy NAT, two busy cores), two processes:
one attempt every 250 ms connected in 0 of 3 tries of 3 s, one every second in 1 of 4;
these attempts (about 800 a second a side) connected in 19 of 22 windows of 3 s and in
20 of 22 of 6 s (0.004-5.2 s, mostly under 2.5 s); the bed's links have no delay, so
the race needs the two sides on different CPUs (with one core kept busy and both sides on
the other: 1 of 8 windows; each side on its own CPU: 8 of 8). Between real nodes
(tests/netns/test_direct_nat.py) the path was direct 0.43-1.91 s after the first call in
10 of 10 runs. On hard NAT no attempt connects (2450 refused a side in 3 s). An attempt
that is not refused stays pending (the kernel resends its SYN), so behind a NAT that drops
instead the attempts are few. ``MAX_TRIES`` bounds them; a NAT seen to change ports
(``keeps_ports``) is not punched at all.

Sans-IO: ``Schedule`` (when to try, how long) and the request and answer models; I/O:
``simultaneous_open``, ``punch`` (the caller) and ``answer_punch`` (the callee's half,
for ``api/punch.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .._client_async import _validate
from ..config import NodeConfig, join_address
from ..errors import InvalidRequest, NotFound, P2PRCError, PunchFailed, RateLimited
from ..identity import Identity
from ..peers.link import PeerLink, PeerTarget
from ..peers.table import Member, MemberState
from ..tunnel.protocol import MessageError, parse_endpoint

__all__ = [
    "GAP",
    "MAX_DELAY_MS",
    "MAX_TRIES",
    "MIN_DELAY_MS",
    "PUNCH_SECONDS",
    "PunchAnswer",
    "PunchNode",
    "PunchRequest",
    "PunchSlots",
    "Schedule",
    "answer_punch",
    "ask_delay_ms",
    "caller_start",
    "checked_target",
    "punch",
    "simultaneous_open",
]

log = logging.getLogger(__name__)

# How long both sides keep trying, from their start (the relay carries calls meanwhile).
PUNCH_SECONDS = 6.0
# The pause after a refused attempt: uniform in this range (jitter breaks lockstep).
GAP = (0.0005, 0.0015)
# Attempts one side makes at most in one punch (about 1000 a second where each is refused).
MAX_TRIES = 6000
# The callee starts this long after it got the request: asked by the caller, bounded.
MIN_DELAY_MS, MAX_DELAY_MS = 50, 3000
# Punches at once on one node (both roles), and per peer one.
MAX_PUNCHES = 16
# When a peer's round trip is unknown (a NAT'd peer's, often), assume this (ms): a side
# that starts late is no loss, the other's attempts go on for PUNCH_SECONDS.
_UNKNOWN_RTT_MS = 100.0
# Errors of one attempt after which another cannot do better (the local port is taken,
# the 4-tuple is still in TIME_WAIT, the address family is wrong).
_FATAL = {"EADDRINUSE", "EADDRNOTAVAIL", "EAFNOSUPPORT", "EINVAL", "EACCES", "EPERM"}


def _checked_ip(text: str) -> str:
    """``text`` as an IP address a punch may connect to, else ``ValueError``."""
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if (
        address.is_loopback
        or address.is_unspecified
        or address.is_multicast
        or address.is_link_local
        or address.is_reserved
    ):
        raise ValueError(f"{address} is no address a peer's NAT can have")
    return address.compressed


def checked_target(observed: str, port: int) -> tuple[str, int]:
    """The ip:port to connect to: the peer's observed IP, at its direct ``port``."""
    try:
        host, _ = parse_endpoint(observed)
        return _checked_ip(host), port
    except (MessageError, ValueError) as exc:
        raise InvalidRequest(f"observed address: {exc}") from None


class _Offer(BaseModel):
    """One side's half: where it is and when it starts."""

    observed: str = Field(max_length=72, description="ip:port its relay saw it come from")
    port: int = Field(ge=1, le=65535, description="its direct port")
    delay_ms: int = Field(
        ge=MIN_DELAY_MS, le=MAX_DELAY_MS, description="the callee starts this long after receipt"
    )

    @field_validator("observed")
    @classmethod
    def _ip_port(cls, value: str) -> str:
        try:
            host, port = parse_endpoint(value)
            return join_address(_checked_ip(host), port)
        except (MessageError, ValueError) as exc:
            raise ValueError(str(exc)) from None


class PunchRequest(_Offer):
    """``POST /direct/punch``: the caller's observed address, direct port and delay."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class PunchAnswer(_Offer):
    """The callee's observed address and direct port; it starts ``delay_ms`` after receipt."""

    model_config = ConfigDict(frozen=True)


def ask_delay_ms(rtt_ms: float | None) -> int:
    """How long after receipt the callee should start: past the answer's way back."""
    rtt = _UNKNOWN_RTT_MS if rtt_ms is None or rtt_ms < 0 else rtt_ms
    return int(min(MAX_DELAY_MS, max(MIN_DELAY_MS * 2, 1.5 * rtt + 100)))


def caller_start(sent: float, answered: float, delay_ms: int) -> float:
    """When the callee starts, on the caller's clock: it got the request about half the
    round trip after it was sent; never before the answer is here."""
    return max(answered, sent + (answered - sent) / 2 + delay_ms / 1000)


@dataclass(slots=True)
class Schedule:
    """When each attempt of one side goes, from ``start`` until ``deadline``."""

    start: float
    deadline: float
    max_tries: int = MAX_TRIES
    tries: int = 0
    _next: float = 0.0

    def __post_init__(self) -> None:
        self._next = self.start

    def wait(self, now: float) -> float | None:
        """Seconds until the next attempt may go (0: now), or None: no more attempts."""
        if self.tries >= self.max_tries or now >= self.deadline:
            return None
        return max(0.0, self._next - now)

    def attempt(self) -> None:
        """An attempt goes now."""
        self.tries += 1

    def refused(self, now: float, jitter: float) -> None:
        """The attempt failed at ``now``; ``jitter`` in [0, 1) places the next in ``GAP``."""
        low, high = GAP
        self._next = now + low + (high - low) * jitter

    def left(self, now: float) -> float:
        return max(0.0, self.deadline - now)


def _bound(family: socket.AddressFamily, port: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setblocking(False)
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
    except OSError:
        sock.close()
        raise
    return sock


def _errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno, "") if exc.errno else ""


def _attempts(
    local_port: int,
    remote: tuple[str, int],
    schedule: Schedule,
    clock: Callable[[], float],
    rng: random.Random,
    stop: threading.Event,
    current: list[socket.socket],
) -> socket.socket | str:
    """The attempts, blocking (in a thread: its sleeps and connects are not rounded to the
    event loop's millisecond ticks, which would keep both sides' attempts in step): the
    connected socket, or the last error's name. ``current`` holds the attempt's socket
    (``_interrupt`` ends a pending connect from another thread)."""
    family = socket.AF_INET6 if ":" in remote[0] else socket.AF_INET
    last = "no attempt"
    while not stop.is_set() and (wait := schedule.wait(clock())) is not None:
        if wait:
            time.sleep(wait)
        schedule.attempt()
        try:
            sock = _bound(family, local_port)
        except OSError as exc:
            raise PunchFailed(f"cannot bind the direct port {local_port}: {exc}") from None
        current[:] = [sock]
        try:
            if stop.is_set():
                raise ConnectionAbortedError("the punch was cancelled")
            sock.settimeout(max(0.001, schedule.left(clock())))
            sock.connect(remote)
        except OSError as exc:  # socket.timeout is an OSError too
            sock.close()
            last = type(exc).__name__
            if _errno_name(exc) in _FATAL:
                raise PunchFailed(f"connecting to {join_address(*remote)}: {exc}") from None
            schedule.refused(clock(), rng.random())
            continue
        if stop.is_set():  # the caller gave up meanwhile
            sock.close()
            break
        sock.setblocking(False)
        return sock
    return last


async def simultaneous_open(
    local_port: int,
    remote: tuple[str, int],
    start: float,
    *,
    within: float = PUNCH_SECONDS,
    rng: random.Random | None = None,
) -> socket.socket:
    """A socket from ``local_port`` connected to ``remote``, trying from ``start`` (loop
    time) for ``within`` seconds; ``PunchFailed`` (with how many tries) when none connects."""
    loop = asyncio.get_running_loop()
    schedule = Schedule(start, start + within)
    stop, current = threading.Event(), list[socket.socket]()
    attempts = asyncio.ensure_future(
        asyncio.to_thread(
            _attempts, local_port, remote, schedule, loop.time, rng or random.Random(), stop,
            current,
        )
    )  # fmt: skip
    try:
        result = await asyncio.shield(attempts)
    except asyncio.CancelledError:
        stop.set()  # the thread ends at once: no new attempt, the pending one interrupted
        _interrupt(current)
        attempts.add_done_callback(_close_result)
        raise
    if isinstance(result, socket.socket):
        return result
    raise PunchFailed(
        f"no connection to {join_address(*remote)} within {within:g} s "
        f"({schedule.tries} attempts, the last: {result}); a NAT that changes ports or "
        "drops the other side's packets"
    )


def _interrupt(current: list[socket.socket]) -> None:
    """End the pending connect of the attempts' thread (a shutdown wakes it)."""
    for sock in list(current):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _close_result(future: asyncio.Future[socket.socket | str]) -> None:
    """A socket connected after its punch was cancelled is closed (any error dropped)."""
    if not future.cancelled() and future.exception() is None:
        result = future.result()
        if isinstance(result, socket.socket):
            result.close()


class PunchSlots:
    """At most one punch per peer at a time, and ``most`` on the node (both roles).

    Each slot is held by one punch, as ``calling`` (this node asked) or ``answering`` (the
    peer asked), with a token: only its holder frees it. When two nodes ask each other at
    once, the lower node id's punch goes on: the higher one answers it (``take_over``: its
    own punch sees it no longer holds the slot and stops) and the lower refuses the other.
    """

    def __init__(self, most: int = MAX_PUNCHES) -> None:
        self.most = most
        self._held: dict[str, tuple[str, object]] = {}

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._held

    def __len__(self) -> int:
        return len(self._held)

    def role(self, node_id: str) -> str | None:
        """``calling``, ``answering``, or None when no punch with ``node_id`` runs."""
        held = self._held.get(node_id)
        return held[0] if held is not None else None

    def take(self, node_id: str, role: str = "calling") -> object:
        """The slot of ``node_id`` (its token); ``RateLimited`` when it is taken or the node
        punches ``most`` already."""
        if node_id in self._held:
            raise RateLimited(f"a hole punch with {node_id} is already running")
        if len(self._held) >= self.most:
            raise RateLimited(f"this node runs {self.most} hole punches already; try later")
        token = object()
        self._held[node_id] = (role, token)
        return token

    def take_over(self, node_id: str) -> object:
        """Answer ``node_id``'s punch in the slot of this node's own to it (crossed)."""
        token = object()
        self._held[node_id] = ("answering", token)
        return token

    def holds(self, node_id: str, token: object) -> bool:
        held = self._held.get(node_id)
        return held is not None and held[1] is token

    def release(self, node_id: str, token: object) -> None:
        """Free the slot, if ``token`` still holds it."""
        if self.holds(node_id, token):
            del self._held[node_id]


class PunchPaths(Protocol):
    """What punching needs of ``node.paths``."""

    @property
    def port(self) -> int: ...
    async def adopt(self, sock: socket.socket, node_id: str, initiator: bool) -> bool: ...


class PunchMembers(Protocol):
    def get(self, node_id: str) -> Member | None: ...


class PunchGossip(Protocol):
    @property
    def table(self) -> PunchMembers: ...


class PunchMapper(Protocol):
    @property
    def observed(self) -> tuple[str, int] | None: ...
    @property
    def keeps_ports(self) -> bool | None: ...


class PunchNode(Protocol):
    """What punching needs of the node."""

    @property
    def identity(self) -> Identity: ...
    @property
    def config(self) -> NodeConfig: ...
    @property
    def link(self) -> PeerLink: ...
    @property
    def gossip(self) -> PunchGossip: ...
    @property
    def mapper(self) -> PunchMapper: ...
    @property
    def paths(self) -> PunchPaths: ...
    @property
    def punches(self) -> PunchSlots: ...
    def spawn(self, coro: Coroutine[Any, Any, None], *, name: str) -> asyncio.Task[None]: ...


def _own_half(node: PunchNode) -> tuple[tuple[str, int], int]:
    """This node's observed address and direct port, or why it cannot punch."""
    if not node.config.direct.enabled:
        raise PunchFailed("direct paths are off on this node (direct.enabled = false)")
    observed = node.mapper.observed
    if observed is None:
        raise PunchFailed("no relay has told this node its public address yet")
    if node.mapper.keeps_ports is False:
        raise PunchFailed(
            f"this node's NAT changes source ports (its relay saw port {observed[1]}): "
            "hole punching cannot work"
        )
    port = node.paths.port
    if not port:
        raise PunchFailed("this node has no direct port open")
    return observed, port


async def punch(node: PunchNode, member: Member) -> socket.socket:
    """A TCP connection to ``member`` made by hole punching (the caller's half): connected,
    not yet checked (``node.paths.adopt`` does that); ``PunchFailed`` says why not."""
    record = member.record
    observed, port = _own_half(node)
    delay = ask_delay_ms(member.rtt_ms)
    request = PunchRequest(observed=join_address(*observed), port=port, delay_ms=delay)
    loop = asyncio.get_running_loop()
    token = node.punches.take(record.node_id)
    try:
        sent = loop.time()
        target = PeerTarget(record.api_url, record.node_id)
        try:
            async with node.link.connect(target) as client:
                response = await client._request(
                    "POST", "/direct/punch", request.model_dump(), signed=True
                )
                answer = _validate(PunchAnswer, response, f"{record.api_url}/direct/punch")
        except PunchFailed:
            raise
        except P2PRCError as exc:
            raise PunchFailed(f"{record.name or record.node_id} did not punch: {exc}") from None
        answered = loop.time()
        if not node.punches.holds(record.node_id, token):
            raise PunchFailed("crossed hole punches: the lower node id's goes on")
        try:
            remote = checked_target(answer.observed, answer.port)
        except InvalidRequest as exc:
            raise PunchFailed(f"{record.name or record.node_id} answered {exc}") from None
        start = caller_start(sent, answered, answer.delay_ms)
        log.info(
            "punching to %s at %s (its start in %.0f ms)",
            record.node_id[:8],
            join_address(*remote),
            (start - answered) * 1000,
        )
        return await simultaneous_open(port, remote, start)
    finally:
        node.punches.release(record.node_id, token)


def answer_punch(node: PunchNode, caller_id: str, request: PunchRequest) -> PunchAnswer:
    """The callee's half of a trusted caller's punch: checks, starts its attempts in the
    background (the connected socket goes to ``node.paths.adopt``) and answers at once."""
    if caller_id == node.identity.node_id:
        raise InvalidRequest("a node does not punch to itself")
    member = node.gossip.table.get(caller_id) if node.config.gossip.enabled else None
    if member is None or member.state > MemberState.SUSPECT:
        raise NotFound(f"node {caller_id} is not in this node's peer table; push-pull first")
    if member.record.behind_nat is False:
        raise InvalidRequest("your record says you are public: dial this node's direct port")
    remote = checked_target(request.observed, request.port)
    observed, port = _own_half(node)
    me = node.identity.node_id
    if node.punches.role(caller_id) == "calling" and caller_id < me:
        token = node.punches.take_over(caller_id)  # crossed: the lower id's punch goes on
    elif node.punches.role(caller_id) == "calling":
        raise RateLimited("crossed hole punches: this node's (the lower node id) goes on")
    else:
        token = node.punches.take(caller_id, "answering")
    start = asyncio.get_running_loop().time() + request.delay_ms / 1000
    initiator = me < caller_id  # after a punch the lower node id is the TLS client

    async def half() -> None:
        try:
            sock = await simultaneous_open(port, remote, start)
            adopted = await node.paths.adopt(sock, caller_id, initiator)
            log.info("hole punch with %s: %s", caller_id[:8], "direct" if adopted else "refused")
        except (P2PRCError, OSError) as exc:  # adopt's own refusals: logged, never a crash
            log.info("hole punch with %s: %s", caller_id[:8], exc)

    task = node.spawn(half(), name=f"punch-{caller_id[:8]}")
    # However the half ends (even cancelled before it ran), its slot is free again.
    task.add_done_callback(lambda _: node.punches.release(caller_id, token))
    return PunchAnswer(observed=join_address(*observed), port=port, delay_ms=request.delay_ms)
