"""What a hospital can check about its own set-up before (and while) it runs: one line per problem.

``medfed hospital init`` runs the local checks on what it is about to write, ``medfed hospital start`` runs them
all before starting the daemon, and ``medfed hospital doctor`` runs them on a running site. Each :class:`Check`
says what was checked, whether it passed, and in one line what is wrong and how to fix it. Nothing here leaves the
site: the checks read the site's own files and open one TLS connection to the coordinator.

The coordinator's registration of this hospital's key cannot be asked from outside Flower's SuperNode (the
coordinator answers a node that is not registered with a bare "Failed to activate SuperNode"), so the daemon
reads that answer and says what it means (:func:`explain_supernode_exit`).
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import time
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medfed.client.site import SiteConfig
from medfed.common.atomic import atomic_write
from medfed.common.errors import MedfedError
from medfed.common.processes import split_address

__all__ = [
    "LAST_CHECK",
    "Check",
    "check_site_data",
    "last_data_check",
    "save_data_check",
    "explain_supernode_exit",
    "local_checks",
    "network_checks",
    "probe_coordinator",
    "readiness_checks",
]

LAST_CHECK = "last-check.json"  # under the state directory: the latest `hospital check` of the site's data

# Flower's SuperNode exit codes (flwr.supercore.exit.ExitCode) that retrying cannot fix
_FATAL_EXIT = {302: "its auth_key is not an elliptic-curve private key", 303: "node authentication needs TLS"}
_CONNECTION_ERROR = 305  # ExitCode.SUPERNODE_CONNECTION_ERROR


@dataclass(frozen=True)
class Check:
    """One check of a site's set-up: ``name`` (what), ``ok``, ``message`` (one line: the problem and its fix)."""

    name: str
    ok: bool
    message: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.name}: {self.message}"


def _check_data(site: SiteConfig) -> Check:
    from medfed.common.data.site_spec import load_site_data

    path = site.path(site.data_path)
    if not path.exists():
        return Check("data_path", False, f"{path} does not exist; point data_path at the site's array file or "
                                         "image folder.")
    try:
        data = load_site_data(site.spec())
    except MedfedError as exc:
        return Check("data_path", False, f"{exc} (see `medfed hospital check` for a full report).")
    except OSError as exc:
        return Check("data_path", False, f"{path} cannot be read ({type(exc).__name__}: {exc.strerror}); give the "
                                         "daemon's user read access.")
    return Check("data_path", True, f"{len(data.train)} training and {len(data.val)} validation images decode.")


def _check_ca(site: SiteConfig) -> Check:
    from cryptography import x509

    path = site.path(site.ca_certificate)
    if not path.is_file():
        return Check("ca_certificate", False, f"{path} does not exist; copy the coordinator's ca.crt there.")
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        return Check("ca_certificate", False, f"{path} is not a PEM certificate ({type(exc).__name__}); copy the "
                                              "coordinator's ca.crt there again.")
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        return Check("ca_certificate", False, f"{path} is not a certificate authority (perhaps the server's "
                                              "server.pem); copy the coordinator's ca.crt there.")
    now = dt.datetime.now(dt.timezone.utc)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        return Check("ca_certificate", False, f"{path} is valid only from {cert.not_valid_before_utc:%Y-%m-%d} to "
                                              f"{cert.not_valid_after_utc:%Y-%m-%d}; ask the coordinator for its "
                                              "current ca.crt.")
    return Check("ca_certificate", True, f"{path} is the CA {cert.subject.rfc4514_string()}, valid until "
                                         f"{cert.not_valid_after_utc:%Y-%m-%d}.")


def _check_key(site: SiteConfig) -> Check:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = site.path(site.auth_key)
    if not path.is_file():
        return Check("auth_key", False, f"{path} does not exist; create the site's keys with `medfed hospital init`.")
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        return Check("auth_key", False, f"{path} is not an OpenSSH private key ({type(exc).__name__}); create the "
                                        "site's keys with `medfed hospital init --force`.")
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return Check("auth_key", False, f"{path} is not an elliptic-curve key, which Flower's node authentication "
                                        "needs; create the site's keys with `medfed hospital init --force`.")
    return Check("auth_key", True, f"{path} is an elliptic-curve node key.")


def local_checks(site: SiteConfig, *, keys: bool = True) -> list[Check]:
    """Checks that need nothing but the site's own files: the coordinator's address, the data (it decodes), the CA
    certificate and, with ``keys``, the node key."""
    checks = []
    try:
        split_address(site.superlink)
        checks.append(Check("superlink", True, f"{site.superlink}"))
    except ValueError as exc:
        checks.append(Check("superlink", False, f"{exc}; set superlink to the coordinator's address."))
    checks += [_check_data(site), _check_ca(site)]
    if keys:
        checks.append(_check_key(site))
    return checks


def readiness_checks(site: SiteConfig) -> list[Check]:
    """What would make every run refused although the set-up is sound: no approved bundle, or a secure RNG the site
    asks for and this machine lacks."""
    import importlib.util

    checks = []
    if site.secure_rng:
        has = importlib.util.find_spec("torchcsprng") is not None
        checks.append(Check("secure_rng", has, "torchcsprng is installed." if has else
                            "secure_rng is true but torchcsprng is not installed, so every DP round is refused; "
                            "run `medfed hospital install-secure-rng` (or secure_rng: false for experiments)."))
    if not site.approved_apps:
        checks.append(Check("approved_apps", False, "empty, so every run is refused; see `medfed hospital approve`."))
    return checks


def probe_coordinator(address: str, ca_file: Path, *, timeout: float = 5.0) -> str | None:
    """Open a TLS connection to the coordinator as the SuperNode will (the site's CA, the address's host name);
    None when the handshake succeeds, else one line saying why it failed."""
    try:
        host, port = split_address(address)
    except ValueError as exc:
        return str(exc)
    try:
        context = ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        return f"the CA certificate {ca_file} cannot be used ({type(exc).__name__})"
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                context.wrap_socket(raw, server_hostname=host):
            return None
    except ssl.SSLCertVerificationError as exc:
        return (f"the coordinator at {address} answered, but its certificate does not verify ({exc.verify_message}): "
                f"check that ca_certificate is the coordinator's ca.crt and that its certificate names {host} "
                "(`medfed coordinator renew-cert --host ...` on the coordinator)")
    except ssl.SSLError as exc:
        return f"the TLS handshake with {address} failed ({exc.reason or type(exc).__name__}); is it the coordinator?"
    except socket.gaierror:
        return f"the host name {host} does not resolve; check superlink in the site config and this machine's DNS"
    except (TimeoutError, socket.timeout):
        return f"no answer from {address} within {timeout:g} s (a firewall, or the coordinator is down)"
    except OSError as exc:
        return f"cannot connect to {address} ({exc.strerror or type(exc).__name__}: is the coordinator running?)"


def network_checks(site: SiteConfig, *, timeout: float = 5.0) -> list[Check]:
    """A TLS handshake with the coordinator, verified with the site's CA certificate."""
    problem = probe_coordinator(site.superlink, site.path(site.ca_certificate), timeout=timeout)
    if problem is None:
        return [Check("coordinator", True, f"TLS handshake with {site.superlink} verified by the site's CA.")]
    return [Check("coordinator", False, problem + ".")]


def explain_supernode_exit(code: int, output: str, site: SiteConfig, fingerprint: str) -> tuple[str, bool]:
    """What a SuperNode exit means for the hospital, and whether retrying can help: (one line, retry).

    ``output``: the SuperNode's last lines; ``fingerprint``: the site's public key fingerprint (what the
    coordinator registered, if it did)."""
    if code in _FATAL_EXIT:
        return (f"The SuperNode stopped: {_FATAL_EXIT[code]} (Flower exit code {code}); fix the site config and "
                "start again.", False)
    if "Failed to activate SuperNode" in output or "[code: 2004]" in output:
        return ("The coordinator refused to activate this hospital's node. Either its key is not registered there "
                f"(ask the coordinator to run `medfed hospitals register node.pub`; this key's fingerprint is "
                f"{fingerprint}), or the coordinator still lists this node online after a restart of the hospital "
                "(that clears within about a minute).", True)
    if code == _CONNECTION_ERROR or "could not establish a connection" in output:
        problem = probe_coordinator(site.superlink, site.path(site.ca_certificate))
        if problem is not None:
            return f"The SuperNode could not connect to the coordinator: {problem}.", True
        return ("The SuperNode could not connect to the coordinator, though a TLS handshake with it succeeds now; "
                "see the SuperNode's lines above.", True)
    return f"The SuperNode exited with code {code}; see its lines above.", True


def check_site_data(site: SiteConfig) -> Any:
    """`medfed hospital check --config` of a site's own folder (a CheckReport), saved as its latest check."""
    from medfed.common.data.site_folder import check_site

    report = check_site(site.path(site.data_path), site.path(site.labels) if site.labels else None,
                        list(site.classes) or None)
    save_data_check(site, report)
    return report


def save_data_check(site: SiteConfig, report: Any) -> None:
    """Keep ``report`` (a CheckReport of the site's folder) as the site's latest data check in its state directory
    (the hospital console shows it; it stays on the site's disk)."""
    site.state_path.mkdir(parents=True, exist_ok=True)
    with atomic_write(site.state_path / LAST_CHECK, binary=False) as handle:
        json.dump({"time": time.time(), "data_path": str(site.path(site.data_path)), "report": report.as_dict()},
                  handle, indent=1)


def last_data_check(site: SiteConfig) -> dict[str, Any] | None:
    """The site's latest saved data check (time, folder, report), or None before the first."""
    path = site.state_path / LAST_CHECK
    if not path.is_file():
        return None
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return None
