"""The attach commands' own checks (before any call) and the attached hosts' table."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from p2prc.attach.models import AttachedGateway, AttachedHost, AttachedLocal
from p2prc.cli import main
from p2prc.cli._attach import attached_table

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICseTfn0fT/bt2pdLk2DoidFbZcTCwfsvb7TXblxDSTw"


def _run(capsys: pytest.CaptureFixture[str], tmp_path: Path, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exited:
        main(["--home", str(tmp_path / "home"), *args])
    code = exited.value.code
    return int(code) if isinstance(code, int) else 1, capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["attach", "x"], "give --host to attach a host"),
        (["attach", "x", "--port", "80", "--allow", "a"], "give --host to attach a host"),
        (["attach", "x", "--host", "10.0.0.2", "--deny", "a"], "without --host"),
        (["attach", "x", "--host", "10.0.0.2", "--port", "0"], "out of range"),
        (["attach", "x", "--host", "10.0.0.2", "--ssh-port", "65536"], "out of range"),
        (["attach", "bad/name", "--host", "10.0.0.2"], "not an attached host name"),
        (["attach", "bad/name", "--allow", "a"], "not an attached host name"),
        (["attach", "x", "--host", "10.0.0.2", "--user", "a b"], "POSIX user name"),
        (["attach", "x", "--host", "10.0.0.2", "--same-as", "no/such"], "same_as"),
        (["detach", "bad/name"], "not an attached host name"),
    ],
)
def test_bad_arguments_fail_before_any_call(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, args: list[str], message: str
) -> None:
    code, err = _run(capsys, tmp_path, *args)
    assert code != 0
    assert message in err
    assert "not running" not in err  # refused before looking for a node


def test_table_shows_gateways_specs_and_the_own_row() -> None:
    host = AttachedHost(
        name="morello",
        host_key=KEY,
        ssh_port=22,
        user="pi",
        ports=[8080],
        cores=4,
        memory=8 << 30,
        arch="aarch64c",
        os="FreeBSD",
        gateways=[
            AttachedGateway(node_id="a" * 32, name="gw", endpoint="", state="self", version=1),
            AttachedGateway(node_id="b" * 32, name="lap", endpoint="", state="dead", version=2),
        ],
        conflicts=[
            AttachedGateway(node_id="c" * 32, name="evil", endpoint="", state="alive", version=3)
        ],
        local=AttachedLocal(address="192.168.0.10", allow=[], created=0.0),
    )
    console = Console(width=300, record=True)
    console.print(attached_table([host]))
    text = console.export_text()
    assert "pi@22" in text
    assert "aarch64c FreeBSD 4 cores 8.0 GiB" in text
    assert "ssh-ed25519 SHA256:" in text
    assert "gw (self), lap (dead); conflict: evil" in text
    assert "192.168.0.10" in text
    assert "owner only" in text
