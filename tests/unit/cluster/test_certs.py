"""The per-cluster CA: chains verify, each role has its own key, a week's validity."""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from p2prc.cluster.certs import VALIDITY, ClusterCA
from p2prc.errors import ClusterError


def _verify(ca: ClusterCA, cert_pem: bytes, when: datetime.datetime) -> None:
    cert = x509.load_pem_x509_certificate(cert_pem)
    verifier = (
        x509.verification.PolicyBuilder()
        .store(x509.verification.Store([ca.cert]))
        .time(when)
        .build_client_verifier()
    )
    verifier.verify(cert, [])


def test_issued_certificates_chain_to_the_cluster_ca() -> None:
    ca = ClusterCA.create("c0ffee")
    now = datetime.datetime.now(datetime.UTC)
    for role in ("scheduler", "client", "worker-w1"):
        _verify(ca, ca.issue(role).cert_pem, now)


def test_another_clusters_ca_does_not_admit_the_certificate() -> None:
    ours, theirs = ClusterCA.create("a"), ClusterCA.create("b")
    with pytest.raises(x509.verification.VerificationError):
        _verify(theirs, ours.issue("client").cert_pem, datetime.datetime.now(datetime.UTC))


def test_each_role_has_its_own_key_and_the_role_as_its_name() -> None:
    ca = ClusterCA.create("c")
    issued = [ca.issue(role) for role in ("scheduler", "client", "worker-a", "worker-b")]
    assert len({i.key_pem for i in issued}) == 4
    cert = x509.load_pem_x509_certificate(issued[2].cert_pem)
    assert cert.subject.rfc4514_string().startswith("CN=worker-a")
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert b"PRIVATE KEY" in issued[0].key_pem
    assert b"ENCRYPTED" not in issued[0].key_pem


def test_validity_is_a_week_and_expired_certificates_are_refused() -> None:
    now = datetime.datetime.now(datetime.UTC)
    ca = ClusterCA.create("c", now=now)
    cert = x509.load_pem_x509_certificate(ca.issue("client", now=now).cert_pem)
    assert abs(cert.not_valid_after_utc - now - VALIDITY) < datetime.timedelta(seconds=1)
    with pytest.raises(x509.verification.VerificationError):
        _verify(ca, ca.issue("client", now=now).cert_pem, now + VALIDITY + VALIDITY)


def test_unknown_roles_are_refused() -> None:
    ca = ClusterCA.create("c")
    for role in ("", "admin", "worker-", "worker-a b", "worker-../x"):
        with pytest.raises(ValueError, match="not a cluster role"):
            ca.issue(role)


def test_the_ca_survives_a_round_trip_through_pem() -> None:
    ca = ClusterCA.create("c")
    again = ClusterCA.load("c", ca.cert_pem, ca.key_pem)
    _verify(ca, again.issue("client").cert_pem, datetime.datetime.now(datetime.UTC))
    with pytest.raises(ClusterError, match="cannot be read"):
        ClusterCA.load("c", b"junk", ca.key_pem)


def test_pythons_ssl_loads_the_files(tmp_path: Path) -> None:
    ca = ClusterCA.create("c")
    issued = ca.issue("scheduler")
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
    (tmp_path / "cert.pem").write_bytes(issued.cert_pem)
    (tmp_path / "key.pem").write_bytes(issued.key_pem)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=tmp_path / "ca.pem")
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
