"""``relay.use``: node ids or public keys of the relays a node may use besides trust.allow."""

import pydantic
import pytest

from p2prc.config import RelayConfig
from p2prc.identity import Identity
from p2prc.tunnel.nat import relay_id


def test_entries_are_node_ids_or_keys() -> None:
    relay = Identity.generate()
    config = RelayConfig(use=[relay.node_id, relay.public_key_b64, relay.openssh_public_key("r")])
    assert {relay_id(entry) for entry in config.use} == {relay.node_id}


@pytest.mark.parametrize("bad", ["", "not a key", "A" * 32, "0" * 31])
def test_other_entries_are_refused(bad: str) -> None:
    with pytest.raises(pydantic.ValidationError):
        RelayConfig(use=[bad])
