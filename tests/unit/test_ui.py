"""The dashboard's login (one-time token, session cookie) and its read-only JSON."""

import asyncio
import json
import webbrowser
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from p2prc import Home, Identity, Node, NodeConfig, init_home
from p2prc.api import create_app
from p2prc.api.ui import COOKIE, MAX_SESSIONS, MAX_TOKENS, UiLogin, UiSessions, overview
from p2prc.cli import main
from p2prc.client import AsyncClient
from p2prc.config import RelayConfig, TrustConfig
from p2prc.errors import AuthError, OwnerOnly
from p2prc.models import CreateContainer
from tests.conftest import FakeNode


@pytest.fixture
def transport(fake_node: FakeNode) -> httpx.ASGITransport:
    return httpx.ASGITransport(app=create_app(fake_node))


@pytest.fixture
async def owner(
    fake_node: FakeNode, transport: httpx.ASGITransport, tmp_path: Path
) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(
        "http://node.test",
        home=tmp_path / "none",
        identity=fake_node.identity,
        transport=transport,
    ) as client:
        yield client


@pytest.fixture
async def browser(transport: httpx.ASGITransport) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=transport, base_url="http://node.test") as http:
        yield http


async def _login_path(client: AsyncClient) -> str:
    login = await client._call("POST", "/ui/login-token", UiLogin)
    assert login.path.startswith("/ui/login?token=")
    assert 0 < login.expires_in <= 60
    return login.path


async def test_data_needs_a_session(browser: httpx.AsyncClient) -> None:
    answer = await browser.get("/ui/api/overview")
    assert answer.status_code == 401
    assert answer.json()["error"]["code"] == "unauthenticated"
    assert "p2prc ui" in answer.json()["error"]["message"]
    browser.cookies.set(COOKIE, "forged", domain="node.test", path="/ui")
    assert (await browser.get("/ui/api/overview")).status_code == 401


async def test_token_needs_the_owners_signature(
    browser: httpx.AsyncClient, transport: httpx.ASGITransport, tmp_path: Path
) -> None:
    assert (await browser.post("/ui/login-token")).status_code == 401
    async with AsyncClient(
        "http://node.test",
        home=tmp_path / "none",
        identity=Identity.generate(),
        transport=transport,
    ) as stranger:
        with pytest.raises((OwnerOnly, AuthError)):
            await stranger._call("POST", "/ui/login-token", UiLogin)


async def test_token_works_once_and_sets_a_strict_cookie(
    owner: AsyncClient, browser: httpx.AsyncClient, fake_node: FakeNode
) -> None:
    await owner.create_container(CreateContainer(name="web"))
    path = await _login_path(owner)
    answer = await browser.get(path)
    assert answer.status_code == 303
    assert answer.headers["location"] == "/ui/"
    cookie = answer.headers["set-cookie"].lower()
    assert f"{COOKIE}=" in cookie
    for part in ("httponly", "samesite=strict", "path=/ui"):
        assert part in cookie
    data = (await browser.get("/ui/api/overview")).json()
    assert [c["name"] for c in data["hosted"]] == ["p2prc-web"]
    assert data["peers"] == []
    assert data["me"] is None
    assert data["tracked"] == []
    assert data["mappings"] == []
    assert data["relay"] is None

    browser.cookies.clear()
    again = await browser.get(path)
    assert again.status_code == 401
    assert "used already" in again.text


@pytest.mark.parametrize("token", ["", "garbage", "x" * 128])
async def test_bad_tokens_are_refused(browser: httpx.AsyncClient, token: str) -> None:
    answer = await browser.get("/ui/login", params={"token": token})
    assert answer.status_code == 401
    assert COOKIE not in answer.headers.get("set-cookie", "")


async def test_an_overlong_token_is_a_clear_error(browser: httpx.AsyncClient) -> None:
    answer = await browser.get("/ui/login", params={"token": "x" * 129})
    assert answer.status_code == 422


async def test_pages_are_served_with_a_strict_policy(browser: httpx.AsyncClient) -> None:
    assert (await browser.get("/ui")).headers["location"] == "/ui/"
    for path, kind in [
        ("/ui/", "text/html"),
        ("/ui/app.js", "javascript"),
        ("/ui/style.css", "css"),
    ]:
        answer = await browser.get(path)
        assert answer.status_code == 200
        assert kind in answer.headers["content-type"]
        assert answer.headers["content-security-policy"].startswith("default-src 'self'")
        assert answer.headers["x-content-type-options"] == "nosniff"
    script = (await browser.get("/ui/app.js")).text
    assert "innerHTML" not in script
    assert "http" not in script.replace("HTTP ", "")


async def test_logout_ends_the_session(owner: AsyncClient, browser: httpx.AsyncClient) -> None:
    await browser.get(await _login_path(owner))
    assert (await browser.get("/ui/api/overview")).status_code == 200
    assert (await browser.post("/ui/logout")).status_code == 204
    browser.cookies.clear()
    assert (await browser.get("/ui/api/overview")).status_code == 401


def test_tokens_expire_and_tables_stay_bounded() -> None:
    now = [1000.0]
    sessions = UiSessions(token_ttl=60, session_ttl=3600, clock=lambda: now[0])
    token = sessions.mint()
    now[0] += 61
    assert sessions.redeem(token) is None
    tokens = [sessions.mint() for _ in range(MAX_TOKENS + 1)]
    assert sessions.redeem(tokens[0]) is None  # the oldest made room
    opened = [sessions.redeem(sessions.mint()) for _ in range(MAX_SESSIONS + 1)]
    assert all(opened)
    assert not sessions.valid(str(opened[0]))
    assert sessions.valid(str(opened[-1]))
    now[0] += 3601
    assert not sessions.valid(str(opened[-1]))


async def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    def run() -> int:
        try:
            main(list(args))
        except SystemExit as exc:
            return int(exc.code or 0)
        return 0

    code = await asyncio.to_thread(run)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def test_cli_prints_a_link_that_works_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    home = Home(tmp_path / "alice")
    config, identity = init_home(home, NodeConfig(name="alice"))
    async with Node(config, home, identity=identity, host="127.0.0.1", port=0) as node:
        code, out, _ = await _cli(capsys, "--home", str(home.path), "ui", "--print-url")
        assert code == 0
        url = out.strip()
        assert url.startswith(f"{node.api_url}/ui/login?token=")
        async with httpx.AsyncClient() as http:
            assert (await http.get(url)).status_code == 303
            assert (await http.get(url)).status_code == 401

        code, out, _ = await _cli(capsys, "--json", "--home", str(home.path), "ui", "--print-url")
        assert json.loads(out)["expires_in"] == 60

        opened: list[str] = []

        def browser_open(link: str) -> bool:
            opened.append(link)
            return True

        monkeypatch.setattr(webbrowser, "open", browser_open)
        code, out, _ = await _cli(capsys, "--home", str(home.path), "ui")
        assert code == 0
        assert len(opened) == 1
        assert "opened the dashboard" in out


async def test_cli_without_a_running_node_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = Home(tmp_path / "idle")
    init_home(home)
    code, _, err = await _cli(capsys, "--home", str(home.path), "ui", "--print-url")
    assert code == 1
    assert "NodeNotRunning" in err


async def test_overview_shows_relay_load_mappings_and_the_relay_path(tmp_path: Path) -> None:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    local_port = server.sockets[0].getsockname()[1]
    relay_home, nat_home = Home(tmp_path / "relay"), Home(tmp_path / "home")
    relay_config, relay_id = init_home(
        relay_home,
        NodeConfig(
            name="relay",
            trust=TrustConfig(mode="open"),
            relay=RelayConfig(enabled=True, port=0, public_host="127.0.0.1"),
            behind_nat=False,
        ),
    )
    try:
        async with Node(
            relay_config, relay_home, identity=relay_id, host="127.0.0.1", port=0
        ) as relay:
            nat_config, nat_id = init_home(
                nat_home,
                NodeConfig(
                    name="home",
                    behind_nat=True,
                    bootstrap=[relay.api_url.removeprefix("http://")],
                    relay=RelayConfig(use=[relay.identity.node_id]),
                ),
            )
            async with (
                Node(nat_config, nat_home, identity=nat_id, host="127.0.0.1", port=0) as home,
                AsyncClient(home=nat_home) as client,
            ):
                for _ in range(100):
                    if any(p.relay_port and p.state == "alive" for p in await client.peers()):
                        break
                    await asyncio.sleep(0.1)
                mapped = await client.map_port(local_port)
                seen = overview(home)
                assert seen.behind_nat is True
                assert [(m.local_port, m.relay) for m in seen.mappings] == [
                    (local_port, relay.identity.node_id)
                ]
                assert seen.relay is None
                load = overview(relay).relay
                assert load is not None
                assert [t.node_id for t in load.tunnels] == [home.identity.node_id]
                assert load.tunnels[0].ports == 2  # its API (public_api) and the mapped port
                for _ in range(100):  # the home node's new record reaches the relay by gossip
                    peers = {p.node_id: p for p in overview(relay).peers}
                    if peers[home.identity.node_id].relay == relay.identity.node_id:
                        break
                    await asyncio.sleep(0.1)
                assert peers[home.identity.node_id].relay == relay.identity.node_id
                assert mapped.relay == relay.identity.node_id
    finally:
        server.close()
        await server.wait_closed()
