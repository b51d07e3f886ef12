"""TLS 1.3 between nodes, authenticated by the node's own Ed25519 key.

Each node makes a self-signed certificate for its identity key; the other end does not
trust any CA but checks that the certificate's key is the node it expected (pinning by
node id), which is what the peer table already vouches for.
"""

from __future__ import annotations

import asyncio.sslproto
import datetime
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import NameOID

from ..config import atomic_write
from ..errors import WrongNode
from ..identity import Identity, node_id_of

__all__ = [
    "client_context",
    "ensure_certificate",
    "peer_node_id",
    "pinned_context",
    "server_context",
    "verify_peer",
]

_VALID_DAYS = 3650

# asyncio gives every TLS connection a read buffer of SSLProtocol.max_size (256 KiB). A
# tunnel is one TLS connection carrying all its streams; 64 KiB keeps a relay with 100
# tunnels small and still moves 1.5 Gbit/s through both hops (bench/relay_throughput.py).
# It is a class attribute read when a connection is made, so this sets it process-wide.
asyncio.sslproto.SSLProtocol.max_size = 64 * 1024


def ensure_certificate(identity: Identity, directory: Path) -> tuple[Path, Path]:
    """``tls.crt`` and ``tls.key`` for this identity in ``directory`` (made when missing)."""
    cert_path, key_path = directory / "tls.crt", directory / "tls.key"
    if cert_path.exists() and key_path.exists() and _matches(cert_path, identity):
        return cert_path, key_path
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.node_id)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(identity.private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=_VALID_DAYS))
        .sign(identity.private_key, algorithm=None)
    )
    key = identity.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    atomic_write(key_path, key, mode=0o600)
    atomic_write(cert_path, certificate.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return cert_path, key_path


def _matches(cert_path: Path, identity: Identity) -> bool:
    try:
        certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except ValueError:
        return False
    return _node_id(certificate) == identity.node_id


def _node_id(certificate: x509.Certificate) -> str | None:
    key = certificate.public_key()
    if not isinstance(key, Ed25519PublicKey):
        return None
    return node_id_of(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def server_context(identity: Identity, directory: Path) -> ssl.SSLContext:
    """TLS 1.3 server side with this node's certificate; clients are checked by pinning."""
    cert_path, key_path = ensure_certificate(identity, directory)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(cert_path, key_path)
    return context


def client_context() -> ssl.SSLContext:
    """TLS 1.3 client side; no CA: the caller pins the server with ``verify_peer``.

    Clients prove who they are inside the channel, by signing a nonce the server sends
    (Python's ssl cannot accept self-signed client certificates without a CA).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # replaced by verify_peer(): pinning by node id
    return context


class _PinnedObject(ssl.SSLObject):
    """A client TLS object whose handshake fails unless the server holds ``expected``'s key.

    The check runs as the handshake completes, so not one byte of the request is sent to
    a server that is not the node we mean (a relay in the middle, say).
    """

    expected = ""

    def do_handshake(self) -> None:
        super().do_handshake()
        found = peer_node_id(self)
        if found != self.expected:
            raise ssl.SSLCertVerificationError(
                f"expected node {self.expected}, the far end is {found or 'anonymous'}"
            )


def pinned_context(node_id: str) -> ssl.SSLContext:
    """TLS 1.3 client side that accepts only the server holding node ``node_id``'s key.

    For connections over memory BIOs (asyncio, anyio, so httpx): each gets the pinned
    object class, whose handshake verifies the key before any data flows.
    """
    context = client_context()
    context.sslobject_class = type("PinnedSSLObject", (_PinnedObject,), {"expected": node_id})
    return context


def peer_node_id(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> str | None:
    """The node id of the certificate the other end presented, if any."""
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    return _node_id(x509.load_der_x509_certificate(der))


def verify_peer(ssl_object: ssl.SSLObject | ssl.SSLSocket, expected: str) -> None:
    """Raise ``WrongNode`` unless the other end holds the key of node ``expected``."""
    found = peer_node_id(ssl_object)
    if found != expected:
        raise WrongNode(f"expected node {expected}, the far end is {found or 'anonymous'}")
