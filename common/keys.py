"""Wire keys of the Flower records medfed exchanges (one place; no string literals elsewhere).

What a hospital sends back is limited to these keys: one ArrayRecord of model weights, one MetricRecord of scalar
metrics and one ConfigRecord naming the site. Nothing else leaves a site.
"""

from __future__ import annotations

__all__ = [
    "ARRAYS",
    "CONFIG",
    "EVAL_PREFIX",
    "EVAL_TIME_S",
    "METRICS",
    "RUN_CACHE_DIR",
    "NODE_PARTITION_ID",
    "NUM_EXAMPLES",
    "N_TRAIN",
    "N_VAL",
    "RUN_DIR",
    "RUN_MODE",
    "RUN_RESUME",
    "RUN_T0",
    "SERVER_ROUND",
    "SITE",
    "SITE_ID",
    "STATE_CONFIG",
    "TRAIN_LOSS",
    "TRAIN_TIME_S",
]

# RecordDict keys of train/evaluate messages and replies
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SITE = "site"

# ConfigRecord keys
SERVER_ROUND = "server-round"  # injected by Flower's strategies
SITE_ID = "site-id"

# MetricRecord keys
NUM_EXAMPLES = "num-examples"  # samples (never batches): FedAvg's weight
N_TRAIN = "n-train"
N_VAL = "n-val"
TRAIN_LOSS = "train-loss"
TRAIN_TIME_S = "train-time-s"
EVAL_TIME_S = "eval-time-s"
EVAL_PREFIX = "val-"  # validation metrics travel as val-auc, val-acc, ...

# Run config keys (set by `medfed simulate` / `medfed train`)
RUN_DIR = "run-dir"
RUN_MODE = "mode"  # "simulation" or "deployment"
RUN_RESUME = "resume"
RUN_T0 = "t0"  # launch time (epoch seconds) for wall_s

# Keys of a node's own Flower context.state (never sent anywhere)
STATE_CONFIG = "medfed-config"  # the composed config, so Hydra runs once per node and run

# Node config keys
NODE_PARTITION_ID = "partition-id"  # set by Flower's simulation runtime
RUN_CACHE_DIR = "cache-dir"  # simulation: where simulated sites cache their decoded data
