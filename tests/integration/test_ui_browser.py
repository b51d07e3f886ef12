"""The dashboard in a real headless Chromium: what the node's owner sees, and who is refused.

Needs Debian's ``chromium`` and ``chromium-driver`` (installed with apt when missing and
allowed) and ``selenium``; the screenshots go to the test's tmp_path (and to
``$UI_SCREENSHOT`` when set, as the README's picture is made).
"""

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest

from p2prc import (
    AsyncClient,
    FakeRuntime,
    Home,
    Identity,
    Node,
    NodeConfig,
    TrustConfig,
    init_home,
)
from p2prc.api.ui import UiLogin
from p2prc.models import CreateContainer
from p2prc.peers.records import PeerRecord

pytestmark = pytest.mark.slow

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.wait import WebDriverWait  # noqa: E402

_PACKAGES = ["chromium", "chromium-driver"]  # Debian's names (bookworm)


def _browser_paths() -> tuple[str, str] | None:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


def _install_chromium() -> tuple[str, str]:
    found = _browser_paths()
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            subprocess.run(
                ["apt-get", "install", "-y", "--no-install-recommends", *_PACKAGES],
                check=True,
                capture_output=True,
                timeout=900,
                env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            )
        found = _browser_paths()
    if found is None:
        pytest.skip(f"chromium could not be installed (apt-get install {' '.join(_PACKAGES)})")
    return found


@pytest.fixture(scope="module")
def chromium() -> tuple[str, str]:
    return _install_chromium()


@contextlib.contextmanager
def _browser(paths: tuple[str, str]) -> Iterator[WebDriver]:
    binary, driver_path = paths
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.add_argument("--window-size=1280,900")
    service = webdriver.ChromeService(executable_path=driver_path)
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


def _wait_text(driver: WebDriver, wanted: Callable[[str], bool], seconds: float = 15.0) -> str:
    """The page's visible text once ``wanted`` holds for it."""
    seen = [""]

    def check(d: WebDriver) -> bool:
        seen[0] = d.find_element(By.TAG_NAME, "body").text
        return wanted(seen[0])

    try:
        WebDriverWait(driver, seconds, poll_frequency=0.2).until(check)
    except TimeoutException:
        raise AssertionError(f"the page never showed it; it showed:\n{seen[0]}") from None
    return seen[0]


def _screenshot(driver: WebDriver, path: Path, *, readme: bool = False) -> None:
    assert driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000  # a rendered page, not a blank one
    extra = os.environ.get("UI_SCREENSHOT")
    if readme and extra:
        shutil.copyfile(path, extra)


@contextlib.asynccontextmanager
async def _node(path: Path, name: str, **config: object) -> AsyncIterator[Node]:
    home = Home(path / name)
    init_home(home, NodeConfig(name=name, **config))  # type: ignore[arg-type]
    config_, identity = init_home(home)
    async with Node(
        config_,
        home,
        identity=identity,
        host="127.0.0.1",
        port=0,
        runtime=FakeRuntime(ssh_banner=True),
    ) as node:
        yield node


def _record(index: int, name: str = "") -> PeerRecord:
    """A signed record of a simulated peer, on a loopback port nobody uses."""
    identity = Identity.generate()
    return PeerRecord(
        node_id=identity.node_id,
        public_key=identity.public_key,
        name=name or f"sim{index}",
        version=1,
        addresses=("127.0.0.1",),
        api_port=40000 + index,
        gossip_port=40000 + index,
    ).signed(identity)


async def _login_url(client: AsyncClient) -> str:
    login = await client._call("POST", "/ui/login-token", UiLogin)
    return f"{client.base_url}{login.path}"


async def test_dashboard_shows_a_joined_peer_and_a_new_container_live(
    chromium: tuple[str, str], tmp_path: Path
) -> None:
    async with (
        _node(tmp_path, "alice") as alice,
        _node(tmp_path, "bob", trust=TrustConfig(mode="open")) as bob,
        AsyncClient(home=tmp_path / "alice") as client,
    ):
        await client.add_peer(bob.api_url)  # bob joins alice's table
        url = await _login_url(client)
        with _browser(chromium) as driver:
            await asyncio.to_thread(driver.get, url)
            text = await asyncio.to_thread(
                _wait_text, driver, lambda t: "bob" in t and "alive" in t
            )
            assert "p2prc alice" in text
            assert bob.identity.node_id[:12] in text
            assert "no containers created on peers" in text
            assert driver.current_url.endswith("/ui/")  # the token left the address bar
            # Created while the page is open: it appears without a reload.
            view = await client.create_on_peer(bob.api_url, CreateContainer(name="train", ports=2))
            text = await asyncio.to_thread(_wait_text, driver, lambda t: view.id in t)
            assert "p2prc-train" in text
            assert "live · updated" in text
            # The create was our last call to bob, and bob accepted it.
            text = await asyncio.to_thread(
                _wait_text, driver, lambda t: re.search(r"ok \d+s ago", t) is not None
            )
            await asyncio.to_thread(_screenshot, driver, tmp_path / "dashboard.png", readme=True)

            # A stranger's record whose name is markup: the page shows it as text.
            hostile = '<img src=x onerror="document.title=1">'
            alice.gossip.table.apply_record(_record(1, hostile))
            text = await asyncio.to_thread(_wait_text, driver, lambda t: hostile in t)
            assert driver.find_elements(By.TAG_NAME, "img") == []
            assert driver.title == "p2prc alice"

            # The cookie is for the page only: scripts cannot read it.
            assert await asyncio.to_thread(driver.execute_script, "return document.cookie") == ""


async def test_dashboard_refuses_without_the_login_token(
    chromium: tuple[str, str], tmp_path: Path
) -> None:
    async with _node(tmp_path, "alice") as alice, AsyncClient(home=tmp_path / "alice") as client:
        async with httpx.AsyncClient(base_url=alice.api_url) as http:
            refused = await http.get("/ui/api/overview")
        assert refused.status_code == 401
        url = await _login_url(client)
        with _browser(chromium) as driver:
            await asyncio.to_thread(driver.get, f"{alice.api_url}/ui/")
            text = await asyncio.to_thread(_wait_text, driver, lambda t: "Not logged in" in t)
            assert "p2prc ui" in text
            assert "alice" not in text.replace("p2prc ui", "")  # nothing of the node shows
            await asyncio.to_thread(_screenshot, driver, tmp_path / "refused.png")
        with _browser(chromium) as first, _browser(chromium) as second:
            await asyncio.to_thread(first.get, url)
            await asyncio.to_thread(_wait_text, first, lambda t: "p2prc alice" in t)
            await asyncio.to_thread(second.get, url)  # the same link again: spent
            text = await asyncio.to_thread(_wait_text, second, lambda t: "used already" in t)
            assert "alice" not in text


async def test_first_paint_with_a_thousand_peers(chromium: tuple[str, str], tmp_path: Path) -> None:
    """Bench (issue #17): the table of 1,000 peers is painted within a second of loading."""
    async with _node(tmp_path, "alice") as alice, AsyncClient(home=tmp_path / "alice") as client:
        for index in range(1000):
            alice.gossip.table.apply_record(_record(index))
        url = await _login_url(client)
        with _browser(chromium) as driver:
            await asyncio.to_thread(driver.get, url)
            await asyncio.to_thread(_wait_text, driver, lambda t: "Peers (1000)" in t)
            rows = driver.find_elements(By.CSS_SELECTOR, "#peers tbody tr")
            assert len(rows) == 1000
            # From the start of navigation (the login link) to the painted table.
            painted = driver.execute_script(
                "return performance.getEntriesByName('p2prc-first-paint')[0].startTime"
            )
            print(f"dashboard first paint, 1,000 peers: {painted:.0f} ms")
            assert painted / 1000 < 1.0, f"first paint of 1,000 peers took {painted:.0f} ms"
