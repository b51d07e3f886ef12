"""The namespace test bed of attached hosts (#16), shared by its test and its benchmark.

``TB_HOSTS=3``: three hosts on home1's LAN behind one NAT router. ``home1-3`` (the board,
"morello") runs only a real OpenSSH server and two web servers, no p2prc; ``home1`` and
``home1-2`` run gateway nodes (their default host, every address) that attach it; a relay
node on ``pub1`` (the gateways' ``relay.use``); a client node on ``pub2`` (allowed on the
gateways). The baseline for the benchmark is plain ``ssh -J`` over the same hops: a second
sshd on ``home1`` (loopback only), published through the same relay with ``p2prc map-port``
on the first gateway, so both paths are pub2 -> relay -> tunnel -> home1 -> board.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tests.netns._bed import Bed

SSHD = Path("/usr/sbin/sshd")
BOARD = "morello"
RELAY_IP, CLIENT_IP = "198.51.100.11", "198.51.100.12"
GW1_IP, GW2_IP, BOARD_IP = "192.168.1.10", "192.168.1.11", "192.168.1.12"
# Name -> (bed host, LAN address) of each gateway, in the order they attach the board.
GATEWAYS = {"gw1": ("home1", GW1_IP), "gw2": ("home1-2", GW2_IP)}
WEB_PORT, OTHER_PORT, GW2_WEB_PORT, JUMP_PORT = 8000, 8001, 8002, 2222


class NetnsSshd:
    """A real OpenSSH server in a host of the bed: its own host key, config and
    ``authorized_keys`` under ``directory``; root logs in by key only.

    Root's account is locked (``*`` in ``/etc/shadow``) on this machine, which sshd without
    PAM refuses even for keys; the server runs in a mount namespace of its own where a
    shadow file holding only root's entry, unlocked (``x``: no password matches it), is
    bound over the real one. Nothing outside that namespace changes.
    """

    def __init__(
        self, bed: Bed, host: str, directory: Path, address: str = "0.0.0.0", port: int = 22
    ) -> None:
        self.bed, self.host, self.directory = bed, host, directory
        self.address, self.port = address, port
        self.process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)
        self.authorized = directory / "authorized_keys"
        self.authorized.write_text("")
        self.log = directory / "sshd.log"
        self._new_host_key()

    @property
    def host_key(self) -> str:
        """The server's public host key, "type base64"."""
        kind, key = (self.directory / "host_key.pub").read_text().split()[:2]
        return f"{kind} {key}"

    def authorize(self, *lines: str) -> None:
        self.authorized.write_text("".join(f"{line.strip()}\n" for line in lines))

    def _new_host_key(self) -> None:
        for name in ("host_key", "host_key.pub"):
            (self.directory / name).unlink(missing_ok=True)
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.directory / "host_key")],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip

    def rekey(self) -> None:
        """A new host key (the old one kept for ``restore_key``), the server restarted
        with it when it runs."""
        if not (self.directory / "host_key.kept").exists():
            for name in ("host_key", "host_key.pub"):
                (self.directory / name).rename(self.directory / f"{name}.kept")
        self._restart(self._new_host_key)

    def restore_key(self) -> None:
        """The host key from before ``rekey`` again."""

        def restore() -> None:
            for name in ("host_key", "host_key.pub"):
                (self.directory / f"{name}.kept").replace(self.directory / name)

        self._restart(restore)

    def _restart(self, change: Callable[[], None]) -> None:
        running = self.process is not None
        self.stop()
        change()
        if running:
            self.start()

    def logins(self) -> list[str]:
        """The source address of each key login the server accepted, oldest first."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return re.findall(r"Accepted publickey for \S+ from (\S+) port", text)

    def start(self, seconds: float = 20) -> None:
        config = self.directory / "sshd_config"
        config.write_text(
            f"ListenAddress {self.address}\nPort {self.port}\n"
            f"HostKey {self.directory / 'host_key'}\nAuthorizedKeysFile {self.authorized}\n"
            "PidFile none\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            "AllowTcpForwarding yes\nMaxStartups 64:30:128\nLogLevel VERBOSE\n"
            "Subsystem sftp internal-sftp\n"
        )
        # Only root's entry, unlocked: no password hash of this machine is copied.
        shadow = self.directory / "shadow"
        shadow.unlink(missing_ok=True)
        with os.fdopen(os.open(shadow, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
            out.write("root:x:20000:0:99999:7:::\n")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation
        script = 'mount --bind "$0" /etc/shadow && exec "$@"'
        offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as log:
            self.process = self.bed.popen(
                self.host, "unshare", "--mount", "--", "sh", "-c", script, str(shadow),
                str(SSHD), "-D", "-e", "-f", str(config), stdout=log, stderr=log,
            )  # fmt: skip
        deadline = time.monotonic() + seconds
        while "Server listening" not in self.log.read_bytes()[offset:].decode(errors="replace"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"sshd in {self.host} did not start:\n{self.tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None:
            Bed.stop([self.process], grace=5)
            self.process = None

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


class AttachBed:
    """The whole bed of #16, up: nodes started, the board attached by both gateways and
    known to the client with both as routes. ``root`` holds every home and file."""

    def __init__(self, root: Path, prefix: str = "ta") -> None:
        self.bed = Bed(prefix, public=2, sites=1, hosts=3)
        self.root = root
        self.homes = {name: root / name for name in ("relay", *GATEWAYS, "client", "stranger")}
        self.nodes: dict[str, subprocess.Popen[bytes]] = {}
        self.servers: list[subprocess.Popen[bytes]] = []
        self.www = root / "www"
        self.board = NetnsSshd(self.bed, "home1-3", root / "board-sshd")
        self.jump: NetnsSshd | None = None
        self.jump_address = ""

    # -- the parts ------------------------------------------------------------------------

    def cli(self, name: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``p2prc ARGS`` as node ``name`` (relay, gw1, gw2, client), in its host."""
        return self.bed.cli(self.host_of(name), self.homes[name], *args, timeout=timeout)

    def json(self, name: str, *args: str, timeout: float = 60, check: bool = False) -> Any:
        return self.bed.json(self.host_of(name), self.homes[name], *args, timeout=timeout,
                             check=check)  # fmt: skip

    @staticmethod
    def host_of(name: str) -> str:
        hosts = {"relay": "pub1", "client": "pub2", "stranger": "pub2"}
        return hosts.get(name) or GATEWAYS[name][0]

    def key(self, name: str) -> str:
        """Node ``name``'s public key as an ``authorized_keys`` line."""
        return (self.homes[name] / "identity" / "id_ed25519.pub").read_text().strip()

    def logs(self) -> str:
        homes = Bed.logs(*self.homes.values(), lines=20)
        return f"{homes}\n--- board sshd ---\n{self.board.tail()}"

    def start_node(self, name: str) -> None:
        address = {"relay": RELAY_IP, "client": CLIENT_IP, "stranger": CLIENT_IP}.get(name)
        port = 8089 if name == "stranger" else 8088  # gateways: their default host
        self.nodes[name] = self.bed.start(self.host_of(name), self.homes[name], address, port)

    def kill_node(self, name: str) -> None:
        process = self.nodes.pop(name)
        process.kill()
        process.wait(timeout=10)

    def serve_web(self) -> None:
        """Web servers: the board's attached port and another of its ports, and one on the
        second gateway's host (neither of the last two is ever forwarded)."""
        self.www.mkdir(exist_ok=True)
        (self.www / "hello.txt").write_text("hello from the board\n")
        for host, port in (("home1-3", WEB_PORT), ("home1-3", OTHER_PORT),
                           ("home1-2", GW2_WEB_PORT)):  # fmt: skip
            web = [sys.executable, "-m", "http.server", str(port), "--directory", str(self.www)]
            self.servers.append(self.bed.popen(host, *web))

    def configure(self) -> None:
        quiet = {"gossip.lan_discovery": "false"}
        boot = {"bootstrap": f"{RELAY_IP}:8088"}
        self.bed.configure("pub1", self.homes["relay"], {**quiet, "name": "relay",
                           "relay.enabled": "true", "trust.mode": "open", "behind_nat": "false",
                           "gossip.advertise": RELAY_IP})  # fmt: skip
        relay_id = Bed.node_id(self.homes["relay"])
        for name, (host, ip) in GATEWAYS.items():
            self.bed.configure(host, self.homes[name], {**quiet, **boot, "name": name,
                               "gossip.advertise": ip, "relay.use": relay_id})  # fmt: skip
        for name in ("client", "stranger"):
            self.bed.configure("pub2", self.homes[name], {**quiet, **boot, "name": name,
                               "behind_nat": "false", "gossip.advertise": CLIENT_IP})  # fmt: skip

    def alive(self, name: str) -> set[str]:
        """The peers node ``name`` sees alive (with their API reachable when NAT'd)."""
        found = self.json(name, "peers", "list") or []
        reachable = [v for v in found if v.get("public_api") or not v.get("behind_nat")]
        return {v.get("name") for v in reachable if v.get("state") == "alive"}

    def wait_seen(self, seconds: float = 90) -> None:
        """Both gateways alive in the client's and the stranger's tables, their APIs on the
        relay; the client and the stranger in each gateway's (``--allow`` names them)."""

        def seen() -> bool:
            return all(set(GATEWAYS) <= self.alive(n) for n in ("client", "stranger")) and all(
                {"client", "stranger"} <= self.alive(gateway) for gateway in GATEWAYS
            )

        Bed.wait("the gateways and the clients to see each other", seen, seconds,
                 *self.homes.values())  # fmt: skip

    def attach(self, name: str, *extra: str) -> subprocess.CompletedProcess[str]:
        """``p2prc attach morello`` on gateway ``name``: the board's SSH, its web port, the
        client allowed."""
        return self.cli(name, "attach", BOARD, "--host", BOARD_IP, "--user", "root", "--port",
                        str(WEB_PORT), "--allow", "client", *extra, timeout=90)  # fmt: skip

    def routes(self, name: str = "client") -> list[str]:
        """The gateways node ``name`` knows for the board (their names)."""
        found = self.json(name, "attached") or []
        for host in found:
            if host.get("name") == BOARD:
                return [gateway.get("name") for gateway in host.get("gateways", [])]
        return []

    def wait_routes(self, expected: set[str], name: str = "client", seconds: float = 90) -> None:
        """Until node ``name`` knows the board through exactly the gateways ``expected``."""
        Bed.wait(f"{name} to know the board through {sorted(expected)}",
                 lambda: set(self.routes(name)) == expected, seconds,
                 *self.homes.values())  # fmt: skip

    def ssh(self, *command: str, name: str = "client",
            timeout: float = 90) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """``p2prc ssh morello -- COMMAND`` as node ``name``."""
        return self.cli(name, "ssh", BOARD, "--", *command, timeout=timeout)

    def start_jump(self) -> str:
        """The ``ssh -J`` baseline's jump host: an sshd on home1's loopback, published
        through the relay by the first gateway (``map-port``); its public ``host:port``."""
        self.jump = NetnsSshd(self.bed, "home1", self.root / "jump-sshd", "127.0.0.1",
                              JUMP_PORT)  # fmt: skip
        self.jump.authorize(self.key("client"))
        self.jump.start()
        mapped: dict[str, Any] = {}

        def published() -> bool:
            found = self.json("gw1", "map-port", str(JUMP_PORT))
            if isinstance(found, dict):
                mapped.update(found)
            return bool(mapped)

        Bed.wait("map-port of the jump sshd", published, 60, *self.homes.values())
        self.jump_address = str(mapped["EntireAddress"])
        return self.jump_address

    def jump_options(self) -> list[str]:
        """``ssh``/``scp`` options for the board through the jump host (``ssh -J`` spelled
        as its ProxyCommand, so scp takes it too): both host keys pinned
        (StrictHostKeyChecking=yes, as ``p2prc ssh`` does), the client node's own key."""
        if self.jump is None:
            raise AssertionError("start_jump first")
        host, port = self.jump_address.rsplit(":", 1)
        known = self.root / "jump_known_hosts"
        known.write_text(
            f"[{host}]:{port} {self.jump.host_key}\n{BOARD_IP} {self.board.host_key}\n"
        )
        key = self.homes["client"] / "identity" / "id_ed25519"
        options = ["-F", "none", "-i", str(key), "-o", "IdentitiesOnly=yes", "-o",
                   "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o",
                   f"UserKnownHostsFile={known}"]  # fmt: skip
        jump = f"ssh {' '.join(options)} -W %h:%p -p {port} root@{host}"
        return [*options, "-o", f"ProxyCommand={jump}"]

    def jump_command(self, *command: str) -> list[str]:
        """``ssh -J`` from pub2: COMMAND run on the board."""
        return self.bed.command("pub2", "ssh", *self.jump_options(), f"root@{BOARD_IP}",
                                *command)  # fmt: skip

    # -- the whole bed --------------------------------------------------------------------

    @contextlib.contextmanager
    def running(self, *, attached: bool = True) -> Iterator[AttachBed]:
        """Bed up, nodes started, the board's sshd and web servers running; with
        ``attached``, the board attached by both gateways and known to the client."""
        if not SSHD.exists() or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
            import pytest

            pytest.skip("needs OpenSSH (sshd, ssh, ssh-keygen)")
        with self.bed.running():
            try:
                self.configure()
                # The board lets in the client and the stranger (only a gateway's allow list
                # keeps the stranger out) and the gateways (their specs).
                self.board.authorize(*(self.key(n) for n in ("client", "stranger", *GATEWAYS)))
                self.board.start()
                self.serve_web()
                for name in self.homes:
                    self.start_node(name)
                self.wait_seen()
                if attached:
                    first = self.attach("gw1")
                    assert first.returncode == 0, f"{first.stdout}{first.stderr}\n{self.logs()}"
                    second = self.attach("gw2", "--same-as", BOARD)
                    assert second.returncode == 0, f"{second.stdout}{second.stderr}\n{self.logs()}"
                    self.wait_routes(set(GATEWAYS))
                yield self
            finally:
                Bed.stop([*self.nodes.values(), *self.servers])
                self.board.stop()
                if self.jump is not None:
                    self.jump.stop()
