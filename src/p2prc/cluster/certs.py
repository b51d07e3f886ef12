"""A certificate authority per Dask cluster: the scheduler, each worker and the client
get their own certificate and key, signed by the cluster's CA, valid for a week.

ECDSA P-256 throughout (OpenSSL, and so Dask's ``ssl`` contexts, accept it everywhere).
Dask does not check host names (``distributed.security`` turns ``check_hostname`` off):
the chain to the cluster's CA is what admits a party.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import ClusterError

__all__ = ["VALIDITY", "ClusterCA", "Issued"]

VALIDITY = datetime.timedelta(days=7)
# Roles a certificate is issued for: the scheduler, the client, or one worker by name.
_ROLE = re.compile(r"^(scheduler|client|worker-[A-Za-z0-9][A-Za-z0-9_.-]{0,63})$")
# Clocks of peers may be a little behind ours.
_SKEW = datetime.timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class Issued:
    """One party's certificate and private key, PEM-encoded."""

    cert_pem: bytes
    key_pem: bytes


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common: str, cluster: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "p2prc"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f"cluster {cluster}"),
            x509.NameAttribute(NameOID.COMMON_NAME, common),
        ]
    )


class ClusterCA:
    """The CA of one cluster; ``issue`` makes a certificate and key per role."""

    def __init__(self, cluster: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey):
        self.cluster = cluster
        self.cert = cert
        self._key = key

    def __repr__(self) -> str:
        return f"<ClusterCA {self.cluster} until {self.cert.not_valid_after_utc:%Y-%m-%d}>"

    @classmethod
    def create(cls, cluster: str, *, now: datetime.datetime | None = None) -> ClusterCA:
        """A fresh CA for ``cluster`` (its id), valid for ``VALIDITY``."""
        now = now or datetime.datetime.now(datetime.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        name = _name(f"p2prc cluster {cluster} CA", cluster)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _SKEW)
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(cluster, cert, key)

    @classmethod
    def load(cls, cluster: str, cert_pem: bytes, key_pem: bytes) -> ClusterCA:
        """The CA kept as PEM (``cert_pem``, ``key_pem``); ``ClusterError`` if unreadable."""
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
            key = serialization.load_pem_private_key(key_pem, password=None)
        except ValueError as exc:
            raise ClusterError(f"the CA of cluster {cluster} cannot be read: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ClusterError(f"the CA key of cluster {cluster} is not an EC key")
        return cls(cluster, cert, key)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return _key_pem(self._key)

    def issue(self, role: str, *, now: datetime.datetime | None = None) -> Issued:
        """A new key and a certificate for ``role``: scheduler, client or worker-NAME."""
        if not _ROLE.fullmatch(role):
            raise ValueError(f"not a cluster role: {role!r}")
        now = now or datetime.datetime.now(datetime.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        ca_public = self._key.public_key()
        # Every party is both a TLS server and a client (Dask connects both ways).
        usage = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(role, self.cluster))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _SKEW)
            .not_valid_after(min(now + VALIDITY, self.cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))
