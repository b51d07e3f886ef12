"""Domain names and the Host of HTTP request heads: valid ones pass, the rest are refused."""

import pytest

from p2prc.errors import InvalidRequest, TunnelProtocolError
from p2prc.tunnel.domains import normalize_domain, request_host


@pytest.mark.parametrize(
    ("given", "expected"),
    [("App.Example.ORG.", "app.example.org"), ("xn--bcher-kva.example", "xn--bcher-kva.example")],
)
def test_domains_are_normalized(given: str, expected: str) -> None:
    assert normalize_domain(given) == expected


@pytest.mark.parametrize(
    "bad",
    ["localhost", "a..b", "-a.example", "a-.example", "a b.example", "x" * 64 + ".example",
     "10.0.0.1", "é.example", "a.example/../x", "a.example:80", ""],
)  # fmt: skip
def test_bad_domains_are_refused(bad: str) -> None:
    with pytest.raises(InvalidRequest):
        normalize_domain(bad)


@pytest.mark.parametrize(
    ("head", "host"),
    [
        (b"GET / HTTP/1.1\r\nHost: App.Example.org:8080\r\n\r\n", "app.example.org"),
        (b"GET / HTTP/1.0\r\nUser-Agent: x\r\nhost:a.example.\r\n\r\n", "a.example"),
        (b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n", "[::1]"),
    ],
)
def test_request_host(head: bytes, host: str) -> None:
    assert request_host(head) == host


@pytest.mark.parametrize(
    "head",
    [b"GET / HTTP/1.1\r\n\r\n", b"garbage\r\n\r\n", b"GET / SPDY/3\r\nHost: a.b\r\n\r\n",
     b"GET / HTTP/1.1\r\nHost: \xff.example\r\n\r\n"],
)  # fmt: skip
def test_bad_heads_are_refused(head: bytes) -> None:
    with pytest.raises(TunnelProtocolError):
        request_host(head)
