"""The relay tells a tunnel client where its connection came from (``Welcome.observed``)."""

from pathlib import Path

import pytest

from p2prc.identity import Identity
from p2prc.tunnel.client import TunnelClient
from p2prc.tunnel.frames import encode
from p2prc.tunnel.protocol import MessageError, Welcome, decode, parse_endpoint
from p2prc.tunnel.relay import RelayServer

RELAY, CLIENT = Identity.generate(), Identity.generate()


def test_welcome_carries_an_observed_address_both_ways() -> None:
    assert decode(Welcome("n", ("198.51.100.7", 40001)).encode()) == Welcome(
        "n", ("198.51.100.7", 40001)
    )
    assert decode(Welcome("n", ("2001:db8::1", 9)).encode()) == Welcome("n", ("2001:db8::1", 9))
    # An older relay's Welcome has none; an older client reads only node_id of a newer one.
    assert decode(encode({"type": "welcome", "node_id": "n"})) == Welcome("n")
    assert Welcome("n", ("198.51.100.7", 1)).to_map()["node_id"] == "n"


@pytest.mark.parametrize(
    "observed",
    ["relay.example:80", "198.51.100.7", "198.51.100.7:0", "198.51.100.7:65536",
     "[2001:db8::1]:x", "", 7, b"1.2.3.4:5", ["1.2.3.4", 5], "1.2.3.4:5" + " " * 100],
)  # fmt: skip
def test_a_malformed_observed_address_is_a_message_error(observed: object) -> None:
    with pytest.raises(MessageError, match="Welcome"):
        decode(encode({"type": "welcome", "node_id": "n", "observed": observed}))


def test_parse_endpoint_wants_an_ip_literal_and_a_port() -> None:
    assert parse_endpoint("[::ffff:198.51.100.7]:5") == ("::ffff:c633:6407", 5)
    assert parse_endpoint(" 198.51.100.7:65535") == ("198.51.100.7", 65535)
    for bad in ("localhost:5", "1.2.3.4:-1", "1.2.3.4:5:6", "[1.2.3.4]:5x"):
        with pytest.raises(MessageError):
            parse_endpoint(bad)


async def test_the_relay_says_where_the_control_connection_came_from(tmp_path: Path) -> None:
    relay = RelayServer(RELAY, tmp_path, host="127.0.0.1", public_host="127.0.0.1")
    async with relay:
        client = TunnelClient(CLIENT, "127.0.0.1", relay.port, RELAY.node_id)
        async with client:
            assert client.local_port > 0
            assert client.observed == ("127.0.0.1", client.local_port)
