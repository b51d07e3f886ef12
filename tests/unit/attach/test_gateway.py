"""The attach listener: its handshake, its one refusal, its bounds, its splice (real TLS and
real sockets on loopback; the attach service is a small policy of two methods)."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest

from p2prc.attach import gateway as gateway_module
from p2prc.attach import handshake
from p2prc.attach.gateway import REFUSED, AttachGateway
from p2prc.errors import RelayUnavailable
from p2prc.identity import Identity
from p2prc.tunnel.streams import close_quietly
from p2prc.tunnel.tls import pinned_context


@dataclass
class Policy:
    """The attach service as the listener asks it: one host, its SSH port and one extra."""

    targets: dict[tuple[str, int], tuple[str, int]] = field(default_factory=dict)
    allowed: set[bytes] = field(default_factory=set)
    hosts: list[object] = field(default_factory=list)
    asked: list[tuple[str, int]] = field(default_factory=list)

    def allows(self, name: str, public_key: bytes) -> bool:
        return public_key in self.allowed

    def target(self, name: str, port: int) -> tuple[str, int] | None:
        self.asked.append((name, port))
        return self.targets.get((name, port))

    def own(self) -> list[object]:
        return self.hosts


@dataclass
class Bed:
    gateway: AttachGateway
    identity: Identity
    client: Identity
    policy: Policy
    echo_port: int


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write(b"<eof>")
        await writer.drain()
    finally:
        writer.close()


@pytest.fixture
async def bed(tmp_path: Path) -> AsyncIterator[Bed]:
    echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
    echo_port = int(echo.sockets[0].getsockname()[1])
    identity, client = Identity.generate(), Identity.generate()
    policy = Policy(
        targets={("board", 22): ("127.0.0.1", echo_port), ("board", 8080): ("127.0.0.1", 1)},
        allowed={client.public_key},
    )
    gateway = AttachGateway(
        identity, tmp_path, lambda: policy, host="127.0.0.1", handshake_timeout=1.0
    )
    async with gateway:
        yield Bed(gateway, identity, client, policy, echo_port)
    echo.close()


async def _tls(bed: Bed) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    context = pinned_context(bed.identity.node_id)
    return await asyncio.open_connection(
        "127.0.0.1", bed.gateway.port, ssl=context, server_hostname=""
    )


async def _connect(
    bed: Bed,
    name: str = "board",
    port: int = 22,
    signer: Identity | None = None,
    signed_port: int | None = None,
    **changes: Any,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, dict[str, Any]]:
    """A client's whole handshake; the gateway's answer."""
    signer = signer or bed.client
    reader, writer = await _tls(bed)
    nonce = handshake.parse_challenge(await handshake.read_frame(reader))
    signed = port if signed_port is None else signed_port
    signature = signer.sign(handshake.connect_message(nonce, bed.identity.node_id, name, signed))
    message = {
        "type": "connect",
        "key": signer.public_key,
        "name": name,
        "port": port,
        "signature": signature,
        **changes,
    }
    writer.write(handshake.encode_frame(message))
    await writer.drain()
    return reader, writer, await handshake.read_frame(reader)


async def test_an_allowed_key_reaches_the_ssh_port_end_to_end(bed: Bed) -> None:
    reader, writer, answer = await _connect(bed)
    assert answer == {"type": "ok"}
    writer.write(b"SSH-2.0-test\r\n" * 1000)
    await writer.drain()
    got = await reader.readexactly(14 * 1000)
    assert got == b"SSH-2.0-test\r\n" * 1000
    assert bed.gateway.streams_served == 1
    await close_quietly(writer)


async def test_large_transfers_keep_order_and_bytes(bed: Bed) -> None:
    reader, writer, answer = await _connect(bed)
    assert answer["type"] == "ok"
    payload = bytes(range(256)) * 16384  # 4 MiB both ways

    async def send() -> None:
        writer.write(payload)
        await writer.drain()

    sender = asyncio.create_task(send())
    got = await reader.readexactly(len(payload))
    await sender
    assert got == payload
    await close_quietly(writer)


async def test_a_key_not_allowed_and_a_port_not_attached_get_one_answer(bed: Bed) -> None:
    stranger = Identity.generate()
    _, w1, not_allowed = await _connect(bed, signer=stranger)
    _, w2, other_port = await _connect(bed, port=2222)
    _, w3, other_host = await _connect(bed, name="elsewhere")
    for answer in (not_allowed, other_port, other_host):
        assert answer == {"type": "error", "code": "attach_refused", "message": REFUSED}
    await close_quietly(w1, w2, w3)


async def test_a_bad_signature_is_refused_before_the_policy_is_asked(bed: Bed) -> None:
    _, writer, answer = await _connect(bed, signature=b"\0" * 64)
    assert answer["type"] == "error"
    assert answer["code"] == "bad_signature"
    # Signed for another port: the signature covers the port.
    _, w2, other = await _connect(bed, port=8080, signed_port=22)
    assert other["code"] == "bad_signature"
    assert bed.policy.asked == []
    await close_quietly(writer, w2)


async def test_a_signature_for_another_gateway_is_refused(bed: Bed) -> None:
    reader, writer = await _tls(bed)
    nonce = handshake.parse_challenge(await handshake.read_frame(reader))
    other_gateway = Identity.generate().node_id
    signature = bed.client.sign(handshake.connect_message(nonce, other_gateway, "board", 22))
    writer.write(handshake.connect_frame(bed.client.public_key, signature, "board", 22))
    answer = await handshake.read_frame(reader)
    assert answer["code"] == "bad_signature"
    await close_quietly(writer)


async def test_an_attached_port_that_does_not_answer_fails_clearly(bed: Bed) -> None:
    _, writer, answer = await _connect(bed, port=8080)
    assert answer["code"] == "attach_failed"
    assert "board port 8080 does not answer" in answer["message"]
    await close_quietly(writer)


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1", "tunnel_protocol_error"),  # not msgpack
        (struct.pack(">I", 5000), "tunnel_protocol_error"),  # over 4 KiB
        (handshake.encode_frame({"type": "hello"}), "tunnel_protocol_error"),
        (struct.pack(">I", 3) + msgpack.packb([1, 2]), "tunnel_protocol_error"),  # not a map
    ],
)
async def test_garbage_and_oversized_frames_are_refused(bed: Bed, frame: bytes, code: str) -> None:
    reader, writer = await _tls(bed)
    await handshake.read_frame(reader)
    writer.write(frame)
    await writer.drain()
    answer = await handshake.read_frame(reader)
    assert answer["type"] == "error"
    assert answer["code"] == code
    assert await reader.read() == b""
    await close_quietly(writer)


@pytest.mark.parametrize(
    "changes",
    [
        {"key": b"short"},
        {"key": "text"},
        {"name": "../etc"},
        {"name": "x" * 64},
        {"port": 0},
        {"port": 70000},
        {"port": True},
        {"port": "22"},
        {"signature": b"x" * 10},
        {"extra": 1},
    ],
)
async def test_every_connect_field_is_checked(bed: Bed, changes: dict[str, Any]) -> None:
    _, writer, answer = await _connect(bed, **changes)
    assert answer["type"] == "error"
    assert answer["code"] == "tunnel_protocol_error"
    assert bed.policy.asked == []
    await close_quietly(writer)


async def test_a_silent_client_is_closed_after_the_handshake_bound(bed: Bed) -> None:
    reader, writer = await _tls(bed)
    await handshake.read_frame(reader)
    started = asyncio.get_running_loop().time()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert asyncio.get_running_loop().time() - started < 3
    await close_quietly(writer)


async def test_streams_per_key_are_bounded(bed: Bed, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gateway_module, "MAX_PER_KEY", 2)
    first, second = await _connect(bed), await _connect(bed)
    assert first[2]["type"] == second[2]["type"] == "ok"
    _, w3, third = await _connect(bed)
    assert third["code"] == "rate_limited"
    # Another key still gets in, and a closed stream gives its room back.
    other = Identity.generate()
    bed.policy.allowed.add(other.public_key)
    _, w4, fourth = await _connect(bed, signer=other)
    assert fourth["type"] == "ok"
    await close_quietly(first[1])
    for _ in range(100):
        if len(bed.gateway._per_key) == 2 and bed.gateway._per_key[bed.client.public_key] == 1:
            break
        await asyncio.sleep(0.02)
    _, w5, fifth = await _connect(bed)
    assert fifth["type"] == "ok"
    await close_quietly(second[1], w3, w4, w5)


async def test_connections_in_all_are_bounded(bed: Bed, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gateway_module, "MAX_TOTAL", 2)
    a, b = await _tls(bed), await _tls(bed)
    await handshake.read_frame(a[0])
    await handshake.read_frame(b[0])
    reader, writer = await _tls(bed)
    answer = await handshake.read_frame(reader)
    assert answer["code"] == "rate_limited"
    await close_quietly(a[1], b[1], writer)


async def test_the_client_pins_the_gateway_node_id(bed: Bed) -> None:
    context = pinned_context(Identity.generate().node_id)
    with pytest.raises(OSError, match="expected node"):
        await asyncio.open_connection(
            "127.0.0.1", bed.gateway.port, ssl=context, server_hostname=""
        )


async def test_an_eof_from_the_host_ends_the_stream(bed: Bed) -> None:
    reader, writer, answer = await _connect(bed)
    assert answer["type"] == "ok"
    writer.write(b"bye")
    await writer.drain()
    assert await reader.readexactly(3) == b"bye"
    writer.close()  # TLS cannot half-close: the gateway ends both sides
    await asyncio.wait_for(writer.wait_closed(), 5)
    for _ in range(100):
        if not bed.gateway._conns:
            break
        await asyncio.sleep(0.02)
    assert not bed.gateway._conns


async def test_closing_the_gateway_ends_its_streams(tmp_path: Path, bed: Bed) -> None:
    reader, writer, answer = await _connect(bed)
    assert answer["type"] == "ok"
    await bed.gateway.aclose()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    await close_quietly(writer)


def test_endpoint_is_the_first_advertised_address(tmp_path: Path) -> None:
    gateway = AttachGateway(
        Identity.generate(), tmp_path, lambda: Policy(), addresses=["203.0.113.5"]
    )
    assert gateway.endpoint() == ""  # not listening yet
    gateway._port = 4100
    assert gateway.endpoint() == "203.0.113.5:4100"
    gateway._public = ("198.51.100.1", 31000)
    assert gateway.endpoint() == "198.51.100.1:31000"


@dataclass
class FakeMapper:
    """The port mapper of a node behind NAT: its relay publishes the listener at ``address``."""

    address: tuple[str, int] | None = ("198.51.100.1", 30000)
    behind_nat: bool = True
    failures: int = 0
    published: list[tuple[str, int]] = field(default_factory=list)

    async def publish(self, host: str, port: int) -> tuple[str, int] | None:
        if self.failures:
            self.failures -= 1
            raise RelayUnavailable("no relay took this node")
        self.published.append((host, port))
        return self.address

    def public_address(self, port: int) -> tuple[str, int] | None:
        return self.address

    async def withdraw(self, port: int) -> None:
        return None


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(200):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


async def test_behind_nat_the_listener_is_published_and_follows_the_relay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gateway_module, "_WATCH", 0.02)
    monkeypatch.setattr(gateway_module, "_RETRY_FIRST", 0.02)
    mapper = FakeMapper(failures=2)  # the relay is not there at first: retried
    policy = Policy()
    moved: list[str] = []
    gateway = AttachGateway(
        Identity.generate(),
        tmp_path,
        lambda: policy,
        host="127.0.0.1",
        addresses=["10.0.0.5"],
        publisher=mapper,
        on_endpoint=lambda: moved.append(gateway.endpoint()),
    )
    async with gateway:
        await asyncio.sleep(0.1)
        assert mapper.published == []  # no attached hosts: nothing to publish
        assert gateway.endpoint() == f"10.0.0.5:{gateway.port}"
        policy.hosts.append(object())
        await _until(lambda: gateway.endpoint() == "198.51.100.1:30000")
        assert mapper.published == [("127.0.0.1", gateway.port)]
        mapper.address = ("198.51.100.2", 31000)  # the relay moved
        await _until(lambda: gateway.endpoint() == "198.51.100.2:31000")
    assert moved == ["198.51.100.1:30000", "198.51.100.2:31000"]


async def test_ensure_published_publishes_before_a_record_is_signed(tmp_path: Path) -> None:
    mapper = FakeMapper()
    gateway = AttachGateway(
        Identity.generate(), tmp_path, lambda: Policy(), host="127.0.0.1", publisher=mapper
    )
    async with gateway:
        assert await gateway.ensure_published() == "198.51.100.1:30000"
