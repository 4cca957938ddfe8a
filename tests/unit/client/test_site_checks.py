"""A hospital's own checks of its set-up (init, start, doctor): one line per problem, against real files and a
real TLS server on this machine."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from medfed.cli.main import app as cli
from medfed.client.site import SiteConfig, load_site_config
from medfed.client.site_checks import explain_supernode_exit, local_checks, probe_coordinator
from medfed.common.pki import create_ca, create_node_keys, create_server_certificate, load_ca


def _data(path: Path) -> Path:
    np.savez(path, images=np.zeros((10, 1, 8, 8), np.float32), labels=np.arange(10) % 2)
    return path


def _site(tmp_path: Path, **kw: object) -> SiteConfig:
    values = {"site_id": "hospital-a", "data_path": str(_data(tmp_path / "d.npz")), "n_classes": 2,
              "ca_certificate": str(tmp_path / "ca.crt"), "auth_key": str(tmp_path / "node.key"), **kw}
    return SiteConfig(**values, source=tmp_path / "site.yaml")  # type: ignore[arg-type]


@contextlib.contextmanager
def _tls_server(directory: Path) -> Iterator[int]:
    """A TLS server with a coordinator certificate issued for a host name only (as `coordinator init` makes it)."""
    create_ca(directory)
    cert, key = create_server_certificate(directory, load_ca(directory), ["coordinator.example.org"])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with contextlib.suppress(OSError), context.wrap_socket(conn, server_side=True):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def test_a_handshake_with_the_coordinator_is_verified_with_the_sites_ca(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    create_ca(other)
    with _tls_server(tmp_path) as port:
        # the certificate names a host, and always the loopback addresses too
        assert probe_coordinator(f"127.0.0.1:{port}", tmp_path / "ca.crt") is None
        assert probe_coordinator(f"localhost:{port}", tmp_path / "ca.crt") is None
        wrong_ca = probe_coordinator(f"127.0.0.1:{port}", other / "ca.crt")
    assert wrong_ca is not None and "does not verify" in wrong_ca and "ca_certificate" in wrong_ca
    closed = probe_coordinator(f"127.0.0.1:{port}", tmp_path / "ca.crt", timeout=1)
    assert closed is not None and "cannot connect" in closed
    assert "is not host:port" in (probe_coordinator("coordinator", tmp_path / "ca.crt") or "")


def test_local_checks_say_what_is_wrong_with_each_file_one_line_each(tmp_path: Path) -> None:
    create_ca(tmp_path)
    create_server_certificate(tmp_path, load_ca(tmp_path), ["coordinator.example.org"])
    create_node_keys(tmp_path)
    assert all(c.ok for c in local_checks(_site(tmp_path))), [c.line() for c in local_checks(_site(tmp_path))]

    (tmp_path / "garbage.crt").write_text("not a certificate")
    bad = {c.name: c for c in local_checks(_site(
        tmp_path, data_path=str(tmp_path / "missing.npz"), ca_certificate=str(tmp_path / "server.pem"),
        auth_key=str(tmp_path / "node.pub"), superlink="coordinator"))}
    assert not any(c.ok for c in bad.values())
    assert "missing.npz does not exist" in bad["data_path"].message
    assert "not a certificate authority" in bad["ca_certificate"].message  # the server's certificate, not the CA
    assert "not an OpenSSH private key" in bad["auth_key"].message
    assert "is not host:port" in bad["superlink"].message
    garbage = {c.name: c for c in local_checks(_site(tmp_path, ca_certificate=str(tmp_path / "garbage.crt")))}
    assert "is not a PEM certificate" in garbage["ca_certificate"].message
    assert all("\n" not in c.line() for c in [*bad.values(), *garbage.values()])


def test_init_refuses_a_missing_data_path_and_ca_file_and_writes_nothing(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, [
        "hospital", "init", "--dir", str(tmp_path / "site"), "--site-id", "a", "--n-classes", "2",
        "--data-path", str(tmp_path / "nowhere.npz"), "--superlink", "coordinator.example.org:9092",
        "--ca", str(tmp_path / "no-ca.crt")])

    assert result.exit_code == 2
    assert "FAIL data_path" in result.output and "FAIL ca_certificate" in result.output
    assert "2 check(s) failed (data_path, ca_certificate)" in result.output
    assert not (tmp_path / "site" / "site.yaml").exists() and not (tmp_path / "site" / "node.key").exists()


def test_doctor_reports_every_check_of_a_site_that_is_not_running(tmp_path: Path) -> None:
    create_ca(tmp_path)
    init = CliRunner().invoke(cli, [
        "hospital", "init", "--dir", str(tmp_path / "site"), "--site-id", "a", "--n-classes", "2",
        "--data-path", str(_data(tmp_path / "d.npz")), "--superlink", f"127.0.0.1:{_closed_port()}",
        "--ca", str(tmp_path / "ca.crt"), "--approve-installed", "--no-secure-rng"])
    assert init.exit_code == 0, init.output
    from medfed.client.gate import read_audit

    (approval,) = read_audit(tmp_path / "site" / "state")  # the approval at init is audited like any other
    assert (approval["event"], approval["via"], len(approval["sha256"])) == ("app-approved", "init", 64)

    result = CliRunner().invoke(cli, ["hospital", "doctor", "--config", str(tmp_path / "site" / "site.yaml"),
                                      "--timeout", "1"])

    assert result.exit_code == 2
    lines = result.output.splitlines()
    for passed in ("site config", "data_path", "ca_certificate", "auth_key"):
        assert any(line.startswith(f"ok   {passed}:") for line in lines), result.output
    assert any(line.startswith("FAIL coordinator: cannot connect") for line in lines), result.output
    assert any(line.startswith("FAIL daemon: not running") for line in lines), result.output


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_supernode_the_coordinator_will_not_activate_is_explained_and_retried(tmp_path: Path) -> None:
    create_ca(tmp_path)
    site = _site(tmp_path, superlink=f"127.0.0.1:{_closed_port()}")
    refused = ("Failed to initialize the connection to the SuperLink.\n[code: 2004] Failed to activate SuperNode.")

    reason, retry = explain_supernode_exit(305, refused, site, "SHA256:abc")
    assert retry and "not registered" in reason and "SHA256:abc" in reason and "hospitals register" in reason

    reason, retry = explain_supernode_exit(305, "could not establish a connection", site, "SHA256:abc")
    assert retry and "could not connect to the coordinator: cannot connect" in reason

    reason, retry = explain_supernode_exit(302, "", site, "SHA256:abc")
    assert not retry and "elliptic-curve" in reason


def test_the_site_config_init_writes_passes_the_checks_start_runs(tmp_path: Path) -> None:
    create_ca(tmp_path)
    result = CliRunner().invoke(cli, [
        "hospital", "init", "--dir", str(tmp_path / "site"), "--site-id", "a", "--n-classes", "2",
        "--data-path", str(_data(tmp_path / "d.npz")), "--superlink", "coordinator.example.org:9092",
        "--ca", str(tmp_path / "ca.crt")])
    assert result.exit_code == 0, result.output

    checks = local_checks(load_site_config(tmp_path / "site" / "site.yaml"))

    assert all(c.ok for c in checks), [c.line() for c in checks]


@pytest.mark.parametrize("text", ["", "some other failure"])
def test_other_supernode_exits_are_retried_with_the_code(tmp_path: Path, text: str) -> None:
    reason, retry = explain_supernode_exit(1, text, _site(tmp_path), "SHA256:abc")
    assert retry and "exited with code 1" in reason


def test_readiness_names_what_would_refuse_every_run(tmp_path: Path) -> None:
    import importlib.util

    from medfed.client.site_checks import readiness_checks

    checks = {c.name: c for c in readiness_checks(_site(tmp_path, secure_rng=True))}
    assert not checks["approved_apps"].ok and "medfed hospital approve" in checks["approved_apps"].message
    has = importlib.util.find_spec("torchcsprng") is not None
    assert checks["secure_rng"].ok is has
    assert has or "medfed hospital install-secure-rng" in checks["secure_rng"].message
    assert readiness_checks(_site(tmp_path, secure_rng=False, approved_apps=["a" * 64])) == []
