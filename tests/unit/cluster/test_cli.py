"""``p2prc cluster ...``: bad input is one line before any call; the output against a fake
service (create with progress, list, show, scale, client, rm, and --json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

import p2prc.cli._cluster as cli_cluster
from p2prc.api import create_app
from p2prc.cli import main
from p2prc.client import AsyncClient
from tests.conftest import FakeNode
from tests.unit.cluster._fake import FakeClusters


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["create", "--workers", "65"], "workers: Input should be less than or equal to 64"),
        (["create", "--workers", "-1"], "workers"),
        (["create", "--memory", "lots"], "worker.memory"),
        (["create", "--cpus", "0"], "worker.cpus"),
        (["create", "--threads", "0"], "threads"),
        (["create", "--name", "a b"], "name"),
        (["scale", "lab", "100"], "workers: Input should be less than or equal to 64"),
    ],
)
def test_bad_input_fails_in_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, args: list[str], message: str
) -> None:
    code, _, err = _run(capsys, "--home", str(tmp_path / "home"), "cluster", *args)
    assert code == 1
    assert err.startswith("InvalidRequest: ")
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "home").exists()  # no node was asked for anything


def test_without_a_node_it_says_how_to_start_one(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = _run(capsys, "--home", str(tmp_path / "h"), "cluster", "list")
    assert code == 1
    assert "start one with 'p2prc start'" in err


@pytest.fixture
def service(fake_node: FakeNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeClusters:
    fake = FakeClusters(tmp_path)
    setattr(fake_node, "clusters", fake)  # noqa: B010 (the node's hook, faked)
    app = create_app(fake_node)

    def client(**kwargs: Any) -> AsyncClient:
        transport = httpx.ASGITransport(app=app)
        return AsyncClient(
            "http://node.test",
            home=tmp_path / "x",
            identity=fake_node.identity,
            transport=transport,
        )

    monkeypatch.setattr(cli_cluster, "AsyncClient", client)
    return fake


def test_create_show_scale_client_rm(
    capsys: pytest.CaptureFixture[str], service: FakeClusters
) -> None:
    code, out, err = _run(capsys, "cluster", "create", "--workers", "2", "--name", "lab")
    assert code == 0, err
    assert "[p2prc] worker starting" in err
    view = next(iter(service.clusters.values()))
    assert service.calls[0] == ("create", "2")
    assert f"cluster lab ({view.id})  running" in out
    assert view.scheduler_address in out
    assert view.dashboard_link in out
    assert view.security is not None
    assert view.security.key_file in out
    assert "from distributed import Client, Security; client = Client(" in out

    code, out, _ = _run(capsys, "cluster", "list")
    assert view.id in out
    assert "running" in out

    code, out, _ = _run(capsys, "cluster", "scale", "lab", "3")
    assert out.strip() == "lab: 3 workers"

    code, out, _ = _run(capsys, "--json", "cluster", "show", "lab")
    assert len(json.loads(out)["workers"]) == 3

    code, out, _ = _run(capsys, "cluster", "client", "lab")
    line = out.strip()
    assert line.startswith("from distributed import Client, Security; ")
    assert f"Client({view.scheduler_address!r}, security=Security(tls_ca_file=" in line
    assert "require_encryption=True))" in line
    compile(line, "<client line>", "exec")

    code, out, _ = _run(capsys, "cluster", "rm", "lab")
    assert out.strip() == "lab closed"
    code, out, err = _run(capsys, "cluster", "show", "nope")
    assert code == 1
    assert err.startswith("ClusterNotFound: ")


def test_json_create_is_one_object(
    capsys: pytest.CaptureFixture[str], service: FakeClusters
) -> None:
    code, out, _ = _run(capsys, "--json", "cluster", "create", "-n", "1", "--cpus", "2")
    assert code == 0
    data = json.loads(out)
    assert data["state"] == "running"
    assert len(data["workers"]) == 1


def test_a_failed_create_is_one_line(
    capsys: pytest.CaptureFixture[str], service: FakeClusters
) -> None:
    service.fail_create = "no peer could take worker 1: peer-a: not trusted"
    code, _, err = _run(capsys, "cluster", "create", "--workers", "1")
    assert code == 1
    assert err.strip().splitlines()[-1] == (
        "ClusterError: no peer could take worker 1: peer-a: not trusted"
    )
