"""What ``install-node`` learns of a machine before it changes anything there (sans-IO).

``PROBE`` is a fixed Python script the remote interpreter reads on stdin, with the
install directory as its one argument; it prints one JSON line, which ``parse_probe``
checks field by field (the machine is not trusted).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["PROBE", "Probe", "parse_probe", "parse_version"]

MIN_PYTHON = (3, 11)
_MAX_ANSWER = 16_384

PROBE = r"""
import json, os, platform, shutil, subprocess, sys
d = os.path.abspath(os.path.expanduser(sys.argv[1]))
p = d
while not os.path.isdir(p):
    p = os.path.dirname(p)
venv_ok, venv_why = True, ""
try:
    import venv, ensurepip
    ensurepip.version()
except Exception as exc:
    venv_ok, venv_why = False, repr(exc)[:200]
def full(info):
    v = "%d.%d.%d" % (info.major, info.minor, info.micro)
    return v if info.releaselevel == "final" else v + info.releaselevel[0] + str(info.serial)
systemd = False
if shutil.which("systemctl") and os.environ.get("XDG_RUNTIME_DIR"):
    try:
        systemd = subprocess.run(["systemctl", "--user", "show-environment"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=5).returncode == 0
    except Exception:
        systemd = False
libc, libc_version = platform.libc_ver()
print(json.dumps({
    "version": platform.python_version(),
    "implementation": sys.implementation.name,
    "abiflags": getattr(sys, "abiflags", ""),
    "machine": platform.machine(),
    "libc": libc, "libc_version": libc_version,
    "dir": d, "dir_exists": os.path.isdir(d),
    "installed": os.path.exists(os.path.join(d, "venv", "bin", "python")),
    "free": shutil.disk_usage(p).free,
    "venv": venv_ok, "venv_why": venv_why,
    "systemd": systemd,
    "home": os.path.expanduser("~"),
    "markers": {
        "implementation_name": sys.implementation.name,
        "implementation_version": full(sys.implementation.version),
        "os_name": os.name,
        "platform_machine": platform.machine(),
        "platform_release": platform.release(),
        "platform_system": platform.system(),
        "platform_version": platform.version(),
        "python_full_version": platform.python_version(),
        "platform_python_implementation": platform.python_implementation(),
        "python_version": ".".join(platform.python_version_tuple()[:2]),
        "sys_platform": sys.platform,
    },
}))
"""


def parse_version(text: str) -> tuple[int, int] | None:
    """``(3, 11)`` from ``python3 --version``'s answer, None when it is none."""
    match = re.search(r"Python (\d{1,3})\.(\d{1,4})", text[:200])
    return (int(match[1]), int(match[2])) if match else None


@dataclass(frozen=True)
class Probe:
    """The probe's answer, checked."""

    raw: dict[str, Any]
    directory: str
    exists: bool
    installed: bool
    free: int
    venv: bool
    venv_why: str
    systemd: bool
    home: str


def parse_probe(text: str) -> Probe:
    """The probe's JSON line; ``ValueError`` for anything else (the machine is untrusted)."""
    if len(text) > _MAX_ANSWER:
        raise ValueError("the probe's answer is too long")
    lines = [line for line in text.splitlines() if line.startswith("{")]
    if not lines:
        raise ValueError("the probe printed no answer")
    try:
        data = json.loads(lines[-1])
    except ValueError:
        raise ValueError("the probe's answer is not JSON") from None
    if not isinstance(data, dict):
        raise ValueError("the probe's answer is not a map")

    def typed(key: str, kind: type) -> Any:
        value = data.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"the probe's {key!r} is not a {kind.__name__}")
        if isinstance(value, str) and len(value) > 4096:
            raise ValueError(f"the probe's {key!r} is too long")
        return value

    directory = typed("dir", str)
    if not directory.startswith("/") or "\n" in directory or "\0" in directory:
        raise ValueError(f"the probe's directory {directory!r} is not an absolute path")
    return Probe(
        raw=data,
        directory=directory,
        exists=typed("dir_exists", bool),
        installed=typed("installed", bool),
        free=max(0, typed("free", int)),
        venv=typed("venv", bool),
        venv_why=typed("venv_why", str)[:200],
        systemd=typed("systemd", bool),
        home=typed("home", str),
    )
