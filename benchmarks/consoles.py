"""Benchmark: page load times of the web consoles with a large state (issue 24).

The coordinator console over a coordinator with 20 registered hospitals (their keys registered with a real
SuperLink, which is running) and 100 runs; the hospital console over a site whose audit log holds 100 runs and whose
privacy ledger holds their 2,000 DP releases. The run files (config.yaml, metrics.jsonl: 20 rounds x 20 hospitals
with per-site metrics and epsilon, as the ServerApp writes them), the audit lines and the ledger entries are
generated, not trained: this measures the consoles, not training.

Per page, in Debian's headless chromium (Playwright): the time from navigation until the page's live part has been
rendered (the page, its stylesheet and script, and its first fragment), median of 10 loads; and the server's time for
the fragment alone (an HTTP client with the bearer token), median of 20.

    python benchmarks/consoles.py      # ~2 min on 2 cores

Writes docs/benchmarks.md (between the `consoles` markers) and benchmarks/results/consoles.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from baselines import write_doc  # noqa: E402

START, END = "<!-- consoles:start -->", "<!-- consoles:end -->"
HOSPITALS, RUNS, ROUNDS = 20, 100, 20
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _medfed(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "medfed.cli.main", *args], env=ENV, capture_output=True, text=True,
                          timeout=300, check=False)
    if done.returncode != 0:
        raise SystemExit(f"medfed {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def _spawn(args: list[str], log: Path, processes: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    process = subprocess.Popen([sys.executable, "-m", "medfed.cli.main", *args], env=ENV, stdout=log.open("wb"),
                               stderr=subprocess.STDOUT, start_new_session=True)
    processes.append(process)
    return process


def _token(log: Path) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = re.search(r"login token: (\S+)", log.read_text(errors="replace"))
        if found:
            return found.group(1)
        time.sleep(0.3)
    raise SystemExit(f"the console did not start:\n{log.read_text(errors='replace')}")


def _site_metrics(rng: random.Random, rnd: int) -> dict[str, Any]:
    return {f"hospital-{h:02d}": {"epsilon": 0.4 * rnd * (1 + h / 40), "delta": 1e-5, "trained": True,
                                  "n_val": rng.randint(10, 200), "val": {"auc": rng.uniform(0.6, 0.95),
                                                                         "acc": rng.uniform(0.6, 0.9)}}
            for h in range(HOSPITALS)}


def coordinator_state(work: Path, processes: list[subprocess.Popen[bytes]]) -> Path:
    """A coordinator with a running SuperLink, 20 registered hospitals and 100 runs' files."""
    from medfed.common.pki import create_node_keys

    coord = work / "coord"
    _medfed("coordinator", "init", "--dir", str(coord), "--host", "127.0.0.1", "--address", f"127.0.0.1:{_port()}")
    superlink = _spawn(["coordinator", "start", "--dir", str(coord), "--no-resume"], work / "superlink.log", processes)
    from medfed.server.coordinator import Coordinator

    settings = json.loads((coord / "coordinator.json").read_text())
    Coordinator(coord, address=settings["address"]).wait_ready(superlink, timeout=120)
    for h in range(HOSPITALS):
        _, pub = create_node_keys(work / "keys" / f"h{h:02d}")
        _medfed("hospitals", "register", str(pub), "--dir", str(coord), "--name", f"hospital-{h:02d}")
    rng = random.Random(0)
    index = {}
    for run in range(1, RUNS + 1):
        run_dir = coord / "runs" / f"run-{run:03d}"
        run_dir.mkdir(parents=True)
        (run_dir / "config.yaml").write_text(f"train:\n  rounds: {ROUNDS}\n")
        lines = [{"round": r, "elapsed_s": 30.0 * r, "train": {"loss": 1 / r}, "val": {"auc": 0.6 + r / 60},
                  "test": {"auc": 0.6 + r / 61}, "sites": _site_metrics(rng, r), "dropped": [],
                  "privacy": {"max_epsilon": 0.4 * r * 1.5}} for r in range(1, ROUNDS + 1)]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        index[str(run)] = {"run-dir": str(run_dir)}
    (coord / "runs.json").write_text(json.dumps(index))
    return coord


def hospital_state(work: Path, coord: Path) -> Path:
    """A site whose audit log holds 100 runs (20 rounds, a train and an evaluate reply each) and whose ledger
    holds their 2,000 DP releases."""
    import numpy as np

    from medfed.client.gate import AUDIT_FILE, append_audit
    from medfed.client.ledger import LedgerEntry, PrivacyLedger
    from medfed.client.site import SiteConfig, write_site_config

    site_dir = work / "site"
    site_dir.mkdir(parents=True)
    np.savez(site_dir / "d.npz", images=np.zeros((10, 8, 8), np.uint8), labels=np.arange(10) % 2)
    settings = json.loads((coord / "coordinator.json").read_text())
    write_site_config(SiteConfig(site_id="hospital-00", data_path=str(site_dir / "d.npz"), n_classes=2,
                                 superlink=settings["address"], ca_certificate=str(coord / "ca.crt"),
                                 max_epsilon=1e6), site_dir / "site.yaml")
    state, t0 = site_dir / "state", time.time() - RUNS * ROUNDS * 60
    entries = []
    for run in range(1, RUNS + 1):
        for r in range(1, ROUNDS + 1):
            when = t0 + ((run - 1) * ROUNDS + r) * 60
            for stage in ("train", "evaluate"):
                append_audit(state / AUDIT_FILE, {
                    "time": when, "event": "sent", "run": run, "round": r, "stage": stage, "type": stage,
                    "bytes": 120_000 if stage == "train" else 900, "epsilon": 0.05 * r, "epsilon_charged": 0.05,
                    "values": {"train_loss": 0.5} if stage == "train" else {"val_auc": 0.8}, "refusal": None,
                    "error": None})
            entry = LedgerEntry.new(run, r, 1.1, 0.1, 30)
            entries.append(LedgerEntry(**{**entry.__dict__, "recorded_at": when}))
    PrivacyLedger(state, "f" * 32).record(entries)
    return site_dir / "site.yaml"


def measure(base: str, token: str, pages: list[tuple[str, str, str | None]]) -> list[dict[str, Any]]:
    """For each (name, path, fragment): browser load time (navigation until the live part is rendered) and the
    fragment's server time, medians."""
    import httpx
    from playwright.sync_api import sync_playwright

    out = []
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=shutil.which("chromium") or "chromium",
                                                 args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page()
            page.goto(base + "/login")
            page.fill("#token", token)
            page.click("#login")
            page.wait_for_url(base + "/")
            for name, path, fragment in pages:
                loads = []
                for _ in range(10):
                    started = time.perf_counter()
                    page.goto(base + path)
                    if fragment is not None:  # until the live part is drawn (a locator: the CSP forbids eval)
                        page.locator("#live[data-updated]").wait_for()
                    else:
                        page.wait_for_load_state("load")
                    loads.append(time.perf_counter() - started)
                server = []
                for _ in range(20 if fragment else 0):
                    started = time.perf_counter()
                    reply = client.get(fragment)
                    reply.raise_for_status()
                    server.append(time.perf_counter() - started)
                out.append({"page": name, "path": path, "browser_ms": 1000 * statistics.median(loads),
                            "fragment_ms": 1000 * statistics.median(server) if server else None,
                            "fragment_kib": len(client.get(fragment).content) / 1024 if fragment else None})
            browser.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "consoles")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    processes: list[subprocess.Popen[bytes]] = []
    started = time.time()
    try:
        coord = coordinator_state(args.work, processes)
        site = hospital_state(args.work, coord)
        port, hport = _port(), _port()
        _spawn(["coordinator", "console", "--dir", str(coord), "--port", str(port)], args.work / "cc.log", processes)
        _spawn(["hospital", "console", "--config", str(site), "--port", str(hport)], args.work / "hc.log", processes)
        ctoken, htoken = _token(args.work / "cc.log"), _token(args.work / "hc.log")
        time.sleep(6)  # the coordinator console's first answer from the SuperLink
        coordinator = measure(f"http://127.0.0.1:{port}", ctoken, [
            ("hospitals", "/", "/live/hospitals"), ("runs", "/runs", "/live/runs"),
            ("one run (20 rounds x 20 hospitals)", "/runs/50", "/live/runs/50")])
        hospital = measure(f"http://127.0.0.1:{hport}", htoken, [
            ("connection", "/", "/live/overview"), ("runs", "/runs", "/live/runs"),
            ("one run's messages", "/runs/50", "/live/runs/50"), ("privacy ledger page", "/privacy", None),
            ("privacy ledger plot", "/privacy/plot.png", None)])
    finally:
        for process in reversed(processes):
            try:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=20)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
    result = {"coordinator": coordinator, "hospital": hospital, "hospitals": HOSPITALS, "runs": RUNS,
              "rounds": ROUNDS, "total_s": time.time() - started,
              "measured": f"{time.strftime('%Y-%m-%d')}, {platform.node()}, {os.cpu_count()} cores, no GPU"}
    results = REPO / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    (results / "consoles.json").write_text(json.dumps(result, indent=1) + "\n")
    rows = ["| console | page | load in chromium (ms) | its live fragment from the server (ms) | fragment KiB |",
            "|---|---|---:|---:|---:|"]
    for kind in ("coordinator", "hospital"):
        for row in result[kind]:
            rows.append(f"| {kind} | {row['page']} (`{row['path']}`) | {row['browser_ms']:.0f} | "
                        + (f"{row['fragment_ms']:.0f} | {row['fragment_kib']:.0f} |" if row["fragment_ms"] is not None
                           else "- | - |"))
    section = "\n".join([
        START, "", f"Measured {result['measured']}: `python benchmarks/consoles.py` ({result['total_s']:.0f} s).",
        "", f"State: {HOSPITALS} hospitals registered with a running SuperLink; {RUNS} runs of {ROUNDS} rounds x "
        f"{HOSPITALS} hospitals in the coordinator's files; a hospital whose audit log holds {RUNS} runs "
        f"({2 * RUNS * ROUNDS} messages) and whose ledger holds {RUNS * ROUNDS} DP releases. The run files, audit "
        "lines and ledger entries are generated (this measures the consoles, not training). Medians: 10 page loads "
        "in headless chromium (until the live part is drawn), 20 fragment requests.", "", *rows, "", END])
    write_doc(section, args.doc, start=START, end=END, heading="Web consoles: page load with a large state")
    print(section)


if __name__ == "__main__":
    main()
