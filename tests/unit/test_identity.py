import subprocess
from pathlib import Path

import pytest

from p2prc.errors import IdentityError, SignatureInvalid
from p2prc.identity import (
    Identity,
    node_id_of,
    parse_public_key,
    signing_message,
    verify_signature,
)


def test_create_load_round_trip(tmp_path: Path) -> None:
    identity = Identity.load_or_create(tmp_path / "id")
    again = Identity.load_or_create(tmp_path / "id")
    assert again.node_id == identity.node_id == node_id_of(identity.public_key)
    assert len(identity.node_id) == 32
    assert (tmp_path / "id").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "id" / "id_ed25519").stat().st_mode & 0o777 == 0o600


def test_never_replaces_an_identity(tmp_path: Path) -> None:
    Identity.load_or_create(tmp_path)
    with pytest.raises(IdentityError, match="refusing"):
        Identity.generate().save(tmp_path)


def test_public_key_file_is_openssh(tmp_path: Path) -> None:
    identity = Identity.load_or_create(tmp_path, comment="me@lab")
    line = (tmp_path / "id_ed25519.pub").read_text().strip()
    assert line.startswith("ssh-ed25519 ")
    assert line.endswith(" me@lab")
    assert parse_public_key(line) == identity.public_key


def test_ssh_keygen_reads_the_private_key(tmp_path: Path) -> None:
    """The key logs into containers with plain ``ssh -i``: OpenSSH must accept it."""
    identity = Identity.load_or_create(tmp_path)
    result = subprocess.run(
        ["ssh-keygen", "-y", "-f", str(tmp_path / "id_ed25519")],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode == 127:
        pytest.skip("ssh-keygen is not installed")
    assert result.returncode == 0, result.stderr
    assert parse_public_key(result.stdout) == identity.public_key


@pytest.mark.parametrize("content", [b"", b"garbage", b"-----BEGIN OPENSSH PRIVATE KEY-----\nxx\n"])
def test_corrupt_key_is_a_clear_error(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "id_ed25519").write_bytes(content)
    with pytest.raises(IdentityError, match="not an OpenSSH private key"):
        Identity.load(tmp_path)


def test_missing_key(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="p2prc init"):
        Identity.load(tmp_path)


@pytest.mark.parametrize(
    "text", ["", "AAAA", "ssh-rsa AAAAB3NzaC1yc2E", "ssh-ed25519 !!!", "x" * 42, "ssh-ed25519"]
)
def test_parse_public_key_rejects_junk(text: str) -> None:
    with pytest.raises(ValueError, match="Ed25519"):
        parse_public_key(text)


def test_signature_covers_every_field() -> None:
    identity = Identity.generate()
    fields = ("POST", "/x?a=1", "aud", "100", "n" * 32, b"body")
    signature = identity.sign(signing_message(*fields))
    verify_signature(identity.public_key, signature, signing_message(*fields))
    for index in range(len(fields)):
        changed = list(fields)
        changed[index] = b"other" if index == 5 else "other"
        with pytest.raises(SignatureInvalid):
            verify_signature(identity.public_key, signature, signing_message(*changed))  # type: ignore[arg-type]
