"""What confines a tenant's container: capabilities, a network per tenant, host firewall rules.

The rule set is pure data (``firewall_rules``); ``Firewall`` installs it with ``iptables``
from argument lists, atomically for its own chains (``iptables-restore --noflush``).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence

from ..errors import ContainerError

__all__ = [
    "BRIDGE_PREFIX",
    "CAPABILITIES",
    "DEFAULT_BLOCKED",
    "NETWORK_PREFIX",
    "Firewall",
    "disk_limit_support",
    "firewall_rules",
    "tenant_network",
]

log = logging.getLogger(__name__)

# Docker's default set minus NET_RAW (ARP/IP spoofing on the bridge), MKNOD, SETFCAP and
# SETPCAP. sshd with privilege separation needs SETUID, SETGID and SYS_CHROOT; sudo needs
# SETUID, SETGID and AUDIT_WRITE; the rest let root inside (sudo) manage the container's own
# files and processes (dpkg, Ansible become) and bind low ports.
CAPABILITIES = (
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "NET_BIND_SERVICE",
    "SETGID",
    "SETUID",
    "SYS_CHROOT",
)
NETWORK_PREFIX = "p2prc-tenant-"
# Linux interface names are at most 15 characters: "p2prc" + 10 hex digits.
BRIDGE_PREFIX = "p2prc"
DEFAULT_BLOCKED = ("169.254.0.0/16",)
INPUT_CHAIN = "P2PRC-INPUT"
FORWARD_CHAIN = "P2PRC-FORWARD"
_ESTABLISHED = ["-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "RETURN"]
# Storage drivers whose containers can have a size limit (overlay2 only on xfs with pquota).
_SIZED_DRIVERS = ("btrfs", "zfs", "devicemapper")

Runner = Callable[[list[str], str | None], subprocess.CompletedProcess[str]]


def tenant_network(owner: str) -> tuple[str, str]:
    """The (network name, bridge name) of one tenant, from a hash of its node id."""
    digest = hashlib.sha256(owner.encode()).hexdigest()
    return f"{NETWORK_PREFIX}{digest[:16]}", f"{BRIDGE_PREFIX}{digest[:10]}"


def firewall_rules(blocked: Sequence[str] = DEFAULT_BLOCKED) -> str:
    """The ``iptables-restore --noflush`` text for the two p2prc chains.

    Traffic from any tenant bridge to this host's own addresses (INPUT) is dropped unless
    it answers a connection the host opened (published ports, readiness checks); forwarded
    traffic from a tenant bridge to a blocked network (link-local metadata by default) is
    dropped. Everything else (published ports from outside, outbound internet) is left to
    Docker's own rules.
    """
    lines = ["*filter", f":{INPUT_CHAIN} - [0:0]", f":{FORWARD_CHAIN} - [0:0]"]
    lines.append(" ".join(["-A", INPUT_CHAIN, *_ESTABLISHED]))
    lines.append(f"-A {INPUT_CHAIN} -j DROP")
    lines.append(" ".join(["-A", FORWARD_CHAIN, *_ESTABLISHED]))
    for network in blocked:
        cidr = ipaddress.ip_network(network, strict=False)
        if cidr.version == 4:
            lines.append(f"-A {FORWARD_CHAIN} -d {cidr} -j DROP")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _jumps() -> list[tuple[str, list[str]]]:
    tenant = ["-i", f"{BRIDGE_PREFIX}+"]
    return [
        ("INPUT", [*tenant, "-j", INPUT_CHAIN]),
        ("DOCKER-USER", [*tenant, "-j", FORWARD_CHAIN]),
    ]


def _run(command: list[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, input=stdin, capture_output=True, text=True, timeout=30, check=False
    )


class Firewall:
    """Installs the tenant rules on this host; says loudly, once, when it cannot."""

    def __init__(
        self, blocked: Sequence[str] = DEFAULT_BLOCKED, run: Runner = _run, *, remote: str = ""
    ) -> None:
        self._blocked = tuple(blocked)
        self._run = run
        self._remote = remote  # a Docker daemon elsewhere: its host's rules are not ours
        self._warned = False

    def ensure(self) -> bool:
        """Install (or refresh) the rules; False, with one warning, where that fails."""
        try:
            self._install()
        except ContainerError as exc:
            if not self._warned:
                self._warned = True
                log.warning(
                    "containers are NOT network-confined on this host: %s. Tenants can reach "
                    "this host's services and 169.254.169.254; run the node as root (it needs "
                    "iptables) or install these rules yourself:\n%s",
                    exc,
                    firewall_rules(self._blocked),
                )
            return False
        return True

    def _install(self) -> None:
        if self._remote:
            raise ContainerError(f"the Docker daemon ({self._remote}) is not on this machine")
        if shutil.which("iptables") is None or shutil.which("iptables-restore") is None:
            raise ContainerError("iptables is not installed")
        self._check(
            self._run(["iptables-restore", "-w", "--noflush"], firewall_rules(self._blocked))
        )
        for chain, rule in _jumps():
            if self._run(["iptables", "-w", "-C", chain, *rule], None).returncode != 0:
                self._check(self._run(["iptables", "-w", "-I", chain, "1", *rule], None))

    @staticmethod
    def _check(result: subprocess.CompletedProcess[str]) -> None:
        if result.returncode != 0:
            text = (result.stderr or result.stdout).strip()[-300:]
            raise ContainerError(f"iptables failed ({result.returncode}): {text}")


def disk_limit_support(info: Mapping[str, object]) -> str | None:
    """None when the daemon's storage driver can limit a container's disk, else why not."""
    driver = str(info.get("Driver") or "")
    status = info.get("DriverStatus") or []
    pairs = [item for item in status if len(item) == 2] if isinstance(status, list) else []
    backing = next((str(value) for key, value in pairs if key == "Backing Filesystem"), "")
    if driver in _SIZED_DRIVERS or (driver == "overlay2" and backing == "xfs"):
        return None
    where = f"{driver} on {backing}" if backing else driver or "an unknown driver"
    return (
        f"the storage driver ({where}) cannot limit a container's disk "
        "(needs overlay2 on xfs with pquota, btrfs, zfs or devicemapper)"
    )
