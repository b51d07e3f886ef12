"""``NatState``: configured or detected by trusted peers only, one copy for the node."""

import asyncio
from types import SimpleNamespace
from typing import Any, cast

import pytest

from p2prc.config import NodeConfig, RelayConfig, TrustConfig
from p2prc.errors import P2PRCError
from p2prc.identity import Identity
from p2prc.peers.table import Member
from p2prc.trust import TrustPolicy
from p2prc.tunnel.nat import NatState

ME = Identity.generate()
FRIEND = Identity.generate()
RELAY = Identity.generate()
STRANGER = Identity.generate()


def _member(who: Identity, *, behind_nat: bool | None = None) -> Member:
    record = SimpleNamespace(node_id=who.node_id, name=who.node_id[:6], behind_nat=behind_nat)
    return cast(Member, SimpleNamespace(record=record))


def _nat(behind_nat: Any = "auto", *, listed: bool = True) -> NatState:
    config = NodeConfig(
        behind_nat=behind_nat,
        trust=TrustConfig(allow=[FRIEND.public_key_b64] if listed else []),
        relay=RelayConfig(use=[RELAY.node_id] if listed else []),
    )
    return NatState(config, TrustPolicy(config.trust, ME.public_key))


@pytest.mark.parametrize("configured", [True, False])
def test_a_configured_value_is_known_from_the_start(configured: bool) -> None:
    nat = _nat(configured)
    assert nat.known.is_set()
    assert nat.value is configured
    assert nat.behind_nat is configured
    nat.set_detected(not configured)  # detection never overrides the owner
    assert nat.value is configured


def test_auto_is_unknown_and_public_until_detected() -> None:
    nat = _nat()
    changes: list[bool | None] = []
    nat.on_change(lambda: changes.append(nat.value))
    assert not nat.known.is_set()
    assert nat.value is None
    assert nat.behind_nat is False
    nat.set_detected(True)
    nat.set_detected(True)
    assert nat.known.is_set()
    assert nat.behind_nat is True
    assert changes == [True]  # listeners hear a change once


def test_only_listed_keys_and_relay_use_are_trusted() -> None:
    nat = _nat()
    assert nat.trusts(FRIEND.node_id)
    assert nat.trusts(RELAY.node_id)
    assert not nat.trusts(STRANGER.node_id)
    assert not _nat(listed=False).trusts(FRIEND.node_id)


async def test_settled_waits_for_detection_when_someone_trusted_could_answer() -> None:
    nat = _nat()
    asyncio.get_running_loop().call_later(0.05, nat.set_detected, False)
    await nat.settled(5.0)
    assert nat.known.is_set()
    undetected = _nat()
    await undetected.settled(0.05)  # gives up after the timeout: treated as public
    assert not undetected.known.is_set()
    assert not undetected.behind_nat


async def test_settled_does_not_wait_when_nobody_trusted_is_there() -> None:
    nat = _nat(listed=False)
    async with asyncio.timeout(1.0):
        await nat.settled(60.0, [_member(STRANGER)])


async def test_detection_asks_and_believes_only_trusted_public_peers() -> None:
    nat = _nat()
    asked: list[str] = []

    async def ask(member: Member) -> bool:
        asked.append(member.record.node_id)
        return False

    members = [
        _member(STRANGER),
        _member(FRIEND, behind_nat=True),  # behind NAT itself: it cannot tell
        _member(RELAY),
    ]
    await nat.detect(lambda: members, ask, interval=0)
    assert asked == [RELAY.node_id]
    assert nat.known.is_set()
    assert nat.behind_nat is True


async def test_one_peer_that_connects_back_makes_the_node_public() -> None:
    nat = _nat()
    answers = iter([False, True])

    async def ask(member: Member) -> bool:
        return next(answers)

    await nat.detect(lambda: [_member(FRIEND), _member(RELAY)], ask, interval=0)
    assert nat.known.is_set()
    assert nat.behind_nat is False


async def test_failed_checks_are_retried_then_it_stays_unknown() -> None:
    nat = _nat()
    calls = 0

    async def ask(member: Member) -> bool:
        nonlocal calls
        calls += 1
        raise P2PRCError("no answer")

    await nat.detect(lambda: [_member(FRIEND)], ask, rounds=3, interval=0)
    assert calls == 3
    assert not nat.known.is_set()
    assert nat.value is None
