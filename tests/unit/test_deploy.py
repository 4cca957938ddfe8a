"""deploy/: the compose files, the Dockerfile and the systemd units are checked here, since no Docker engine or
systemd runs on our machines: YAML and unit syntax, every key known, every secret and named volume declared,
every COPY source present, and every command line they run parsed by the real `medfed` CLI."""

from __future__ import annotations

import configparser
import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import click
import pytest
import typer
import yaml

from medfed.cli.main import app

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
BASE_FILES = {"coordinator.yml": "coordinator", "hospital.yml": "hospital"}
OVERLAYS = {"coordinator.insecure.yml": "coordinator.yml", "hospital.insecure.yml": "hospital.yml",
            "hospital.gpu.yml": "hospital.yml"}

# the Compose specification's keys that these files may use (a typo is an unknown key, which Compose would refuse)
TOP_KEYS = {"name", "services", "volumes", "secrets", "networks", "configs"}
SERVICE_KEYS = {"build", "image", "command", "entrypoint", "ports", "volumes", "secrets", "environment", "restart",
                "stop_grace_period", "deploy", "user", "healthcheck", "depends_on", "networks", "logging"}
BUILD_KEYS = {"context", "dockerfile", "target", "args"}
RESTART = {"no", "always", "on-failure", "unless-stopped"}
VOLUME = re.compile(r"(\$\{[^}]*\}|[^:$]+):(/[^:]*)(?::(ro|rw))?")  # source:target[:mode], source may be ${VAR:-x}


class ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's merge tags (!reset, !override), kept as markers."""


ComposeLoader.add_constructor("!reset", lambda loader, node: ("!reset", None))
ComposeLoader.add_constructor("!override", lambda loader, node: ("!override", None))


def _load(path: Path) -> dict[str, Any]:
    data = yaml.load(path.read_text(), Loader=ComposeLoader)
    assert isinstance(data, dict), path
    return data


def parse_cli(argv: list[str]) -> tuple[str, dict[str, Any]]:
    """Parse a `medfed ...` command line as the CLI would (options, required values), without running it."""
    command: click.Command = typer.main.get_command(app)
    ctx = command.make_context("medfed", list(argv))
    path = []
    while isinstance(command, click.Group):
        pending = list(getattr(ctx, "_protected_args", None) or ctx.protected_args) + list(ctx.args)
        name, command, rest = command.resolve_command(ctx, pending)
        path.append(name)
        ctx = command.make_context(name, rest, parent=ctx)
    return " ".join(path), ctx.params


def test_parse_cli_refuses_a_typo():
    with pytest.raises(click.UsageError, match="--confg"):
        parse_cli(["hospital", "start", "--confg", "site.yaml"])
    with pytest.raises(click.UsageError, match="config"):
        parse_cli(["hospital", "start"])


# --- compose -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(BASE_FILES))
def test_compose_base_files_are_complete_and_consistent(name):
    data = _load(COMPOSE / name)
    role = BASE_FILES[name]

    assert set(data) <= TOP_KEYS, set(data) - TOP_KEYS
    (service_name, service), = data["services"].items()
    assert service_name == role
    assert set(service) <= SERVICE_KEYS, set(service) - SERVICE_KEYS
    assert set(service["build"]) <= BUILD_KEYS
    assert service["restart"] in RESTART
    # the build points at the Dockerfile and one of its stages
    build = service["build"]
    assert (COMPOSE / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    assert build["target"] in _stages()
    # every secret used is declared with a file; every named volume is declared
    for secret in service.get("secrets", []):
        assert "file" in data["secrets"][secret], secret
    for volume in service["volumes"]:
        source, target, _ = VOLUME.fullmatch(volume).groups()
        if not source.startswith((".", "/", "$")):
            assert source in data.get("volumes", {}), source
        assert target.startswith("/")
    # the command is a valid medfed command, and it reads what the service mounts
    path, params = parse_cli(service["command"])
    assert path == f"{role} start"
    if role == "coordinator":
        assert "insecure" not in service["command"] and params["tls_dir"] == "/run/secrets"
        assert set(service["secrets"]) == {"ca.crt", "server.pem", "server.key"}
        assert service["ports"] == ["9093:9093"] and params["address"].endswith(":9093")
        mounts = [VOLUME.fullmatch(v).group(2) for v in service["volumes"]]
        assert any(params["directory"].startswith(m) for m in mounts)  # state on a volume
    else:
        assert "--insecure" not in service["command"] and service["secrets"] == ["ca.crt"]
        assert "ports" not in service  # a hospital only connects out
        assert any(v.startswith("${MEDFED_SITE_DATA") and v.endswith(":/data:ro") for v in service["volumes"])
        assert Path(params["config"]).parent.as_posix() in [VOLUME.fullmatch(v).group(2) for v in service["volumes"]]


def test_compose_init_instructions_match_the_cli():
    # the commands the comments tell operators to run must parse too
    text = (COMPOSE / "hospital.yml").read_text()
    block = re.search(r"run --rm hospital (hospital init .*?)\n(?!#\s{3,})", text, re.S).group(1)
    argv = shlex.split(re.sub(r"\\\n#\s*", " ", block))
    path, params = parse_cli(argv)
    assert path == "hospital init" and params["state_dir"].startswith("/var/lib/medfed")
    register = re.search(r"medfed (hospitals register .*)", (COMPOSE / "coordinator.yml").read_text()).group(1)
    assert parse_cli(shlex.split(register))[0] == "hospitals register"


@pytest.mark.parametrize("name", sorted(OVERLAYS))
def test_compose_overlays_only_change_known_services(name):
    data, base = _load(COMPOSE / name), _load(COMPOSE / OVERLAYS[name])

    assert set(data) <= TOP_KEYS
    for service_name, service in data["services"].items():
        assert service_name in base["services"]  # an overlay never creates a half-defined service
        assert set(service) <= SERVICE_KEYS
        if "command" in service:
            parse_cli(service["command"])
    if "insecure" in name:
        (service,) = data["services"].values()
        assert "--insecure" in service["command"] and service["secrets"] == ("!reset", None)
        assert "LOCAL EXPERIMENTS ONLY" in (COMPOSE / name).read_text()
    if "gpu" in name:
        devices = data["services"]["hospital"]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
        assert data["services"]["hospital"]["build"]["args"]["TORCH_INDEX"].startswith("https://")


# --- Dockerfile --------------------------------------------------------------------------------------------------
INSTRUCTIONS = {"FROM", "ARG", "ENV", "RUN", "COPY", "WORKDIR", "USER", "EXPOSE", "ENTRYPOINT", "CMD", "LABEL",
                "VOLUME", "HEALTHCHECK", "STOPSIGNAL"}


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            out.append((keyword, rest.strip()))
    return out


def _stages() -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for keyword, rest in _instructions():
        if keyword == "FROM":
            current = stages.setdefault(rest.split(" AS ")[-1].strip(), [])
        current.append((keyword, rest))
    return stages


def test_dockerfile_is_well_formed_and_copies_what_exists():
    instructions = _instructions()
    assert {k for k, _ in instructions} <= INSTRUCTIONS
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
    for keyword, rest in instructions:
        if keyword == "COPY":
            source = rest.split()[0]
            assert (REPO / source).exists(), source
            assert f"!{source}" in ignore or f"!{source}/" in ignore, f"{source} is excluded from the build context"
    # every package the wheel installs is copied
    import tomllib

    folders = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    copied = {rest.split()[0] for k, rest in instructions if k == "COPY"}
    assert "console" in folders and folders <= copied, folders - copied  # the folders medfed.* are built from


def test_dockerfile_builds_without_a_registry_frontend_on_any_base():
    text = DOCKERFILE.read_text()
    assert "# syntax=" not in text  # BuildKit would fetch that frontend from a registry
    args = dict(rest.split("=", 1) for k, rest in _instructions() if k == "ARG" and "=" in rest)
    assert args["BASE_IMAGE"] == "python:3.11-slim"
    assert ("FROM", "${BASE_IMAGE} AS base") in _instructions()
    assert (REPO / ".ci" / "containers").is_file()  # the CI step that builds it from a local base


def test_dockerfile_pins_the_torch_the_project_admits():
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    upper = re.search(r"<=([\d.]+)", next(d for d in deps if d.startswith("torch"))).group(1)
    args = dict(rest.split("=", 1) for k, rest in _instructions() if k == "ARG" and "=" in rest)
    assert args["TORCH_VERSION"] == upper


@pytest.mark.parametrize(("stage", "role"), [("coordinator", "coordinator start"), ("hospital", "hospital start")])
def test_docker_stages_run_the_medfed_daemons(stage, role):
    stage_instructions = dict(_stages()[stage])
    entrypoint, cmd = json.loads(stage_instructions["ENTRYPOINT"]), json.loads(stage_instructions["CMD"])
    assert entrypoint == ["medfed"]
    assert parse_cli(cmd)[0] == role
    user = [rest for k, rest in _stages()["base"] if k == "USER"]
    assert user == ["medfed"]  # the daemons never run as root
    assert [rest for k, rest in _stages()[stage] if k == "USER"][-1:] in ([], ["medfed"])  # (root only to build)


def test_the_hospital_image_builds_torchcsprng_from_a_pinned_commit_and_checks_it():
    stage = _stages()["hospital"]
    args = dict(rest.split("=", 1) for k, rest in stage if k == "ARG" and "=" in rest)
    assert re.fullmatch(r"[0-9a-f]{40}", args["CSPRNG_COMMIT"])
    assert args["WITH_CSPRNG"] == "1"  # built unless the build says otherwise
    (build,) = [rest for k, rest in stage if k == "RUN" and "csprng" in rest]
    assert '"${CSPRNG_SOURCE}"' in build and "--no-build-isolation" in build
    assert "create_random_device_generator" in build  # a broken build fails the image, not a hospital's first round
    # the source is the vendored archive of that commit (no GitHub needed), checked against its sha256 first
    vendored = DEPLOY / "docker" / "vendor" / f"torchcsprng-{args['CSPRNG_COMMIT'][:12]}.tar.gz"
    assert args["CSPRNG_SOURCE"] == f"/tmp/vendor/{vendored.name}"
    assert ("COPY", "deploy/docker/vendor/ /tmp/vendor/") in stage
    assert "!deploy/docker/vendor/" in (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    assert hashlib.sha256(vendored.read_bytes()).hexdigest() == args["CSPRNG_SHA256"]
    assert 'sha256sum -c' in build and "${CSPRNG_SHA256}" in build
    with tarfile.open(vendored) as archive:  # an unmodified `git archive` of the pinned commit
        assert archive.pax_headers.get("comment") == args["CSPRNG_COMMIT"]
        names = set(archive.getnames())
    assert {f"{vendored.name[:-7]}/{name}" for name in ("LICENSE", "setup.py", "version.txt")} <= names
    # the image, the docs and `medfed hospital install-secure-rng` build the same commit
    from medfed.client.privacy import TORCHCSPRNG_COMMIT

    assert args["CSPRNG_COMMIT"] == TORCHCSPRNG_COMMIT
    assert TORCHCSPRNG_COMMIT in (DEPLOY.parent / "docs" / "operations.md").read_text()


def test_install_secure_rng_builds_the_pinned_source_into_this_environment():
    from typer.testing import CliRunner

    from medfed.cli.main import app as cli
    from medfed.client.privacy import TORCHCSPRNG_COMMIT, secure_rng_install_command

    command = secure_rng_install_command("/opt/medfed/bin/python")
    assert command[:4] == ["/opt/medfed/bin/python", "-m", "pip", "install"]
    assert "--no-build-isolation" in command and "--no-deps" in command  # against the torch installed here
    assert command[-1].endswith(f"github.com/pytorch/csprng@{TORCHCSPRNG_COMMIT}")
    result = CliRunner().invoke(cli, ["hospital", "install-secure-rng", "--dry-run"])
    assert result.exit_code == 0 and TORCHCSPRNG_COMMIT in result.output


# --- systemd -----------------------------------------------------------------------------------------------------
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_units_run_medfed_unprivileged(unit):
    parser = configparser.ConfigParser(strict=True, interpolation=None)
    parser.optionxform = str
    parser.read_string(unit.read_text())
    service = parser["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0].endswith("/bin/medfed")
    path, params = parse_cli(argv[1:])
    assert path in {"coordinator start", "hospital start"}
    assert not params.get("insecure")
    assert service["User"] == "medfed" and service["NoNewPrivileges"] == "yes"
    assert service["KillMode"] == "mixed" and service["Restart"] == "on-failure"
    assert "FLWR_TELEMETRY_ENABLED=0" in service["Environment"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_units_verify(unit, tmp_path):
    # systemd's own check, with ExecStart pointing at this environment's medfed (the unit's path is the install's)
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text().replace("/opt/medfed/venv/bin/medfed", str(Path(sys.executable).parent / "medfed")))
    done = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and str(copy) not in done.stderr + done.stdout, done.stderr


# --- README ------------------------------------------------------------------------------------------------------
def _readme_commands() -> list[list[str]]:
    """Every `medfed ...` line of the README's deployment walk-throughs, continuation lines joined."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Deployment"):text.index("## Benchmarks")]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" # ")[0].split("  #")[0].strip()
            if line.startswith("medfed "):
                line = line.replace("$((5 + i))", "5").replace("$i", "0")
                commands.append(shlex.split(line)[1:])
    return commands


def test_readme_walkthrough_commands_parse():
    commands = _readme_commands()
    paths = [parse_cli(argv)[0] for argv in commands]
    # both walk-throughs: certificates, daemons, registration, approval, training, runs, audit
    for expected in ("coordinator init", "coordinator start", "hospital init", "hospitals register", "hospital start",
                     "train", "runs list", "hospital audit", "hospital approve", "bundle-hash", "hospital export-demo"):
        assert expected in paths, expected


def test_every_run_config_key_a_deployment_run_sends_is_declared_in_the_app_bundle(tmp_path):
    # Flower refuses a run whose run config has a key the app's pyproject does not declare (found in e2e: the
    # SuperLink answered "Key 'node-names' is not present in the main dictionary")
    import tomllib

    from medfed.cli.bundle import staged_app
    from medfed.cli.coordination import deployment_run_config
    from medfed.common.config import run_config_from_overrides

    sent = run_config_from_overrides(["train.rounds=2"], **deployment_run_config(
        tmp_path / "run", resume=False, names={123: "hospital-a"}))
    with staged_app() as app_dir:
        declared = tomllib.loads((app_dir / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]

    assert set(sent) <= set(declared), set(sent) - set(declared)
    assert {type(v) for k, v in sent.items()} <= {str, bool, float, int}
    assert all(type(sent[k]) is type(declared[k]) for k in sent if k != "t0"), sent
