"""Certificates and keys: 0600 private keys, no silent overwrite, a chain that verifies, OpenSSH node keys."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from medfed.common.errors import ConfigError
from medfed.common.pki import KeyExists, create_ca, create_node_keys, create_server_certificate, load_ca, public_key_fingerprint


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ca_and_server_certificate_chain(tmp_path: Path) -> None:
    # Execute
    create_ca(tmp_path)
    cert_path, key_path = create_server_certificate(tmp_path, load_ca(tmp_path), ["127.0.0.1", "coord.example.org"])

    # Assert: private keys 0600, certificates 0644, the server certificate is signed by the CA for both names
    assert _mode(tmp_path / "ca.key") == 0o600 and _mode(key_path) == 0o600
    assert _mode(tmp_path / "ca.crt") == 0o644 and _mode(cert_path) == 0o644
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate(cert_path.read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert names.get_values_for_type(x509.DNSName) == ["coord.example.org", "localhost"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_a_certificate_for_a_host_name_also_covers_the_coordinators_own_loopback_clients(tmp_path: Path) -> None:
    # Flower's SuperExec and CLI reach the SuperLink at 127.0.0.1 when it listens on all interfaces
    create_ca(tmp_path)
    cert_path, _ = create_server_certificate(tmp_path, load_ca(tmp_path), ["coordinator.example.org"])

    server = x509.load_pem_x509_certificate(cert_path.read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["coordinator.example.org", "localhost"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert server.subject.rfc4514_string() == "CN=coordinator.example.org"


def test_keys_are_never_overwritten_without_force(tmp_path: Path) -> None:
    create_ca(tmp_path)
    before = (tmp_path / "ca.key").read_bytes()
    with pytest.raises(KeyExists, match="--force"):
        create_ca(tmp_path)
    assert (tmp_path / "ca.key").read_bytes() == before
    create_ca(tmp_path, force=True)
    assert (tmp_path / "ca.key").read_bytes() != before
    assert not list(tmp_path.glob(".*.tmp"))  # no temp files left behind


def test_node_keys_are_openssh_ec_keys(tmp_path: Path) -> None:
    key_path, pub_path = create_node_keys(tmp_path)
    key = serialization.load_ssh_private_key(key_path.read_bytes(), password=None)
    public = serialization.load_ssh_public_key(pub_path.read_bytes())
    assert isinstance(key, ec.EllipticCurvePrivateKey) and _mode(key_path) == 0o600
    assert key.public_key().public_numbers() == public.public_numbers()  # type: ignore[union-attr]
    assert public_key_fingerprint(pub_path.read_bytes()).startswith("SHA256:")


def test_bad_inputs_get_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="medfed coordinator init"):
        load_ca(tmp_path)
    create_ca(tmp_path)
    with pytest.raises(ConfigError, match="at least one host"):
        create_server_certificate(tmp_path, load_ca(tmp_path), [])
    with pytest.raises(ConfigError, match="not an OpenSSH public key"):
        public_key_fingerprint(b"-----BEGIN PUBLIC KEY-----")
