"""Keys and certificates of a deployment, made with ``cryptography`` (no hand-rolled crypto).

- The coordinator's certificate authority (CA) and the SuperLink's TLS server certificate, signed by that CA.
  Hospitals receive the CA certificate only; it lets their SuperNodes verify the coordinator.
- Each hospital's SuperNode authentication key pair: an elliptic-curve (P-384) key, the public half in OpenSSH
  format, which is what Flower's ``flwr supernode register`` and ``--auth-supernode-private-key`` take.

Private keys are created with mode 0600 in a temp file beside the target and renamed into place, so a key is never
readable by others, not even for a moment, and a reader never sees half a key. Nothing is overwritten unless
``force=True``.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from medfed.common.atomic import atomic_write
from medfed.common.errors import ConfigError

__all__ = [
    "CertificateAuthority",
    "KeyExists",
    "LOOPBACK_HOSTS",
    "create_ca",
    "create_node_keys",
    "create_server_certificate",
    "load_ca",
    "public_key_fingerprint",
    "write_private",
    "write_public",
]

logger = logging.getLogger(__name__)

CA_DAYS = 3650
SERVER_DAYS = 825  # the longest lifetime browsers and most TLS stacks accept for a leaf certificate


class KeyExists(ConfigError):
    """A key or certificate file already exists and ``--force`` was not given."""

    def __init__(self, path: Path) -> None:
        super().__init__(
            f"{path.name} already exists in {path.parent}; medfed never overwrites keys or certificates on its own. "
            "Keep it, choose another directory, or pass --force to replace it (everyone holding the old one must "
            "then get the new one)."
        )


def _refuse_existing(paths: Sequence[Path], force: bool) -> None:
    if force:
        return
    for path in paths:
        if path.exists():
            raise KeyExists(path)


def _write(path: Path, data: bytes, mode: int, force: bool) -> None:
    _refuse_existing([Path(path)], force)
    with atomic_write(Path(path), mode=mode) as handle:
        handle.write(data)


def write_private(path: Path, data: bytes, *, force: bool = False) -> None:
    """Write a private key: mode 0600 from creation, atomically renamed into place, never silently overwritten."""
    _write(path, data, 0o600, force)


def write_public(path: Path, data: bytes, *, force: bool = False) -> None:
    """Write a certificate or public key (mode 0644), atomically, never silently overwritten."""
    _write(path, data, 0o644, force)


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass(frozen=True)
class CertificateAuthority:
    """A CA certificate with its private key (the coordinator keeps the key; hospitals get the certificate)."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def create_ca(directory: Path, *, name: str = "medfed coordinator CA", force: bool = False) -> tuple[Path, Path]:
    """Create ``ca.crt`` and ``ca.key`` in ``directory``; return their paths."""
    cert_path, key_path = Path(directory) / "ca.crt", Path(directory) / "ca.key"
    _refuse_existing([cert_path, key_path], force)
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    write_private(key_path, _pem_private(key), force=force)
    write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM), force=force)
    logger.info("created CA %s (key %s)", cert_path, key_path)
    return cert_path, key_path


def load_ca(directory: Path) -> CertificateAuthority:
    """Read ``ca.crt`` and ``ca.key`` from ``directory``, with a clear error when they are missing."""
    cert_path, key_path = Path(directory) / "ca.crt", Path(directory) / "ca.key"
    for path in (cert_path, key_path):
        if not path.is_file():
            raise ConfigError(
                f"No {path.name} in {directory}; create the coordinator's CA first with "
                f"`medfed coordinator init --dir {directory}`."
            )
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{key_path.name} in {directory} is not an elliptic-curve key made by medfed.")
    return CertificateAuthority(cert, key)


LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([*hosts, *LOOPBACK_HOSTS]):  # in order, without repeats
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def create_server_certificate(
    directory: Path, ca: CertificateAuthority, hosts: Sequence[str], *, force: bool = False
) -> tuple[Path, Path]:
    """Create ``server.pem`` and ``server.key`` for the SuperLink, valid for ``hosts`` (DNS names or IPs) and for
    the loopback addresses (127.0.0.1, ::1, localhost): the coordinator's own clients (Flower's SuperExec, which
    the SuperLink starts, Flower's CLI and medfed's readiness check) reach it there, whatever name hospitals use."""
    if not hosts:
        raise ConfigError("A server certificate needs at least one host name or IP address (e.g. --host 127.0.0.1).")
    cert_path, key_path = Path(directory) / "server.pem", Path(directory) / "server.key"
    _refuse_existing([cert_path, key_path], force)
    key = ec.generate_private_key(ec.SECP384R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=SERVER_DAYS), ca.certificate.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.certificate.public_key()),  # type: ignore[arg-type]  # an EC key: the stub's union is wider
            critical=False,
        )
        .sign(ca.key, hashes.SHA384())
    )
    write_private(key_path, _pem_private(key), force=force)
    write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM), force=force)
    logger.info("created server certificate %s for %s", cert_path, ", ".join(hosts))
    return cert_path, key_path


def create_node_keys(directory: Path, *, force: bool = False) -> tuple[Path, Path]:
    """Create a SuperNode authentication key pair: ``node.key`` and ``node.pub``, both in OpenSSH format (as
    ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register`` read them)."""
    key_path, pub_path = Path(directory) / "node.key", Path(directory) / "node.pub"
    _refuse_existing([key_path, pub_path], force)
    key = ec.generate_private_key(ec.SECP384R1())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    write_private(key_path, private, force=force)
    write_public(pub_path, public + b"\n", force=force)
    logger.info("created SuperNode key pair %s / %s", key_path, pub_path)
    return key_path, pub_path


def public_key_fingerprint(public_openssh: bytes) -> str:
    """SHA-256 fingerprint of an OpenSSH public key, as ``ssh-keygen -l`` prints it (``SHA256:...``)."""
    try:
        blob = base64.b64decode(public_openssh.split()[1])
        serialization.load_ssh_public_key(public_openssh.strip())
    except (IndexError, ValueError) as exc:
        raise ConfigError(
            "The public key is not an OpenSSH public key (one line like 'ecdsa-sha2-nistp384 AAAA...'); use the "
            "node.pub that `medfed hospital init` wrote."
        ) from exc
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
