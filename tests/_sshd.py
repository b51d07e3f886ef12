"""A real OpenSSH server for tests: ``with Sshd() as sshd: ...``.

It runs ``/usr/sbin/sshd -D -e`` with a config of its own in a temp dir: a fresh ed25519 host
key, keys-only login through an ``authorized_keys`` file the test appends to (``authorize``),
and a pid file. ``netns`` runs it inside that network namespace (``ip netns exec``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

SSHD = "/usr/sbin/sshd"


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class Sshd:
    """One sshd process on ``host:port`` (a free port when ``port`` is 0)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        netns: str | None = None,
        directory: Path | None = None,
        extra_config: str = "",
    ) -> None:
        if netns is not None and port == 0:
            raise ValueError("give a port with netns (a free port is found on this host only)")
        self.host = host
        self.port = port or _free_port(host)
        self.netns = netns
        self._own_dir = directory is None
        self.directory = directory or Path(tempfile.mkdtemp(prefix="p2prc-sshd-"))
        self.authorized_keys = self.directory / "authorized_keys"
        self.pid_file = self.directory / "sshd.pid"
        self.log_file = self.directory / "sshd.log"
        self._extra = extra_config
        self._process: subprocess.Popen[bytes] | None = None
        self._log: object = None
        self.host_key = ""

    # -- lifecycle -----------------------------------------------------------------------

    def start(self, timeout: float = 15.0) -> Sshd:
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)
        self.directory.mkdir(parents=True, exist_ok=True)
        key = self.directory / "ssh_host_ed25519_key"
        if not key.exists():
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                check=True,
                capture_output=True,
                timeout=30,
            )
        self.host_key = " ".join(key.with_suffix(".pub").read_text().split()[:2])
        self.authorized_keys.touch()
        config = self.directory / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"ListenAddress {self._listen()}",
                    f"HostKey {key}",
                    f"AuthorizedKeysFile {self.authorized_keys}",
                    f"PidFile {self.pid_file}",
                    "PermitRootLogin prohibit-password",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "StrictModes no",
                    "LogLevel VERBOSE",
                    # Real hosts serve SFTP (scp and Ansible use it); sshd refuses a second line.
                    "" if "Subsystem" in self._extra else "Subsystem sftp internal-sftp",
                    self._extra,
                    "",
                ]
            )
        )
        command = [SSHD, "-D", "-e", "-f", str(config)]
        if self.netns is not None:
            command = ["ip", "netns", "exec", self.netns, *command]
        log = self.log_file.open("ab")
        self._log = log
        self._process = subprocess.Popen(command, stdout=log, stderr=log)
        self._wait_ready(timeout)
        return self

    def _listen(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def _wait_ready(self, timeout: float) -> None:
        assert self._process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"sshd exited: {self.log()}")
            if self._banner():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"sshd did not answer on {self.host}:{self.port}: {self.log()}")

    def _banner(self) -> bool:
        command = [
            "python3",
            "-c",
            "import socket,sys;s=socket.create_connection((sys.argv[1],int(sys.argv[2])),1);"
            "s.settimeout(1);sys.exit(0 if s.recv(4).startswith(b'SSH-') else 1)",
            self.host,
            str(self.port),
        ]
        if self.netns is not None:
            command = ["ip", "netns", "exec", self.netns, *command]
            result = subprocess.run(command, capture_output=True, timeout=10, check=False)
            return result.returncode == 0
        try:
            with socket.create_connection((self.host, self.port), timeout=1) as sock:
                sock.settimeout(1)
                return sock.recv(4).startswith(b"SSH-")
        except OSError:
            return False

    def authorize(self, public_key_line: str) -> None:
        """Let the key (an ``authorized_keys`` line) log in as any user."""
        line = public_key_line.strip()
        if "\n" in line or not line:
            raise ValueError("one key line")
        with self.authorized_keys.open("a") as handle:
            handle.write(line + "\n")

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def stop(self) -> None:
        """Stop this sshd (its own pid only; the listener and its sessions)."""
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        self._process = None
        log = self._log
        if log is not None and hasattr(log, "close"):
            log.close()
        self._log = None

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            for path in sorted(self.directory.rglob("*"), reverse=True):
                if path.is_dir():
                    path.rmdir()
                else:
                    path.unlink(missing_ok=True)
            os.rmdir(self.directory)

    def __enter__(self) -> Sshd:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()
