"""Mutation testing of the code that keeps medfed's promises, with mutmut (``make mutate``; CI runs a sample).

The modules are named in ``[tool.mutmut] only_mutate`` of pyproject.toml: the privacy ledger, the privacy planning
and site caps, model selection, the scrubbing of what an error may carry off a site, and distributed DP's arithmetic
(the Skellam accounting and transport, a hospital's integer gradients, the coordinator's step). mutmut changes one thing
at a time in them (a comparison, a constant, an argument ...) and runs the unit tests that reach the changed
function; a change that no test notices *survived*, and shows a test missing.

mutmut imports the changed code from a copy laid out as the package imports it, but setuptools' ``package-dir``
maps ``medfed.client`` to the folder ``client/`` (as ``tests/typecheck.py`` explains). So this script copies the
package into ``build/mutate/medfed/<part>`` with the tests and runs mutmut there, from scratch each time.

    python tests/mutate.py                  # every mutant (tens of minutes on 2 cores)
    python tests/mutate.py --sample 7       # the mutants whose number ends in 7: a fixed tenth
    python tests/mutate.py --sample '[13579]7'   # ... in 17, 37, 57, 77 or 97: a fixed twentieth (CI)
    python tests/mutate.py 'medfed.client.ledger.*'   # the mutants these names match (fnmatch), e.g. one module
    python tests/mutate.py --tests tests/unit/client/test_privacy_planning.py 'medfed.client.privacy.*'
                                            # a quick pass with fewer tests; rerun its survivors by name without it

It prints each module's score and its survivors, writes ``build/mutate/report.json``, and exits non-zero when a
mutant survives in a module of ``MUST_BE_CLEAN`` (the privacy ledger and planning) or when nothing was run.
``mutmut show NAME`` in ``build/mutate`` (or ``--dir``) prints a survivor's change.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DIR = ROOT / "build" / "mutate"
# modules where a surviving mutant fails the run: the privacy ledger, the privacy planning and site caps, and the
# accountant and noise search they use (every mutant of each killed, 2026-12-06/07; docs/benchmarks.md)
MUST_BE_CLEAN = ("medfed/client/ledger.py", "medfed/client/privacy.py", "medfed/common/accounting.py",
                 "medfed/common/noise_search.py")
# mutmut's exit codes of a checked mutant, as its own `results` names them
SPINNER = tuple("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏")  # the first character of mutmut's progress lines
STATUS = {0: "survived", 1: "killed", 3: "killed", 5: "no tests", 33: "no tests", 34: "skipped", 35: "suspicious",
          36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout", 37: "killed by type check",
          -11: "segfault", -9: "segfault", None: "not checked"}


def stage(where: Path, tests: list[str] | None = None) -> None:
    """Lay out the package as it imports (``medfed/<part>``), the tests and a pyproject.toml of pytest's and
    mutmut's settings in ``where``, replacing what an earlier run left there; ``tests``: only these test files."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    package_dir = project["tool"]["setuptools"]["package-dir"]
    shutil.rmtree(where, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / package_dir["medfed"], where / "medfed", ignore=ignore)
    for name, folder in package_dir.items():
        if name != "medfed":
            shutil.copytree(ROOT / folder, where / Path(*name.split(".")), ignore=ignore)
    shutil.copytree(ROOT / "tests", where / "tests", ignore=ignore)
    pytest_options = dict(project["tool"]["pytest"]["ini_options"])
    pytest_options["addopts"] += " -p no:cacheprovider"
    mutmut_options = dict(project["tool"]["mutmut"])
    if tests:
        mutmut_options["pytest_add_cli_args_test_selection"] = tests
    (where / "pyproject.toml").write_text(
        _toml("tool.pytest.ini_options", pytest_options) + _toml("tool.mutmut", mutmut_options),
        encoding="utf-8")


def _toml(table: str, values: dict[str, object]) -> str:
    """One TOML table of strings, numbers, booleans and lists of strings (all these settings hold)."""
    return f"[{table}]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items()) + "\n"


def results(where: Path) -> dict[str, tuple[Counter[str], list[str]]]:
    """Each mutated module's mutants by status, and the names of its survivors."""
    out: dict[str, tuple[Counter[str], list[str]]] = {}
    for meta in sorted((where / "mutants").rglob("*.py.meta")):
        module = meta.relative_to(where / "mutants").as_posix().removesuffix(".meta")
        codes = json.loads(meta.read_text(encoding="utf-8"))["exit_code_by_key"]
        out[module] = (Counter(STATUS.get(code, "suspicious") for code in codes.values()),
                       sorted(name for name, code in codes.items() if code == 0))
    return out


def _suffix(text: str) -> str:
    """``--sample``'s ending of a mutant's number: one digit, or one class of digits then a digit."""
    if re.fullmatch(r"\d|\[\d+\]\d", text) is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ending of a mutant's number; give one digit (7) or a "
                                         "class of digits and a digit ('[13579]7')")
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sample", type=_suffix, metavar="ENDING",
                        help="run only the mutants whose number ends so: a digit (7: a fixed tenth of them) or a "
                             "digit class then a digit ('[13579]7': a fixed twentieth, CI's)")
    parser.add_argument("--children", type=int, default=os.cpu_count() or 1, help="mutants checked at once")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR,
                        help=f"where to run (default {DEFAULT_DIR.relative_to(ROOT)})")
    parser.add_argument("--tests", action="append", metavar="FILE",
                        help="only this test file (repeatable): a quick first pass (a mutant it misses may yet die "
                             "to the whole selection, so rerun the survivors by name without --tests)")
    parser.add_argument("names", nargs="*", help="only the mutants these names match (fnmatch patterns)")
    args = parser.parse_args()
    where = args.dir.resolve()
    stage(where, args.tests)
    names: list[str] = list(args.names)
    if args.sample is not None:  # mutmut matches names with fnmatch: ..._7, ..._17, ..._127 ...
        names = [f"{name}*{args.sample}" for name in (names or ["medfed.*__mutmut_"])]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "MEDFED_DATA_DIR": os.environ.get("MEDFED_DATA_DIR", str(ROOT.parent / "shared" / "data" / "medmnist"))}
    started = time.monotonic()
    log = where / "mutmut.log"
    with log.open("wb") as out:  # mutmut's progress line, redrawn with carriage returns: kept out of CI's log
        done = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(args.children), *names],
                              cwd=where, env=env, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        lines = log.read_text(encoding="utf-8", errors="replace").replace("\r", "\n").splitlines()
        print("\n".join(line for line in lines[-40:] if line.strip() and not line.startswith(SPINNER)))
    found = results(where)
    report: dict[str, object] = {"seconds": round(seconds), "sample": args.sample, "modules": {}}
    failed = done.returncode != 0
    chosen = "every mutant" if not names else " ".join(names)
    print(f"mutmut run ({chosen}): "
          f"{seconds:.0f} s, exit {done.returncode}")
    total = 0
    for module, (counts, survivors) in found.items():
        checked = sum(n for status, n in counts.items() if status != "not checked")  # a sample leaves the rest
        if not checked:
            continue
        killed = counts["killed"] + counts["killed by type check"] + counts["timeout"]
        total += checked
        score = killed / checked
        report["modules"][module] = {"checked": checked, "killed": killed, "score": round(score, 4),  # type: ignore[index]
                                     "by_status": dict(counts), "survivors": survivors}
        path = module.removeprefix("medfed/")
        print(f"{path:34s} {killed:4d}/{checked:<4d} killed  score {score:.3f}  survived {len(survivors)}")
        for name in survivors:
            print(f"    survived: {name}")
        if survivors and module in MUST_BE_CLEAN:
            failed = True
    (where / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if total == 0:
        print("no mutant was checked: see build/mutate and `mutmut run` there")
        return 1
    if failed:
        print(f"FAILED: mutants survived in {', '.join(m.removeprefix('medfed/') for m in MUST_BE_CLEAN)} "
              "(or mutmut failed); each needs a test that notices it")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
