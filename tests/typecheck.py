"""Type-check the installed package ``medfed`` with mypy (the first step of ``make test``).

mypy cannot follow setuptools' ``package-dir`` mapping (``medfed.client`` is the folder ``client/``), so this lays
out ``medfed/<part>`` as symbolic links to the repository's top-level folders in a scratch directory and checks
``-p medfed`` there, with the settings of ``[tool.mypy]`` in pyproject.toml. Paths in the report are the
repository's (``client/app.py``, not ``medfed/client/app.py``). Exits with mypy's status.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parts() -> list[str]:
    """The folders that setuptools maps into ``medfed`` (``[tool.setuptools.package-dir]``)."""
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["package-dir"]
    return sorted(folder for name, folder in package_dir.items() if name != "medfed")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="medfed-typecheck-") as tmp:
        package = Path(tmp) / "medfed"
        package.mkdir()
        for path in (ROOT / "medfed").iterdir():
            if path.is_file():
                (package / path.name).symlink_to(path)
        for folder in parts():
            (package / folder).symlink_to(ROOT / folder, target_is_directory=True)
        command = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
                   "--cache-dir", str(ROOT / ".mypy_cache"), "-p", "medfed"]
        done = subprocess.run(command, cwd=tmp, capture_output=True, text=True, env={**os.environ, "MYPYPATH": tmp})
    report = (done.stdout + done.stderr).replace("medfed/medfed/", "medfed/")
    for folder in parts():
        report = report.replace(f"medfed/{folder}/", f"{folder}/")
    print(report, end="")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
