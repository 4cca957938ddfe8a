"""``medfed coordinator console``: the study coordinator's web page (127.0.0.1 by default). Registered hospitals
(name, online, last seen), runs (status, live round progress, global and per-site metrics, per-site epsilon and the
privacy assumptions in force, drops with reasons, the run's report), start a run from a recipe file, stop a run,
logs. Everything it shows is what the coordinator already holds: scalar metrics and run files, never an image."""

from __future__ import annotations

import json
import logging
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from medfed.console.web import Console, Session
from medfed.server.runs import RunDirectory

__all__ = ["CoordinatorView", "create_coordinator_app", "recipe_overrides"]

logger = logging.getLogger(__name__)

REFRESH_S = 5.0  # how often the SuperLink is asked for its nodes and runs (each answer is a `flwr` process)
RECIPE_BYTES = 64 * 1024
MAX_OVERRIDES = 500
LOG_TAIL = 40_000  # bytes of a log a page shows
# a run's report.html: a sandbox (an origin of its own, no access to the console) with its inline style and script
REPORT_POLICY = "sandbox allow-scripts; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


class CoordinatorView:
    """The coordinator's state for the pages: run files are read per request; what only the SuperLink knows
    (nodes online, run status) comes from a background thread that asks it every REFRESH_S, so a page never waits
    on Flower's CLI."""

    def __init__(self, directory: Path, *, refresh: bool = True) -> None:
        from medfed.cli.coordination import open_coordinator

        self.dir = Path(directory).resolve()
        self.coordinator = open_coordinator(self.dir)
        self.snapshot: dict[str, Any] = {"nodes": [], "status": {}, "at": None, "error": None}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._progress: dict[str, tuple[tuple[tuple[int, int], ...], dict[str, Any]]] = {}
        if refresh:
            threading.Thread(target=self._refresh_loop, name="superlink-poll", daemon=True).start()

    def _refresh_loop(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._stop.wait(REFRESH_S)

    def refresh(self) -> None:
        """Ask the SuperLink for its nodes and runs (a failure is shown, and the last answer kept)."""
        from medfed.common.errors import MedfedError

        try:
            nodes = self.coordinator.nodes()
            status = {str(r.get("run-id")): r for r in self.coordinator.status()}
            with self._lock:
                self.snapshot = {"nodes": nodes, "status": status, "at": time.time(), "error": None}
        except (MedfedError, OSError) as exc:
            with self._lock:
                self.snapshot = {**self.snapshot, "error": str(exc)}

    def hospitals(self) -> list[dict[str, Any]]:
        names = self.coordinator.node_names()
        with self._lock:
            nodes = {int(str(n.get("node-id"))): n for n in self.snapshot["nodes"]}
        rows = []
        for node_id in sorted(set(names) | set(nodes)):
            node, known = nodes.get(node_id, {}), names.get(node_id, {})
            status = node.get("status") or "unknown"
            rows.append({"name": known.get("name", f"node-{node_id}"), "node_id": node_id, "status": status,
                         "last_seen": node.get("online-at") if status == "online" else node.get("offline-at"),
                         "registered": known.get("registered") or node.get("created-at"),
                         "fingerprint": known.get("fingerprint", "")})
        return rows

    def runs(self) -> list[dict[str, Any]]:
        with self._lock:
            status = dict(self.snapshot["status"])
        out = []
        for run_id, entry in sorted(self.coordinator.runs().items(), key=lambda kv: -int(kv[0])):
            progress = self.progress(entry)
            flower = status.get(run_id, {})
            out.append({"run_id": int(run_id), "status": self._status(flower, entry, progress),
                        "run_dir": entry.get("run-dir"), **progress})
        return out

    @staticmethod
    def _status(flower: dict[str, Any], entry: dict[str, Any], progress: dict[str, Any]) -> str:
        if entry.get("stopped"):
            return "stopped"
        if flower.get("status"):
            return str(flower["status"])
        return "finished" if progress.get("finished") else "unknown (SuperLink not asked yet)"

    def run_entry(self, run_id: int) -> dict[str, Any]:
        entry = self.coordinator.runs().get(str(run_id))
        if entry is None:
            raise HTTPException(status_code=404, detail=f"no run {run_id} on this coordinator")
        return entry

    def progress(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Rounds done of planned, the last round's validation AUC and the run's largest per-site epsilon (kept
        until the run's metrics.jsonl or summary.json changes)."""
        run_dir = Path(str(entry.get("run-dir", "")))
        stamp = tuple(_stamp(run_dir / name) for name in ("metrics.jsonl", "summary.json", "config.yaml"))
        cached = self._progress.get(str(run_dir))
        if cached is not None and cached[0] == stamp:
            return cached[1]
        found = self._read_progress(run_dir)
        self._progress[str(run_dir)] = (stamp, found)
        return found

    @staticmethod
    def _read_progress(run_dir: Path) -> dict[str, Any]:
        records = RunDirectory(run_dir).read_metrics()  # a torn last line while the run writes is skipped
        last = records[-1] if records else {}
        sites = (last.get("sites") or {}).values()
        epsilons = [s["epsilon"] for s in sites if (s or {}).get("epsilon") is not None]
        return {"rounds": int(last.get("round", 0) or 0), "planned": _planned_rounds(run_dir),
                "val_auc": (last.get("val") or {}).get("auc"), "max_epsilon": max(epsilons) if epsilons else None,
                "finished": (run_dir / "summary.json").is_file()}

    def run_detail(self, run_id: int) -> dict[str, Any]:
        entry = self.run_entry(run_id)
        run_dir = Path(str(entry.get("run-dir", "")))
        records = RunDirectory(run_dir).read_metrics()  # a torn last line while the run writes is skipped
        last = records[-1] if records else {}
        summary = _json(run_dir / "summary.json")
        with self._lock:
            flower = dict(self.snapshot["status"].get(str(run_id), {}))
        return {"run_id": run_id, "entry": entry, "records": records, "last": last, "summary": summary,
                "status": self._status(flower, entry, self.progress(entry)), "flower": flower,
                "planned": _planned_rounds(run_dir), "report": (run_dir / "report.html").is_file(),
                "assumptions": ((summary or {}).get("privacy") or {}).get("assumptions")
                or ((last.get("privacy") or {}).get("assumptions"))}

    def logs(self, run_id: int | None) -> str:
        """The ServerApp's log of a run (`flwr log --show`), or the SuperLink's log tail."""
        from medfed.common.environment import script
        from medfed.server.coordinator import CONNECTION

        if run_id is None:
            path = self.dir / "superlink.log"
            if not path.is_file():
                return "(no log yet)"
            with path.open("rb") as handle:  # the tail only: the log grows for as long as the coordinator runs
                handle.seek(max(0, path.stat().st_size - LOG_TAIL))
                return handle.read().decode("utf-8", errors="replace")
        try:
            done = subprocess.run([script("flwr"), "log", str(run_id), CONNECTION, "--show"],
                                  env=self.coordinator.environment(), capture_output=True, text=True, timeout=30,
                                  cwd=self.dir)
        except subprocess.TimeoutExpired:
            return "(the SuperLink did not answer within 30 s)"
        return (done.stdout + done.stderr)[-LOG_TAIL:]


def _stamp(path: Path) -> tuple[int, int]:
    try:
        stat = path.stat()
    except OSError:
        return (0, -1)
    return (stat.st_mtime_ns, stat.st_size)


def _json(path: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return None


def _planned_rounds(run_dir: Path) -> int | None:
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        return int(config["train"]["rounds"])
    except (OSError, ValueError, TypeError, KeyError, yaml.YAMLError):
        return None


def recipe_overrides(text: str) -> list[str]:
    """The Hydra overrides of a recipe file: a YAML mapping (nested or with dotted keys, e.g. ``train: {rounds:
    20}``), or one ``key=value`` per line (``#`` comments). What `medfed train` would take on its command line."""
    from medfed.common.errors import ConfigError

    try:
        if any(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text)):
            raise ConfigError("a recipe file may not use YAML anchors and aliases (&name, *name): write each value "
                              "out.")
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        data = None
    if isinstance(data, dict):
        flat: list[str] = []

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            else:
                rendered = json.dumps(value) if isinstance(value, (list, bool)) or value is None else str(value)
                flat.append(f"{prefix}={rendered.lower() if isinstance(value, bool) else rendered}")

        walk("", data)
        return _capped(flat)
    lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    overrides = [line for line in lines if line]
    bad = [line for line in overrides if "=" not in line]
    if bad:
        raise ConfigError(f"recipe line {bad[0][:80]!r} is not key=value: give one Hydra override per line (e.g. "
                          "train.rounds=20) or a YAML mapping (train: {rounds: 20}).")
    return _capped(overrides)


def _capped(overrides: list[str]) -> list[str]:
    from medfed.common.errors import ConfigError

    if len(overrides) > MAX_OVERRIDES:
        raise ConfigError(f"a recipe holds at most {MAX_OVERRIDES} overrides; this one has {len(overrides)}.")
    return overrides


def create_coordinator_app(directory: Path, console: Console | None = None, *, refresh: bool = True,
                           ) -> tuple[FastAPI, Console]:
    """The coordinator console for the coordinator directory ``directory``."""
    from medfed.common.errors import MedfedError

    view = CoordinatorView(directory, refresh=refresh)
    console = console or Console(title=f"coordinator {view.dir.name}", kind="coordinator")
    app = FastAPI(title="medfed coordinator console", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.view = view
    console.install(app)
    auth = Depends(console.require)

    def snapshot() -> dict[str, Any]:
        return {"at": view.snapshot["at"], "error": view.snapshot["error"]}

    @app.get("/", response_class=HTMLResponse)
    def hospitals(request: Request, session: Session = auth) -> HTMLResponse:
        return console.page(request, "coordinator/hospitals.html", session, live="/live/hospitals")

    @app.get("/live/hospitals", response_class=HTMLResponse)
    def hospitals_live(request: Request, session: Session = auth) -> HTMLResponse:
        return console.page(request, "coordinator/hospitals_live.html", session, hospitals=view.hospitals(),
                            snap=snapshot())

    @app.get("/runs", response_class=HTMLResponse)
    def runs(request: Request, session: Session = auth) -> HTMLResponse:
        return console.page(request, "coordinator/runs.html", session, live="/live/runs")

    @app.get("/live/runs", response_class=HTMLResponse)
    def runs_live(request: Request, session: Session = auth) -> HTMLResponse:
        return console.page(request, "coordinator/runs_live.html", session, runs=view.runs(), snap=snapshot())

    @app.get("/runs/new", response_class=HTMLResponse)
    def new_run(request: Request, session: Session = auth) -> HTMLResponse:
        return console.page(request, "coordinator/new_run.html", session)

    @app.post("/runs/new")
    async def start_run(request: Request, session: Session = auth) -> Response:
        from medfed.cli.coordination import launch_run

        form = await console.check_csrf(request, session)
        recipe = form.get("recipe", "")
        upload = (await request.form()).get("recipe_file")
        if upload is not None and hasattr(upload, "read"):
            raw = await upload.read(RECIPE_BYTES + 1)
            if raw:
                recipe = raw.decode("utf-8", errors="replace")
        if len(recipe.encode()) > RECIPE_BYTES:
            raise HTTPException(status_code=400, detail=f"a recipe file is at most {RECIPE_BYTES // 1024} KiB")
        try:
            overrides = await run_in_threadpool(recipe_overrides, recipe)
            run_dir = Path(form["run_dir"]).expanduser() if form.get("run_dir", "").strip() else None
            run_id, _, _ = await run_in_threadpool(launch_run, view.dir, overrides, run_dir)  # a bundle build
            # and a `flwr run`: seconds, off the event loop
        except MedfedError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from exc
        await run_in_threadpool(view.refresh)
        return RedirectResponse(f"/runs/{run_id}", status_code=303)

    @app.get("/runs/{run_id}", response_class=HTMLResponse)
    def run_page(request: Request, run_id: int, session: Session = auth) -> HTMLResponse:
        view.run_entry(run_id)
        return console.page(request, "coordinator/run.html", session, run_id=run_id, live=f"/live/runs/{run_id}")

    @app.get("/live/runs/{run_id}", response_class=HTMLResponse)
    def run_live(request: Request, run_id: int, session: Session = auth) -> HTMLResponse:
        return console.page(request, "coordinator/run_live.html", session, r=view.run_detail(run_id))

    @app.post("/runs/{run_id}/stop")
    async def stop_run(request: Request, run_id: int, session: Session = auth) -> Response:
        form = await console.check_csrf(request, session)
        view.run_entry(run_id)
        if form.get("confirm") != "yes":
            raise HTTPException(status_code=400, detail="confirm the stop (tick the box): a stopped run is not resumed")
        try:
            await run_in_threadpool(view.coordinator.stop_run, run_id)
        except MedfedError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from exc
        await run_in_threadpool(view.refresh)
        return RedirectResponse(f"/runs/{run_id}", status_code=303)

    @app.get("/runs/{run_id}/report")
    def run_report(run_id: int, session: Session = auth) -> Response:
        from medfed.cli.report import write_report

        run_dir = Path(str(view.run_entry(run_id).get("run-dir", "")))
        page = run_dir / "report.html"
        summary = run_dir / "summary.json"
        if not page.is_file() or (summary.is_file() and summary.stat().st_mtime > page.stat().st_mtime):
            if not summary.is_file():
                raise HTTPException(status_code=409, detail="the run has no summary yet: its report is written when "
                                                            "it ends")
            try:
                page = write_report(run_dir)
            except MedfedError as exc:
                raise HTTPException(status_code=400, detail=str(exc)) from exc
        # the page comes from a run directory: served in a sandbox (its own origin, no access to the console)
        return FileResponse(page, media_type="text/html", headers={"Content-Security-Policy": REPORT_POLICY})

    @app.get("/runs/{run_id}/logs", response_class=HTMLResponse)
    def run_logs(request: Request, run_id: int, session: Session = auth) -> HTMLResponse:
        view.run_entry(run_id)
        return console.page(request, "coordinator/logs.html", session, title=f"run {run_id}", text=view.logs(run_id))

    @app.get("/logs", response_class=HTMLResponse)
    def logs(request: Request, session: Session = auth) -> HTMLResponse:
        return console.page(request, "coordinator/logs.html", session, title="the SuperLink", text=view.logs(None))

    return app, console
