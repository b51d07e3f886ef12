"""A Docker daemon inside one of the test bed's namespaces, as its README shows."""

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

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
