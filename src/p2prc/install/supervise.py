"""Keep a node running where there is no user systemd: ``python -m p2prc.install.supervise``.

``start HOME`` detaches (double fork, new session, stdin from /dev/null, output to
``HOME/node.log``), records its pid in ``HOME/supervisor.pid`` and runs
``python -m p2prc --home HOME start``, starting it again when it exits, after 1 s, then
twice as long each time up to 60 s (back to 1 s once it ran a minute). ``stop HOME`` sends
the supervisor SIGTERM (it stops the node, waits for it, removes the pid file), then SIGKILL
after 20 s. ``status HOME`` prints the pid, or exits 1. Only a pid whose command line is
this module's is ever signalled.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

__all__ = ["main"]

PID_FILE = "supervisor.pid"
LOG_FILE = "node.log"
_MAX_LOG = 10 * 1024 * 1024
_MAX_BACKOFF = 60.0
_STEADY = 60.0
_STOP_WAIT = 20.0


def _pid_of(home: Path) -> int | None:
    """The recorded supervisor's pid when that process runs and is this module."""
    try:
        pid = int((home / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return pid if b"p2prc.install.supervise" in cmdline else None


def _start(home: Path) -> int:
    running = _pid_of(home)
    if running is not None:
        print(json.dumps({"pid": running, "started": False}))  # noqa: T201
        return 0
    home.mkdir(parents=True, exist_ok=True)
    read, write = os.pipe()
    first = os.fork()
    if first > 0:  # the caller's process: wait for the supervisor's pid, then return
        os.close(write)
        os.waitpid(first, 0)
        with os.fdopen(read) as pipe:
            pid = pipe.read().strip()
        if not pid.isdigit():
            print("the supervisor did not start; see " + str(home / LOG_FILE), file=sys.stderr)  # noqa: T201
            return 1
        print(json.dumps({"pid": int(pid), "started": True}))  # noqa: T201
        return 0
    os.close(read)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    log = home / LOG_FILE
    with contextlib.suppress(OSError):
        if log.stat().st_size > _MAX_LOG:
            log.replace(log.with_suffix(".log.1"))
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.close(null)
    pid_file = home / PID_FILE
    pid_file.write_text(f"{os.getpid()}\n")
    os.write(write, str(os.getpid()).encode())
    os.close(write)
    try:
        _supervise(home)
    finally:
        with contextlib.suppress(OSError):
            if pid_file.read_text().strip() == str(os.getpid()):
                pid_file.unlink()
    os._exit(0)


def _supervise(home: Path) -> None:
    stopping = threading.Event()
    child: list[subprocess.Popen[bytes]] = []

    def stop(signum: int, frame: object) -> None:
        stopping.set()
        if child and child[0].poll() is None:
            child[0].send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    backoff = 1.0
    while not stopping.is_set():
        began = time.monotonic()
        command = [sys.executable, "-m", "p2prc", "--home", str(home), "start"]
        child[:] = [subprocess.Popen(command, stdin=subprocess.DEVNULL)]
        code = child[0].wait()
        if stopping.is_set():
            break
        backoff = 1.0 if time.monotonic() - began > _STEADY else backoff
        print(f"supervisor: the node exited ({code}); again in {backoff:.0f} s", flush=True)  # noqa: T201
        stopping.wait(backoff)
        backoff = min(backoff * 2, _MAX_BACKOFF)
    if child and child[0].poll() is None:
        try:
            child[0].wait(timeout=_STOP_WAIT)
        except subprocess.TimeoutExpired:
            child[0].kill()
            child[0].wait()


def _stop(home: Path) -> int:
    pid = _pid_of(home)
    if pid is None:
        print(json.dumps({"pid": None, "stopped": False}))  # noqa: T201
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + _STOP_WAIT
    while time.monotonic() < deadline and _pid_of(home) == pid:
        time.sleep(0.1)
    if _pid_of(home) == pid:
        os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            (home / PID_FILE).unlink()
    print(json.dumps({"pid": pid, "stopped": True}))  # noqa: T201
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in ("start", "stop", "status"):
        print("usage: python -m p2prc.install.supervise start|stop|status HOME", file=sys.stderr)  # noqa: T201
        return 2
    home = Path(args[1]).expanduser().absolute()
    if args[0] == "start":
        return _start(home)
    if args[0] == "stop":
        return _stop(home)
    pid = _pid_of(home)
    print(json.dumps({"pid": pid}))  # noqa: T201
    return 0 if pid is not None else 1


if __name__ == "__main__":
    sys.exit(main())
