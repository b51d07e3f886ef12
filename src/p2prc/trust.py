"""The node's trust policy: one object that every check asks (API, relay, gossip, NAT).

Membership is public: any key may gossip. Using this node's resources (containers, its
relay, map-port) and believing a peer about the network (NAT answers, relays to use) is
for the keys this policy trusts: the node's own key, the keys in ``trust.allow``, or
everyone when ``trust.mode`` is ``open``. ``trust.roles`` narrows what a listed key may
do (``containers``, ``relay``, ``map-port``); a key without an entry may do all of it, and
open mode lets every key do all of it, as before roles existed.
"""

from __future__ import annotations

import base64
import hashlib

from .config import TRUST_ROLES, TrustConfig
from .identity import node_id_of, parse_public_key

__all__ = [
    "ROLES",
    "TrustPolicy",
    "fingerprint",
    "missing_role_message",
    "not_trusted_message",
    "openssh_line",
]

ROLES = TRUST_ROLES


def openssh_line(public_key: bytes, comment: str = "") -> str:
    """A raw Ed25519 public key as an ``authorized_keys`` line."""
    blob = b"".join(len(part).to_bytes(4, "big") + part for part in (b"ssh-ed25519", public_key))
    line = f"ssh-ed25519 {base64.b64encode(blob).decode()}"
    return f"{line} {comment}" if comment else line


def fingerprint(public_key: bytes) -> str:
    """``SHA256:...`` of the key, as ``ssh-keygen -l`` prints it."""
    blob = base64.b64decode(openssh_line(public_key).split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


class TrustPolicy:
    """Who this node trusts, by public key and by node id."""

    def __init__(self, config: TrustConfig, own_key: bytes) -> None:
        self._own_key = own_key
        self._own_id = node_id_of(own_key)
        self.reload(config)

    def reload(self, config: TrustConfig) -> None:
        """Take a new ``[trust]`` section (``p2prc trust add``) without a restart."""
        keys = {parse_public_key(key) for key in config.allow}
        # One assignment each, built first: a check running meanwhile sees old or new.
        self._config, self._keys, self._ids = config, keys, {node_id_of(key) for key in keys}

    def __repr__(self) -> str:
        return f"<TrustPolicy [{self._config.mode} | {len(self._keys)} keys]>"

    @property
    def open(self) -> bool:
        """Whether every key is trusted (the original's UnsafeMode)."""
        return self._config.mode == "open"

    @property
    def allowed(self) -> list[str]:
        """The ``trust.allow`` entries this policy holds now."""
        return list(self._config.allow)

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

    def allows(self, node_id: str, role: str) -> bool:
        """Whether ``node_id`` may use this node for ``role`` (one of ``ROLES``)."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        if self.open or node_id == self._own_id:
            return True
        return node_id in self._ids and role in self.roles_of(node_id)

    def roles_of(self, node_id: str) -> tuple[str, ...]:
        """The roles ``trust.roles`` gives a listed key (all of them without an entry)."""
        given = self._config.roles.get(node_id)
        return ROLES if given is None else tuple(role for role in ROLES if role in given)

    def listed(self, node_id: str) -> bool:
        """Whether the owner named this node (in ``trust.allow``), whatever the mode.

        Open mode lets strangers *use* the node; it does not make their word about the
        network (NAT answers, relays) worth believing, so those checks ask this.
        """
        return node_id == self._own_id or node_id in self._ids


def not_trusted_message(refused_by: str, caller: str, role: str = "") -> str:
    """What ``NotTrusted`` says: who refused, and what its owner runs to allow the caller."""
    if role:
        return (
            f"node {refused_by} does not trust your node {caller} for {role!r}; its owner can "
            f"allow you with 'p2prc trust add {caller} --role {role}'"
        )
    return (
        f"node {refused_by} does not trust your node {caller}; its owner can allow you with "
        f"'p2prc trust add {caller}' (or send you a token from 'p2prc invite')"
    )


def missing_role_message(refused_by: str, caller: str, role: str) -> str:
    """What ``NotTrusted`` says when the caller is trusted, but not for ``role``."""
    return (
        f"node {refused_by} trusts your node {caller}, but not for {role!r}; its owner can "
        f"add it with 'p2prc trust add {caller} --role {role}'"
    )
