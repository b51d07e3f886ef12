"""The test helper ``tests/_sshd.py`` runs a real sshd that takes the keys it is given."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests._sshd import SSHD, Sshd

pytestmark = pytest.mark.skipif(
    not Path(SSHD).exists() or shutil.which("ssh") is None, reason="needs OpenSSH"
)


def _ssh(key: Path, port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "ssh", "-i", str(key), "-p", str(port), "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "root@127.0.0.1", "echo", "hello",
        ],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def test_sshd_takes_an_authorized_key_only(tmp_path: Path) -> None:
    key = tmp_path / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    with Sshd() as sshd:
        assert sshd.host_key.startswith("ssh-ed25519 AAAA")
        assert _ssh(key, sshd.port).returncode != 0  # not authorized yet
        sshd.authorize(key.with_suffix(".pub").read_text())
        result = _ssh(key, sshd.port)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "hello"
        pid = sshd.pid
        assert pid is not None
    assert sshd.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
