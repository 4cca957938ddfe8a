"""One import package, ``medfed``, whose parts are the repository's top-level folders: each resolves inside this
project, the wheel installs nothing but ``medfed``, and the dependency rule of the design holds (common <- strategies <- server; common <- client; client and server never import each other;
simulation may import every part but cli; Flower types only in the apps, strategies and the simulation launcher)."""

from __future__ import annotations

import ast
import importlib
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ["cli", "client", "common", "console", "server", "simulation", "strategies"]
FORBIDDEN = {
    "common": {"client", "server", "strategies", "cli", "console", "flwr"},
    "strategies": {"client", "server", "cli", "console"},
    "server": {"client", "cli", "console"},
    "client": {"server", "strategies", "cli", "console"},
    # a composition root below cli (the launcher and the baselines): it may import every part but cli
    "simulation": {"cli", "console", "flwr"},
    # the web consoles: a composition root like cli (which starts them); no Flower types
    "console": {"flwr"},
}
# the apps, the hospital's process wrappers around Flower's SuperNode and ClientApp runner, the coordinator's
# message plumbing, the simulation launcher and its polling of Flower's engine, and the bundle builder (README
# "Dependency rule" lists the same files)
FLOWER_ALLOWED = {"client/app.py", "server/app.py", "server/secure_aggregation.py", "simulation/launcher.py",
                  "simulation/polling.py", "client/gate.py", "client/daemon.py", "server/grid.py", "server/final.py",
                  "cli/bundle.py", "server/superlink.py"}


@pytest.mark.parametrize("name", PACKAGES)
def test_package_resolves_inside_the_project(name):
    module = importlib.import_module(f"medfed.{name}")
    assert Path(module.__file__).resolve().parent == ROOT / name


def test_generic_top_level_names_are_not_importable():
    # Prepare: a process whose path does not hold the repository (pytest puts it there for tests/ imports)
    code = "import importlib.util as u; print([n for n in %r if u.find_spec(n)])" % (PACKAGES,)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # Execute
    found = subprocess.run([sys.executable, "-c", code], cwd="/", env=env, capture_output=True, text=True, check=True)
    # Assert
    assert found.stdout.strip() == "[]"


def test_wheel_lists_every_package():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    on_disk = {str(p.parent.relative_to(ROOT)).replace("/", ".") for p in ROOT.glob("*/**/__init__.py")}
    on_disk = {"medfed." + p for p in on_disk if p.split(".")[0] in PACKAGES}
    conf = {"medfed." + str(d.relative_to(ROOT)).replace("/", ".") for d in [ROOT / "common" / "conf",
                                                                              *(ROOT / "common" / "conf").glob("*/")]}
    web = {"medfed." + str(d.relative_to(ROOT)).replace("/", ".") for d in (ROOT / "console").rglob("*")
           if d.is_dir() and d.name != "__pycache__"}
    assert on_disk | conf | web | {"medfed"} == listed  # Hydra's config folders hold YAML only, the console's
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]  # the rest
    assert all(data[c] == ["*.yaml"] for c in conf)
    for folder in web:  # every template, stylesheet and script of the consoles is shipped
        suffixes = {p.suffix for p in (ROOT / folder.removeprefix("medfed.").replace(".", "/")).iterdir() if p.is_file()}
        assert {f"*{suffix}" for suffix in suffixes} <= set(data[folder]), folder
    assert setuptools["package-dir"] == {"medfed": "medfed", **{f"medfed.{name}": name for name in PACKAGES}}


def test_wheel_installs_only_medfed(tmp_path):
    # Prepare: the wheel, built without network access from a copy of the source (setuptools writes build/ there)
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for name in ("medfed", *PACKAGES):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                            "--wheel-dir", str(tmp_path / "dist"), str(source)], check=True, capture_output=True,
                           text=True)
    assert "Warning" not in built.stdout + built.stderr, (built.stdout + built.stderr)[-3000:]  # an install is quiet
    (wheel,) = (tmp_path / "dist").glob("medfed-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True)
    python = tmp_path / "venv" / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    before = set(os.listdir(site))
    # Execute: this environment's pip installs the wheel into the fresh venv
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--ignore-installed", "--quiet", "--no-index", "--no-warn-script-location",
                    "--prefix", str(tmp_path / "venv"), str(wheel)], check=True, capture_output=True, text=True)
    # Assert: one new top-level name besides the metadata, the config tree shipped, the entry points moved
    new = set(os.listdir(site)) - before
    assert {n for n in new if not n.endswith(".dist-info")} == {"medfed"}
    assert (Path(site) / "medfed" / "common" / "conf" / "config.yaml").is_file()
    demo_data = Path(site) / "medfed" / "common" / "data" / "demo"  # `medfed demo`'s BreastMNIST and its licence
    assert {"breastmnist.npz", "ATTRIBUTION.txt"} <= set(os.listdir(demo_data))
    with zipfile.ZipFile(wheel) as archive:  # the data's CC BY 4.0 attribution travels as a licence file
        assert "ATTRIBUTION.txt" in {Path(n).name for n in archive.namelist() if ".dist-info/licenses/" in n}
    assert (Path(site) / "medfed" / "client" / "app.py").is_file()
    assert (Path(site) / "medfed" / "console" / "templates" / "hospital" / "approvals.html").is_file()
    assert (Path(site) / "medfed" / "console" / "static" / "console.js").is_file()
    assert {"medfed", "medfed-clientapp"} <= set(os.listdir(tmp_path / "venv" / "bin"))
    with zipfile.ZipFile(wheel) as archive:
        entry_points = next(archive.read(n).decode() for n in archive.namelist() if n.endswith("entry_points.txt"))
    assert "medfed = medfed.cli.main:main" in entry_points
    assert "medfed-clientapp = medfed.client.gate:main" in entry_points
    # the installed package imports (its dependencies come from this environment) from the fresh venv alone
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p.endswith("site-packages"))}
    out = subprocess.run([python, "-c", "import medfed.common.keys as k, medfed.client.app as a; "
                          "print(k.__file__); print(a.__file__)"], cwd=tmp_path, env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    assert all(Path(path).is_relative_to(site) for path in out)


def _imports(path: Path) -> set[str]:
    """Top-level names a file imports, with ``medfed``'s parts named as ``medfed.<part>``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
    assert not any(m.split(".")[0] in PACKAGES for m in modules), f"{path}: import through medfed.<part>"
    return {".".join(m.split(".")[:2]) if m.startswith("medfed.") else m.split(".")[0] for m in modules}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_dependency_rule(package):
    forbidden = {f"medfed.{name}" if name != "flwr" else name for name in FORBIDDEN[package]}
    offenders = []
    for path in (ROOT / package).rglob("*.py"):
        rel = str(path.relative_to(ROOT))
        bad = _imports(path) & forbidden
        if package == "strategies":
            bad -= {"flwr"}
        if rel in FLOWER_ALLOWED:
            bad -= {"flwr"}
        if bad:
            offenders.append(f"{rel}: {sorted(bad)}")
    assert offenders == []


def test_flower_is_imported_only_where_the_readme_says():
    offenders = []
    for package in PACKAGES:
        if package == "strategies":  # Flower's strategies are what they extend
            continue
        for path in (ROOT / package).rglob("*.py"):
            rel = str(path.relative_to(ROOT))
            if "flwr" in _imports(path) and rel not in FLOWER_ALLOWED:
                offenders.append(rel)
    assert offenders == []
    rule = (ROOT / "README.md").read_text(encoding="utf-8").split("Dependency rule:", 1)[1].split("\n\n", 1)[0]
    listed = set(re.findall(r"`([a-z_]+/[a-z_]+\.py)`", rule))
    assert listed == FLOWER_ALLOWED, listed ^ FLOWER_ALLOWED


def test_training_core_never_imports_flower():
    assert "flwr" not in _imports(ROOT / "client" / "training.py")


# the hospital's process wrappers around Flower's own processes, and the adapter itself
CLIENT_ADAPTERS = {"app.py", "gate.py", "daemon.py"}


@pytest.mark.parametrize("path", sorted(p.name for p in (ROOT / "client").glob("*.py") if p.name not in CLIENT_ADAPTERS))
def test_no_hospital_helper_takes_a_message_or_a_context(path):
    tree = ast.parse((ROOT / "client" / path).read_text(encoding="utf-8"))
    offenders = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            annotations = [a.annotation for a in (*node.args.args, *node.args.kwonlyargs) if a.annotation is not None]
            names = {n.id for a in annotations for n in ast.walk(a) if isinstance(n, ast.Name)}
            names |= {n.attr for a in annotations for n in ast.walk(a) if isinstance(n, ast.Attribute)}
            if names & {"Message", "Context"}:
                offenders.append(node.name)
    assert offenders == []


def test_simulation_or_deployment_is_decided_in_one_place():
    # the node's environment (NodeEnv) is the one reader of the keys that tell a simulated node from a deployed one
    readers = {str(p.relative_to(ROOT)) for p in (ROOT / "client").glob("*.py")
               if "NODE_PARTITION_ID" in p.read_text(encoding="utf-8")}
    assert readers == {"client/node.py"}
