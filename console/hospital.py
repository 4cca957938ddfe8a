"""``medfed hospital console``: a hospital's own web page (127.0.0.1 by default). What left the site and what it
cost (the audit log, per run and per message), its privacy ledger, the app bundles it approves (approve and revoke,
written to the same site config the CLI writes, and audited), its latest data check, and its own Grad-CAM maps,
which never leave the site: this console is the only page that shows the site's images, and it runs at the site."""

from __future__ import annotations

import asyncio
import io
import logging
import re
import time
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from medfed.console.web import Console, Session

__all__ = ["HospitalView", "create_hospital_app"]

logger = logging.getLogger(__name__)

PLOT_POINTS = 300  # the most points of a ledger's plot (each is an accountant call over the releases before it)
NETWORK_CHECK_S = 30.0  # how long a TLS probe of the coordinator is reused by the live page


class HospitalView:
    """What the pages show, read fresh from the site's files on every request (the daemon and the CLI change them
    while the console runs)."""

    def __init__(self, config: Path) -> None:
        self.config = Path(config).resolve()
        self._probe: tuple[float, bool, str] | None = None
        self._audit: tuple[tuple[str, int, int], list[dict[str, Any]]] | None = None

    def site(self) -> Any:
        from medfed.client.site import load_site_config

        return load_site_config(self.config)

    def audit(self) -> list[dict[str, Any]]:
        """The audit log, read again only when the file changed (a live page asks for it every 2 s, and twice per
        refresh of the overview)."""
        from medfed.client.gate import AUDIT_FILE, read_audit

        state = self.site().state_path
        try:
            stat = (state / AUDIT_FILE).stat()
            stamp = (str(state), stat.st_mtime_ns, stat.st_size)
        except OSError:
            return []
        if self._audit is None or self._audit[0] != stamp:
            self._audit = (stamp, read_audit(state))
        return self._audit[1]

    def connection(self) -> dict[str, Any]:
        """The daemon's process, the coordinator's address and whether its TLS handshake works (probed at most every
        NETWORK_CHECK_S), the last message the site sent, and the name and key the coordinator knows it by."""
        from medfed.client.daemon import PID_FILE
        from medfed.client.site_checks import network_checks
        from medfed.common.pki import public_key_fingerprint
        from medfed.common.processes import pid_alive

        site = self.site()
        pid_file = site.state_path / PID_FILE
        pid = pid_file.read_text(encoding="utf-8").strip() if pid_file.is_file() else ""
        running = pid.isdigit() and pid_alive(int(pid))
        now = time.monotonic()
        if self._probe is None or now - self._probe[0] > NETWORK_CHECK_S:
            check = network_checks(site, timeout=2.0)[0]
            self._probe = (now, check.ok, check.message)
        sent = [e for e in self.audit() if e.get("event") == "sent"]
        pub = site.path(site.auth_key).with_suffix(".pub")
        try:
            fingerprint = public_key_fingerprint(pub.read_bytes()) if pub.is_file() else "-"
        except ValueError:
            fingerprint = "unreadable"
        return {"site_id": site.site_id, "superlink": site.superlink, "daemon_pid": int(pid) if running else None,
                "reachable": self._probe[1], "probe": self._probe[2], "fingerprint": fingerprint,
                "last_contact": sent[-1]["time"] if sent else None, "messages": len(sent)}

    def runs(self) -> list[dict[str, Any]]:
        """One row per run the site answered or refused: its rounds, messages, bytes, epsilon, refusals."""
        out: dict[int, dict[str, Any]] = {}
        for entry in self.audit():
            if entry.get("run") is None:
                continue
            row = out.setdefault(int(entry["run"]), {"run": int(entry["run"]), "first": entry.get("time"),
                                                     "rounds": set(), "messages": 0, "bytes": 0, "epsilon": None,
                                                     "refusals": 0})
            row["last"] = entry.get("time")
            row["messages"] += 1
            row["bytes"] += int(entry.get("bytes") or 0)
            if entry.get("round") is not None:
                row["rounds"].add(entry["round"])
            if entry.get("epsilon") is not None:
                row["epsilon"] = max(float(entry["epsilon"]), row["epsilon"] or 0.0)
            if entry.get("refusal") or entry.get("event") == "refused-app":
                row["refusals"] += 1
        return [{**row, "rounds": len(row["rounds"])} for _, row in sorted(out.items(), reverse=True)]

    def messages(self, run: int) -> list[dict[str, Any]]:
        return [e for e in self.audit() if e.get("run") == run]

    def budget(self) -> list[dict[str, Any]]:
        from medfed.client.privacy import budget_rows

        return budget_rows(self.site())

    def budget_plot(self) -> bytes:
        """A PNG of each ledger's cumulative epsilon over time against the site's cap."""
        from datetime import datetime

        import matplotlib.dates as mdates
        from matplotlib.figure import Figure  # not pyplot: its global state is not thread-safe

        from medfed.client.ledger import site_ledgers
        from medfed.client.privacy import epsilon_spent

        site = self.site()
        fig = Figure(figsize=(7, 3.2), dpi=100)
        ax = fig.subplots()
        for ledger in site_ledgers(site.state_path):
            entries = sorted(ledger.entries(), key=lambda e: e.recorded_at)
            if not entries:  # a ledger file written before its first release
                continue
            step = max(1, len(entries) // PLOT_POINTS)  # a long ledger: every step-th release, and the last
            points = sorted({*range(step - 1, len(entries), step), len(entries) - 1})
            times = [datetime.fromtimestamp(entries[i].recorded_at) for i in points]
            spent = [epsilon_spent(entries[: i + 1], float(site.max_delta)) for i in points]
            ax.step(mdates.date2num(times), spent, where="post", label=f"ledger {ledger.fingerprint[:12]}")
        ax.axhline(float(site.max_epsilon), color="crimson", linestyle="--", label=f"cap {site.max_epsilon:g}")
        ax.xaxis_date()
        ax.set_ylabel("epsilon spent")
        ax.set_ylim(bottom=0)
        ax.legend(loc="upper left", fontsize=8)
        fig.autofmt_xdate()
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        return buffer.getvalue()

    def approvals(self) -> dict[str, Any]:
        from medfed.client.approvals import approval_history

        site = self.site()
        history = approval_history(site.state_path)
        return {"approved": [{"sha256": h, **{k: history.get(h, {}).get(k) for k in ("by", "via", "time")}}
                             for h in site.approved_apps],
                "revoked": [e for h, e in history.items() if e.get("event") == "app-revoked"
                            and h not in site.approved_apps],
                "refused": [e for e in self.audit() if e.get("event") == "refused-app"][-20:]}

    def installed_bundle(self) -> str | None:
        """This installation's app bundle hash (what `medfed hospital approve` approves by default)."""
        from medfed.cli.bundle import bundle_hash
        from medfed.common.errors import MedfedError

        try:
            return bundle_hash()
        except (MedfedError, OSError) as exc:
            logger.warning("could not hash this installation's app bundle: %s", exc)
            return None

    def explanations(self) -> list[Path]:
        """The site's own Grad-CAM overlays (``STATE/explanations/**/*.png``), newest first."""
        root = self.site().state_path / "explanations"
        found = root.glob("**/*.png") if root.is_dir() else []
        return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)[:200]


def create_hospital_app(config: Path, console: Console | None = None) -> tuple[FastAPI, Console]:
    """The hospital console for the site config at ``config``."""
    from medfed.client.approvals import set_approval
    from medfed.common.errors import MedfedError

    view = HospitalView(config)
    console = console or Console(title=f"hospital {view.site().site_id}", kind="hospital")
    app = FastAPI(title="medfed hospital console", docs_url=None, redoc_url=None, openapi_url=None)
    console.install(app)
    auth = Depends(console.require)
    bundle: dict[str, str | None] = {}
    checking = asyncio.Lock()

    @app.exception_handler(MedfedError)  # an unreadable ledger or site config: said on the page, not a bare 500
    async def site_error(request: Request, exc: MedfedError) -> Response:
        return console.page(request, "error.html", console.session(request), status=500, message=str(exc))

    @app.get("/", response_class=HTMLResponse)
    def overview(request: Request, session: Session = auth) -> HTMLResponse:
        return console.page(request, "hospital/overview.html", session, live="/live/overview")

    @app.get("/live/overview", response_class=HTMLResponse)
    def overview_live(request: Request, session: Session = auth) -> HTMLResponse:
        from medfed.client.site import site_policy

        site = view.site()
        return console.page(request, "hospital/overview_live.html", session, c=view.connection(),
                            policy=site_policy(site).describe(), budget=view.budget(), runs=view.runs()[:5])

    @app.get("/runs", response_class=HTMLResponse)
    def runs(request: Request, session: Session = auth) -> HTMLResponse:
        return console.page(request, "hospital/runs.html", session, live="/live/runs")

    @app.get("/live/runs", response_class=HTMLResponse)
    def runs_live(request: Request, session: Session = auth) -> HTMLResponse:
        return console.page(request, "hospital/runs_live.html", session, runs=view.runs())

    @app.get("/runs/{run}", response_class=HTMLResponse)
    def run_page(request: Request, run: int, session: Session = auth) -> HTMLResponse:
        return console.page(request, "hospital/run.html", session, run=run, live=f"/live/runs/{run}")

    @app.get("/live/runs/{run}", response_class=HTMLResponse)
    def run_live(request: Request, run: int, session: Session = auth) -> HTMLResponse:
        return console.page(request, "hospital/run_live.html", session, run=run, messages=view.messages(run))

    @app.get("/privacy", response_class=HTMLResponse)
    def privacy(request: Request, session: Session = auth) -> HTMLResponse:
        site = view.site()
        return console.page(request, "hospital/privacy.html", session, budget=view.budget(), site=site,
                            stamp=int(time.time()))

    @app.get("/privacy/plot.png")
    def privacy_plot(session: Session = auth) -> Response:
        return Response(view.budget_plot(), media_type="image/png", headers={"Cache-Control": "no-store"})

    @app.get("/approvals", response_class=HTMLResponse)
    def approvals(request: Request, session: Session = auth, done: str = "", h: str = "") -> HTMLResponse:
        if "hash" not in bundle:
            bundle["hash"] = view.installed_bundle()
        message = ""  # fixed words only: a link cannot put text of its own on this page
        if done in ("approved", "revoked") and re.fullmatch(r"[0-9a-f]{16}", h):
            message = f"{done} {h}..."
        elif done == "unchanged":
            message = "nothing changed"
        return console.page(request, "hospital/approvals.html", session, a=view.approvals(),
                            installed=bundle["hash"], message=message)

    async def _approval(request: Request, session: Session, approve: bool) -> Response:
        form = await console.check_csrf(request, session)
        if form.get("confirm") != "yes":
            raise HTTPException(status_code=400, detail="confirm the change (tick the box) before it is written")
        try:
            changed = await run_in_threadpool(
                lambda: set_approval(view.config, form.get("sha256", ""), approve=approve, via="console"))
        except MedfedError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from exc
        if not changed:
            return RedirectResponse("/approvals?done=unchanged", status_code=303)
        digest = form["sha256"].strip().lower()[:16]
        return RedirectResponse(f"/approvals?done={'approved' if approve else 'revoked'}&h={digest}", status_code=303)

    @app.post("/approvals/approve")
    async def approve(request: Request, session: Session = auth) -> Response:
        return await _approval(request, session, True)

    @app.post("/approvals/revoke")
    async def revoke(request: Request, session: Session = auth) -> Response:
        return await _approval(request, session, False)

    @app.get("/check", response_class=HTMLResponse)
    def check(request: Request, session: Session = auth) -> HTMLResponse:
        from medfed.client.site_checks import last_data_check

        return console.page(request, "hospital/check.html", session, last=last_data_check(view.site()))

    @app.post("/check")
    async def check_now(request: Request, session: Session = auth) -> Response:
        from medfed.client.site_checks import check_site_data

        await console.check_csrf(request, session)
        if checking.locked():
            raise HTTPException(status_code=409, detail="a check of the site's data is already running")
        try:
            async with checking:  # one at a time: a check reads every file of the folder
                await run_in_threadpool(lambda: check_site_data(view.site()))
        except MedfedError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from exc
        return RedirectResponse("/check", status_code=303)

    @app.get("/explanations", response_class=HTMLResponse)
    def explanations(request: Request, session: Session = auth) -> HTMLResponse:
        root = view.site().state_path / "explanations"
        maps = [p.relative_to(root).as_posix() for p in view.explanations()]
        return console.page(request, "hospital/explanations.html", session, maps=maps, root=root)

    @app.get("/explanations/{name:path}")
    def explanation(name: str, session: Session = auth) -> Response:
        root = (view.site().state_path / "explanations").resolve()
        path = (root / name).resolve()
        if root not in path.parents or path.suffix != ".png" or not path.is_file():
            raise HTTPException(status_code=404, detail="no such map")
        return FileResponse(path, media_type="image/png", headers={"Cache-Control": "no-store"})

    return app, console
