"""What ``medfed hospital console`` and ``medfed coordinator console`` share: their serving options and the call
that serves a console app in the foreground."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from medfed.cli.display import make_console

if TYPE_CHECKING:
    from fastapi import FastAPI

    from medfed.console.web import Console

__all__ = ["HostOpt", "TlsCertOpt", "TlsKeyOpt", "serve_console"]

HostOpt = Annotated[str, typer.Option(help="Address to serve on (anything but loopback needs --tls-cert/key).")]
TlsCertOpt = Annotated[Path | None, typer.Option(help="The console's TLS certificate (PEM).")]
TlsKeyOpt = Annotated[Path | None, typer.Option(help="The private key of --tls-cert.")]


def serve_console(app: FastAPI, web: Console, host: str, port: int, tls_cert: Path | None,
                  tls_key: Path | None, token_file: Path) -> None:
    """Serve a console until Ctrl-C, printing its address and login token first and writing the token to
    ``token_file`` (0600) (a ConfigError for a non-loopback host without TLS)."""
    from medfed.console.web import serve

    out = make_console()
    serve(app, web, host=host, port=port, tls_cert=tls_cert, tls_key=tls_key,
          announce=lambda line: out.print(line, highlight=False, soft_wrap=True), token_file=token_file)
