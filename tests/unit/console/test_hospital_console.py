"""The hospital console over HTTP (FastAPI's test client, the real app): login and token, CSRF, the approvals it
writes (the same site config and audit line as the CLI), and the pages built from the site's own files."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from medfed.cli.main import app as cli
from medfed.client.gate import AUDIT_FILE, append_audit, read_audit
from medfed.client.ledger import LedgerEntry, PrivacyLedger
from medfed.client.privacy import budget_rows
from medfed.client.site import SiteConfig, load_site_config, write_site_config
from medfed.common.pki import create_ca, create_node_keys
from medfed.console.hospital import create_hospital_app

HASH_A, HASH_B = "a" * 64, "0123456789abcdef" * 4


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the test uses it: nothing listens there


@pytest.fixture()
def site(tmp_path: Path) -> Path:
    create_ca(tmp_path / "coord")
    create_node_keys(tmp_path)
    np.savez(tmp_path / "d.npz", images=np.zeros((10, 8, 8), np.uint8), labels=np.arange(10) % 2)
    config = tmp_path / "site.yaml"
    write_site_config(SiteConfig(site_id="hospital-a", data_path=str(tmp_path / "d.npz"), n_classes=2,
                                 superlink=f"127.0.0.1:{_closed_port()}",
                                 ca_certificate=str(tmp_path / "coord" / "ca.crt"), approved_apps=[HASH_A],
                                 max_epsilon=5.0), config)
    return config


@pytest.fixture()
def client(site: Path) -> TestClient:
    app, web = create_hospital_app(site)
    client = TestClient(app)
    client.token = web.token  # type: ignore[attr-defined]
    client.cookie_name = web.cookie  # type: ignore[attr-defined]
    return client


def _login(client: TestClient) -> str:
    """Log in with the token; returns the CSRF token a page carries."""
    reply = client.post("/login", data={"token": client.token}, follow_redirects=False)  # type: ignore[attr-defined]
    assert reply.status_code == 303 and client.cookie_name in reply.cookies  # type: ignore[attr-defined]
    page = client.get("/runs")  # every page's log-out form carries it
    return re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)


@pytest.mark.parametrize("path", ["/", "/runs", "/runs/3", "/privacy", "/privacy/plot.png", "/approvals", "/check",
                                  "/explanations", "/live/overview"])
def test_every_page_needs_the_token(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 401
    assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    client.cookies.set(client.cookie_name, "forged-session")  # type: ignore[attr-defined]
    assert client.get(path).status_code == 401


def test_a_wrong_token_is_refused_and_the_right_one_opens_a_session(client: TestClient) -> None:
    wrong = client.post("/login", data={"token": "nope"}, follow_redirects=False)
    assert wrong.status_code == 401 and "wrong token" in wrong.text
    assert client.get("/").status_code == 401
    _login(client)
    assert client.get("/").status_code == 200
    assert client.get("/live/overview").status_code == 200


def test_approve_and_revoke_write_the_site_config_and_the_audit_log(client: TestClient, site: Path) -> None:
    # Prepare
    csrf = _login(client)

    # Execute: approve B, revoke A
    approved = client.post("/approvals/approve", data={"csrf": csrf, "sha256": HASH_B.upper(), "confirm": "yes"})
    revoked = client.post("/approvals/revoke", data={"csrf": csrf, "sha256": HASH_A, "confirm": "yes"})

    # Assert: the file the CLI writes, and one audit line per change, naming the console
    assert approved.status_code == revoked.status_code == 200
    assert load_site_config(site).approved_apps == [HASH_B]
    assert yaml.safe_load(site.read_text())["approved_apps"] == [HASH_B]
    audit = [e for e in read_audit(site.parent / "state") if e["event"].startswith("app-")]
    assert [(e["event"], e["sha256"], e["via"]) for e in audit] == [
        ("app-approved", HASH_B, "console"), ("app-revoked", HASH_A, "console")]
    assert HASH_B in revoked.text and HASH_A in revoked.text  # approved list, and the revoked one below it


def test_state_changes_need_csrf_and_confirmation(client: TestClient, site: Path) -> None:
    csrf = _login(client)
    for form in ({"sha256": HASH_B, "confirm": "yes"}, {"csrf": "x" * 43, "sha256": HASH_B, "confirm": "yes"}):
        assert client.post("/approvals/approve", data=form).status_code == 403
    assert client.post("/check", data={}).status_code == 403
    assert client.post("/logout", data={}).status_code == 403
    unconfirmed = client.post("/approvals/approve", data={"csrf": csrf, "sha256": HASH_B})
    bad = client.post("/approvals/approve", data={"csrf": csrf, "sha256": "not-a-hash", "confirm": "yes"})
    assert unconfirmed.status_code == 400 and "confirm" in unconfirmed.text
    assert bad.status_code == 400 and "64 hexadecimal" in bad.text
    assert load_site_config(site).approved_apps == [HASH_A]


def test_the_cli_approves_and_revokes_through_the_same_audited_path(site: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(cli, ["hospital", "approve", "--config", str(site), "--sha256", HASH_B]).exit_code == 0
    assert runner.invoke(cli, ["hospital", "revoke", "--config", str(site), "--sha256", HASH_A]).exit_code == 0
    assert load_site_config(site).approved_apps == [HASH_B]
    assert [(e["event"], e["via"]) for e in read_audit(site.parent / "state")] == [
        ("app-approved", "cli"), ("app-revoked", "cli")]


def test_pages_show_what_left_the_site_and_what_it_cost(client: TestClient, site: Path) -> None:
    # Prepare: two messages of run 7 in the audit log (one refused), a DP round in the ledger
    state = site.parent / "state"
    append_audit(state / AUDIT_FILE, {"time": 1.0e9, "event": "sent", "run": 7, "round": 1, "stage": "train",
                                      "bytes": 1234, "epsilon": 0.25, "epsilon_charged": 0.25,
                                      "values": {"train_loss": 0.5}, "refusal": None, "error": None})
    append_audit(state / AUDIT_FILE, {"time": 1.0e9 + 5, "event": "sent", "run": 7, "round": 2, "stage": "train",
                                      "bytes": 99, "epsilon": None, "values": {}, "refusal": "privacy-budget",
                                      "error": "the site's cap is reached"})
    PrivacyLedger(state, "f" * 32).record([LedgerEntry.new(7, 1, 1.1, 0.1, 30)])
    spent = budget_rows(load_site_config(site))[0]["spent"]
    _login(client)

    # Execute
    runs = client.get("/live/runs").text
    messages = client.get("/live/runs/7").text
    privacy = client.get("/privacy").text
    plot = client.get("/privacy/plot.png")
    overview = client.get("/live/overview").text

    # Assert
    row = re.search(r'href="/runs/7">7</a>.*?</tr>', runs, re.S).group(0)
    assert [c for c in re.findall(r'class="num">([^<]*)<', row)] == ["2", "2", "1333", "0.250", "1"]
    assert "train_loss=0.500" in messages and "privacy-budget" in messages
    assert "the site&#39;s cap is reached" in messages
    assert f"{spent:.3f}" in privacy and spent > 0
    assert plot.status_code == 200 and plot.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert "not reachable" in overview and "not running" in overview and "SHA256:" in overview


def test_grad_cam_maps_are_served_from_the_state_directory_only(client: TestClient, site: Path) -> None:
    maps = site.parent / "state" / "explanations" / "run-3"
    maps.mkdir(parents=True)
    (maps / "val-00001.png").write_bytes(b"\x89PNG\r\n\x1a\n-a-map")
    (site.parent / "secret.png").write_bytes(b"\x89PNG\r\n\x1a\n-not-a-map")
    _login(client)
    assert "run-3/val-00001.png" in client.get("/explanations").text
    assert client.get("/explanations/run-3/val-00001.png").content.endswith(b"-a-map")
    for escape in ("/explanations/../../secret.png", "/explanations/..%2F..%2Fsecret.png",
                   "/explanations/run-3/../../../site.yaml"):
        assert client.get(escape).status_code == 404


def test_the_data_check_is_kept_and_shown(client: TestClient, site: Path, tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "images"
    for label in ("benign", "malignant"):
        (folder / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((16, 16), 40 * i, np.uint8)).save(folder / label / f"{i}.png")
    (folder / "benign" / "broken.png").write_bytes(b"not a png")
    config = load_site_config(site)
    write_site_config(SiteConfig(**{**{k: getattr(config, k) for k in ("site_id", "n_classes", "superlink",
                                                                       "ca_certificate", "approved_apps")},
                                    "data_path": str(folder), "classes": ["benign", "malignant"]}), site)
    csrf = _login(client)
    assert "No check yet" in client.get("/check").text
    assert client.post("/check", data={"csrf": csrf}).status_code == 200
    page = client.get("/check").text
    assert re.search(r"readable: benign</td><td class=\"num\">3<", page)
    assert re.search(r"unreadable \(skipped\)</td><td class=\"num\">1<", page)


def test_serving_elsewhere_than_loopback_needs_tls(site: Path) -> None:
    result = CliRunner().invoke(cli, ["hospital", "console", "--config", str(site), "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "must use TLS" in " ".join(result.output.split())


def test_answers_forbid_framing_and_caching_and_big_bodies_are_refused(client: TestClient) -> None:
    page = client.get("/login")
    assert page.headers["x-frame-options"] == "DENY" and "frame-ancestors 'none'" in page.headers[
        "content-security-policy"]
    assert page.headers["cache-control"] == "no-store" and page.headers["x-content-type-options"] == "nosniff"
    huge = client.post("/login", data={"token": "x" * (200 * 1024)})
    assert huge.status_code == 413


def test_the_approvals_page_shows_fixed_words_only(client: TestClient) -> None:
    _login(client)
    assert "approved 0123456789abcdef..." in client.get("/approvals?done=approved&h=0123456789abcdef").text
    forged = client.get("/approvals?done=approved&h=Verified by IT&message=Verified").text
    assert "Verified" not in forged


def test_an_empty_ledger_a_torn_audit_line_and_a_broken_ledger_are_shown_not_crashed(client: TestClient,
                                                                                      site: Path) -> None:
    state = site.parent / "state"
    PrivacyLedger(state, "e" * 32).record([])  # a ledger file written before its first release
    append_audit(state / AUDIT_FILE, {"time": 1.0e9, "event": "sent", "run": 4, "round": 1, "stage": "train"})
    with (state / AUDIT_FILE).open("a") as handle:
        handle.write('{"time": 1.0e9, "event": "se')  # torn by a crash mid-write
    _login(client)
    assert client.get("/privacy/plot.png").status_code == 200
    assert 'href="/runs/4">4</a>' in client.get("/live/runs").text
    (state / "privacy" / ("e" * 32 + ".json")).write_text("{not json")
    broken = client.get("/privacy")
    assert broken.status_code == 500 and "unreadable" in broken.text and "Error 500" in broken.text


def test_configure_refuses_other_hosts_without_tls_and_keeps_the_token_private(site: Path, tmp_path: Path) -> None:
    import stat

    from medfed.common.errors import ConfigError
    from medfed.console.web import configure

    app, web = create_hospital_app(site)
    with pytest.raises(ConfigError, match="must use TLS"):
        configure(app, web, host="0.0.0.0", port=8470, tls_cert=None, tls_key=None)
    token_file = tmp_path / "state" / "console.token"
    line = configure(app, web, host="127.0.0.1", port=8471, tls_cert=None, tls_key=None, token_file=token_file)
    assert web.token in line and "http://127.0.0.1:8471/" in line
    assert token_file.read_text().strip() == web.token and stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert web.cookie == "medfed_console_hospital_8471"  # another console on this host keeps its own session
    client = TestClient(app, base_url="http://attacker.example")  # a rebound DNS name for 127.0.0.1
    assert client.get("/login").status_code == 400
