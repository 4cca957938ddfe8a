"""A hospital's own policy: what it answers, checked at every message, whatever the coordinator's run config says.

The coordinator's recipe is a request. The hospital's site config decides:

- ``require_dp``: it trains only under ``privacy=dp`` (its own DP-SGD, charged to its ledger) or
  ``privacy=distributed_dp`` (its own clipping and noise share, charged to its ledger under the run's trust
  assumption). A run config with
  ``privacy=none`` or ``privacy=central_dp`` (noise added by the coordinator, whom this protects against) is
  refused.
- ``require_secure_aggregation``: it trains only when its update is masked by SecAgg+.
- ``stages``: the requests it answers: ``train`` (supervised rounds), ``ssl`` (self-supervised rounds),
  ``evaluate`` (validation metrics of a global model), ``calibrate`` and ``reliability`` (the final calibration
  stages), ``gradcam`` (explanation maps written to the site's own disk; off by default), ``audit`` (the
  membership-inference audit of the final model on its own data, :mod:`medfed.client.audit`: its attack AUC and
  TPRs leave outside DP's guarantee; off by default).
- Limits on evaluation: one evaluate request per round of a run (rounds numbered 1..``train.rounds``), and each
  final stage once per run; the calibration grid is the site's own when it sets one, and never longer than
  :data:`MAX_CALIBRATION_POINTS` temperatures.

Every refusal is a :class:`~medfed.common.errors.PolicyRefusal` whose text names the rule and carries no site data.
In simulation (no site config) the policy is permissive: the researcher plays every role.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from medfed.common import keys
from medfed.common.config import Config
from medfed.common.errors import ConfigError, PolicyRefusal

__all__ = [
    "DEFAULT_STAGES",
    "MAX_CALIBRATION_POINTS",
    "MAX_TEMPERATURE",
    "MIN_TEMPERATURE",
    "STAGES",
    "RequestLog",
    "SitePolicy",
    "parse_grid",
    "parse_stages",
]

logger = logging.getLogger(__name__)

STAGES = ("train", "ssl", "evaluate", "calibrate", "reliability", "gradcam", "audit")
# Grad-CAM copies validation images and the audit releases numbers outside DP's guarantee: a site lists them to answer
DEFAULT_STAGES = tuple(s for s in STAGES if s not in ("gradcam", "audit"))
# temperatures per calibration request (medfed's default grid has 86): each is a statistic of the validation data
MAX_CALIBRATION_POINTS = 100
# temperatures a final stage may ask (medfed's grid spans 1/16 to about 22.6): extreme ones only serve to overflow
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0


def parse_stages(value: str | Iterable[str], *, key: str = "stages") -> tuple[str, ...]:
    """The stages a site answers, from a list or a comma-separated string; unknown names are refused."""
    names = [s.strip() for s in (value.split(",") if isinstance(value, str) else value) if str(s).strip()]
    unknown = sorted(set(names) - set(STAGES))
    if unknown:
        raise ConfigError(f"{key} holds {unknown}, which are not stages; allowed: {', '.join(STAGES)}.")
    return tuple(s for s in STAGES if s in names)


def parse_grid(value: str | Sequence[float], *, key: str = "calibration_grid") -> tuple[float, ...]:
    raw = value.split(",") if isinstance(value, str) else list(value)
    try:
        grid = tuple(float(t) for t in raw if str(t).strip())
    except ValueError:
        raise ConfigError(f"{key}={value!r} must be a list of temperatures (numbers > 0).") from None
    if any(not t > 0 for t in grid) or len(grid) > MAX_CALIBRATION_POINTS:
        raise ConfigError(
            f"{key} must hold at most {MAX_CALIBRATION_POINTS} temperatures, each > 0; got {len(grid)} values."
        )
    return grid


class RequestLog(Protocol):
    """Which requests a node already answered in this run (Flower's ``context.state`` at a real node)."""

    def answered(self) -> list[str]:
        """Keys of the requests answered so far in this run."""

    def set_answered(self, answered: list[str]) -> None:
        """Keep the keys of the requests answered so far."""


def _true(value: object) -> bool:
    return value is True or str(value).strip().lower() in ("true", "1", "yes")


@dataclass(frozen=True)
class SitePolicy:
    """What a hospital answers. The defaults are a simulated hospital's (permissive); a deployed hospital's come
    from its site config, whose own defaults are strict (see ``medfed.client.site.SiteConfig``)."""

    require_dp: bool = False
    require_secure_aggregation: bool = False
    stages: tuple[str, ...] = STAGES
    calibration_grid: tuple[float, ...] = ()

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, object]) -> SitePolicy:
        """A deployed hospital's policy from its node config (written by its daemon from the site config); a
        node config without a site config is a simulated hospital's (permissive)."""
        if keys.NODE_SITE_CONFIG not in node_config:
            return cls()
        stages = node_config.get(keys.NODE_STAGES)
        grid = node_config.get(keys.NODE_CALIBRATION_GRID)
        return cls(
            require_dp=_true(node_config.get(keys.NODE_REQUIRE_DP, True)),
            require_secure_aggregation=_true(node_config.get(keys.NODE_REQUIRE_SECURE_AGGREGATION, False)),
            stages=parse_stages(str(stages), key="node config stages") if stages is not None else DEFAULT_STAGES,
            calibration_grid=parse_grid(str(grid), key="node config calibration-grid") if grid else (),
        )

    def _stage(self, stage: str) -> None:
        if stage not in self.stages:
            raise PolicyRefusal(
                f"This hospital does not answer {stage!r} requests (its site config's stages: "
                f"{', '.join(self.stages)}); the run goes on without this answer."
            )

    def admit_train(self, cfg: Config) -> None:
        """Refuse a training round the site's policy does not allow (before anything is read or spent)."""
        self._stage("ssl" if cfg.task == "ssl" else "train")
        if self.require_dp and cfg.privacy.name not in ("dp", "distributed_dp"):
            raise PolicyRefusal(
                f"This hospital trains only with its own differential privacy (require_dp in its site config), "
                f"but the run asks for privacy={cfg.privacy.name}; launch the run with privacy=dp (or "
                "privacy=distributed_dp)."
            )
        if self.require_secure_aggregation and not cfg.privacy.secure_aggregation:
            raise PolicyRefusal(
                "This hospital sends updates only under secure aggregation (require_secure_aggregation in its "
                "site config); launch the run with privacy.secure_aggregation=true."
            )

    def admit_evaluate(self, cfg: Config, log: RequestLog, *, run_id: int, server_round: int) -> None:
        """One evaluate request per round of a run, rounds 1..train.rounds (0: the initial model)."""
        self._stage("evaluate")
        if not 0 <= server_round <= cfg.train.rounds:
            raise PolicyRefusal(
                f"This hospital answers evaluate requests for rounds 0..{cfg.train.rounds} of a run; the request "
                f"names round {server_round}."
            )
        _once(log, f"evaluate:{run_id}:{server_round}",
              f"This hospital already answered the evaluate request of round {server_round} of this run; it "
              "answers one per round.")

    def admit_final_stage(
        self, cfg: Config, log: RequestLog, *, run_id: int, stage: str, temperatures: Sequence[float],
        temperature: float = 1.0,
    ) -> tuple[float, ...]:
        """Each final stage once per run, only when the run config plans the final stages, with temperatures in
        [:data:`MIN_TEMPERATURE`, :data:`MAX_TEMPERATURE`] (checked before anything is read or charged); returns
        the temperature grid to use (the site's own, if it has one)."""
        self._stage(stage)
        if stage == "audit":  # asked for by the run, answered once, no temperatures
            if not cfg.evaluate.audit:
                raise PolicyRefusal("The run's config asks for no privacy audit (evaluate.audit=false), so this "
                                    "hospital does not answer an 'audit' request.")
            _once(log, f"final:{stage}:{run_id}",
                  "This hospital already answered the 'audit' stage of this run; it answers each final stage once.")
            return ()
        if not cfg.evaluate.final_stages:
            raise PolicyRefusal(
                f"The run's config plans no final stage (evaluate.calibrate=false, evaluate.gradcam_samples=0), so "
                f"this hospital does not answer a {stage!r} request."
            )
        grid = self.calibration_grid or tuple(temperatures)
        if len(grid) > MAX_CALIBRATION_POINTS:
            raise PolicyRefusal(
                f"The calibration grid has {len(grid)} temperatures; this hospital answers at most "
                f"{MAX_CALIBRATION_POINTS} (each is a statistic of its validation data)."
            )
        outside = [t for t in (*grid, temperature) if not MIN_TEMPERATURE <= t <= MAX_TEMPERATURE]
        if outside:
            raise PolicyRefusal(
                f"Temperature {outside[0]!r} is out of range; this hospital answers temperatures in "
                f"[{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}] only."
            )
        _once(log, f"final:{stage}:{run_id}",
              f"This hospital already answered the {stage!r} stage of this run; it answers each final stage once.")
        return grid

    @property
    def gradcam(self) -> bool:
        """Whether the site writes Grad-CAM maps of its validation images when a final stage asks for them."""
        return "gradcam" in self.stages

    def describe(self) -> str:
        """One line for the daemon's start-up log."""
        grid = (",".join(f"{t:g}" for t in self.calibration_grid)
                or f"the coordinator's (<= {MAX_CALIBRATION_POINTS} points)")
        return (f"require_dp={str(self.require_dp).lower()}, require_secure_aggregation="
                f"{str(self.require_secure_aggregation).lower()}, stages={','.join(self.stages)}, "
                f"calibration_grid={grid}")


def _once(log: RequestLog, key: str, refusal: str) -> None:
    answered = log.answered()
    if key in answered:
        raise PolicyRefusal(refusal)
    log.set_answered([*answered, key])
