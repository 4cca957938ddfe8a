"""``medfed coordinator|hospitals|train|runs`` (the coordinator) and ``medfed hospital`` (a site): real deployments.

Coordinator::

    medfed coordinator init --dir coord --host coordinator.example.org     # CA + SuperLink certificate
    medfed coordinator start --dir coord --address 0.0.0.0:9093             # the SuperLink (TLS, node auth)
    medfed coordinator renew-cert --dir coord --host coordinator.example.org  # new server cert, same CA
    medfed hospitals register node.pub --dir coord --name hospital-a
    medfed hospitals unregister NODE_ID --dir coord
    medfed train --dir coord dataset=medmnist dataset.name=pneumoniamnist train.rounds=20
    medfed runs list|logs RUN_ID|stop RUN_ID --dir coord

Hospital::

    medfed hospital init --dir site --site-id hospital-a --data images.npz --n-classes 2 \\
        --superlink coordinator.example.org:9093 --ca ca.crt --max-epsilon 8
    medfed hospital approve --config site/site.yaml        # this installation's app bundle
    medfed hospital start --config site/site.yaml
    medfed hospital audit --config site/site.yaml
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from medfed.cli.display import fail
from medfed.common.errors import ConfigError, MedfedError

__all__ = ["register_commands"]

logger = logging.getLogger(__name__)

console = Console()
err_console = Console(stderr=True)

coordinator_app = typer.Typer(help="The coordinator's daemon: certificates and the Flower SuperLink.")
hospitals_app = typer.Typer(help="Hospitals known to the coordinator (their SuperNode keys).")
runs_app = typer.Typer(help="Training runs on the coordinator: list, follow logs, stop.")
hospital_app = typer.Typer(help="A hospital's own side: site config, keys, approved code, the client daemon.")

CoordDir = Annotated[Path, typer.Option("--dir", help="The coordinator directory (certificates, state, runs).")]
SiteOpt = Annotated[Path, typer.Option("--config", help="The hospital's site config (site.yaml).")]


def _coordinator(directory: Path) -> Any:
    from medfed.server.coordinator import Coordinator

    settings = Path(directory) / "coordinator.json"
    if not settings.is_file():
        raise ConfigError(
            f"{directory} is not a coordinator directory; create it with `medfed coordinator init`, or start with "
            "`medfed coordinator start --dir DIR --tls-dir FOLDER` when the certificates were made elsewhere."
        )
    values = json.loads(settings.read_text(encoding="utf-8"))
    return Coordinator(directory, address=values["address"], insecure=bool(values.get("insecure", False)),
                       tls_dir=values.get("tls_dir"))


def _save_settings(directory: Path, address: str, insecure: bool, tls_dir: Path | None = None) -> None:
    from medfed.common.atomic import atomic_write

    settings = {"address": address, "insecure": insecure}
    if tls_dir is not None:
        settings["tls_dir"] = str(Path(tls_dir).resolve())
    with atomic_write(Path(directory) / "coordinator.json", binary=False) as handle:
        json.dump(settings, handle, indent=2)


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
        create_ca(directory, force=force)
        create_server_certificate(directory, load_ca(directory), host, force=force)
        _save_settings(directory, address, insecure=False)
    except MedfedError as exc:
        fail(exc)
    console.print(f"coordinator directory {directory}: give every hospital [bold]{directory / 'ca.crt'}[/] "
                  "(never ca.key or server.key)")


@coordinator_app.command("renew-cert")
def coordinator_renew_cert(
    directory: CoordDir,
    host: Annotated[list[str], typer.Option("--host", help="Name or IP hospitals use to reach the coordinator.")],
) -> None:
    """Issue a new SuperLink certificate from the same CA (hospitals keep their ca.crt); restart to use it."""
    from medfed.common.pki import create_server_certificate, load_ca

    try:
        coordinator = _coordinator(directory)
        cert, _ = create_server_certificate(coordinator.tls_dir, load_ca(directory), host, force=True)
    except MedfedError as exc:
        fail(exc)
        return
    console.print(f"renewed {cert}; restart the coordinator (`medfed coordinator start`) to serve it")


def resume_interrupted(directory: Path) -> None:
    """Relaunch every run a coordinator stop or crash cut off, from its last checkpoint. A run that cannot be
    relaunched is reported and left for the next start, and one that made no progress since it was last resumed
    this way is left alone (it fails by itself); the coordinator keeps serving the others."""
    from medfed.server.coordinator import AUTO_RESUMED_AT

    for run in _coordinator(directory).interrupted_runs():
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


@coordinator_app.command("start")
def coordinator_start(
    directory: CoordDir,
    address: Annotated[str | None, typer.Option(help="host:port to listen on (default: the one from init).")] = None,
    tls_dir: Annotated[Path | None, typer.Option(
        help="Folder with ca.crt, server.pem and server.key (default: the coordinator directory).")] = None,
    insecure: Annotated[bool, typer.Option(help="No TLS: local experiments only.")] = False,
    resume: Annotated[bool, typer.Option(
        help="Resume the runs an earlier stop or crash of the coordinator cut off, from their last checkpoint.")] = True,
) -> None:
    """Run the SuperLink in the foreground until Ctrl-C / SIGTERM (TLS and SuperNode authentication on)."""
    from medfed.common.processes import stop_tree

    try:
        if not (Path(directory) / "coordinator.json").is_file() and (tls_dir is not None or insecure):
            # certificates made elsewhere (e.g. container secrets): this directory holds state and runs only
            Path(directory).mkdir(parents=True, exist_ok=True)
            _save_settings(directory, address or "0.0.0.0:9093", insecure, tls_dir)
        elif address is not None or insecure or tls_dir is not None:
            current = _coordinator(directory)
            _save_settings(directory, address or current.address, insecure, tls_dir or current.tls_dir)
        coordinator = _coordinator(directory)
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
    try:
        if resume:
            resume_interrupted(directory)
        while not stopping["now"] and process.poll() is None:
            time.sleep(0.5)
    finally:  # the SuperLink, its SuperExec and every ServerApp it started: none may outlive the coordinator
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
        node_id = _coordinator(directory).register(public_key, name=name)
        fingerprint = public_key_fingerprint(Path(public_key).read_bytes())
    except MedfedError as exc:
        fail(exc)
        return
    console.print(f"registered {name or public_key.name} ({fingerprint}) as node {node_id}", soft_wrap=True)


@hospitals_app.command("unregister")
def hospitals_unregister(node_id: int, directory: CoordDir) -> None:
    """Revoke a hospital's key (it is refused from now on; nobody else's credentials change)."""
    try:
        _coordinator(directory).unregister(node_id)
    except MedfedError as exc:
        fail(exc)
        return
    console.print(f"unregistered node {node_id}")


@hospitals_app.command("list")
def hospitals_list(directory: CoordDir) -> None:
    """Registered hospitals and whether they are online."""
    try:
        nodes = _coordinator(directory).nodes()
    except MedfedError as exc:
        fail(exc)
        return
    table = Table("node id", "status", "online since", "registered")
    for node in nodes:
        table.add_row(str(node.get("node-id")), str(node.get("status")), str(node.get("online-at")),
                      str(node.get("created-at")))
    console.print(table)


# --- runs --------------------------------------------------------------------------------------------------------
def launch_run(
    directory: Path, overrides: list[str], run_dir: Path | None, *, resume: bool = False,
    note: dict[str, Any] | None = None,
) -> tuple[int, Path, Any]:
    """Launch a training run of this installation's app bundle on the coordinator; returns (run id, run dir,
    composed config)."""
    from medfed.cli.bundle import staged_app
    from medfed.common import keys
    from medfed.common.config import compose_config, run_config_from_overrides
    from medfed.server.runs import RunDirectory

    coordinator = _coordinator(directory)
    cfg = compose_config(overrides)  # bad overrides fail here, before anything is submitted
    run_path = (run_dir or coordinator.runs_dir / f"run-{datetime.now().strftime('%Y%m%d-%H%M%S')}").resolve()
    if not resume and RunDirectory(run_path).metrics_path.exists():
        raise ConfigError(f"--run-dir {run_path} already holds a run; choose another or pass --resume.")
    run_config = run_config_from_overrides(
        overrides, **{keys.RUN_DIR: str(run_path), keys.RUN_MODE: "deployment", keys.RUN_RESUME: resume,
                      keys.RUN_T0: time.time()},
    )
    with staged_app() as app_dir:
        run_id = coordinator.launch(app_dir, run_config, note=note)
    return run_id, run_path, cfg


def train(
    directory: CoordDir,
    overrides: Annotated[list[str] | None, typer.Argument(help="Hydra overrides, key=value.")] = None,
    run_dir: Annotated[Path | None, typer.Option("--run-dir", help="Where the run's files go.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --run-dir from its last checkpoint.")] = False,
    wait: Annotated[bool, typer.Option(help="Wait for the run to finish and show its summary.")] = False,
) -> None:
    """Launch a training run on the coordinator's hospitals (the recipe: model, strategy, rounds, privacy)."""
    from medfed.cli.display import RoundFollower, summary_table
    from medfed.server.runs import RunDirectory

    try:
        if resume and run_dir is not None and not overrides:
            overrides = RunDirectory(run_dir).read_overrides()
        run_id, run_path, cfg = launch_run(directory, list(overrides or []), run_dir, resume=resume)
    except MedfedError as exc:
        fail(exc)
        return
    console.print(f"run {run_id} launched -> {run_path}")
    online = sum(1 for node in _coordinator(directory).nodes() if node.get("status") == "online")
    if online < cfg.strategy.min_available_nodes:
        err_console.print(
            f"[yellow]warning:[/] {online} hospital(s) online; the first round starts when "
            f"strategy.min_available_nodes={cfg.strategy.min_available_nodes} are (see `medfed hospitals list`)."
        )
    if wait:
        target = RunDirectory(run_path)
        next_status = time.monotonic() + 10
        with RoundFollower(target.metrics_path, cfg.train.rounds, console):
            while not target.summary_path.exists():
                if time.monotonic() >= next_status:  # Flower's CLI is a process start: ask it now and then
                    next_status = time.monotonic() + 10
                    status = _coordinator(directory).status(run_id)
                    if status and str(status[0].get("status", "")).startswith("finished") and not (
                        target.summary_path.exists()
                    ):
                        err_console.print(f"run {run_id} ended: {status[0].get('status')}")
                        raise typer.Exit(1)
                time.sleep(0.5)
        console.print(summary_table(target.read_summary(), f"medfed train: run {run_id}"))


@runs_app.command("list")
def runs_list(directory: CoordDir) -> None:
    """Every run of this coordinator with its status and run directory."""
    try:
        coordinator = _coordinator(directory)
        runs, index = coordinator.status(), coordinator.runs()
    except MedfedError as exc:
        fail(exc)
        return
    table = Table("run id", "status", "elapsed s", "run dir")
    for run in runs:
        rid = str(run.get("run-id"))
        table.add_row(rid, str(run.get("status")), f"{float(run.get('elapsed', 0)):.0f}",
                      str(index.get(rid, {}).get("run-dir", "-")))
    console.print(table)


@runs_app.command("stop")
def runs_stop(run_id: int, directory: CoordDir) -> None:
    """Stop a run (hospitals finish nothing further for it)."""
    try:
        _coordinator(directory).stop_run(run_id)
    except MedfedError as exc:
        fail(exc)
    console.print(f"run {run_id} stopped")


@runs_app.command("logs")
def runs_logs(run_id: int, directory: CoordDir, follow: Annotated[bool, typer.Option("--follow")] = False) -> None:
    """The ServerApp's log of a run (Flower's `flwr log`)."""
    import subprocess

    from medfed.common.environment import script
    from medfed.server.coordinator import CONNECTION

    try:
        coordinator = _coordinator(directory)
    except MedfedError as exc:
        fail(exc)
        return
    args = [script("flwr"), "log", str(run_id), CONNECTION] + ([] if follow else ["--show"])
    raise typer.Exit(subprocess.call(args, env=coordinator.environment()))


# --- hospital (site side) ----------------------------------------------------------------------------------------
@hospital_app.command("init")
def hospital_init(
    directory: Annotated[Path, typer.Option("--dir", help="The site's folder (config, keys, state).")],
    site_id: Annotated[str, typer.Option(help="The name the coordinator sees (no patient or staff names).")],
    data: Annotated[Path, typer.Option(
        help="The site's data: an array file (images + labels, .npz) or an image folder (DICOM, NIfTI, PNG/JPEG; "
             "check it first with `medfed hospital check`).")],
    n_classes: Annotated[int, typer.Option(help="Classes of the task (labels 0..n_classes-1).")],
    superlink: Annotated[str, typer.Option(help="The coordinator's address, host:port.")],
    ca: Annotated[Path, typer.Option(help="The coordinator's ca.crt.")],
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
) -> None:
    """Write the site config and the SuperNode key pair; send node.pub (only) to the coordinator."""
    from medfed.client.site import SiteConfig, write_site_config
    from medfed.common.pki import KeyExists, create_node_keys, public_key_fingerprint

    try:
        config_path = Path(directory) / "site.yaml"
        if config_path.exists() and not force:
            raise KeyExists(config_path)
        _, pub = create_node_keys(directory, force=force)
        approved = []
        if approve_installed:
            from medfed.cli.bundle import bundle_hash

            approved.append(bundle_hash())
        site = SiteConfig(
            site_id=site_id, data_path=str(Path(data).resolve()), labels=str(Path(labels).resolve()) if labels else None,
            n_classes=n_classes, max_epsilon=max_epsilon, max_delta=max_delta, min_noise=min_noise,
            secure_rng=secure_rng,
            superlink=superlink, ca_certificate=str(Path(ca).resolve()), auth_key="node.key",
            runtime_port=runtime_port, approved_apps=approved, state_dir=state_dir, threads=threads,
            classes=classes.split(",") if classes else [], image_size=image_size,
        )
        write_site_config(site, config_path)
        fingerprint = public_key_fingerprint(pub.read_bytes())
    except MedfedError as exc:
        fail(exc)
        return
    console.print(f"site {site_id}: wrote {config_path}; send [bold]{pub}[/] ({fingerprint}) to the coordinator")


@hospital_app.command("approve")
def hospital_approve(
    config: SiteOpt,
    sha256: Annotated[str | None, typer.Option(help="A bundle hash to approve (default: this installation's).")] = None,
) -> None:
    """Approve an app bundle: the site runs only bundles listed in its site config."""
    from medfed.cli.bundle import bundle_hash
    from medfed.client.site import load_site_config, write_site_config

    try:
        site = load_site_config(config)
        digest = (sha256 or bundle_hash()).lower()
        if digest not in site.approved_apps:
            write_site_config(dataclasses.replace(site, approved_apps=[*site.approved_apps, digest]), config)
    except MedfedError as exc:
        fail(exc)
        return
    console.print(f"approved app bundle {digest}")


@hospital_app.command("start")
def hospital_start(
    config: SiteOpt,
    insecure: Annotated[bool, typer.Option(help="No TLS: local experiments only.")] = False,
) -> None:
    """Run the hospital daemon (SuperNode + gate) in the foreground until Ctrl-C / SIGTERM."""
    from medfed.client.daemon import HospitalDaemon
    from medfed.client.site import load_site_config

    try:
        site = load_site_config(config)
        if not site.approved_apps:
            err_console.print("warning: approved_apps is empty, so every run will be refused; see "
                              "`medfed hospital approve`.")
        if site.secure_rng and importlib.util.find_spec("torchcsprng") is None:
            err_console.print("warning: secure_rng is true but torchcsprng is not installed, so every DP round will "
                              "be refused; see docs/operations.md, 'A secure RNG for DP' (or set secure_rng: false "
                              "in the site config for experiments).")
        daemon = HospitalDaemon(site, insecure=insecure)
    except MedfedError as exc:
        fail(exc)
        return
    console.print(f"hospital {site.site_id} -> {site.superlink} ({'INSECURE' if insecure else 'TLS'})")
    raise typer.Exit(daemon.run())


@hospital_app.command("audit")
def hospital_audit(config: SiteOpt) -> None:
    """Every message this site sent (and every bundle it refused)."""
    from medfed.client.gate import read_audit
    from medfed.client.site import load_site_config

    try:
        entries = read_audit(load_site_config(config).state_path)
    except MedfedError as exc:
        fail(exc)
        return
    table = Table("time", "event", "run", "round", "type", "bytes", "sha256", "epsilon")
    for e in entries:
        table.add_row(datetime.fromtimestamp(e["time"]).isoformat(timespec="seconds"), e["event"], str(e.get("run")),
                      str(e.get("round", "")), str(e.get("type", "")), str(e.get("bytes", "")),
                      str(e.get("sha256") or e.get("fab_sha256", ""))[:16],
                      "-" if e.get("epsilon") is None else f"{e['epsilon']:.3f}")
    console.print(table)


@hospital_app.command("check")
def hospital_check(
    data: Annotated[Path | None, typer.Option(
        help="The site's image folder (DICOM files/series, NIfTI, PNG/JPEG).")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="Check the folder of this site config.")] = None,
    labels: Annotated[Path | None, typer.Option(
        help="Label manifest CSV (path,label[,split][,patient_id]); default: one subfolder per class.")] = None,
    classes: Annotated[str | None, typer.Option(
        help="The task's classes, comma-separated; other labels are reported as unknown.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the report as JSON here.")] = None,
) -> None:
    """Check a site's data before training: readable images per class, unreadable files and why, duplicates,
    sizes, label problems. Files are named by index; their paths go to the local log only. Exits non-zero only
    when no labelled image is usable."""
    import json

    from medfed.common.data.site_folder import check_site

    try:
        wanted = classes.split(",") if classes else None
        if config is not None:
            from medfed.client.site import load_site_config

            site = load_site_config(config)
            data = site.path(site.data_path)
            labels = site.path(site.labels) if site.labels else labels
            wanted = wanted or (list(site.classes) or None)
        if data is None:
            raise ConfigError("give the site's folder with --data DIR, or its site config with --config site.yaml.")
        report = check_site(data, labels, wanted)
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
    console.print(table)
    for problem in report.unreadable[:20]:
        console.print(f"  file {problem['index']}: {problem['reason']}")
    if json_out is not None:
        json_out.write_text(json.dumps(report.as_dict(), indent=1) + "\n", encoding="utf-8")
        console.print(f"report written to {json_out}")
    if report.usable == 0:
        err_console.print("no labelled image is usable: fix the problems above before training")
        raise typer.Exit(1)


ModelOpt = Annotated[Path, typer.Option("--model", help="A trained model: a run's best_model.pt or model.pt.")]
RunConfigOpt = Annotated[Path | None, typer.Option(
    "--run-config", help="The config.yaml of the run that trained it (default: beside the model).")]
ImageSizeOpt = Annotated[int | None, typer.Option(help="The model's input size (default: the run config's).")]


@hospital_app.command("explain")
def hospital_explain(
    model: ModelOpt,
    images: Annotated[Path, typer.Option(help="An image, a DICOM series folder, or a folder of images.")],
    out: Annotated[Path, typer.Option(help="The folder for the maps (PNG overlays, .npy maps, index.csv).")],
    run_config: RunConfigOpt = None,
    image_size: ImageSizeOpt = None,
    layer: Annotated[str | None, typer.Option(help="The layer to explain (default: the encoder's last stage).")] = None,
    target_class: Annotated[int | None, typer.Option(
        "--class", help="The class to explain (default: each image's predicted class).")] = None,
) -> None:
    """Grad-CAM maps of a trained model's predictions for any image, computed and written on this machine only."""
    from medfed.client.local_tools import load_local_model, predict, read_images
    from medfed.common.explain import gradcam_maps, save_explanations

    try:
        local = load_local_model(model, run_config=run_config, image_size=image_size)
        array, names, failed = read_images(images, local)
        maps = gradcam_maps(local.model, array, target_layer=layer, class_index=target_class)
        labels = [f"{i:05d}-" + Path(name).name.replace(".", "_") for i, name in enumerate(names)]
        save_explanations(out, array, maps, labels, predict(local, array))
    except MedfedError as exc:
        fail(exc)
        return
    console.print(f"{len(names)} Grad-CAM map(s) in {out}/ (index.csv lists them)")
    for name, reason in failed:
        console.print(f"  skipped {name}: {reason}")


@hospital_app.command("rank")
def hospital_rank(
    model: ModelOpt,
    images: Annotated[Path, typer.Option(help="The unlabelled images: a folder (or one image / series).")],
    out: Annotated[Path, typer.Option(help="The CSV to write: which images to label first.")],
    method: Annotated[str, typer.Option(help="entropy | margin | mc_dropout | random.")] = "entropy",
    run_config: RunConfigOpt = None,
    image_size: ImageSizeOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of mc_dropout passes and of the random order.")] = 0,
) -> None:
    """Active learning: rank this site's unlabelled images by the model's uncertainty and write the labelling
    queue (rank, path, score, prediction) as a local CSV."""
    from medfed.client.local_tools import load_local_model, predict, read_images, uncertainty_scores, write_ranking

    try:
        local = load_local_model(model, run_config=run_config, image_size=image_size)
        array, names, failed = read_images(images, local)
        probs = predict(local, array)  # once: for the scores and the CSV's predictions
        write_ranking(out, names, uncertainty_scores(local, array, method, seed=seed, probs=probs), probs, method)
    except MedfedError as exc:
        fail(exc)
        return
    console.print(f"ranked {len(names)} image(s) by {method} -> {out}")
    for name, reason in failed:
        console.print(f"  skipped {name}: {reason}")


@hospital_app.command("export-demo")
def hospital_export_demo(
    index: Annotated[int, typer.Option(help="Which simulated hospital (0-based).")],
    out: Annotated[Path, typer.Option(help="The array file (.npz) or, with --format dicom, the folder to write.")],
    overrides: Annotated[list[str] | None, typer.Argument(help="Hydra overrides choosing dataset and federation.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="npz: one array file; dicom: a folder of DICOM files, one "
                                                       "subfolder per class (2D greyscale tasks).")] = "npz",
) -> None:
    """Write one simulated hospital's data as a site array file or DICOM folder (for walk-throughs and tests)."""
    from medfed.common.config import compose_config
    from medfed.common.data import ArrayDataset, load_site
    from medfed.common.data.site_files import write_array_file

    try:
        if fmt not in ("npz", "dicom"):
            raise ConfigError(f"--format {fmt!r} is not allowed; choose npz or dicom.")
        cfg = compose_config(list(overrides or []))
        site = load_site(cfg, index)
        data = ArrayDataset.concat([site.train, site.val])
        if fmt == "npz":
            write_array_file(out, data)
        else:
            _write_dicom_site(out, data, site.info.class_names)
    except MedfedError as exc:
        fail(exc)
        return
    console.print(f"wrote {len(site.train) + len(site.val)} images of {site.site_id} to {out}")


def _write_dicom_site(out: Path, data: object, class_names: tuple[str, ...]) -> None:
    """A class-subfolder DICOM site (8-bit greyscale secondary captures) from channel-first arrays in [0, 1]."""
    import numpy as np

    from medfed.common.data.dicom import write_dicom

    images, labels = data.images, data.labels  # type: ignore[attr-defined]
    if images.ndim != 4 or images.shape[1] != 1:
        raise ConfigError("--format dicom writes 2D greyscale images; this dataset is colour or 3D (use npz).")
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        pixels = np.clip(np.rint(image[0] * 255.0), 0, 255).astype(np.uint8)
        write_dicom(Path(out) / class_names[int(label)] / f"img{i:06d}.dcm", pixels)


def show_bundle_hash() -> None:
    """The sha256 of the app bundle this installation builds and `medfed train` submits: the coordinator announces
    it, and each hospital approves it (`medfed hospital approve --sha256 ...`) after checking its own matches."""
    from medfed.cli.bundle import bundle_hash

    console.print(bundle_hash(), highlight=False)


def register_commands(app: typer.Typer) -> None:
    """Add the deployment commands to the ``medfed`` command."""
    app.command("bundle-hash")(show_bundle_hash)
    app.add_typer(coordinator_app, name="coordinator")
    app.add_typer(hospitals_app, name="hospitals")
    app.add_typer(runs_app, name="runs")
    app.add_typer(hospital_app, name="hospital")
    app.command("train")(train)
