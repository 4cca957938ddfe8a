"""``medfed coordinator`` (certificates and the Flower SuperLink) and ``medfed hospitals`` (the hospitals the
coordinator knows: their SuperNode keys)."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from medfed.cli.coordination import CoordDir, check_listen_address, launch_run, open_coordinator, save_settings
from medfed.cli.display import fail, folded, make_console
from medfed.cli.web import HostOpt, TlsCertOpt, TlsKeyOpt
from medfed.common.errors import MedfedError

__all__ = ["coordinator_app", "hospitals_app", "resume_interrupted"]

logger = logging.getLogger(__name__)

console = make_console()
err_console = make_console(stderr=True)

coordinator_app = typer.Typer(help="The coordinator's daemon: certificates and the Flower SuperLink.")
hospitals_app = typer.Typer(help="Hospitals known to the coordinator (their SuperNode keys).")


# --- coordinator ------------------------------------------------------------------------------------------------
@coordinator_app.command("init")
def coordinator_init(
    directory: CoordDir,
    host: Annotated[list[str], typer.Option("--host", help="Name or IP hospitals use to reach the coordinator.")],
    address: Annotated[str, typer.Option(help="Where the SuperLink listens (host:port).")] = "0.0.0.0:9093",
    force: Annotated[bool, typer.Option(help="Replace existing keys and certificates.")] = False,
) -> None:
    """Create the deployment's certificate authority and the SuperLink's TLS certificate."""
    from medfed.common.pki import create_ca, create_server_certificate, load_ca

    try:
        check_listen_address(address)
        create_ca(directory, force=force)
        create_server_certificate(directory, load_ca(directory), _with_listen_host(host, address), force=force)
        save_settings(directory, address, insecure=False)
    except MedfedError as exc:
        fail(exc)
    console.print(f"coordinator directory {directory}: give every hospital [bold]{directory / 'ca.crt'}[/] "
                  "(never ca.key or server.key)")


def _with_listen_host(hosts: list[str], address: str) -> list[str]:
    """``hosts`` and the host the SuperLink listens on, when that is one address rather than all of them (Flower's
    SuperExec connects there)."""
    from medfed.server.coordinator import listen_host

    listen = listen_host(address)
    return hosts if listen is None or listen in hosts else [*hosts, listen]


@coordinator_app.command("renew-cert")
def coordinator_renew_cert(
    directory: CoordDir,
    host: Annotated[list[str], typer.Option("--host", help="Name or IP hospitals use to reach the coordinator.")],
) -> None:
    """Issue a new SuperLink certificate from the same CA (hospitals keep their ca.crt); restart to use it."""
    from medfed.common.pki import create_server_certificate, load_ca

    try:
        coordinator = open_coordinator(directory)
        cert, _ = create_server_certificate(coordinator.tls_dir, load_ca(directory),
                                            _with_listen_host(host, coordinator.address), force=True)
    except MedfedError as exc:
        fail(exc)
        return
    console.print(f"renewed {cert}; restart the coordinator (`medfed coordinator start`) to serve it")


def resume_interrupted(directory: Path) -> None:
    """Relaunch every run a coordinator stop or crash cut off, from its last checkpoint. A run that cannot be
    relaunched is reported and left for the next start, and one that made no progress since it was last resumed
    this way is left alone (it fails by itself); the coordinator keeps serving the others."""
    from medfed.server.coordinator import AUTO_RESUMED_AT

    for run in open_coordinator(directory).interrupted_runs():
        if run.stalled:
            err_console.print(
                f"[yellow]warning:[/] run {run.run_id} ({run.run_dir}) did not finish a round since it was last "
                f"resumed (after round {run.rounds_done}); see `medfed runs logs {run.run_id}`, then resume it with "
                f"`medfed train --dir {directory} --run-dir {run.run_dir} --resume`."
            )
            continue
        try:
            new_id, _, _ = launch_run(directory, run.overrides, run.run_dir, resume=True,
                                      note={AUTO_RESUMED_AT: run.rounds_done})
        except MedfedError as exc:
            err_console.print(f"[red]error:[/] run {run.run_id} ({run.run_dir}) could not be resumed: {exc}")
            continue
        console.print(f"run {run.run_id} was cut off after round {run.rounds_done}: resumed as run {new_id} -> "
                      f"{run.run_dir}")


COORDINATOR_CONSOLE_PORT = 8480


@coordinator_app.command("console")
def coordinator_console(
    directory: CoordDir,
    host: HostOpt = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the console.")] = COORDINATOR_CONSOLE_PORT,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
) -> None:
    """The coordinator's web console: hospitals, runs with live rounds and per-site epsilon, start and stop runs,
    logs. Prints the login token; serves until Ctrl-C."""
    from medfed.console.coordinator import create_coordinator_app
    from medfed.cli.web import serve_console

    try:
        app, web = create_coordinator_app(directory)
        serve_console(app, web, host, port, tls_cert, tls_key, Path(directory) / "console.token")
    except MedfedError as exc:
        fail(exc)


@coordinator_app.command("start")
def coordinator_start(
    directory: CoordDir,
    address: Annotated[str | None, typer.Option(help="host:port to listen on (default: the one from init).")] = None,
    tls_dir: Annotated[Path | None, typer.Option(
        help="Folder with ca.crt, server.pem and server.key (default: the coordinator directory).")] = None,
    insecure: Annotated[bool, typer.Option(help="No TLS: local experiments only.")] = False,
    resume: Annotated[bool, typer.Option(
        help="Resume the runs an earlier stop or crash of the coordinator cut off, from their last checkpoint.")] = True,
    with_console: Annotated[bool, typer.Option(
        "--console", help="Also serve the coordinator console (127.0.0.1, its own process: a console crash never "
                          "stops the SuperLink; it stops with the coordinator).")] = False,
    console_port: Annotated[int, typer.Option(help="Port of --console.")] = COORDINATOR_CONSOLE_PORT,
) -> None:
    """Run the SuperLink in the foreground until Ctrl-C / SIGTERM (TLS and SuperNode authentication on)."""
    from medfed.common.processes import stop_tree

    try:
        if not (Path(directory) / "coordinator.json").is_file() and (tls_dir is not None or insecure):
            # certificates made elsewhere (e.g. container secrets): this directory holds state and runs only
            Path(directory).mkdir(parents=True, exist_ok=True)
            save_settings(directory, address or "0.0.0.0:9093", insecure, tls_dir)
        elif address is not None or insecure or tls_dir is not None:
            current = open_coordinator(directory)
            save_settings(directory, address or current.address, insecure, tls_dir or current.tls_dir)
        coordinator = open_coordinator(directory)
        process = coordinator.start()
    except MedfedError as exc:
        fail(exc)
        return
    console.print(f"SuperLink pid {process.pid} listening on {coordinator.address} "
                  f"({'INSECURE' if coordinator.insecure else 'TLS'}, SuperNode authentication on)")
    stopping = {"now": False}

    def stop(*_: object) -> None:
        stopping["now"] = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    web = None
    try:
        if resume:
            resume_interrupted(directory)
        if with_console:  # a process of its own, stopped by its pid with the SuperLink's
            web = subprocess.Popen([sys.executable, "-m", "medfed.cli.main", "coordinator", "console", "--dir",
                                    str(directory), "--port", str(console_port)])
            console.print(f"console pid {web.pid}")
        while not stopping["now"] and process.poll() is None:
            if web is not None and web.poll() is not None:
                err_console.print(f"[yellow]warning:[/] the console (pid {web.pid}) exited with {web.returncode}; "
                                  f"the SuperLink goes on (`medfed coordinator console --dir {directory}`)")
                web = None
            time.sleep(0.5)
    finally:  # the SuperLink, its SuperExec and every ServerApp it started: none may outlive the coordinator
        if web is not None and web.poll() is None:
            stop_tree(web.pid, timeout=10)
        crashed = process.poll() is not None  # then its pid may be reused: nothing to signal (its SuperExec
        if not crashed:  # watches the SuperLink's pid and stops by itself)
            stop_tree(process.pid)
        process.wait()
    if crashed and not stopping["now"]:
        err_console.print(f"[red]error:[/] the SuperLink exited with {process.returncode}; see "
                          f"{coordinator.dir / 'superlink.log'}")
        raise typer.Exit(1)
    raise typer.Exit(0)


# --- hospitals (coordinator side) ------------------------------------------------------------------------------
@hospitals_app.command("register")
def hospitals_register(
    public_key: Annotated[Path, typer.Argument(help="The hospital's node.pub (OpenSSH public key).")],
    directory: CoordDir,
    name: Annotated[str | None, typer.Option(help="A name for the hospital.")] = None,
) -> None:
    """Allow a hospital's SuperNode to connect (no one else's credentials change)."""
    from medfed.common.pki import public_key_fingerprint

    try:
        node_id = open_coordinator(directory).register(public_key, name=name)
        fingerprint = public_key_fingerprint(Path(public_key).read_bytes())
    except MedfedError as exc:
        fail(exc)
        return
    console.print(f"registered {name or public_key.name} ({fingerprint}) as node {node_id}", soft_wrap=True)


@hospitals_app.command("unregister")
def hospitals_unregister(node_id: int, directory: CoordDir) -> None:
    """Revoke a hospital's key (it is refused from now on; nobody else's credentials change)."""
    try:
        open_coordinator(directory).unregister(node_id)
    except MedfedError as exc:
        fail(exc)
        return
    console.print(f"unregistered node {node_id}")


@hospitals_app.command("list")
def hospitals_list(
    directory: CoordDir,
    as_json: Annotated[bool, typer.Option("--json", help="Print the hospitals as JSON (all fields).")] = False,
) -> None:
    """Registered hospitals: their names, whether they are online, their keys' fingerprints."""
    import json

    try:
        coordinator = open_coordinator(directory)
        nodes, names = coordinator.nodes(), coordinator.node_names()
    except MedfedError as exc:
        fail(exc)
        return
    rows = []
    for node in nodes:
        known = names.get(int(str(node.get("node-id"))), {})
        rows.append({"name": known.get("name", ""), "node-id": str(node.get("node-id")),
                     "status": node.get("status"), "online-at": node.get("online-at"),
                     "registered-at": node.get("created-at"), "fingerprint": known.get("fingerprint", "")})
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    table = Table("name", "node id", "status", "online since", "registered", "key fingerprint")
    for row in rows:
        table.add_row(*(str(row[k] or "") for k in ("name", "node-id", "status", "online-at", "registered-at",
                                                     "fingerprint")))
    console.print(folded(table))
