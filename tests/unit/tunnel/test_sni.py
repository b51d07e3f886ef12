"""SNI from real ClientHellos (made by Python's ssl), in any chunking; garbage is refused."""

import contextlib
import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2prc.errors import TunnelProtocolError
from p2prc.tunnel.sni import NeedMore, server_name


def _client_hello(host: str | None) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = False
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname=host)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


HELLO = _client_hello("App.Example.org")


def test_the_server_name_of_a_real_client_hello() -> None:
    assert server_name(HELLO) == "app.example.org"
    assert server_name(HELLO + b"trailing bytes") == "app.example.org"


def test_a_hello_without_a_name() -> None:
    assert server_name(_client_hello(None)) is None


@given(st.integers(min_value=0, max_value=len(HELLO) - 1))
@settings(max_examples=50)
def test_a_partial_hello_asks_for_more(cut: int) -> None:
    with pytest.raises(NeedMore):
        server_name(HELLO[:cut])


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x00\x00",  # empty record
        b"\x16\x03\x01\xff\xff" + b"\x00" * 10,  # record above the limit
        b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00",  # a ServerHello
        b"\x16\x03\x01\x00\x08\x01\x00\x00\x04\x03\x03\x00\x00",  # truncated inside
    ],
)
def test_garbage_is_refused(data: bytes) -> None:
    with pytest.raises(TunnelProtocolError):
        server_name(data)


@given(st.binary(max_size=300))
def test_any_bytes_give_a_name_none_more_or_a_protocol_error(data: bytes) -> None:
    with contextlib.suppress(NeedMore, TunnelProtocolError):
        server_name(data)
