"""``medfed hospital`` (a site's own side): its site config and keys, the app bundles it approves, the client
daemon, its audit log and the check of its data. The local tools (explain, rank, export-demo) are in
``hospital_tools``."""

from __future__ import annotations

import importlib.util
import logging
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from medfed.cli.display import fail, folded, make_console
from medfed.cli.web import HostOpt, TlsCertOpt, TlsKeyOpt
from medfed.cli.hospital_tools import add_local_tools
from medfed.client.policy import DEFAULT_STAGES, parse_stages
from medfed.common.errors import ConfigError, MedfedError

__all__ = ["hospital_app"]

logger = logging.getLogger(__name__)

console = make_console()
err_console = make_console(stderr=True)

# `--data` was the data path's name before `--data-path` (site.yaml's data_path, dataset.data_path): still taken
DeprecatedDataOpt = Annotated[Path | None, typer.Option("--data", hidden=True, help="Deprecated: --data-path.")]


def _data_path(data_path: Path | None, deprecated: Path | None) -> Path | None:
    """``--data-path``, or the deprecated ``--data`` with a message saying so."""
    if deprecated is None:
        return data_path
    if data_path is not None:
        raise ConfigError("give the data path once, with --data-path (--data is its deprecated old name).")
    err_console.print("[yellow]warning:[/] --data is deprecated and will be removed; use --data-path.", highlight=False)
    return deprecated

hospital_app = typer.Typer(help="A hospital's own side: site config, keys, approved code, the client daemon.")

SiteOpt = Annotated[Path, typer.Option("--config", help="The hospital's site config (site.yaml).")]


def _require_checks(checks: list[Any], command: str) -> None:
    """Print each failed check on its own line and refuse (a ConfigError) when any failed."""
    failed = [c for c in checks if not c.ok]
    for check in failed:
        err_console.print(f"[red]{check.line()}[/]", highlight=False)
    if failed:
        raise ConfigError(f"{command}: {len(failed)} check(s) failed ({', '.join(c.name for c in failed)}); fix "
                          "them as each line above says and run it again.")


@hospital_app.command("init")
def hospital_init(
    directory: Annotated[Path, typer.Option("--dir", help="The site's folder (config, keys, state).")],
    site_id: Annotated[str, typer.Option(help="The name the coordinator sees (no patient or staff names).")],
    n_classes: Annotated[int, typer.Option(help="Classes of the task (labels 0..n_classes-1).")],
    superlink: Annotated[str, typer.Option(help="The coordinator's address, host:port.")],
    ca: Annotated[Path, typer.Option(help="The coordinator's ca.crt.")],
    data_path: Annotated[Path | None, typer.Option(
        help="The site's data: an array file (images + labels, .npz) or an image folder (DICOM, NIfTI, PNG/JPEG; "
             "check it first with `medfed hospital check`). Required.")] = None,
    labels: Annotated[Path | None, typer.Option(
        help="Optional labels: index,label rows for an array file; a path,label[,split][,patient_id] manifest for a "
             "folder (default there: one subfolder per class).")] = None,
    classes: Annotated[str | None, typer.Option(
        help="A folder's label names in the task's class order, comma-separated (e.g. malignant,benign).")] = None,
    image_size: Annotated[int, typer.Option(help="A folder's images are resized to the task's input size.")] = 28,
    max_epsilon: Annotated[float, typer.Option(help="The site's privacy cap over every run on its data.")] = 10.0,
    max_delta: Annotated[float, typer.Option(help="The largest delta the site accepts.")] = 1e-5,
    min_noise: Annotated[float, typer.Option(help="The least DP noise multiplier the site accepts.")] = 0.0,
    secure_rng: Annotated[bool, typer.Option(
        help="DP rounds only with a cryptographically secure RNG (Opacus' secure_mode; needs torchcsprng, see "
             "docs/operations.md). --no-secure-rng: torch's RNG, for experiments.")] = True,
    runtime_port: Annotated[int, typer.Option(help="Local port of the SuperNode's Runtime API.")] = 9094,
    threads: Annotated[int, typer.Option(
        help="CPU threads for training (0 = every core); on a machine shared with other sites, its share.")] = 0,
    state_dir: Annotated[str, typer.Option(
        help="Privacy ledger and audit log; relative paths are under --dir. Back it up: it holds the budget spent.")
    ] = "state",
    approve_installed: Annotated[bool, typer.Option(help="Approve this installation's app bundle.")] = False,
    force: Annotated[bool, typer.Option(help="Replace an existing key pair and site config.")] = False,
    require_dp: Annotated[bool, typer.Option(
        help="Train only with this site's own DP (privacy=dp). --no-require-dp: research sites that opt out.")] = True,
    require_secure_aggregation: Annotated[bool, typer.Option(
        help="Send updates only under SecAgg+ (privacy.secure_aggregation=true).")] = False,
    stages: Annotated[str, typer.Option(
        help="The requests the site answers, comma-separated (add gradcam to let it write explanation maps, audit "
             "to let it run the membership-inference audit, whose numbers DP does not cover).")]
        = ",".join(DEFAULT_STAGES),
    data: DeprecatedDataOpt = None,
) -> None:
    """Write the site config and the SuperNode key pair; send node.pub (only) to the coordinator."""
    from medfed.client.site import SiteConfig, write_site_config
    from medfed.client.site_checks import local_checks
    from medfed.common.pki import KeyExists, create_node_keys, public_key_fingerprint

    try:
        data_path = _data_path(data_path, data)
        if data_path is None:
            raise ConfigError("give the site's data with --data-path (an array file or an image folder).")
        config_path = Path(directory) / "site.yaml"
        if config_path.exists() and not force:
            raise KeyExists(config_path)
        approved = []
        if approve_installed:
            from medfed.cli.bundle import bundle_hash

            approved.append(bundle_hash())
        site = SiteConfig(
            site_id=site_id, data_path=str(Path(data_path).resolve()), labels=str(Path(labels).resolve()) if labels else None,
            n_classes=n_classes, max_epsilon=max_epsilon, max_delta=max_delta, min_noise=min_noise,
            secure_rng=secure_rng,
            superlink=superlink, ca_certificate=str(Path(ca).resolve()), auth_key="node.key",
            runtime_port=runtime_port, approved_apps=approved, state_dir=state_dir, threads=threads,
            classes=classes.split(",") if classes else [], image_size=image_size, require_dp=require_dp,
            require_secure_aggregation=require_secure_aggregation, stages=list(parse_stages(stages, key="--stages")),
            source=config_path.resolve(),
        )
        _require_checks(local_checks(site, keys=False), "medfed hospital init")  # before any file is written
        _, pub = create_node_keys(directory, force=force)
        write_site_config(site, config_path)
        if approved:  # audited like every approval (who, through what, when)
            from medfed.client.approvals import audit_approval

            audit_approval(site, approved[0], approve=True, via="init")
        fingerprint = public_key_fingerprint(pub.read_bytes())
    except MedfedError as exc:
        fail(exc)
        return
    console.print(f"site {site_id}: wrote {config_path}; send [bold]{pub}[/] ({fingerprint}) to the coordinator")
    if secure_rng and importlib.util.find_spec("torchcsprng") is None:
        err_console.print("note: DP rounds need the secure RNG this site asks for (secure_rng: true), and torchcsprng "
                          "is not installed here: run `medfed hospital install-secure-rng` before the first DP run "
                          "(or init with --no-secure-rng for experiments).", highlight=False)


@hospital_app.command("approve")
def hospital_approve(
    config: SiteOpt,
    sha256: Annotated[str | None, typer.Option(help="A bundle hash to approve (default: this installation's).")] = None,
) -> None:
    """Approve an app bundle: the site runs only bundles listed in its site config (audited)."""
    from medfed.cli.bundle import bundle_hash
    from medfed.client.approvals import set_approval, valid_hash

    try:
        digest = valid_hash(sha256 or bundle_hash())
        set_approval(config, digest, approve=True, via="cli")
    except MedfedError as exc:
        fail(exc)
        return
    console.print(f"approved app bundle {digest}")


@hospital_app.command("revoke")
def hospital_revoke(
    config: SiteOpt,
    sha256: Annotated[str, typer.Option(help="The bundle hash to take off the approved list.")],
) -> None:
    """Revoke an app bundle: runs of it are refused from the next message on (audited)."""
    from medfed.client.approvals import set_approval, valid_hash

    try:
        digest = valid_hash(sha256)
        changed = set_approval(config, digest, approve=False, via="cli")
    except MedfedError as exc:
        fail(exc)
        return
    console.print(f"revoked app bundle {digest}" if changed else f"{digest} was not approved: nothing changed")


HOSPITAL_CONSOLE_PORT = 8470


@hospital_app.command("console")
def hospital_console(
    config: SiteOpt,
    host: HostOpt = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the console.")] = HOSPITAL_CONSOLE_PORT,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
) -> None:
    """The hospital's web console: connection, runs and what left the site, privacy ledger, approved code, data
    check, Grad-CAM maps. Prints the login token; serves until Ctrl-C."""
    from medfed.client.site import load_site_config
    from medfed.console.hospital import create_hospital_app
    from medfed.cli.web import serve_console

    try:
        site = load_site_config(config)  # a bad site config fails here, with its message
        app, web = create_hospital_app(config)
        serve_console(app, web, host, port, tls_cert, tls_key, site.state_path / "console.token")
    except MedfedError as exc:
        fail(exc)


@hospital_app.command("start")
def hospital_start(
    config: SiteOpt,
    insecure: Annotated[bool, typer.Option(help="No TLS: local experiments only.")] = False,
    with_console: Annotated[bool, typer.Option(
        "--console", help="Also serve the hospital console (127.0.0.1, its own process: a console crash never stops "
                          "training; it stops with the daemon).")] = False,
    console_port: Annotated[int, typer.Option(help="Port of --console.")] = HOSPITAL_CONSOLE_PORT,
) -> None:
    """Run the hospital daemon (SuperNode + gate) in the foreground until Ctrl-C / SIGTERM."""
    from medfed.client.daemon import HospitalDaemon
    from medfed.client.site import load_site_config, site_policy
    from medfed.client.site_checks import local_checks, network_checks, readiness_checks
    from medfed.common.errors import ServiceUnavailable
    from medfed.common.processes import port_taken

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        site = load_site_config(config)
        _require_checks(local_checks(site, keys=True), "medfed hospital start")
        if port_taken(f"127.0.0.1:{site.runtime_port}"):  # at start only: a running hospital holds it itself
            raise ServiceUnavailable(
                f"runtime_port {site.runtime_port} (the SuperNode's local Runtime API, 127.0.0.1) is in use by "
                f"another process: another hospital on this machine, or this one already running. Stop it, or set "
                f"another runtime_port in {site.source} (any free port in [1024, 65535]) and start again.")
        for check in readiness_checks(site):  # the daemon starts; the runs would be refused
            if not check.ok:
                err_console.print(f"warning: {check.name}: {check.message}", highlight=False)
        if not insecure:
            for check in network_checks(site):  # the daemon keeps trying: a coordinator may come up later
                if not check.ok:
                    err_console.print(f"warning: {check.name}: {check.message} The daemon keeps trying.",
                                      highlight=False)
        web = [sys.executable, "-m", "medfed.cli.main", "hospital", "console", "--config", str(site.source),
               "--port", str(console_port)] if with_console else None
        daemon = HospitalDaemon(site, insecure=insecure, console=web)
    except MedfedError as exc:
        fail(exc)
        return
    console.print(f"hospital {site.site_id} -> {site.superlink} ({'INSECURE' if insecure else 'TLS'})")
    console.print(f"policy: {site_policy(site).describe()}", highlight=False)
    if site.defaults_applied:
        console.print(f"  (defaults applied for {', '.join(site.defaults_applied)}: the site config does not set "
                      "them; write them in site.yaml to make the choice explicit)", highlight=False)
    raise typer.Exit(daemon.run())


@hospital_app.command("install-secure-rng")
def hospital_install_secure_rng(
    dry_run: Annotated[bool, typer.Option(help="Print the command, run nothing.")] = False,
) -> None:
    """Build and install the secure RNG that DP rounds need (secure_rng: true, the default): torchcsprng from its
    pinned source, into this medfed's environment. Needs network access to GitHub and a C++ compiler (about 40 s
    on 2 cores); the hospital image has it built in. Then checks that it draws random numbers."""
    import subprocess
    import sys

    import torch

    from medfed.client.privacy import secure_rng_install_command, secure_rng_problem

    command = secure_rng_install_command(sys.executable)
    console.print(" ".join(command), highlight=False, soft_wrap=True)
    if dry_run:
        return
    if subprocess.run(command, check=False).returncode != 0:
        err_console.print("error: the build failed (see pip's output above): it needs network access to "
                          "github.com, git and a C++ compiler (e.g. apt install git g++). Without it, DP rounds run "
                          "only at sites that set secure_rng: false (experiments).", highlight=False)
        raise typer.Exit(1)
    problem = secure_rng_problem(torch.device("cpu"))
    if problem is not None:
        err_console.print(f"error: installed, but {problem}.", highlight=False)
        raise typer.Exit(1)
    console.print("torchcsprng works: DP rounds at sites with secure_rng: true can run (restart the daemon).")


@hospital_app.command("doctor")
def hospital_doctor(
    config: SiteOpt,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the coordinator's TLS handshake.")] = 5.0,
) -> None:
    """Check a site as `hospital start` does, on a running site too: its config, data, CA certificate, node key,
    the TLS handshake with the coordinator, the daemon's process and the secure RNG. One line per check; exits
    non-zero when any fails."""
    from medfed.client.daemon import PID_FILE
    from medfed.client.site import load_site_config
    from medfed.client.site_checks import Check, local_checks, network_checks, readiness_checks
    from medfed.common.processes import pid_alive

    try:
        site = load_site_config(config)
    except MedfedError as exc:
        fail(exc)
        return
    checks = [Check("site config", True, f"{site.source} is valid (site {site.site_id})."),
              *local_checks(site, keys=True), *network_checks(site, timeout=timeout)]
    pid_file = site.state_path / PID_FILE
    pid = pid_file.read_text(encoding="utf-8").strip() if pid_file.is_file() else ""
    if pid.isdigit() and pid_alive(int(pid)):
        checks.append(Check("daemon", True, f"running as pid {pid}."))
    else:
        checks.append(Check("daemon", False, "not running; start it with `medfed hospital start --config "
                                             f"{config}`."))
    checks += readiness_checks(site)
    for check in checks:
        (console if check.ok else err_console).print(check.line(), highlight=False, soft_wrap=True)
    if not all(c.ok for c in checks):
        raise typer.Exit(ConfigError.exit_code)


@hospital_app.command("audit")
def hospital_audit(
    config: SiteOpt,
    as_json: Annotated[bool, typer.Option("--json", help="Print every entry as JSON (all fields).")] = False,
) -> None:
    """Every message this site sent (and every bundle it refused, every ledger reset)."""
    import json

    from medfed.client.gate import read_audit
    from medfed.client.site import load_site_config

    try:
        entries = read_audit(load_site_config(config).state_path)
    except MedfedError as exc:
        fail(exc)
        return
    if as_json:
        typer.echo(json.dumps(entries, indent=1))
        return
    table = Table("time", "event", "run", "round", "stage", "bytes", "sha256", "epsilon", "refusal")
    for e in entries:
        table.add_row(datetime.fromtimestamp(e["time"]).isoformat(timespec="seconds"), e["event"], str(e.get("run")),
                      str(e.get("round", "")), str(e.get("stage") or e.get("type") or ""), str(e.get("bytes", "")),
                      str(e.get("sha256") or e.get("fab_sha256", ""))[:16],
                      "-" if e.get("epsilon") is None else f"{e['epsilon']:.3f}", str(e.get("refusal") or ""))
    console.print(folded(table))


budget_app = typer.Typer(help="This site's privacy budget: spent, cap and remaining, per ledger.",
                         invoke_without_command=True)
hospital_app.add_typer(budget_app, name="budget")


@budget_app.callback()
def hospital_budget(
    ctx: typer.Context,
    config: SiteOpt,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
) -> None:
    """Spent, cap and remaining epsilon of every ledger of this site (at the site's max_delta)."""
    if ctx.invoked_subcommand is not None:
        ctx.obj = config
        return
    import json

    from medfed.client.privacy import budget_rows
    from medfed.client.site import load_site_config

    try:
        rows = budget_rows(load_site_config(config))
    except MedfedError as exc:
        fail(exc)
        return
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    table = Table("ledger", "rounds", "steps", "evaluations", "spent", "of it evaluations", "cap", "remaining",
                  title="privacy budget (epsilon)")
    for row in rows:
        table.add_row(row["ledger"][:12], str(row["rounds"]), str(row["steps"]), str(row["evaluations"]),
                      f"{row['spent']:.3f}", f"{100 * row['evaluation_share']:.0f} %", f"{row['cap']:g}",
                      f"{row['remaining']:.3f}")
    console.print(folded(table) if rows else "no privacy ledger yet: this site has not trained with DP")


@budget_app.command("reset")
def hospital_budget_reset(
    ctx: typer.Context,
    reason: Annotated[str, typer.Option(help="Why (written to the audit log), e.g. 'new dataset, old one deleted'.")],
    ledger: Annotated[str | None, typer.Option(help="The ledger to reset (default: the only one).")] = None,
) -> None:
    """Start a fresh ledger: the old one is archived under privacy/archive/ and the reset is audited. Only for data
    that is truly new: every training on the same images must compose in one ledger."""
    import time

    from medfed.client.gate import AUDIT_FILE, append_audit
    from medfed.client.ledger import archive_ledger
    from medfed.client.privacy import budget_rows
    from medfed.client.site import load_site_config

    try:
        site = load_site_config(ctx.obj)
        rows = {row["ledger"]: row for row in budget_rows(site)}
        if ledger is None and len(rows) != 1:
            raise ConfigError(f"this site has {len(rows)} ledgers; name one with --ledger ({', '.join(rows) or '-'}).")
        key = ledger or next(iter(rows))
        archived = archive_ledger(site.state_path, key, reason)
        append_audit(site.state_path / AUDIT_FILE, {
            "time": time.time(), "event": "ledger-reset", "site": site.site_id, "ledger": key, "reason": reason,
            "spent": rows[key]["spent"] if key in rows else None, "archive": archived.name})
    except MedfedError as exc:
        fail(exc)
        return
    console.print(f"ledger {key} archived as {archived.name}; the reset is in the audit log")


@hospital_app.command("check")
def hospital_check(
    data_path: Annotated[Path | None, typer.Option(
        help="The site's image folder (DICOM files/series, NIfTI, PNG/JPEG).")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="Check the folder of this site config.")] = None,
    labels: Annotated[Path | None, typer.Option(
        help="Label manifest CSV (path,label[,split][,patient_id]); default: one subfolder per class.")] = None,
    classes: Annotated[str | None, typer.Option(
        help="The task's classes, comma-separated; other labels are reported as unknown.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the report as JSON here.")] = None,
    data: DeprecatedDataOpt = None,
) -> None:
    """Check a site's data before training: readable images per class, unreadable files and why, duplicates,
    sizes, label problems. Files are named by index; their paths go to the local log only. Exits non-zero only
    when no labelled image is usable."""
    import json

    from medfed.common.data.site_folder import check_site

    try:
        wanted = classes.split(",") if classes else None
        data_path = _data_path(data_path, data)
        site = None
        if config is not None:
            from medfed.client.site import load_site_config

            site = load_site_config(config)
            data_path = site.path(site.data_path)
            labels = site.path(site.labels) if site.labels else labels
            wanted = wanted or (list(site.classes) or None)
        if data_path is None:
            raise ConfigError("give the site's folder with --data-path DIR, or its site config with --config "
                              "site.yaml.")
        report = check_site(data_path, labels, wanted)
        if site is not None:
            from medfed.client.site_checks import save_data_check

            save_data_check(site, report)  # the site's latest check, shown by the hospital console
    except MedfedError as exc:
        fail(exc)
        return
    table = Table("", "images", title=f"site data check: {len(report.classes)} classes")
    for label, count in report.readable.items():
        table.add_row(f"readable: {label}", str(count))
    table.add_row("unreadable (skipped)", str(len(report.unreadable)))
    table.add_row("duplicate groups", str(len(report.duplicates)))
    for label, count in report.unknown_labels.items():
        table.add_row(f"unknown label {label!r}", str(count))
    table.add_row("manifest rows for missing files", str(report.missing_files))
    table.add_row("manifest rows with no path or a bad split", str(report.bad_rows))
    table.add_row("images without a manifest row (unlabelled)", str(report.unlisted))
    for shape, count in list(report.shapes.items())[:5]:
        table.add_row(f"size {shape}", str(count))
    for modality, count in report.modalities.items():
        table.add_row(f"DICOM modality {modality}", str(count))
    console.print(folded(table))
    for problem in report.unreadable[:20]:
        console.print(f"  file {problem['index']}: {problem['reason']}")
    if json_out is not None:
        json_out.write_text(json.dumps(report.as_dict(), indent=1) + "\n", encoding="utf-8")
        console.print(f"report written to {json_out}")
    if report.usable == 0:
        err_console.print("no labelled image is usable: fix the problems above before training")
        raise typer.Exit(1)


add_local_tools(hospital_app)  # explain, rank, export-demo: listed after the site's own commands
