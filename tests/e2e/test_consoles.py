"""Both web consoles in Debian's headless chromium (Playwright drives it; it downloads no browser), during a real
deployment: a coordinator and two hospitals over TLS, each hospital started with `hospital start --console`, the
coordinator's console beside them. The study coordinator logs in, starts a DP run from a recipe, and watches its
rounds advance and the per-site epsilon without reloading; a hospital's data-protection officer logs in, sees what
the site sent and spent, and approves a bundle. Forged POSTs are refused, and consoles live and die by their own
PIDs: one crashing never stops training, and one stops with its daemon.

``MEDFED_CONSOLE_SCREENSHOTS=DIR`` keeps the screenshots (docs/images/ holds the ones the docs show).
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
import yaml

from medfed.common.processes import pid_alive
from tests.e2e.test_deployment import RECIPE, _deploy, _free_port
from tests.e2e.test_report import _chromium

pytestmark = pytest.mark.e2e

DP_RECIPE = [*RECIPE, "train.rounds=2", "evaluate.calibrate=false", "privacy=dp", "privacy.target_epsilon=8",
             "strategy.min_train_nodes=2", "strategy.min_evaluate_nodes=2", "strategy.min_available_nodes=2"]
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"]
NEW_HASH = "0123456789abcdef" * 4


def _line(log: Path, pattern: str, timeout: float = 60) -> re.Match[str]:
    """The first match of ``pattern`` in a process's log, waiting for it to be written."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, log.read_text(errors="replace")) if log.is_file() else None
        if found:
            return found
        time.sleep(0.3)
    raise AssertionError(f"{pattern!r} not in {log}:\n{log.read_text(errors='replace')[-3000:]}")


def _until(condition, timeout: float) -> None:
    """Poll ``condition`` (which reads the page through locators: the consoles' CSP forbids the eval behind
    Playwright's wait_for_function) until it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the page did not get there in time"
        time.sleep(0.5)


def _round(page) -> int:
    shown = page.locator("#round").all_inner_texts()
    return int(shown[0]) if shown and shown[0].strip().isdigit() else 0


def _newest(folder: Path, pattern: str) -> Path:
    return max(folder.glob(pattern), key=lambda p: p.stat().st_mtime)


def _not_blank(png: bytes, where: Path | None, name: str) -> None:
    from PIL import Image

    image = Image.open(io.BytesIO(png))
    if where is not None:  # kept small: 64 colours
        where.mkdir(parents=True, exist_ok=True)
        image.convert("RGB").quantize(colors=64).save(where / name, optimize=True)
    image = image.convert("L")
    assert image.size[0] >= 800 and len(set(image.getdata())) > 16, f"{name}: a blank page"


def _log_in(page, base: str, token: str) -> None:
    reply = page.goto(base + "/")
    assert reply.status == 401 and page.locator("#token").is_visible()  # no session: the login form, 401
    page.fill("#token", "not-the-token")
    with page.expect_response(lambda r: r.url.endswith("/login")) as wrong:
        page.click("#login")
    assert wrong.value.status == 401 and "wrong token" in page.inner_text("#message")
    page.fill("#token", token)
    page.click("#login")
    page.wait_for_url(base + "/")


def test_both_consoles_during_a_real_dp_deployment(tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    executable = _chromium()
    shots = Path(os.environ["MEDFED_CONSOLE_SCREENSHOTS"]) if os.environ.get("MEDFED_CONSOLE_SCREENSHOTS") else None
    coordinator_port, ports = _free_port(), [_free_port(), _free_port()]
    with _deploy(tmp_path, [True, True], coordinator_args=["--console", "--console-port", str(coordinator_port)],
                 hospital_args=lambda index: ["--console", "--console-port", str(ports[index])]) as dep:
        # Prepare: the coordinator and both hospitals run with their consoles, each a process of its own
        coordinator_log = _newest(tmp_path, "coordinator-*.log")  # the last start: a taken port retries it
        logs = [_newest(tmp_path, f"site-{index}-*.log") for index in range(2)]
        hospital_console = [int(_line(log, r"console pid (\d+)").group(1)) for log in logs]
        coordinator_token = _line(coordinator_log, r"login token: (\S+)").group(1)
        coordinator_console = int(_line(coordinator_log, r"console pid (\d+)").group(1))
        base, site_base = f"http://127.0.0.1:{coordinator_port}", f"http://127.0.0.1:{ports[0]}"
        _line(logs[1], r"login token: (\S+)")  # hospital-b's console is serving
        assert _line(logs[0], r"login token: (\S+)")  # hospital-a's, until it is killed below

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=executable, args=BROWSER_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1200, "height": 900})
                page.on("dialog", lambda dialog: dialog.accept())  # the confirm() before a change

                # Execute + Assert: the coordinator: log in, see both hospitals online, start a run from a recipe
                _log_in(page, base, coordinator_token)
                _until(lambda: page.locator("#hospitals td.status").all_inner_texts() == ["online", "online"], 60)
                assert {"hospital-a", "hospital-b"} <= set(page.inner_text("#hospitals").split())
                page.goto(base + "/runs/new")
                page.fill("#recipe", "# the console test's recipe\n" + "\n".join(DP_RECIPE) + "\n")
                page.click("#start", no_wait_after=True)  # a bundle build and `flwr run`: seconds
                page.wait_for_url(re.compile(r".*/runs/\d+$"), timeout=180_000)
                run_id = int(page.url.rsplit("/", 1)[1])
                loads: list[str] = []  # every navigation of the page from here on (there must be none)
                page.on("framenavigated", lambda frame: loads.append(frame.url))
                _until(lambda: _round(page) >= 1, 400)
                first = _round(page)
                # a console crash never stops training: hospital-a's console dies mid-run
                os.kill(hospital_console[0], signal.SIGKILL)
                _until(lambda: _round(page) >= 2, 400)
                assert loads == [], loads  # the round advanced in place, without a reload
                epsilons = [float(t) for t in page.locator("#sites .epsilon").all_inner_texts()]
                assert len(epsilons) == 2 and all(0 < e <= 8 for e in epsilons), (first, epsilons)
                _not_blank(page.screenshot(full_page=True), shots, "coordinator-console-run.png")
                # a POST without the session's CSRF token is refused, though the browser sends the cookie
                forged = page.request.post(f"{base}/runs/{run_id}/stop", form={"confirm": "yes"})
                assert forged.status == 403
                run_dir = Path(json.loads((dep.coord / "runs.json").read_text())[str(run_id)]["run-dir"])
                deadline = time.monotonic() + 400
                while not (run_dir / "summary.json").is_file():
                    assert time.monotonic() < deadline, "the run did not finish"
                    time.sleep(1)
                summary = json.loads((run_dir / "summary.json").read_text())
                assert set(summary["sites"]) == {"hospital-a", "hospital-b"}  # hospital-a trained on
                assert all(d.poll() is None for d in dep.daemons)

                # the hospital (its second console: hospital-a's was killed; start it again by hand)
                again = tmp_path / "hospital-a-console.log"
                dep.spawn(["hospital", "console", "--config", str(dep.sites[0] / "site.yaml"), "--port",
                           str(ports[0])], again)
                hospital_token = _line(again, r"login token: (\S+)").group(1)
                site_page = browser.new_page(viewport={"width": 1200, "height": 900})
                site_page.on("dialog", lambda dialog: dialog.accept())
                _log_in(site_page, site_base, hospital_token)
                site_page.wait_for_selector("#connection")
                assert "hospital-a" in site_page.inner_text("#connection")
                site_page.goto(f"{site_base}/runs/{run_id}")
                site_page.wait_for_selector("#messages")
                stages = site_page.locator("#messages tr td:nth-child(3)").all_inner_texts()
                assert stages.count("train") == 2 and stages.count("evaluate") == 2, stages
                site_page.goto(site_base + "/privacy")
                spent = float(site_page.inner_text("#budget td.spent"))
                assert 0 < spent <= 8
                _not_blank(site_page.screenshot(full_page=True), shots, "hospital-console-privacy.png")
                site_page.goto(site_base + "/approvals")
                site_page.fill("#sha256", NEW_HASH)
                site_page.check("#confirm")
                site_page.click("#approve")
                site_page.wait_for_selector("#message")
                approved = yaml.safe_load((dep.sites[0] / "site.yaml").read_text())["approved_apps"]
                assert approved[-1] == NEW_HASH and len(approved) == 2
                assert NEW_HASH in site_page.inner_text("#approved")
                _not_blank(site_page.screenshot(full_page=True), shots, "hospital-console-approvals.png")
                forged = site_page.request.post(site_base + "/approvals/revoke",
                                                form={"sha256": NEW_HASH, "confirm": "yes"})
                assert forged.status == 403
                assert yaml.safe_load((dep.sites[0] / "site.yaml").read_text())["approved_apps"][-1] == NEW_HASH
            finally:
                browser.close()

        # hospital-b's console stops with its daemon, the coordinator's with the coordinator (SIGTERM to the
        # daemon's pid only, not to its process group)
        for daemon, web in ((dep.daemons[1], hospital_console[1]), (dep.coordinator, coordinator_console)):
            assert daemon is not None and pid_alive(web)
            os.kill(daemon.pid, signal.SIGTERM)
            daemon.wait(timeout=60)
            deadline = time.monotonic() + 20
            while pid_alive(web) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not pid_alive(web)
