"""Ed25519 node identity, node ids and the request signature format.

A node's id is derived from its public key, so a peer cannot claim another
node's id without its private key. The private key is stored in OpenSSH format
(``identity/id_ed25519``, mode 0600) so the same key logs into containers with
plain ``ssh -i``.

A signed request carries five headers; the signature covers the canonical
message built by :func:`signing_message`::

    P2PRC-Key        base64url raw public key (32 bytes)
    P2PRC-Audience   node id of the node the request is meant for
    P2PRC-Timestamp  integer unix seconds
    P2PRC-Nonce      32 hex digits, never reused
    P2PRC-Signature  base64url Ed25519 signature
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import IdentityError, SignatureInvalid

__all__ = [
    "HEADER_AUDIENCE",
    "HEADER_KEY",
    "HEADER_NONCE",
    "HEADER_SIGNATURE",
    "HEADER_TIMESTAMP",
    "Identity",
    "node_id_of",
    "parse_public_key",
    "signing_message",
    "verify_signature",
]

HEADER_KEY = "P2PRC-Key"
HEADER_AUDIENCE = "P2PRC-Audience"
HEADER_TIMESTAMP = "P2PRC-Timestamp"
HEADER_NONCE = "P2PRC-Nonce"
HEADER_SIGNATURE = "P2PRC-Signature"

_PRIVATE_NAME = "id_ed25519"
_PUBLIC_NAME = "id_ed25519.pub"


def b64encode(data: bytes) -> str:
    """Unpadded base64url, as used in headers."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64decode(text: str) -> bytes:
    """Inverse of :func:`b64encode`; raises ``ValueError`` on bad input."""
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not base64url: {exc}") from None


def node_id_of(public_key: bytes) -> str:
    """The node id for a raw 32-byte public key: 32 hex digits of its SHA-256."""
    return hashlib.sha256(public_key).hexdigest()[:32]


def parse_public_key(text: str) -> bytes:
    """A raw Ed25519 public key from an OpenSSH line or base64url text."""
    text = text.strip()
    try:
        if text.startswith("ssh-ed25519 "):
            key = serialization.load_ssh_public_key(text.encode())
            if not isinstance(key, Ed25519PublicKey):
                raise ValueError("not an Ed25519 key")
            return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        raw = b64decode(text)
    except (ValueError, TypeError, binascii.Error) as exc:
        raise ValueError(f"not an Ed25519 public key: {exc}") from None
    if len(raw) != 32:
        raise ValueError("not an Ed25519 public key: expected 32 bytes")
    return raw


def signing_message(
    method: str, target: str, audience: str, timestamp: str, nonce: str, body: bytes
) -> bytes:
    """The exact bytes a request signature covers; ``target`` is path plus query."""
    digest = hashlib.sha256(body).hexdigest()
    parts = ["p2prc-request-v1", method.upper(), target, audience, timestamp, nonce, digest]
    return "\n".join(parts).encode()


def verify_signature(public_key: bytes, signature: bytes, message: bytes) -> None:
    """Raise ``SignatureInvalid`` unless ``signature`` is valid for ``message``."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        raise SignatureInvalid("signature does not verify") from None


@dataclass(frozen=True, slots=True)
class Identity:
    """A node's key pair."""

    private_key: Ed25519PrivateKey

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte public key."""
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def node_id(self) -> str:
        return node_id_of(self.public_key)

    @property
    def public_key_b64(self) -> str:
        return b64encode(self.public_key)

    def openssh_public_key(self, comment: str = "") -> str:
        """The public key as an ``authorized_keys`` line."""
        line = (
            self.private_key.public_key()
            .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            .decode()
        )
        return f"{line} {comment}".strip()

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)

    def signed_headers(
        self, method: str, target: str, audience: str, body: bytes, now: float | None = None
    ) -> dict[str, str]:
        """Headers that authenticate one request to the node ``audience``."""
        timestamp = str(int(time.time() if now is None else now))
        nonce = secrets.token_hex(16)
        message = signing_message(method, target, audience, timestamp, nonce, body)
        return {
            HEADER_KEY: self.public_key_b64,
            HEADER_AUDIENCE: audience,
            HEADER_TIMESTAMP: timestamp,
            HEADER_NONCE: nonce,
            HEADER_SIGNATURE: b64encode(self.sign(message)),
        }

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, directory: Path) -> Identity:
        """Read ``id_ed25519`` from ``directory``."""
        path = directory / _PRIVATE_NAME
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise IdentityError(f"no identity at {path}; run 'p2prc init'") from None
        except OSError as exc:
            raise IdentityError(f"cannot read {path}: {exc}") from None
        try:
            key = serialization.load_ssh_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise IdentityError(f"{path} is not an OpenSSH private key: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(f"{path} is not an Ed25519 key")
        return cls(key)

    @classmethod
    def load_or_create(cls, directory: Path, comment: str = "p2prc") -> Identity:
        """Load the identity in ``directory``; create one only when none exists."""
        if (directory / _PRIVATE_NAME).exists():
            return cls.load(directory)
        identity = cls.generate()
        identity.save(directory, comment)
        return identity

    def save(self, directory: Path, comment: str = "p2prc") -> None:
        """Write the key pair; never overwrites an existing private key."""
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        private = self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        path = directory / _PRIVATE_NAME
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise IdentityError(f"{path} exists; refusing to replace an identity") from None
        with os.fdopen(fd, "wb") as file:
            file.write(private)
        (directory / _PUBLIC_NAME).write_text(self.openssh_public_key(comment) + "\n")
