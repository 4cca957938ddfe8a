"""The top-level folders are the import packages: each resolves inside this project, and the dependency rule
of the design holds (common <- strategies <- server; common <- client; client and server never import each other;
Flower types only in the apps and strategies)."""

from __future__ import annotations

import ast
import importlib
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ["cli", "client", "common", "server", "strategies"]
FORBIDDEN = {
    "common": {"client", "server", "strategies", "cli", "flwr"},
    "strategies": {"client", "server", "cli"},
    "server": {"client", "cli"},
    "client": {"server", "strategies", "cli"},
}
# the apps, and the hospital's process wrappers around Flower's SuperNode and ClientApp runner
FLOWER_ALLOWED = {"client/app.py", "server/app.py", "server/secure_aggregation.py", "cli/runtime.py",
                  "client/gate.py", "client/daemon.py", "server/grid.py", "server/final.py"}


@pytest.mark.parametrize("name", PACKAGES)
def test_package_resolves_inside_the_project(name):
    module = importlib.import_module(name)
    assert Path(module.__file__).resolve().parent == ROOT / name


def test_wheel_lists_every_package():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {str(p.parent.relative_to(ROOT)).replace("/", ".") for p in ROOT.glob("*/**/__init__.py")}
    on_disk = {p for p in on_disk if p.split(".")[0] in PACKAGES}
    assert on_disk == listed


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_dependency_rule(package):
    offenders = []
    for path in (ROOT / package).rglob("*.py"):
        rel = str(path.relative_to(ROOT))
        bad = _imports(path) & FORBIDDEN[package]
        if package == "strategies":
            bad -= {"flwr"}
        if rel in FLOWER_ALLOWED:
            bad -= {"flwr"}
        if bad:
            offenders.append(f"{rel}: {sorted(bad)}")
    assert offenders == []


def test_flower_types_stay_in_apps_and_strategies():
    offenders = []
    for package in ("common", "client", "server"):
        for path in (ROOT / package).rglob("*.py"):
            rel = str(path.relative_to(ROOT))
            if "flwr" in _imports(path) and rel not in FLOWER_ALLOWED:
                offenders.append(rel)
    assert offenders == []


def test_training_core_never_imports_flower():
    assert "flwr" not in _imports(ROOT / "client" / "training.py")
