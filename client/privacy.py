"""A hospital's differential-privacy budget: its cap, what it has spent, and the noise each round gets.

The hospital decides. Its cap (cumulative epsilon over every run on its data, the largest delta, the least noise)
comes from its own node config, or in simulation from ``federation.site_*``; the coordinator's ``privacy=dp``
request can only be made stricter by it. What the site has spent lives in its ledger (:mod:`medfed.client.ledger`:
one per site and task, on its own disk, locked across processes, spanning runs and restarts).
Epsilon is always computed by Opacus' accountant from the ledger's full history (sequential composition).

Before a round trains, :func:`plan_round` checks that the round's steps keep the site within its cap; if not it
raises :class:`~common.errors.PrivacyBudgetExceeded` with a PHI-free reason and the site does not train.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medfed.client.ledger import SKELLAM, LedgerEntry
from medfed.common import keys
from medfed.common.config import DPConfig, FederationConfig
from medfed.common.errors import ConfigError, PrivacyBudgetExceeded, SitOut
from medfed.common.accounting import MAX_NOISE, epsilon_of, release_noise_for
from medfed.common.noise_search import least_noise as _least_noise

if TYPE_CHECKING:
    import torch

    from medfed.client.site import SiteConfig

__all__ = [
    "TORCHCSPRNG_SOURCE",
    "RoundPlan",
    "SitOut",
    "SiteCap",
    "budget_rows",
    "costed",
    "default_state_dir",
    "epsilon_spent",
    "plan_release",
    "plan_round",
    "release_noise_for",
    "secure_rng_install_command",
    "secure_rng_problem",
    "site_cap",
]

logger = logging.getLogger(__name__)

_MAX_NOISE = MAX_NOISE


# pragma: no mutate start  (the site's environment, not its privacy accounting: outside `make mutate`'s scope)
def default_state_dir() -> Path:
    """Where a hospital keeps its state (privacy ledger) when its config names no other place."""
    return Path(os.environ.get("MEDFED_STATE_DIR") or "~/.local/share/medfed").expanduser()
# pragma: no mutate end


@dataclass(frozen=True)
class SiteCap:
    """A hospital's own privacy limits."""

    max_epsilon: float = math.inf
    max_delta: float = 1e-5
    min_noise: float = 0.0
    secure_rng: bool = False  # DP-SGD only with a cryptographically secure RNG (Opacus' secure_mode)


def _node_float(node_config: Mapping[str, object], key: str, default: float, low: float, high: float) -> float:
    if key not in node_config:
        return default
    raw = node_config[key]
    try:
        if not isinstance(raw, (int, float, str)):
            raise TypeError  # (reported below as "not a number")
        value = float(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"Node config {key}={raw!r} is not a number; set it in the site config.") from None
    if not low <= value <= high or math.isnan(value):
        raise ConfigError(f"Node config {key}={raw!r} is out of range; it must lie in [{low}, {high}].")
    return value


def _node_bool(node_config: Mapping[str, object], key: str) -> bool:
    raw = node_config.get(key, False)
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, (int, float)) and raw in (0, 1):
        return bool(raw)
    text = raw.strip().lower() if isinstance(raw, str) else None
    if text in ("true", "1", "yes", "false", "0", "no"):
        return text in ("true", "1", "yes")
    raise ConfigError(f"Node config {key}={raw!r} is not true or false; set it in the site config.")


def site_cap(federation: FederationConfig, node_config: Mapping[str, object], site_index: int | None) -> SiteCap:
    """The hospital's cap: its node config wins; in simulation ``federation.site_*`` stands in for it."""
    default_eps = federation.site_max_epsilon
    if federation.site_max_epsilon_each and site_index is not None:
        default_eps = federation.site_max_epsilon_each[site_index]
    return SiteCap(
        max_epsilon=_node_float(node_config, keys.NODE_MAX_EPSILON, default_eps, 1e-9, math.inf),
        max_delta=_node_float(node_config, keys.NODE_MAX_DELTA, federation.site_max_delta, 1e-300, 0.999999),
        min_noise=_node_float(node_config, keys.NODE_MIN_NOISE, federation.site_min_noise, 0.0, _MAX_NOISE),
        secure_rng=_node_bool(node_config, keys.NODE_SECURE_RNG),
    )


# pragma: no mutate start  (the secure RNG's presence, not privacy accounting: outside `make mutate`'s scope)
# torchcsprng has no wheel for current torch; the hospital image and `medfed hospital install-secure-rng` build this
# commit of its source (deploy/docker/Dockerfile's CSPRNG_COMMIT must match: tests/unit/test_deploy.py)
TORCHCSPRNG_COMMIT = "defa0b556e8c5655693ccde2777b10906d25c034"
TORCHCSPRNG_SOURCE = f"git+https://github.com/pytorch/csprng@{TORCHCSPRNG_COMMIT}"


def secure_rng_install_command(python: str) -> list[str]:
    """The pip command that builds and installs the pinned torchcsprng into ``python``'s environment (against the
    torch installed there: no build isolation, no dependencies)."""
    return [python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", TORCHCSPRNG_SOURCE]


def secure_rng_problem(device: torch.device) -> str | None:
    """Why DP-SGD cannot draw its noise and batches from a cryptographically secure RNG here, or None if it can.

    Opacus' ``secure_mode`` takes the RNG from ``torchcsprng`` (``/dev/urandom`` through AES). Its releases stop at
    torch 1.8; it builds from source against this torch (docs/operations.md, "A secure RNG for DP"). A build
    without CUDA cannot draw on a GPU, so the check draws one number on the training device.
    """
    import torch

    try:
        import torchcsprng
    except ImportError:
        return ("torchcsprng is not installed on this machine (it has no wheel for this torch: build it from source, "
                "see docs/operations.md, 'A secure RNG for DP')")
    try:
        generator = torchcsprng.create_random_device_generator("/dev/urandom")
        torch.empty(1, device=device).normal_(0.0, 1.0, generator=generator)
    except Exception as exc:  # noqa: BLE001 - any failure means no secure noise; the type says which
        return f"torchcsprng cannot draw random numbers on {device.type} here ({type(exc).__name__})"
    return None
# pragma: no mutate end


def costed(noise_multiplier: float, sample_rate: float, steps: int) -> LedgerEntry:
    """A release that is only costed, never recorded: the accountant reads its noise, sampling rate and steps."""
    return LedgerEntry("plan", 0, 0, noise_multiplier, sample_rate, steps, 0.0)  # pragma: no mutate (id, run, time)


def budget_rows(site: SiteConfig) -> list[dict[str, Any]]:
    """Spent, cap and remaining epsilon of every ledger of a site, at the site's max_delta (what `medfed hospital
    budget` prints and the hospital console shows)."""
    from medfed.client.ledger import site_ledgers

    rows = []
    for ledger in site_ledgers(site.state_path):
        entries = ledger.entries()
        delta = float(site.max_delta)
        spent = epsilon_spent(entries, delta)
        training = [e for e in entries if e.kind == "train"]
        releases = [e for e in entries if e.kind != "train"]
        rows.append({"ledger": ledger.fingerprint, "rounds": len(training), "steps": sum(e.steps for e in training),
                     "evaluations": len(releases), "spent": spent,
                     # what the noised evaluations add: the total less the training rounds composed alone
                     "evaluation_share": (1 - epsilon_spent(training, delta) / spent) if spent > 0 else 0.0,
                     "cap": float(site.max_epsilon), "delta": delta,
                     "remaining": max(0.0, float(site.max_epsilon) - spent)})
    return rows


def epsilon_spent(entries: Iterable[LedgerEntry], delta: float) -> float:
    """Cumulative epsilon of every entry (sequential composition) at ``delta``, by Opacus' accountant
    (:func:`medfed.common.accounting.epsilon_of`).

    Entries with the same noise and sampling rate are composed as one (their steps add up), which is exact. A
    ledger holding distributed-DP rounds (``mechanism == "skellam"``) is composed at the integer orders where the
    Skellam bound holds.
    """
    steps: dict[tuple[float, float], int] = {}
    skellam: dict[tuple[float, float, float, float], int] = {}
    for e in entries:
        if e.steps > 0 and e.mechanism == SKELLAM:
            key = (e.noise_multiplier, e.sample_rate, e.l2, e.l1)
            skellam[key] = skellam.get(key, 0) + e.steps
        elif e.steps > 0:
            steps[(e.noise_multiplier, e.sample_rate)] = steps.get((e.noise_multiplier, e.sample_rate), 0) + e.steps
    return epsilon_of(steps, skellam, delta)


@dataclass(frozen=True)
class RoundPlan:
    """What one round of DP training at a site will be, decided before it trains.

    ``batch_size`` and ``local_epochs`` are what the site trains with: the recipe's, or for a site whose cap does
    not fit the recipe's plan, full-batch steps (sampling rate 1), fewer of them, and training only every
    ``period``-th round of the run (it sits the others out).
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    epsilon_before: float
    epsilon_after: float
    cap: SiteCap
    batch_size: int = 0
    local_epochs: int = 1
    period: int = 1

    @property
    def adapted(self) -> bool:
        """Whether the site planned other steps than the recipe's (larger batches, fewer steps or rounds)."""
        return self.period > 1 or self.sample_rate >= 1.0


def sampling(n_train: int, batch_size: int, local_epochs: int) -> tuple[float, int]:
    """Poisson sampling rate and optimizer steps of one round, as Opacus' DP data loader makes them."""
    batches = math.ceil(n_train / batch_size)
    return 1.0 / batches, local_epochs * batches


def _noise_for(
    target: float, delta: float, sample_rate: float, steps: int, prior: list[LedgerEntry], ceiling: float
) -> float:
    """The least noise multiplier (to 0.1%) with which ``prior`` plus ``steps`` more steps stays within ``target``;
    ``inf`` when even ``ceiling`` does not fit."""

    def eps(sigma: float) -> float:
        return epsilon_spent([*prior, costed(sigma, sample_rate, steps)], delta)

    return _least_noise(eps, target, ceiling)


def _candidates(n_train: int, batch_size: int, local_epochs: int, rounds_left: int) -> list[tuple[int, int, int]]:
    """Run plans to try in order, as (batch size, local epochs, period): the recipe's; full-batch steps; one
    full-batch step per round; then one every 2nd, 3rd ... round (the cheapest plan that still trains)."""
    plans = [(batch_size, local_epochs, 1)]
    if batch_size < n_train:
        plans.append((n_train, local_epochs, 1))
    if local_epochs > 1:
        plans.append((max(batch_size, n_train), 1, 1))
    plans += [(max(batch_size, n_train), 1, k) for k in range(2, max(1, rounds_left) + 1)]
    return plans


def plan_round(
    dp: DPConfig,
    cap: SiteCap,
    *,
    n_train: int,
    batch_size: int,
    local_epochs: int,
    rounds_left: int,
    entries: list[LedgerEntry],
    run_id: int,
    reserved: list[LedgerEntry] | None = None,
    server_round: int,
) -> RoundPlan:
    """Decide this round's noise and check the site's cap; raises :class:`PrivacyBudgetExceeded` if it would pass.

    The run plan is fixed per run (the first round a site trains in a run derives it): the least noise with which
    this run's planned rounds spend at most ``privacy.target_epsilon``, raised if needed so that everything spent
    on this data so far plus the planned rounds stays within the hospital's cap, and never below its
    ``min_noise``. When the recipe's steps would need more noise than ``privacy.max_noise_multiplier`` (a small
    site, a small cap), the site plans fewer, larger steps instead of refusing: full-batch steps, then one per
    round, then one every ``period``-th round (it sits the others out, raising :class:`SitOut`). Only when even one
    step in the whole run does not fit does it refuse.

    ``reserved``: the noised evaluations this run will still ask of the site (not yet in the ledger). They count
    against the run's target and the site's cap alongside this run's evaluations already recorded, so that the
    target and the cap cover everything the run releases, and a round trains only while they still fit.
    """
    delta = min(dp.delta, cap.max_delta)
    spent = epsilon_spent(entries, delta)
    reserved = list(reserved or [])
    this_run = [e for e in entries if e.run_id == run_id and e.steps > 0 and e.kind == "train"]
    ceiling = max(dp.max_noise_multiplier, cap.min_noise)
    if this_run:  # the run's plan, from the round that made it (later entries may record excess steps only)
        first = this_run[0]
        sigma, sample_rate, steps, period = first.noise_multiplier, first.sample_rate, first.steps, first.period
        batches = max(1, round(1.0 / sample_rate))
        batch = first.batch_size or math.ceil(n_train / batches)
        epochs = first.local_epochs or max(1, steps // batches)
        if sampling(n_train, batch, epochs) != (sample_rate, steps):
            logger.warning("the training split changed size during the run (%d images now)", n_train)
            raise PrivacyBudgetExceeded(
                "This hospital's training split changed size during this run, so the run's privacy plan (its "
                "sampling rate and steps) no longer holds; it does not train again in this run. A new run plans "
                "afresh."
            )
        if (server_round - first.server_round) % period:
            raise SitOut(f"This hospital trains every {period} rounds of this run to fit its privacy budget "
                         "(planned at its first round); it sits this round out.")
    else:
        # this run's releases so far: noised evaluations only (no training step of it is in the ledger yet)
        run_releases = [e for e in entries if e.run_id == run_id] + reserved
        sigma, batch, epochs, period = math.inf, batch_size, local_epochs, 1
        sample_rate, steps = sampling(n_train, batch_size, local_epochs)
        for batch_c, epochs_c, period_c in _candidates(n_train, batch_size, local_epochs, rounds_left):
            rate_c, steps_c = sampling(n_train, batch_c, epochs_c)
            planned = steps_c * math.ceil(max(1, rounds_left) / period_c)
            sigma_c = _noise_for(dp.target_epsilon, delta, rate_c, planned, run_releases, ceiling)
            if math.isfinite(cap.max_epsilon) and math.isfinite(sigma_c):
                sigma_c = max(sigma_c, _noise_for(cap.max_epsilon, delta, rate_c, planned, [*entries, *reserved],
                                                  ceiling))
            sigma_c = max(sigma_c, cap.min_noise)
            if sigma_c <= ceiling:
                sigma, batch, epochs, period, sample_rate, steps = sigma_c, batch_c, epochs_c, period_c, rate_c, \
                    steps_c
                break
        if period > 1 or (batch, epochs) != (batch_size, local_epochs):
            logger.info("run plan adapted to fit the privacy budget: batch %d, %d epoch(s) per round, every %d "
                        "round(s), noise %.3g", batch, epochs, period, sigma)
    if sigma > ceiling and not math.isfinite(cap.max_epsilon):
        # (the sampling rate, steps and image count stay in the site's log: they follow the training split's size)
        logger.warning("target out of reach: %d DP steps per round at sampling rate %.3g (%d training images)",
                       steps, sample_rate, n_train)
        raise PrivacyBudgetExceeded(
            f"Privacy target out of reach for this hospital: spending at most target_epsilon "
            f"{dp.target_epsilon:g} (delta {delta:g}) even with one full-batch step in the run's "
            f"{max(1, rounds_left)} remaining rounds would need a noise multiplier above "
            f"privacy.max_noise_multiplier={dp.max_noise_multiplier:g}, so it does not train this round (it tries "
            "again next round). Raise privacy.target_epsilon or privacy.max_noise_multiplier."
        )
    if sigma > ceiling:
        raise PrivacyBudgetExceeded(
            f"Privacy cap reached: the hospital has spent epsilon {spent:.3g} of its cap {cap.max_epsilon:g} "
            f"(delta {delta:g}); even one full-batch step more in this run, with its noised evaluations, would need "
            f"a noise multiplier above privacy.max_noise_multiplier={dp.max_noise_multiplier:g}, so it does not "
            "train. The run goes on without it. To train more, the hospital must raise its own cap (max-epsilon), "
            "or the coordinator may plan a larger target_epsilon."
        )
    this_round = costed(sigma, sample_rate, steps)
    after = epsilon_spent([*entries, this_round], delta)
    with_evaluations = epsilon_spent([*entries, this_round, *reserved], delta)
    if not with_evaluations <= cap.max_epsilon:
        evaluations = f" and the run's {len(reserved)} noised evaluations still to come" if reserved else ""
        raise PrivacyBudgetExceeded(
            f"Privacy cap reached: this round{evaluations} would raise the hospital's epsilon from {spent:.3g} to "
            f"{with_evaluations:.3g} (delta {delta:g}), above its cap {cap.max_epsilon:g}; it does not train. The "
            "run goes on without it. To train more, the hospital must raise its own cap (max-epsilon)."
        )
    return RoundPlan(sigma, sample_rate, steps, delta, spent, after, cap, batch, epochs, period)


def plan_release(
    entries: list[LedgerEntry], *, noise_multiplier: float, delta: float, cap: SiteCap, what: str
) -> tuple[float, float]:
    """The site's epsilon before and after one more noised release (a Gaussian step at sampling rate 1) of
    ``what``; raises :class:`PrivacyBudgetExceeded` when it would pass the site's cap (the release is then not
    made)."""
    if not noise_multiplier > 0:
        raise PrivacyBudgetExceeded(f"The {what} asks for noise multiplier {noise_multiplier!r}; a noised release "
                                    "needs one > 0, so this hospital does not answer.")
    release = costed(noise_multiplier, 1.0, 1)
    spent, after = (epsilon_spent(e, delta) for e in (entries, [*entries, release]))  # one accountant
    if not after <= cap.max_epsilon:
        raise PrivacyBudgetExceeded(
            f"Privacy cap reached: answering the {what} (noise multiplier {noise_multiplier:g}) would raise the "
            f"hospital's epsilon from {spent:.3g} to {after:.3g} (delta {delta:g}), above its cap "
            f"{cap.max_epsilon:g}; it does not answer. To answer more, the hospital must raise its own cap."
        )
    return spent, after
