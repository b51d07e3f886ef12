"""The node's trust policy: one object that every check asks (API, relay, gossip, NAT).

Membership is public: any key may gossip. Using this node's resources (containers, its
relay, map-port) and believing a peer about the network (NAT answers, relays to use) is
for the keys this policy trusts: the node's own key, the keys in ``trust.allow``, or
everyone when ``trust.mode`` is ``open``.
"""

from __future__ import annotations

from .config import TrustConfig
from .identity import node_id_of, parse_public_key

__all__ = ["TrustPolicy"]


class TrustPolicy:
    """Who this node trusts, by public key and by node id."""

    def __init__(self, config: TrustConfig, own_key: bytes) -> None:
        self._config = config
        self._own_key = own_key
        self._own_id = node_id_of(own_key)
        self._keys = {parse_public_key(key) for key in config.allow}
        self._ids = {node_id_of(key) for key in self._keys}

    def __repr__(self) -> str:
        return f"<TrustPolicy [{self._config.mode} | {len(self._keys)} keys]>"

    @property
    def open(self) -> bool:
        """Whether every key is trusted (the original's UnsafeMode)."""
        return self._config.mode == "open"

    @property
    def own_id(self) -> str:
        return self._own_id

    def is_owner(self, public_key: bytes) -> bool:
        return public_key == self._own_key

    def allows_key(self, public_key: bytes) -> bool:
        """Whether a caller with this key may use this node's resources."""
        return self.open or public_key == self._own_key or public_key in self._keys

    def allows_node(self, node_id: str) -> bool:
        """The same question asked by node id (relay clients, gossip members)."""
        return self.open or node_id == self._own_id or node_id in self._ids

    def listed(self, node_id: str) -> bool:
        """Whether the owner named this node (in ``trust.allow``), whatever the mode.

        Open mode lets strangers *use* the node; it does not make their word about the
        network (NAT answers, relays) worth believing, so those checks ask this.
        """
        return node_id == self._own_id or node_id in self._ids
