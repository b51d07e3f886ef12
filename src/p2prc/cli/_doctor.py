"""``p2prc doctor``: what stands between this machine and a working node, each with its fix."""

from __future__ import annotations

import asyncio
import email.utils
import errno
import socket
import time
from dataclasses import asdict, dataclass
from typing import Annotated, Literal

import httpx
import typer
from rich.table import Table

from ..client import AsyncClient
from ..config import Home, NodeConfig, load
from ..errors import ConfigError, NotTrusted, OwnerOnly, P2PRCError
from ..models import PeerView
from ._common import Options, emit, options_of

__all__ = ["Check", "doctor_command", "run_checks"]

Level = Literal["ok", "warn", "fail", "skip"]
_MARK = {"ok": "ok", "warn": "warn", "fail": "FAIL", "skip": "-"}
_PEER_TIMEOUT = 3.0
# Peers asked for the time, and relays asked whether they trust us, at most.
_SAMPLE = 5


@dataclass(frozen=True, slots=True)
class Check:
    """One finding: what was checked, how it went, and the one thing to do about it."""

    name: str
    level: Level
    detail: str
    fix: str = ""


def _docker(config: NodeConfig) -> list[Check]:
    base = config.containers.docker_host
    image = config.default_image
    if base.startswith("unix://"):
        path = base.removeprefix("unix://")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(3)
            try:
                probe.connect(path)
            except PermissionError:
                return [
                    Check(
                        "docker",
                        "fail",
                        f"{path}: permission denied",
                        "sudo usermod -aG docker $USER, then log in again",
                    )
                ]
            except OSError as exc:
                why = exc.strerror or type(exc).__name__
                return [
                    Check(
                        "docker",
                        "fail",
                        f"no Docker daemon at {path} ({why}); this node cannot host containers",
                        "install Docker and start it (sudo systemctl start docker), "
                        "or p2prc config set containers.docker_host URL",
                    )
                ]
    import docker.errors

    import docker

    try:
        client = docker.DockerClient(base_url=base, timeout=5)
    except docker.errors.DockerException as exc:
        return [Check("docker", "fail", f"{base}: {exc}", "check containers.docker_host")]
    try:
        version = client.version().get("Version", "?")
        found = [Check("docker", "ok", f"Docker {version} at {base}")]
        try:
            client.images.get(image)
        except docker.errors.ImageNotFound:
            found.append(
                Check("image", "fail", f"{image} is not built here", "p2prc images bootstrap")
            )
        else:
            found.append(Check("image", "ok", f"{image} present"))
        return found
    except Exception as exc:  # docker-py raises requests' and its own errors alike
        return [Check("docker", "fail", f"{base}: {exc}", "sudo systemctl restart docker")]
    finally:
        client.close()


def _bind_error(host: str, port: int, kind: int) -> OSError | None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as sock:
        if kind == socket.SOCK_STREAM:  # as the node's listener: TIME_WAIT does not count
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc
    return None


def _ports(config: NodeConfig, running: _Running | None) -> list[Check]:
    if running is not None:
        return [Check("ports", "ok", f"our node is running at {running.api}")]
    wanted = [("API", config.port, socket.SOCK_STREAM, "port")]
    gossip = config.gossip.port if config.gossip.port is not None else config.port
    if config.gossip.enabled and gossip:
        wanted.append(("gossip", gossip, socket.SOCK_DGRAM, "gossip.port"))
    if config.relay.enabled and config.relay.port:
        wanted.append(("relay", config.relay.port, socket.SOCK_STREAM, "relay.port"))
    found = []
    for what, port, kind, key in wanted:
        proto = "tcp" if kind == socket.SOCK_STREAM else "udp"
        error = _bind_error(config.host, port, kind)
        if error is None:
            found.append(Check(f"{what} port", "ok", f"{config.host}:{port}/{proto} is free"))
        elif error.errno == errno.EADDRINUSE:
            found.append(
                Check(
                    f"{what} port",
                    "fail",
                    f"{port}/{proto} is in use by another program",
                    f"stop it (ss -lptn 'sport = :{port}'), or p2prc config set {key} {port + 1}",
                )
            )
        else:
            found.append(
                Check(
                    f"{what} port",
                    "fail",
                    f"cannot listen on {config.host}:{port}/{proto}: {error.strerror}",
                    f"p2prc config set {key} N (a port above 1024)",
                )
            )
    return found


def _dual_stack() -> Check:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(("::", 0))
    except OSError as exc:
        return Check(
            "dual-stack",
            "warn",
            f"no IPv6 socket for both families ({exc.strerror or exc}); IPv4 only",
            "enable IPv6: sudo sysctl net.ipv6.conf.all.disable_ipv6=0",
        )
    return Check("dual-stack", "ok", "IPv6 sockets also take IPv4")


@dataclass(frozen=True, slots=True)
class _Running:
    """What the running node told us."""

    api: str
    me: PeerView
    peers: list[PeerView]
    stats: dict[str, object]


def _nat(node: _Running | None) -> Check:
    if node is None:
        return Check("nat", "skip", "node not running", "p2prc start")
    me = node.me
    if me.behind_nat is None:
        fix = "p2prc peers add HOST:PORT of a public node you trust"
        return Check("nat", "warn", "not decided yet (no trusted public peer answered)", fix)
    if not me.behind_nat:
        return Check("nat", "ok", "public: peers reach this node directly")
    return Check("nat", "ok", "behind NAT: peers reach this node through a relay")


async def _relays(node: _Running | None, home: Home) -> list[Check]:
    if node is None:
        return [Check("relays", "skip", "node not running", "p2prc start")]
    me = node.me
    if not me.behind_nat:
        return [Check("relays", "skip", "not needed (public or not decided)")]
    if me.relay:
        names = {p.node_id: p.name for p in node.peers}
        via = names.get(me.relay, me.relay[:12])
        where = f" (API published at {me.public_api})" if me.public_api else ""
        return [Check("relays", "ok", f"tunnelling through {via}{where}")]
    candidates = [
        p for p in node.peers if p.relay_port and not p.behind_nat and p.state == "alive"
    ][:_SAMPLE]
    if not candidates:
        return [
            Check(
                "relays",
                "fail",
                "behind NAT and no public peer with a relay is alive",
                "ask a public node to enable relay (p2prc config set relay.enabled true) "
                "and add it: p2prc peers add HOST:PORT",
            )
        ]
    found = await asyncio.gather(*(_relay_trusts(p, home, me.node_id) for p in candidates))
    return list(found)


async def _relay_trusts(peer: PeerView, home: Home, our_id: str) -> Check:
    name = f"relay {peer.name}"
    try:
        async with AsyncClient(peer.api, home=home, timeout=_PEER_TIMEOUT) as client:
            await client.whoami()
    except (NotTrusted, OwnerOnly):
        fix = f"its owner runs: p2prc trust add {our_id}"
        return Check(name, "fail", "reachable but does not trust this node", fix)
    except P2PRCError as exc:
        return Check(name, "fail", f"unreachable: {exc}", "check its address and firewall")
    return Check(
        name,
        "warn",
        "reachable and trusts us, yet not in use",
        f"trust it as a relay: p2prc config set relay.use '[\"{peer.node_id}\"]'",
    )


async def _clock(node: _Running | None, skew: float) -> list[Check]:
    if node is None:
        return [Check("clock", "skip", "node not running", "p2prc start")]
    found: list[Check] = []
    rejected = node.stats.get("rejected")
    future = int(rejected.get("future", 0)) if isinstance(rejected, dict) else 0
    if future:
        found.append(
            Check(
                "clock",
                "warn",
                f"{future} peer records were refused as signed in the future",
                "a peer's clock (or ours) is ahead: sudo timedatectl set-ntp true",
            )
        )
    peers = [p for p in node.peers if not p.me and p.state == "alive"][:_SAMPLE]
    offsets = [o for o in await asyncio.gather(*(_offset(p) for p in peers)) if o is not None]
    if not offsets:
        found.append(Check("clock", "skip", "no peer answered with its time"))
        return found
    worst = max(offsets, key=abs)
    text = f"largest offset {worst:+.0f} s against {len(offsets)} peers"
    if abs(worst) > skew / 2:
        level: Level = "fail" if abs(worst) > skew else "warn"
        fix = "sudo timedatectl set-ntp true (on whichever clock is off)"
        found.append(Check("clock", level, text, fix))
    else:
        found.append(Check("clock", "ok", text))
    return found


async def _offset(peer: PeerView) -> float | None:
    """The peer's clock minus ours, from its HTTP Date header (1 s resolution)."""
    verify: object = True
    if peer.api.startswith("https://"):
        from ..tunnel.tls import pinned_context

        verify = pinned_context(peer.node_id)
    try:
        async with httpx.AsyncClient(timeout=_PEER_TIMEOUT, verify=verify) as http:  # type: ignore[arg-type]
            before = time.time()
            answer = await http.get(f"{peer.api}/health")
            after = time.time()
        stamp = email.utils.parsedate_to_datetime(answer.headers["date"]).timestamp()
    except (httpx.HTTPError, KeyError, TypeError, ValueError, OSError):
        return None
    return stamp + 0.5 - (before + after) / 2


async def _node(home: Home) -> _Running | None:
    try:
        async with AsyncClient(home=home, timeout=5.0) as client:
            peers = await client.peers()
            api = str(client.base_url)
            async with httpx.AsyncClient(timeout=5.0) as http:
                stats = (await http.get(f"{api}/peers/stats")).json()
    except (P2PRCError, httpx.HTTPError, ValueError):
        return None
    me = next((p for p in peers if p.me), None)
    if me is None:
        return None
    return _Running(
        api, me, [p for p in peers if not p.me], stats if isinstance(stats, dict) else {}
    )


async def _gather(home: Home, config: NodeConfig) -> list[Check]:
    node = await _node(home)
    checks = await asyncio.to_thread(_docker, config)
    checks += _ports(config, node)
    checks.append(_nat(node))
    checks += await _relays(node, home)
    checks += await _clock(node, config.trust.clock_skew)
    checks.append(_dual_stack())
    return checks


def run_checks(home: Home) -> list[Check]:
    """Every check, for ``home`` and its node if one runs."""
    try:
        config = load(home)
        prelude: list[Check] = []
    except ConfigError as exc:
        config = NodeConfig(name="unconfigured")
        prelude = [Check("config", "warn", str(exc), "p2prc init")]
    return prelude + asyncio.run(_gather(home, config))


def doctor_command(
    ctx: typer.Context,
    strict: Annotated[bool, typer.Option("--strict", help="Warnings fail too.")] = False,
) -> None:
    """Check Docker, ports, NAT, relays, clock and IPv6; each problem with its fix."""
    options: Options = options_of(ctx)
    checks = run_checks(options.home)
    table = Table("", "check", "finding", "fix", box=None)
    for check in checks:
        style = {"fail": "red", "warn": "yellow"}.get(check.level)
        table.add_row(_MARK[check.level], check.name, check.detail, check.fix, style=style)
    bad = {"fail", "warn"} if strict else {"fail"}
    failed = [c for c in checks if c.level in bad]
    data = {"ok": not failed, "checks": [asdict(c) for c in checks]}
    emit(options, data, table)
    if failed:
        raise typer.Exit(1)
