"""Wire keys of the Flower records medfed exchanges (one place; no string literals elsewhere).

What a hospital sends back is limited to these keys: one ArrayRecord of model weights, one MetricRecord of scalar
metrics and one ConfigRecord naming the site. Nothing else leaves a site.
"""

from __future__ import annotations

import re
from enum import StrEnum

__all__ = [
    "SiteRefusal",
    "BYTES_UP",
    "site_refusal",
    "ENSEMBLE_PREFIX",
    "ENSEMBLE_TEST_PREFIX",
    "GRADCAM_SAVED",
    "INTEGER_OVERFLOW",
    "RELIABILITY_AFTER",
    "RELIABILITY_BEFORE",
    "NLL_SUMS",
    "TEMPERATURE",
    "TEMPERATURES",
    "STAGE_RELIABILITY",
    "STAGE_AUDIT",
    "AUDIT_PREFIX",
    "STAGE_CALIBRATE",
    "FINAL_STAGE",
    "ARRAYS",
    "CONFIG",
    "DELTA",
    "DP_CLASSES",
    "DP_STAT_PREFIX",
    "VAL_STAT_PREFIX",
    "EPSILON",
    "EPSILON_CHARGED",
    "EVAL_NOISE",
    "EVAL_PREFIX",
    "EVAL_TIME_S",
    "FINETUNED_EPOCH",
    "FINETUNED_PREFIX",
    "FINETUNED_TEST_PREFIX",
    "PERSONAL_PREFIX",
    "PERSONAL_TEST_PREFIX",
    "METRICS",
    "RUN_CACHE_DIR",
    "NODE_MAX_DELTA",
    "NODE_MAX_EPSILON",
    "NODE_MIN_NOISE",
    "NODE_PARTITION_ID",
    "NODE_SECURE_RNG",
    "NODE_CALIBRATION_GRID",
    "NODE_REQUIRE_DP",
    "NODE_REQUIRE_SECURE_AGGREGATION",
    "NODE_SITE_CONFIG",
    "NODE_STAGES",
    "NODE_STATE_DIR",
    "NODE_THREADS",
    "NODE_CUDNN_BENCHMARK",
    "NODE_DEVICE",
    "NODE_DEVICE_MEMORY_GB",
    "NODE_LOADER_WORKERS",
    "NODE_PIN_MEMORY",
    "NOISE_MULTIPLIER",
    "NOISED_COUNT",
    "NOISED_SSL_LOSS",
    "NOISED_TRAIN_COUNT",
    "NUM_EXAMPLES",
    "N_TRAIN",
    "N_VAL",
    "PROXIMAL_MU",
    "RUN_DIR",
    "RUN_MODE",
    "RUN_NODE_NAMES",
    "RUN_RESUME",
    "RUN_STATE_DIR",
    "RUN_T0",
    "SERVER_ROUND",
    "SITE",
    "SITE_ID",
    "RAY_NODE",
    "STATE_CONFIG",
    "STATE_ANSWERED",
    "STATE_LEDGER",
    "STATE_LOCAL_LAYERS",
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
PROXIMAL_MU = "proximal-mu"  # FedProx: the proximal weight Flower's FedProx puts in the train ConfigRecord
SITE_ID = "site-id"
# simulation on Ray only (never sent by a deployed hospital): the id of the Ray node a reply was computed on
RAY_NODE = "ray-node"
BYTES_UP = "bytes-up"  # the coordinator's own measure of a training reply's size (never sent by a hospital)
# after the last round (evaluate messages): which final stage, and its parameters
FINAL_STAGE = "final-stage"  # STAGE_CALIBRATE or STAGE_RELIABILITY
STAGE_CALIBRATE = "calibrate"  # reply: the validation NLL sum at each temperature
STAGE_RELIABILITY = "reliability"  # reply: reliability sums before/after the fitted temperature (+ Grad-CAM count)
STAGE_AUDIT = "audit"  # reply: membership-inference attack AUC and TPRs on the site's own data (AUDIT_PREFIX)
AUDIT_PREFIX = "audit-"  # audit-loss-auc, audit-lira-tpr_at_0.01, ...
TEMPERATURES = "temperatures"  # the grid (list of floats)
TEMPERATURE = "temperature"  # the fitted temperature

# MetricRecord keys
NUM_EXAMPLES = "num-examples"  # samples (never batches): FedAvg's weight
N_TRAIN = "n-train"
N_VAL = "n-val"
TRAIN_LOSS = "train-loss"
TRAIN_TIME_S = "train-time-s"
EVAL_TIME_S = "eval-time-s"
EVAL_PREFIX = "val-"  # validation metrics travel as val-auc, val-acc, ...
PERSONAL_PREFIX = "pval-"  # the personalised model (global + the site's local layers) on the site's validation split
PERSONAL_TEST_PREFIX = "ptest-"  # ... on the global test set (simulation only: a deployed hospital has none)
FINETUNED_PREFIX = "ftval-"  # after local fine-tuning of the final model, at the best-validation epoch
FINETUNED_TEST_PREFIX = "fttest-"  # ... on the global test set (simulation only)
ENSEMBLE_PREFIX = "ensval-"  # personalisation: the mean of the global, personalised and fine-tuned models' probabilities
ENSEMBLE_TEST_PREFIX = "enstest-"  # ... on the global test set (simulation only)
FINETUNED_EPOCH = "ft-epoch"  # the fine-tuning epoch a hospital kept (0: fine-tuning did not help on validation)
EPSILON = "epsilon"  # the site's cumulative epsilon (all runs on its data) after this round
EPSILON_CHARGED = "epsilon-charged"  # what this reply's releases added to it (the audit log keeps it per message)
DELTA = "delta"  # the delta that epsilon is stated at
NOISE_MULTIPLIER = "noise-multiplier"
NLL_SUMS = "nll-sums"  # final stage: summed validation NLL per temperature (list, one float per temperature)
RELIABILITY_BEFORE = "reliability-before"  # final stage: reliability sums (count, confidence, correct per bin), T=1
RELIABILITY_AFTER = "reliability-after"  # ... at the fitted temperature
GRADCAM_SAVED = "gradcam-saved"  # final stage: Grad-CAM maps the hospital wrote to its own disk (a count)
# metered (DP) evaluation: the noised sufficient statistics (medfed.common.noised_stats) as scalars dp-stat-0, ...
DP_STAT_PREFIX = "dp-stat-"
DP_CLASSES = "dp-classes"  # the class count that fixes their layout (data-independent)
# exact (non-metered) binary evaluation: the same statistics without noise (per-threshold counts over the site's
# validation split, no per-image values), from which the coordinator picks the operating threshold
VAL_STAT_PREFIX = "exact-stat-"
EVAL_NOISE = "eval-noise-multiplier"  # the noise multiplier of a metered release
NOISED_COUNT = "noised-count"  # final stages and SSL under DP: the noised number of validation images
INTEGER_OVERFLOW = "integer-overflow"  # distributed DP: values of a site's integer sum the SecAgg+ range clipped
NOISED_TRAIN_COUNT = "noised-n-train"  # metered train reply, once per run: the training split's noised size
NOISED_SSL_LOSS = "noised-ssl-loss-sum"  # SSL under DP: the noised sum of per-image pretext losses (clipped)

# Run config keys (set by `medfed simulate` / `medfed train`)
RUN_DIR = "run-dir"
RUN_MODE = "mode"  # "simulation" or "deployment"
RUN_RESUME = "resume"
RUN_T0 = "t0"  # launch time (epoch seconds) for wall_s
RUN_NODE_NAMES = "node-names"  # deployment: JSON {node id: name the coordinator registered the hospital under}

RUN_STATE_DIR = "state-dir"  # simulation: where simulated sites keep their privacy ledgers

# Keys of a node's own Flower context.state (never sent anywhere)
STATE_CONFIG = "medfed-config"  # the composed config, so Hydra runs once per node and run
STATE_LOCAL_LAYERS = "medfed-local-layers"  # personalisation: the layers this hospital keeps to itself
STATE_LEDGER = "medfed-privacy-ledger"  # this node's privacy ledger entries (mirrors the on-disk ledger)
STATE_ANSWERED = "medfed-answered"  # the requests this node answered in this run (evaluation limits)

# Node config keys
NODE_PARTITION_ID = "partition-id"  # set by Flower's simulation runtime
NODE_STATE_DIR = "state-dir"  # a hospital's state directory (privacy ledger)
NODE_MAX_EPSILON = "max-epsilon"  # a hospital's privacy cap: cumulative epsilon over every run on its data
NODE_MAX_DELTA = "max-delta"  # the largest delta it accepts
NODE_MIN_NOISE = "min-noise"  # the least noise multiplier it accepts
NODE_SECURE_RNG = "secure-rng"  # true: DP noise and sampling from a cryptographically secure RNG, or no DP
RUN_CACHE_DIR = "cache-dir"  # simulation: where simulated sites cache their decoded data
NODE_THREADS = "threads"  # deployment: the site's torch threads (0 = every core); overrides federation.threads
NODE_REQUIRE_DP = "require-dp"  # deployment: train only with privacy=dp (the site's policy)
NODE_REQUIRE_SECURE_AGGREGATION = "require-secure-aggregation"  # deployment: train only under SecAgg+
NODE_STAGES = "stages"  # deployment: the stages the site answers, comma-separated (see client.policy.STAGES)
NODE_CALIBRATION_GRID = "calibration-grid"  # deployment: the site's own temperature grid, comma-separated
NODE_SITE_CONFIG = "site-config"  # deployment: the hospital's site config file (data, cap, approved apps)
# deployment: the site's hardware (client.site.SiteConfig); each overrides the recipe's train.* key of its name
NODE_DEVICE = "device"  # auto | cpu | cuda | cuda:N
NODE_DEVICE_MEMORY_GB = "device-memory-gb"  # the memory the device offers training (GiB; 0 = detect)
NODE_LOADER_WORKERS = "loader-workers"  # DataLoader worker processes
NODE_PIN_MEMORY = "pin-memory"  # pinned host memory for batches bound for a GPU
NODE_CUDNN_BENCHMARK = "cudnn-benchmark"  # cuDNN picks the fastest convolution algorithms per shape


class SiteRefusal(StrEnum):
    """Why a hospital refused a message, as the coordinator reads it back from the error Flower forwards.

    A hospital's error text is ``"<ErrorType>: <PHI-free explanation>"`` (the ClientApp's guard writes it); the
    value of each member is the error type whose name opens that text.
    """

    PRIVACY_BUDGET = "PrivacyBudgetExceeded"  # the hospital is at its privacy cap (medfed.common.errors)
    POLICY = "PolicyRefusal"  # the hospital's site policy refuses the request (medfed.common.errors)
    SIT_OUT = "SitOut"  # the hospital's DP run plan trains in other rounds (medfed.common.errors)


_REFUSAL = re.compile(r"(?:^|[\s<'\"])(" + "|".join(m.value for m in SiteRefusal) + r"): ")


def site_refusal(reason: str) -> SiteRefusal | None:
    """The refusal a hospital's forwarded error names (Flower wraps the text, e.g. ``<class '...'>:<'Name: ...'>``);
    None for any other failure."""
    found = _REFUSAL.search(reason)
    return SiteRefusal(found.group(1)) if found else None
