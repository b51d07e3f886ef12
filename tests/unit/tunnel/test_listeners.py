"""Which addresses a port listens on, parsed from /proc/net/tcp and tcp6 text."""

import ipaddress

from p2prc.tunnel.listeners import listening_addresses, loopback_only, read_listening

_HEAD = "  sl  local_address rem_address   st tx_queue rx_queue ...\n"
TCP = _HEAD + (
    "   0: 00000000:07E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000  0 0 1\n"
    "   1: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  0 0 2\n"
    "   2: 0100007F:BC7C 0100007F:1F90 01 00000000:00000000 00:00000000 00000000  0 0 3\n"
    "   3: 0202000A:1F91 00000000:0000 0A 00000000:00000000 00:00000000 00000000  0 0 4\n"
    "   4: garbage\n"
)
TCP6 = _HEAD + (
    "   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A x\n"
    "   1: 0000000000000000FFFF00000100007F:1F92 00000000000000000000000000000000:0000 0A x\n"
    "   2: 00000000000000000000000000000000:1F93 00000000000000000000000000000000:0000 0A x\n"
)


def test_listeners_by_port() -> None:
    assert listening_addresses(TCP, 2024) == [ipaddress.ip_address("0.0.0.0")]
    assert listening_addresses(TCP, 8080) == [ipaddress.ip_address("127.0.0.1")]
    assert listening_addresses(TCP, 8081) == [ipaddress.ip_address("10.0.2.2")]
    assert listening_addresses(TCP, 48252) == []  # a connection, not a listener
    assert listening_addresses(TCP6, 8080) == [ipaddress.ip_address("::1")]
    assert listening_addresses(TCP6, 8082) == [ipaddress.ip_address("::ffff:127.0.0.1")]


def test_loopback_only() -> None:
    both = listening_addresses(TCP, 8080) + listening_addresses(TCP6, 8080)
    assert loopback_only(both)
    assert loopback_only(listening_addresses(TCP6, 8082))  # IPv4-mapped loopback
    assert not loopback_only(listening_addresses(TCP6, 8083))  # [::]
    assert not loopback_only(listening_addresses(TCP, 8081))
    assert not loopback_only([])  # no socket at all is not "loopback only"


def test_this_machines_tables() -> None:
    found = read_listening(1)
    assert found is None or isinstance(found, list)
