"""Invite tokens and the invite store: round trip, garbage, forged, expired and used."""

import secrets
from pathlib import Path

import pytest

from p2prc.errors import InvalidRequest, NotTrusted
from p2prc.identity import b64decode, b64encode
from p2prc.peers.invites import (
    MAX_LIVE_INVITES,
    TOKEN_PREFIX,
    InviteStore,
    InviteToken,
    decode_token,
    encode_token,
)
from p2prc.state import State

_ID = "0123456789abcdef0123456789abcdef"


def _token(*addresses: str) -> InviteToken:
    return InviteToken(addresses or ("192.0.2.1:8088",), _ID, secrets.token_bytes(16))


def test_round_trip_and_short() -> None:
    token = _token("192.0.2.1:8088", "[2001:db8::1]:8088", "https://ab@198.51.100.2:443")
    text = encode_token(token)
    assert text.startswith(TOKEN_PREFIX)
    assert len(text) < 200
    assert decode_token(f"  {text}\n") == token
    assert len(encode_token(_token())) < 80


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello",
        TOKEN_PREFIX,
        TOKEN_PREFIX + "!!!not base64!!!",
        TOKEN_PREFIX + b64encode(b"\x01short"),
        TOKEN_PREFIX + "A" * 700,
    ],
)
def test_garbage_is_one_line_invalid_request(text: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        decode_token(text)
    assert "\n" not in str(refused.value)


def test_wrong_version_and_bad_addresses_are_refused() -> None:
    raw = b64decode(encode_token(_token())[len(TOKEN_PREFIX) :])
    with pytest.raises(InvalidRequest):
        decode_token(TOKEN_PREFIX + b64encode(b"\x02" + raw[1:]))
    with pytest.raises(InvalidRequest, match="addresses"):
        decode_token(TOKEN_PREFIX + b64encode(raw[:33] + b"host:99999"))
    with pytest.raises(InvalidRequest, match="addresses"):
        decode_token(TOKEN_PREFIX + b64encode(raw[:33] + ",".join(["h:1"] * 5).encode()))


@pytest.fixture
def store(tmp_path: Path) -> InviteStore:
    return InviteStore(State(tmp_path / "state.db").connection)


def test_redeem_spends_uses_then_refuses(store: InviteStore) -> None:
    secret, expires = store.create(60, 2, now=1000.0)
    assert expires == 1060.0
    assert store.live(now=1000.0) == 1
    store.redeem(secret, "a" * 32, now=1001.0)
    store.redeem(secret, "b" * 32, now=1002.0)
    with pytest.raises(NotTrusted, match="already used"):
        store.redeem(secret, "c" * 32, now=1003.0)
    assert store.live(now=1003.0) == 0


def test_expired_and_forged_are_refused(store: InviteStore) -> None:
    secret, _ = store.create(60, 1, now=1000.0)
    with pytest.raises(NotTrusted, match="expired"):
        store.redeem(secret, "a" * 32, now=1060.0)
    with pytest.raises(NotTrusted, match="not one this node gave out"):
        store.redeem(secrets.token_bytes(16), "a" * 32, now=1000.0)


def test_only_digests_are_stored(store: InviteStore, tmp_path: Path) -> None:
    secret, _ = store.create(60, 1)
    assert secret.hex() not in (tmp_path / "state.db").read_bytes().hex()


def test_live_invites_are_bounded(store: InviteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("p2prc.peers.invites.MAX_LIVE_INVITES", 3)
    for _ in range(3):
        store.create(60, 1, now=1000.0)
    with pytest.raises(InvalidRequest, match="live"):
        store.create(60, 1, now=1000.0)
    store.create(60, 1, now=2000.0)  # the expired ones made room
    assert MAX_LIVE_INVITES >= 100
