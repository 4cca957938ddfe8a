"""Benchmark: the per-round cost of Flower's simulation runtime itself, with a ClientApp that does nothing.

Same shape as medfed's federations (5 virtual SuperNodes, one Ray actor so hospitals run one at a time, a
130k-parameter model travelling both ways, a train and an evaluate phase per round), but the ClientApp replies at
once. What this measures is the floor no medfed change can remove; the difference to a medfed run of the same
shape is medfed's own per-round cost.

    python benchmarks/flower_floor.py            # ~1 min

Writes its table into docs/benchmarks.md between the `flower-floor` markers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- flower-floor:start -->", "<!-- flower-floor:end -->"

CHILD = r'''
import json, logging, os, sys, time
import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

nodes, rounds, pull = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
client = ClientApp()

@client.train()
def train(msg, ctx):
    content = RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord({"num-examples": 10})})
    return Message(content, reply_to=msg)

@client.evaluate()
def evaluate(msg, ctx):
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": 10, "x": 1.0})}), reply_to=msg)

server = ServerApp()
marks = []

@server.main()
def main(grid: Grid, context: Context):
    if pull > 0:
        grid.pull_interval = pull
    strategy = FedAvg(min_train_nodes=nodes, min_evaluate_nodes=nodes, min_available_nodes=nodes)
    strategy.start(grid, ArrayRecord([np.zeros(130_146, dtype=np.float32)]), num_rounds=rounds,
                   evaluate_fn=lambda r, a: marks.append(time.time()))

t0 = time.time()
logging.getLogger("flwr").setLevel(logging.WARNING)
run_simulation(server, client, num_supernodes=nodes,
               backend_config={"client_resources": {"num_cpus": os.cpu_count(), "num_gpus": 0.0},
                               "init_args": {"num_cpus": os.cpu_count()}})
print("RESULT " + json.dumps({"per_round_s": (marks[-1] - marks[1]) / (rounds - 1),
                              "first_round_s": marks[1] - t0, "total_s": time.time() - t0}))
'''


def measure(nodes: int, rounds: int, pull: float) -> dict[str, float]:
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(nodes), str(rounds), str(pull)], env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=600)
    finally:
        try:
            os.killpg(proc.pid, 9)  # by PID, the session we started
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
    line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"no result:\n{out[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rows = []
    for pull in (0.1, 0.01):
        result = measure(args.nodes, args.rounds, pull)
        logging.info("pull %.2f s: %s", pull, result)
        rows.append((pull, result))
    lines = [
        START,
        f"Measured {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores; reproduce with "
        "`python benchmarks/flower_floor.py`. A no-op ClientApp, "
        f"{args.nodes} SuperNodes on one Ray actor, {args.rounds} rounds of FedAvg with a 130k-parameter model.",
        "",
        "| Grid pull interval | wall s per round (train + evaluate phase) | first round done after s | total s |",
        "|---|---|---|---|",
    ]
    for pull, r in rows:
        label = f"{pull} s" + (" (Flower's default)" if pull == 0.1 else " (medfed's simulation setting)")
        lines.append(f"| {label} | {r['per_round_s']:.3f} | {r['first_round_s']:.1f} | {r['total_s']:.1f} |")
    lines.append(END)
    section = "\n".join(lines)
    print(section)
    text = args.doc.read_text(encoding="utf-8") if args.doc.is_file() else "# medfed benchmarks\n"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n## The floor of Flower's simulation runtime\n\n" + section + "\n"
    args.doc.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
