"""The coordinator console over HTTP (FastAPI's test client, the real app, no SuperLink running): login, CSRF,
recipes, and run progress read from run directories."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from medfed.cli.main import app as cli
from medfed.common.errors import ConfigError
from medfed.console.coordinator import create_coordinator_app, recipe_overrides


@pytest.fixture()
def coord(tmp_path: Path) -> Path:
    result = CliRunner().invoke(cli, ["coordinator", "init", "--dir", str(tmp_path / "coord"), "--host", "127.0.0.1",
                                      "--address", "127.0.0.1:1"])
    assert result.exit_code == 0, result.output
    return tmp_path / "coord"


def _run(coord: Path, run_id: int, rounds: list[dict], planned: int, *, finished: bool = False) -> Path:
    """A run directory as the ServerApp writes it (config.yaml, metrics.jsonl) and its line in runs.json."""
    run_dir = coord / "runs" / f"run-{run_id}"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"train:\n  rounds: {planned}\n")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds) + '{"round": 9, "to')
    if finished:
        (run_dir / "summary.json").write_text("{}")
    index = json.loads((coord / "runs.json").read_text()) if (coord / "runs.json").is_file() else {}
    index[str(run_id)] = {"run-dir": str(run_dir)}
    (coord / "runs.json").write_text(json.dumps(index))
    return run_dir


def _client(coord: Path) -> tuple[TestClient, str]:
    app, web = create_coordinator_app(coord, refresh=False)
    client = TestClient(app)
    assert client.post("/login", data={"token": web.token}, follow_redirects=False).status_code == 303
    csrf = re.search(r'name="csrf" value="([^"]+)"', client.get("/runs").text).group(1)
    return client, csrf


def test_pages_need_the_token_and_actions_need_csrf(coord: Path) -> None:
    app, web = create_coordinator_app(coord, refresh=False)
    anonymous = TestClient(app)
    for path in ("/", "/runs", "/runs/new", "/logs", "/live/runs", "/live/hospitals"):
        assert anonymous.get(path).status_code == 401
    assert anonymous.post("/runs/new", data={"recipe": "train.rounds=2"}).status_code == 401
    assert anonymous.get("/runs", headers={"Authorization": f"Bearer {web.token}"}).status_code == 200
    _run(coord, 5, [], 3)
    client, csrf = _client(coord)
    assert client.post("/runs/5/stop", data={"confirm": "yes"}).status_code == 403
    assert client.post("/runs/new", data={"recipe": "train.rounds=2"}).status_code == 403
    unconfirmed = client.post("/runs/5/stop", data={"csrf": csrf})
    assert unconfirmed.status_code == 400 and "confirm" in unconfirmed.text


def test_a_bad_recipe_is_refused_with_the_reason_before_anything_starts(coord: Path) -> None:
    client, csrf = _client(coord)
    reply = client.post("/runs/new", data={"csrf": csrf, "recipe": "train.rounds=0\n"})
    assert reply.status_code == 400 and "train.rounds=0 is out of range" in " ".join(reply.text.split())
    assert not (coord / "runs.json").exists()


def test_recipe_files_are_overrides_or_yaml() -> None:
    assert recipe_overrides("# a recipe\ndataset=synthetic\n\ntrain.rounds=3  # short\n") == [
        "dataset=synthetic", "train.rounds=3"]
    assert recipe_overrides("privacy: dp\ntrain: {rounds: 4, lr: 0.01}\nevaluate.calibrate: false\n") == [
        "privacy=dp", "train.rounds=4", "train.lr=0.01", "evaluate.calibrate=false"]
    with pytest.raises(ConfigError, match="not key=value"):
        recipe_overrides("train.rounds=3\nrounds 4\n")
    bomb = "a0: &a0 {x: 1}\n" + "".join(f"a{i}: &a{i} {{p: *a{i - 1}, q: *a{i - 1}}}\n" for i in range(1, 30))
    with pytest.raises(ConfigError, match="anchors and aliases"):  # 2^29 overrides from 1 KiB
        recipe_overrides(bomb)
    with pytest.raises(ConfigError, match="at most 500 overrides"):
        recipe_overrides("".join(f"k{i}=1\n" for i in range(501)))


def test_runs_show_live_progress_per_site_epsilon_and_drops(coord: Path) -> None:
    # Prepare: a running DP run after 2 of 5 rounds (one hospital dropped in round 2), a finished one
    sites = {"hospital-a": {"epsilon": 0.61, "delta": 1e-5, "trained": True, "n_val": 20, "val": {"auc": 0.8}},
             "hospital-b": {"epsilon": 0.73, "delta": 1e-5, "trained": True, "n_val": 30, "val": {"auc": 0.7}}}
    rounds = [{"round": 1, "val": {"auc": 0.71}, "sites": sites, "dropped": [], "privacy": {"max_epsilon": 0.5}},
              {"round": 2, "val": {"auc": 0.77}, "sites": sites, "privacy": {"max_epsilon": 0.73},
               "dropped": [{"site": "hospital-c", "phase": "train", "reason": "privacy cap reached"}]}]
    _run(coord, 5, rounds, 5)
    _run(coord, 6, rounds[:1], 1, finished=True)
    client, _ = _client(coord)

    # Execute
    runs = client.get("/live/runs").text
    run = client.get("/live/runs/5").text

    # Assert
    assert re.search(r'href="/runs/5">5</a></td><td>unknown[^<]*</td>\s*<td class="num">2/5</td>'
                     r'<td class="num">0.770</td>\s*<td class="num">0.730</td>', runs)
    assert re.search(r'<td>finished</td>\s*<td class="num">1/1</td>', runs)
    assert re.search(r'id="round">2</strong>\s*of 5', run)
    assert re.findall(r'class="num epsilon">([^<]+)<', run) == ["0.610", "0.730"]
    assert "hospital-c" in run and "privacy cap reached" in run
    assert client.get("/runs/99").status_code == 404
    assert client.get("/runs/5/report").status_code == 409  # no summary yet


def test_hospitals_are_listed_from_the_registry_when_the_superlink_is_down(coord: Path) -> None:
    (coord / "hospitals.json").write_text(json.dumps({"11": {"name": "hospital-a", "fingerprint": "SHA256:x",
                                                              "registered": 1.0e9}}))
    app, web = create_coordinator_app(coord, refresh=False)
    app.state.view.refresh()  # nothing listens at 127.0.0.1:1
    client = TestClient(app)
    page = client.get("/live/hospitals", headers={"Authorization": f"Bearer {web.token}"}).text
    assert "hospital-a" in page and "not answering" in page and ">unknown<" in page
