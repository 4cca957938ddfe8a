"""What both consoles share: the login token, sessions, CSRF checks, templates, live fragments and serving.

Security model: the console binds to 127.0.0.1 unless told otherwise, and binding anywhere else requires TLS. Every
page and action needs a session made by posting the login token (printed at start) to ``/login``, or the token
itself as ``Authorization: Bearer ...`` (scripts). A session cookie is HttpOnly and SameSite=Strict; every
state-changing POST must also carry the session's CSRF token in a form field (a cross-site page cannot read it), so a
forged POST is refused with 403 even where a browser would send the cookie.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException

from medfed.common.errors import ConfigError

__all__ = ["COOKIE", "Console", "Session", "configure", "serve", "tls_required"]

logger = logging.getLogger(__name__)

COOKIE = "medfed_console"  # the session cookie's name, per console kind and port (cookies are not per port)
HERE = Path(__file__).resolve().parent
SESSION_HOURS = 12
MAX_BODY = 128 * 1024  # the largest request body a console reads (a recipe file is at most 64 KiB)
HEADERS = {  # every answer: no framing, no foreign origin, nothing cached, no referrer
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
                               "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store"}


@dataclass
class Session:
    csrf: str
    expires: float


@dataclass
class Console:
    """A console app's security state (the token and its sessions) and its templates. ``title`` names the console
    in every page (the hospital's site id, or the coordinator's directory)."""

    title: str
    kind: str  # "hospital" | "coordinator"
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    secure_cookie: bool = False  # True when served over TLS
    sessions: dict[str, Session] = field(default_factory=dict)
    cookie: str = ""

    def __post_init__(self) -> None:
        self.cookie = self.cookie or f"{COOKIE}_{self.kind}"
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        self.templates.env.filters["when"] = _when
        self.templates.env.filters["num"] = _num

    # --- sessions ---------------------------------------------------------------------------------------------
    def token_ok(self, given: str | None) -> bool:
        return bool(given) and hmac.compare_digest(str(given).encode(), self.token.encode())

    def new_session(self) -> str:
        now = time.time()
        self.sessions = {k: s for k, s in self.sessions.items() if s.expires > now}
        sid = secrets.token_urlsafe(32)
        self.sessions[sid] = Session(csrf=secrets.token_urlsafe(32), expires=now + SESSION_HOURS * 3600)
        return sid

    def session(self, request: Request) -> Session | None:
        """The request's session, or a token-only pseudo-session for ``Authorization: Bearer`` (no cookie, so no
        CSRF exposure); None when neither is valid."""
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer ") and self.token_ok(header[7:].strip()):
            return Session(csrf="", expires=time.time() + 60)
        found = self.sessions.get(request.cookies.get(self.cookie, ""))
        if found is None or found.expires < time.time():
            return None
        return found

    def require(self, request: Request) -> Session:
        """The FastAPI dependency of every page and action: 401 without a valid session or token."""
        found = self.session(request)
        if found is None:
            raise HTTPException(status_code=401, detail="log in with the console's token")
        return found

    async def check_csrf(self, request: Request, session: Session) -> dict[str, str]:
        """The posted form, after checking its CSRF field against the session's (403 when missing or wrong).
        Bearer-token requests carry no cookie and need none."""
        form = {k: str(v) for k, v in (await request.form()).items()}
        if session.csrf and not hmac.compare_digest(form.get("csrf", "").encode(), session.csrf.encode()):
            raise HTTPException(status_code=403, detail="missing or wrong CSRF token: reload the page and try again")
        return form

    # --- pages ------------------------------------------------------------------------------------------------
    def page(self, request: Request, template: str, session: Session | None, *, status: int = 200,
             **context: Any) -> HTMLResponse:
        return self.templates.TemplateResponse(
            request, template, {"console": {"title": self.title if session else "console", "kind": self.kind},
                                "csrf": session.csrf if session else "", "signed_in": bool(session), "code": status,
                                **context}, status_code=status)

    def install(self, app: FastAPI) -> None:
        """Static files, the login and logout routes and the 401/403 pages."""
        app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

        @app.middleware("http")
        async def guard(request: Request, call_next: Callable[[Request], Any]) -> Response:
            declared = request.headers.get("content-length", "0")
            if not declared.isdigit() or int(declared) > MAX_BODY or (
                    request.method == "POST" and "content-length" not in request.headers):
                return Response(f"a console request body is at most {MAX_BODY // 1024} KiB, with its length "
                                "declared", status_code=413, headers=HEADERS)
            response: Response = await call_next(request)
            for key, value in HEADERS.items():
                response.headers.setdefault(key, value)
            return response

        @app.exception_handler(StarletteHTTPException)  # FastAPI's and the router's (404, 405) alike
        async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
            if exc.status_code == 401:
                return self.page(request, "login.html", None, message=str(exc.detail), status=401) \
                    if _wants_html(request) else _json_error(exc)
            if _wants_html(request):
                return self.page(request, "error.html", self.session(request), status=exc.status_code,
                                 message=str(exc.detail))
            return _json_error(exc)

        @app.get("/login", response_class=HTMLResponse)
        async def login_page(request: Request) -> HTMLResponse:
            return self.page(request, "login.html", None, message="")

        @app.post("/login")
        async def login(request: Request) -> Response:
            form = await request.form(max_files=0, max_fields=4, max_part_size=4096)
            if not self.token_ok(str(form.get("token", ""))):
                return self.page(request, "login.html", None, status=401,
                                 message="wrong token: use the one the console printed when it started")
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(self.cookie, self.new_session(), httponly=True, samesite="strict",
                                secure=self.secure_cookie, max_age=SESSION_HOURS * 3600)
            return response

        @app.post("/logout")
        async def logout(request: Request) -> Response:
            session = self.require(request)
            await self.check_csrf(request, session)
            self.sessions.pop(request.cookies.get(self.cookie, ""), None)
            response = RedirectResponse("/login", status_code=303)
            response.delete_cookie(self.cookie)
            return response


def _wants_html(request: Request) -> bool:
    return not request.url.path.startswith("/api/") and "application/json" not in request.headers.get("accept", "")


def _json_error(exc: StarletteHTTPException) -> Response:
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": exc.detail}, status_code=exc.status_code)


def _when(value: Any) -> str:
    """A unix time as local 'YYYY-MM-DD HH:MM:SS' ('-' when unknown)."""
    try:
        return datetime.fromtimestamp(float(value)).isoformat(sep=" ", timespec="seconds")
    except (TypeError, ValueError, OverflowError, OSError):
        return "-" if value in (None, "") else str(value)


def _num(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def tls_required(host: str) -> bool:
    """Whether binding to ``host`` needs TLS: anything but a loopback address does."""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # a name: it may resolve to anything


def configure(app: FastAPI, console: Console, *, host: str, port: int, tls_cert: Path | None,
              tls_key: Path | None, token_file: Path | None = None) -> str:
    """Check where a console may serve and set it up for there: refuses a non-loopback ``host`` without TLS; one
    session cookie per console and port; only this host's names accepted (DNS rebinding); the token written to
    ``token_file`` (mode 0600: whoever can read the daemon's log may not be whoever may log in). Returns the line
    that announces the address and the token."""
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("give both --tls-cert and --tls-key (the console's certificate and its private key), or "
                          "neither.")
    if tls_required(host) and tls_cert is None:
        raise ConfigError(f"--host {host}: a console reachable from other machines must use TLS; give --tls-cert and "
                          "--tls-key (e.g. the coordinator's server.pem and server.key), or keep the default "
                          "--host 127.0.0.1 and reach it through an SSH tunnel.")
    for path in (tls_cert, tls_key):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"TLS file {path} does not exist: give the certificate (PEM) and its key.")
    console.secure_cookie = tls_cert is not None
    # one cookie per console (two consoles on one host share cookies whatever their ports); __Host-: TLS only
    console.cookie = f"{'__Host-' if tls_cert is not None else ''}{COOKIE}_{console.kind}_{port}"
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=["127.0.0.1", "localhost", "[::1]", "::1", host])
    if token_file is not None:
        token_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(console.token + "\n")
        os.chmod(token_file, 0o600)  # an older file keeps its mode through O_TRUNC
    scheme = "https" if tls_cert is not None else "http"
    shown = f"[{host}]" if ":" in host else host
    where = f" (also in {token_file})" if token_file is not None else ""
    return f"{console.kind} console: {scheme}://{shown}:{port}/  login token: {console.token}{where}"


def serve(app: FastAPI, console: Console, *, host: str, port: int, tls_cert: Path | None, tls_key: Path | None,
          announce: Callable[[str], None], token_file: Path | None = None) -> None:
    """Run the console in the foreground (uvicorn) until Ctrl-C / SIGTERM, after :func:`configure`; prints the
    address and the login token through ``announce``."""
    import uvicorn

    announce(configure(app, console, host=host, port=port, tls_cert=tls_cert, tls_key=tls_key,
                       token_file=token_file))
    uvicorn.run(app, host=host, port=port, log_level="warning",
                ssl_certfile=str(tls_cert) if tls_cert else None, ssl_keyfile=str(tls_key) if tls_key else None)
