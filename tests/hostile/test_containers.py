"""Hole 11: a trusted peer's container is root inside, so it must be confined outside.

These run without Docker: a recording stand-in for docker-py shows what the runtime asks
the daemon for (tests/docker/test_confinement.py checks the real daemon).
"""

from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker.errors
import httpx
import pytest

from p2prc import AsyncClient, ContainerConfig, NodeConfig, TrustConfig
from p2prc.api.app import create_app
from p2prc.containers.confine import Firewall, disk_limit_support, firewall_rules, tenant_network
from p2prc.containers.docker import DockerRuntime
from p2prc.containers.runtime import FakeRuntime
from p2prc.containers.service import FIRST_EXTRA_PORT
from p2prc.errors import GpuUnavailable, LimitExceeded
from p2prc.identity import Identity
from p2prc.models import CreateContainer

_OWNER = "ab" * 16
_XFS = {"Driver": "overlay2", "DriverStatus": [["Backing Filesystem", "xfs"]]}
_EXT4 = {"Driver": "overlay2", "DriverStatus": [["Backing Filesystem", "extfs"]]}


@dataclass
class _Network:
    name: str
    client: _Docker
    options: dict[str, str]

    @property
    def attrs(self) -> dict[str, Any]:
        users: dict[str, Any] = {c.id: {} for c in self.client.running if c.network == self.name}
        return {"Containers": users, "Options": self.options}

    def reload(self) -> None:
        pass

    def remove(self) -> None:
        del self.client.networks_by_name[self.name]


@dataclass
class _Container:
    id: str
    network: str
    options: dict[str, Any]
    client: _Docker

    @property
    def attrs(self) -> dict[str, Any]:
        return {
            "Id": self.id + "0" * 52,
            "Name": "/" + self.options["name"],
            "Config": {"Image": "p2prc/sshd:latest", "Labels": self.options["labels"]},
            "State": {"Status": "running"},
            "NetworkSettings": {
                "Ports": {"22/tcp": [{"HostPort": "40022"}]},
                "Networks": {self.network: {}},
            },
            "HostConfig": {
                "DeviceRequests": [
                    {"Count": r.count, "DeviceIDs": r.device_ids}
                    for r in self.options["device_requests"] or []
                ],
                "StorageOpt": self.options.get("storage_opt"),
            },
        }

    def start(self) -> None:
        self.client.running.append(self)

    def reload(self) -> None:
        pass

    def remove(self, force: bool = False) -> None:
        self.client.running.remove(self)


@dataclass
class _Docker:
    """What DockerRuntime calls on docker-py, recorded."""

    info_answer: dict[str, Any] = field(default_factory=lambda: dict(_XFS))
    refuse_storage: bool = False
    lose_network: bool = False  # another node removes the network between get and create
    created: list[dict[str, Any]] = field(default_factory=list)
    networks_by_name: dict[str, _Network] = field(default_factory=dict)
    running: list[_Container] = field(default_factory=list)

    @property
    def containers(self) -> _Docker:
        return self

    @property
    def networks(self) -> _Docker:
        return self

    def info(self) -> dict[str, Any]:
        return self.info_answer

    def get(self, name: str) -> Any:
        if name in self.networks_by_name:
            return self.networks_by_name[name]
        for container in self.running:
            if container.id == name:
                return container
        raise docker.errors.NotFound(f"no {name}")

    def create(self, first: str, **options: Any) -> Any:
        """``networks.create(name, ...)`` or ``containers.create(image, ...)``."""
        if "driver" in options:
            self.networks_by_name[first] = _Network(first, self, options["options"])
            return self.networks_by_name[first]
        if self.refuse_storage and "storage_opt" in options:
            raise docker.errors.APIError(
                "500", explanation="--storage-opt is supported only for overlay over xfs"
            )
        if self.lose_network:
            self.lose_network = False
            self.networks_by_name.pop(options["network"])
            raise docker.errors.NotFound(f"network {options['network']} not found")
        self.created.append(options)
        return _Container(f"{len(self.created):012x}", options["network"], options, self)

    def list(self, all: bool = False, filters: dict[str, Any] | None = None) -> list[Any]:
        network = (filters or {}).get("network")
        return [c for c in self.running if c.network == network]

    def close(self) -> None:
        pass


class _Firewall(Firewall):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def ensure(self) -> bool:
        self.calls += 1
        return True


def _runtime(client: _Docker) -> tuple[DockerRuntime, _Firewall]:
    firewall = _Firewall()
    runtime = DockerRuntime(firewall=firewall)
    runtime._client = client
    return runtime, firewall


def _spec(owner: str = _OWNER, gpus: int = 0, disk: int | None = 10 * 1024**3) -> Any:
    from p2prc.containers.runtime import ContainerSpec

    return ContainerSpec(
        name=f"p2prc-{owner[:6]}",
        image="p2prc/sshd:latest",
        cpus=1.0,
        memory=256 * 1024**2,
        pids=512,
        ports=(FIRST_EXTRA_PORT,),
        gpus=gpus,
        authorized_keys=(),
        labels={"p2prc.node": "n" * 32, "p2prc.owner": owner},
        disk=disk,
    )


async def test_containers_lose_net_raw_and_every_capability_they_do_not_need() -> None:
    client = _Docker()
    runtime, firewall = _runtime(client)
    await runtime.create(_spec())
    options = client.created[0]
    assert options["cap_drop"] == ["ALL"]
    assert "NET_RAW" not in options["cap_add"]
    assert not {"NET_ADMIN", "SYS_ADMIN", "MKNOD", "SYS_PTRACE"} & set(options["cap_add"])
    assert options["pids_limit"] == 512
    assert [(u["Name"], u["Hard"]) for u in options["ulimits"]] == [("nofile", 8192)]
    assert "privileged" not in options
    assert "volumes" not in options
    assert firewall.calls == 1


async def test_each_tenant_gets_its_own_network_without_inter_container_traffic() -> None:
    client = _Docker()
    runtime, _ = _runtime(client)
    mallory = "cd" * 16
    first = await runtime.create(_spec())
    await runtime.create(_spec(mallory))
    ours, theirs = (options["network"] for options in client.created)
    assert ours == tenant_network(_OWNER)[0] != theirs == tenant_network(mallory)[0]
    assert "bridge" not in (ours, theirs)
    for network in client.networks_by_name.values():
        assert network.options["com.docker.network.bridge.enable_icc"] == "false"
        assert network.options["com.docker.network.bridge.name"].startswith("p2prc")
        assert len(network.options["com.docker.network.bridge.name"]) <= 15
    await runtime.remove(first.id)
    assert list(client.networks_by_name) == [theirs]  # gone with its last container


async def test_a_network_removed_by_another_node_meanwhile_is_made_again() -> None:
    client = _Docker(lose_network=True)
    runtime, _ = _runtime(client)
    await runtime.create(_spec())
    assert list(client.networks_by_name) == [tenant_network(_OWNER)[0]]
    assert len(client.running) == 1


async def test_gpus_are_a_counted_request_never_all_of_them() -> None:
    client = _Docker()
    runtime, _ = _runtime(client)
    info = await runtime.create(_spec(gpus=2))
    (request,) = client.created[0]["device_requests"]
    assert request.count == 2
    assert info.gpus == 2
    await runtime.create(_spec("ef" * 16))
    assert client.created[1]["device_requests"] is None


async def test_disk_is_limited_where_the_driver_can_and_said_where_it_cannot(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = _Docker()
    runtime, _ = _runtime(client)
    info = await runtime.create(_spec())
    assert client.created[0]["storage_opt"] == {"size": str(10 * 1024**3)}
    assert info.disk == 10 * 1024**3
    unsized = _Docker(info_answer=dict(_EXT4))
    runtime, _ = _runtime(unsized)
    with caplog.at_level(logging.WARNING):
        info = await runtime.create(_spec())
    assert "storage_opt" not in unsized.created[0]
    assert info.disk is None
    assert "NO disk limit" in caplog.text
    assert "overlay2 on extfs" in caplog.text
    # xfs without pquota: the daemon refuses; created without the limit, and said once.
    refusing = _Docker(refuse_storage=True)
    runtime, _ = _runtime(refusing)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        await runtime.create(_spec())
        await runtime.create(_spec("12" * 16))
    assert [("storage_opt" in options) for options in refusing.created] == [False, False]
    assert caplog.text.count("NO disk limit") == 1


def test_disk_support_by_driver() -> None:
    assert disk_limit_support(_XFS) is None
    assert disk_limit_support({"Driver": "btrfs"}) is None
    assert "overlay2 on extfs" in str(disk_limit_support(_EXT4))
    assert disk_limit_support({}) is not None


def test_firewall_rules_keep_tenants_off_the_host_and_metadata() -> None:
    rules = firewall_rules(["169.254.0.0/16", "10.0.0.0/8", "fd00::/8"])
    lines = rules.splitlines()
    established = "-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN"
    assert lines.index(f"-A P2PRC-INPUT {established}") < lines.index("-A P2PRC-INPUT -j DROP")
    assert "-A P2PRC-FORWARD -d 169.254.0.0/16 -j DROP" in lines
    assert "-A P2PRC-FORWARD -d 10.0.0.0/8 -j DROP" in lines
    assert "fd00" not in rules  # tenant networks are IPv4 only
    assert lines[-1] == "COMMIT"


def test_firewall_installs_its_chains_and_the_jumps_once() -> None:
    calls: list[tuple[list[str], str | None]] = []
    present: set[str] = set()

    def run(command: list[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
        calls.append((command, stdin))
        key = " ".join(command[3:])
        code = 0
        if command[2] == "-C":
            code = 0 if key in present else 1
        elif command[2] == "-I":
            present.add(" ".join([command[3], *command[5:]]))
        return subprocess.CompletedProcess(command, code, "", "")

    firewall = Firewall(run=run)
    assert firewall.ensure()
    assert firewall.ensure()
    restores = [stdin for command, stdin in calls if command[0] == "iptables-restore"]
    assert restores == [firewall_rules(), firewall_rules()]
    inserts = [command for command, _ in calls if command[2:3] == ["-I"]]
    assert [command[3] for command in inserts] == ["INPUT", "DOCKER-USER"]
    assert all(command[5:7] == ["-i", "p2prc+"] for command in inserts)


def test_firewall_that_cannot_run_says_so_loudly(caplog: pytest.LogCaptureFixture) -> None:
    def denied(command: list[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(command, 4, "", "Permission denied (you must be root)")

    firewall = Firewall(run=denied)
    with caplog.at_level(logging.WARNING):
        assert not firewall.ensure()
        assert not firewall.ensure()
    assert caplog.text.count("NOT network-confined") == 1
    assert "169.254.169.254" in caplog.text
    assert "P2PRC-INPUT" in caplog.text


def test_a_remote_docker_daemon_is_not_confined_by_this_hosts_rules(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[list[str]] = []

    def run(command: list[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
        calls.append(command)
        return subprocess.CompletedProcess(command, 0, "", "")

    firewall = Firewall(run=run, remote="tcp://10.0.0.5:2375")
    with caplog.at_level(logging.WARNING):
        assert not firewall.ensure()
    assert calls == []
    assert "tcp://10.0.0.5:2375" in caplog.text


async def test_a_peer_asking_for_more_gpus_than_allowed_gets_none(
    make_fake_node: Any, tmp_path: Path
) -> None:
    config = NodeConfig(name="host", trust=TrustConfig(mode="open"))
    node = make_fake_node(config, runtime=FakeRuntime(gpus=8))
    mallory = Identity.generate()
    transport = httpx.ASGITransport(app=create_app(node))
    async with AsyncClient(
        "http://host.test",
        identity=mallory,
        transport=transport,
        home=tmp_path / "mallory",
    ) as client:
        with pytest.raises(LimitExceeded, match="maximum 1 per container"):
            await client.create_container(CreateContainer(gpus=8))
    assert node.runtime.containers == {}
    capped = NodeConfig(name="host", containers=ContainerConfig(max_gpus=0))
    assert capped.containers.max_gpus == 0


async def test_gpu_on_a_node_without_gpus_is_refused(make_fake_node: Any, tmp_path: Path) -> None:
    config = NodeConfig(name="host", trust=TrustConfig(mode="open"))
    node = make_fake_node(config, runtime=FakeRuntime())
    transport = httpx.ASGITransport(app=create_app(node))
    async with AsyncClient(
        "http://host.test",
        identity=Identity.generate(),
        transport=transport,
        home=tmp_path / "peer",
    ) as client:
        with pytest.raises(GpuUnavailable):
            await client.create_container(CreateContainer(gpu=True))
    assert node.runtime.containers == {}
