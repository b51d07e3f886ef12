import httpx
import pytest

from p2prc import __version__
from p2prc.api import create_app
from p2prc.client import AsyncClient
from tests.conftest import FakeNode


async def test_health(api_client: AsyncClient) -> None:
    assert (await api_client.health()).ok


async def test_status(api_client: AsyncClient, fake_node: FakeNode) -> None:
    status = await api_client.status()
    assert status.node_id == fake_node.identity.node_id
    assert status.name == "fake"
    assert status.version == __version__
    assert status.api == "http://node.test"
    assert status.public_key.startswith("ssh-ed25519 ")
    assert status.uptime_s >= 0


async def test_specs(api_client: AsyncClient) -> None:
    specs = await api_client.specs()
    assert specs.cpu.cores >= 1
    assert specs.memory.total > 0
    assert specs.gpus == []


async def _raw(fake_node: FakeNode, method: str, path: str, **kwargs: object) -> httpx.Response:
    transport = httpx.ASGITransport(app=create_app(fake_node))
    async with httpx.AsyncClient(transport=transport, base_url="http://node.test") as http:
        return await http.request(method, path, **kwargs)  # type: ignore[arg-type]


async def test_openapi_lists_routes(fake_node: FakeNode) -> None:
    response = await _raw(fake_node, "GET", "/openapi.json")
    paths = response.json()["paths"]
    assert {"/health", "/status", "/specs", "/whoami", "/shutdown"} <= set(paths)


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/nope", 404, "not_found"),
        ("DELETE", "/status", 405, "method_not_allowed"),
        ("POST", "/shutdown", 401, "unauthenticated"),
        ("POST", "/whoami", 401, "unauthenticated"),
    ],
)
async def test_error_bodies(
    fake_node: FakeNode, method: str, path: str, status: int, code: str
) -> None:
    response = await _raw(fake_node, method, path)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert isinstance(response.json()["error"]["message"], str)
    assert not fake_node.closed


async def test_unhandled_error_is_500_json(fake_node: FakeNode) -> None:
    app = create_app(fake_node)

    @app.get("/boom")
    async def boom() -> None:
        raise ValueError("secret detail")

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://node.test") as http:
        response = await http.get("/boom")
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal"
    assert "secret" not in response.text
