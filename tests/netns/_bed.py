"""The shared test bed for the netns tests: ``Bed`` (the namespaces, nodes and CLI calls in
them) and a Docker daemon inside one of its namespaces, as the bed's README shows."""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from p2prc.config import Home, set_value
from p2prc.identity import Identity
from p2prc.node import init_home

REPO = Path(__file__).resolve().parents[2]
TESTBED = REPO.parent / "shared" / "testbed" / "netns-nat.sh"


class Bed:
    """``netns-nat.sh`` under a prefix of its own (so several beds coexist), and the
    operations every netns test repeats: the CLI of a node home in a host, a node started
    there with its log in ``home/node.log``, bounded waits that show the logs on failure.

    Hosts are named as the script names them without the prefix: ``pub1``, ``home1``,
    ``home1-2`` ...
    """

    def __init__(
        self, prefix: str, *, public: int = 3, sites: int = 1, hosts: int = 1, nat: str = "easy"
    ) -> None:
        self.prefix = prefix
        self.env = {**os.environ, "TB_PREFIX": prefix, "TB_PUBLIC": str(public),
                    "TB_SITES": str(sites), "TB_HOSTS": str(hosts), "TB_NAT": nat}  # fmt: skip

    def ns(self, host: str) -> str:
        """The namespace of ``host``."""
        return f"{self.prefix}-{host}"

    def script(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``netns-nat.sh ARGS`` for this bed."""
        return subprocess.run(
            ["bash", str(TESTBED), *args], env=self.env, capture_output=True, text=True,
            timeout=120, check=False,
        )  # fmt: skip

    @contextlib.contextmanager
    def running(self) -> Iterator["Bed"]:
        """The bed, up (skipping the test where it cannot be), and down afterwards."""
        if os.geteuid() != 0 or shutil.which("ip") is None:
            pytest.skip("needs root and iproute2")
        if not TESTBED.is_file():
            pytest.skip(f"no test bed at {TESTBED}")
        up = self.script("up")
        if up.returncode != 0:
            pytest.skip(f"test bed did not come up: {up.stderr.strip()[-300:]}")
        try:
            yield self
        finally:
            self.script("down")

    def command(self, host: str, *args: str, home: Path | None = None,
                env: Mapping[str, str] | None = None) -> list[str]:  # fmt: skip
        """``args`` run in ``host``, with ``P2PRC_HOME=home`` and ``env`` set."""
        extra = {**({"P2PRC_HOME": str(home)} if home is not None else {}), **(env or {})}
        settings = [f"{key}={value}" for key, value in extra.items()]
        return ["ip", "netns", "exec", self.ns(host), *(["env", *settings] if settings else []),
                *args]  # fmt: skip

    def run(self, host: str, *args: str, timeout: float = 60,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """``args`` in ``host``, to completion."""
        return subprocess.run(self.command(host, *args, env=env), capture_output=True,
                              text=True, timeout=timeout, check=False)  # fmt: skip

    def popen(self, host: str, *args: str, env: Mapping[str, str] | None = None,
              **kwargs: Any) -> "subprocess.Popen[Any]":  # fmt: skip
        """``args`` in ``host``, in the background (output discarded unless told)."""
        kwargs.setdefault("stdout", subprocess.DEVNULL)
        kwargs.setdefault("stderr", subprocess.DEVNULL)
        return subprocess.Popen(self.command(host, *args, env=env), **kwargs)

    def python(self, host: str, code: str, *args: object,
               timeout: float = 60) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """A Python snippet in ``host`` (this checkout importable), to completion."""
        return self.run(host, sys.executable, "-c", code, *map(str, args), timeout=timeout,
                        env={"PYTHONPATH": str(REPO)})  # fmt: skip

    def output(self, host: str, code: str, *args: object) -> str:
        """What the snippet printed, or the end of its error."""
        done = self.python(host, code, *args)
        return done.stdout.strip() or done.stderr.strip()[-300:]

    def serve(self, host: str, code: str, *args: object) -> "subprocess.Popen[bytes]":
        """A Python snippet running in the background in ``host`` (a server)."""
        return self.popen(host, sys.executable, "-c", code, *map(str, args),
                          env={"PYTHONPATH": str(REPO)})  # fmt: skip

    def cli(self, host: str, home: Path, *args: str, timeout: float = 60,
            check: bool = False) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """``p2prc ARGS`` for the node home ``home`` in ``host``; ``check`` fails the test
        on a non-zero exit, naming the call and its error."""
        command = self.command(host, sys.executable, "-m", "p2prc", *args, home=home)
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                check=False)  # fmt: skip
        if check and result.returncode != 0:
            raise AssertionError(f"{args}: {result.stdout}\n{result.stderr}")
        return result

    def json(
        self, host: str, home: Path, *args: str, timeout: float = 60, check: bool = False
    ) -> Any:
        """``p2prc --json ARGS`` parsed, or None when it failed (``check``: fail the test)."""
        result = self.cli(host, home, "--json", *args, timeout=timeout, check=check)
        return json.loads(result.stdout) if result.returncode == 0 else None

    @staticmethod
    def configure(host: str, home: Path, settings: Mapping[str, str]) -> None:
        """What ``p2prc config set`` does for each setting (the home made first), in this
        process: files only, the same in any namespace, and a CLI start less per key (the
        ``host`` is kept for the reader)."""
        del host
        node_home = Home(home)
        init_home(node_home)
        for key, value in settings.items():
            set_value(node_home, key, value)

    def start(self, host: str, home: Path, address: str | None, port: int = 8088,
              *args: str, cpu: int | None = None) -> "subprocess.Popen[bytes]":  # fmt: skip
        """A node in ``host`` listening on ``address:port`` (None: the node's default host,
        every address), on CPU ``cpu`` alone when given; its log goes to ``home/node.log``
        (shown on failures)."""
        home.mkdir(parents=True, exist_ok=True)
        where = ["--host", address] if address is not None else []
        pinned = ["taskset", "-c", str(cpu)] if cpu is not None else []
        command = self.command(host, *pinned, sys.executable, "-m", "p2prc", "--debug",
                               "start", *where, "--port", str(port), *args,
                               home=home)  # fmt: skip
        with (home / "node.log").open("ab") as log:
            return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)

    @staticmethod
    def site_cpu(site: int) -> int | None:
        """A CPU of its own for the hosts of NAT site ``site`` (1, 2, ...), or None on a
        single CPU. The bed's links have no delay: a packet's whole way through both
        routers, and the reset that answers it, runs on the sending CPU at once, so two
        sites whose nodes share one CPU never have SYNs in flight at the same moment and
        hole punching against the routers' resets cannot succeed; real sites are separate
        machines with a real round trip between them."""
        cpus = sorted(os.sched_getaffinity(0))
        return cpus[(site - 1) % len(cpus)] if len(cpus) > 1 else None

    @staticmethod
    def node_id(home: Path) -> str:
        """The node id of the node home ``home``."""
        return Identity.load(Home(home).identity_dir).node_id

    @staticmethod
    def logs(*homes: Path, lines: int = 40) -> str:
        """The last lines of each home's node log."""
        parts = []
        for home in homes:
            log = home / "node.log"
            text = log.read_text(errors="replace").splitlines() if log.exists() else []
            # httpx's transport logs each request in a dozen DEBUG lines: not the story.
            text = [line for line in text if " DEBUG httpcore." not in line][-lines:]
            parts.append(f"--- {home.name} ---\n" + "\n".join(text))
        return "\n".join(parts)

    @staticmethod
    def wait(what: str, check: Callable[[], bool], seconds: float, *homes: Path) -> None:
        """Poll ``check`` every 0.5 s for at most ``seconds``; on timeout fail with the logs."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what}\n{Bed.logs(*homes)}")

    @staticmethod
    def stop(processes: Iterable["subprocess.Popen[Any] | None"], grace: float = 15) -> None:
        """SIGTERM every process, then wait for each (SIGKILL after ``grace`` seconds)."""
        started = [process for process in processes if process is not None]
        for process in started:
            process.terminate()
        for process in started:
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


CGROUPS = ("cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids")
# `ip netns exec` remounts /sys, hiding the cgroup mounts dockerd needs; they are mounted
# again in that command's own mount namespace (cgroup2 on a cgroup v2 host).
_V1 = "".join(
    f"mkdir -p /sys/fs/cgroup/{c}; mount -t cgroup -o {o} cgroup /sys/fs/cgroup/{c}\n"
    for c, o in [(c, c) for c in CGROUPS] + [("systemd", "none,name=systemd")]
)
MOUNT_CGROUPS = (
    "mount -t cgroup2 cgroup2 /sys/fs/cgroup\n"
    if Path("/sys/fs/cgroup/cgroup.controllers").exists()
    else "mount -t tmpfs -o mode=755 cgroup /sys/fs/cgroup\n" + _V1
)


class NamespaceDocker:
    """dockerd in namespace ``ns`` with its own socket, data root and cgroup parent."""

    def __init__(self, ns: str, bip: str = "172.31.1.1/24") -> None:
        self.ns, self.bip = ns, bip
        self.run_dir = Path("/run/netns-docker") / ns
        self.data_dir = Path("/var/lib/netns-docker") / ns
        self.socket = f"unix://{self.run_dir}/docker.sock"

    def docker(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """The docker CLI against this daemon."""
        return subprocess.run(
            ["docker", "-H", self.socket, *args], capture_output=True, text=True,
            timeout=timeout, check=False,
        )  # fmt: skip

    def log(self) -> str:
        path = self.run_dir / "dockerd.log"
        return path.read_text(errors="replace")[-600:] if path.exists() else ""

    @contextlib.contextmanager
    def running(self, images: tuple[str, ...] = ()) -> Iterator["NamespaceDocker"]:
        """The daemon, up and holding ``images`` (copied from the host's daemon)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        script = (
            f"set -e\n{MOUNT_CGROUPS}"
            f"exec dockerd --host {self.socket} --data-root {self.data_dir} "
            f"--exec-root {self.run_dir}/exec --pidfile {self.run_dir}/dockerd.pid "
            f"--bip {self.bip} --cgroup-parent /{self.ns}-docker\n"
        )
        with (self.run_dir / "dockerd.log").open("ab") as log:
            dockerd = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, "sh", "-c", script], stdout=log, stderr=log
            )
        try:
            deadline = time.monotonic() + 60
            while self.docker("info", timeout=10).returncode != 0:
                if dockerd.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"dockerd in {self.ns} did not come up:\n{self.log()}")
                time.sleep(0.5)
            for image in images:
                self._load(image)
            yield self
        finally:
            self._stop(dockerd)

    def _load(self, image: str, attempts: int = 3) -> None:
        """Copy ``image`` from the host's daemon; a load the fresh daemon drops is retried."""
        for attempt in range(1, attempts + 1):
            with subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE) as save:
                loaded = subprocess.run(
                    ["docker", "-H", self.socket, "load", "-q"], stdin=save.stdout,
                    capture_output=True, text=True, timeout=300, check=False,
                )  # fmt: skip
            if loaded.returncode == 0:
                return
            if attempt == attempts:
                raise RuntimeError(f"loading {image} into {self.ns}: {loaded.stderr}")
            time.sleep(2)

    def _stop(self, dockerd: "subprocess.Popen[bytes]") -> None:
        """Every container, then the daemon (by its pid), its files and its cgroups."""
        listed = self.docker("ps", "-aq")
        if listed.returncode == 0 and listed.stdout.split():
            self.docker("rm", "-f", *listed.stdout.split(), timeout=120)
        dockerd.terminate()
        try:
            dockerd.wait(timeout=30)
        except subprocess.TimeoutExpired:
            dockerd.kill()
            dockerd.wait(timeout=10)
        shutil.rmtree(self.data_dir, ignore_errors=True)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        for parent in (self.data_dir.parent, self.run_dir.parent):
            with contextlib.suppress(OSError):
                parent.rmdir()  # when no other daemon of the kind is left
        # The daemon's cgroup parent, made in the host's own hierarchies; empty by now.
        for parent in Path("/sys/fs/cgroup").glob(f"*/{self.ns}-docker"):
            for cgroup in sorted(parent.glob("**/"), key=lambda path: -len(path.parts)):
                with contextlib.suppress(OSError):
                    cgroup.rmdir()
