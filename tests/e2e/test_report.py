"""`medfed report` on a real DP simulation with the uncertainty analysis on, opened in headless Chromium.

The browser is Debian's ``chromium`` (``.ci/run`` installs it and sets ``MEDFED_REQUIRE_BROWSER=1``, so in CI a
missing browser fails the test instead of skipping it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from tests.e2e.test_simulation import FAST_DP, _medfed

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("MEDFED_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium is not installed, and MEDFED_REQUIRE_BROWSER=1 (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return found


def test_report_of_a_private_run_renders_every_plot_in_chromium(tmp_path):
    browser = _chromium()
    # Prepare: a DP run with dropout, MC dropout, a snapshot ensemble and Grad-CAM maps at the hospitals
    args = ["simulate", "--run-dir", "run", "--cache-dir", "cache", "--state-dir", "state", *FAST_DP, "train.rounds=3",
            "privacy=dp", "privacy.target_epsilon=8", "model.dropout=0.2", "evaluate.mc_samples=4",
            "evaluate.snapshots=2", "evaluate.gradcam_samples=2"]
    result = _medfed(args, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]
    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["uncertainty"]["test"]) == {"model", "calibrated", "mc_dropout", "snapshot_ensemble"}
    assert summary["uncertainty"]["mc_dropout"]["mean_variance"] > 0.0
    # metered DP: not even the count of Grad-CAM maps leaves a hospital; in simulation they are on the
    # researcher's disk, 2 per hospital
    assert "gradcam_saved" not in summary["calibration"]
    assert len(list((run_dir / "sites").glob("*/gradcam/*.png"))) == 6

    # Execute
    report = _medfed(["report", "run"], tmp_path)
    assert report.returncode == 0, report.stdout[-3000:]
    page = run_dir / "report.html"
    dom = subprocess.run(
        [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000",
         "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    ).stdout
    shot = tmp_path / "page.png"
    subprocess.run(
        [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile2'}", "--window-size=1200,2000",
         f"--screenshot={shot}", page.as_uri()],
        capture_output=True, timeout=120, check=False,
    )

    # Assert: the seven plots exist as PNG files and every one decoded in the browser
    names = sorted(p.stem for p in (run_dir / "report").glob("*.png"))
    assert names == ["embedding", "epsilon", "learning_curves", "referral", "reliability", "roc", "site_auc"]
    body = re.search(r"<body[^>]*>", dom)
    assert body is not None, dom[:2000]
    assert 'data-plots-expected="7"' in body.group(0)
    assert 'data-plots-rendered="7"' in body.group(0)
    html = page.read_text()
    assert "src=\"file:" not in html and "http://" not in html and "https://" not in html  # self-contained
    assert "Temperature scaling" in html and "target_epsilon: 8" in html  # tables and the config
    assert "Representation quality" in html
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (2000, 1200) and pixels.std() > 10  # a page with content, not a blank one


def test_report_of_a_folder_without_a_run_says_so(tmp_path):
    result = _medfed(["report", "nothing-here"], tmp_path)

    assert result.returncode != 0
    assert "no finished run" in result.stdout + result.stderr
