"""Advice before a run: choices the config allows that are likely to disappoint, each with the reason and what to use
instead. `medfed simulate` and `medfed train` print them as warnings; nothing is refused (the rules that refuse are
:mod:`medfed.common.config.rules`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medfed.common.config.schema import Config

__all__ = ["advisories"]


def advisories(cfg: Config, *, deployment: bool = False) -> list[str]:
    """Choices that are allowed but likely to disappoint, each with the reason and what to use instead (printed by
    `medfed simulate` and `medfed train` before the run starts; nothing is refused)."""
    out: list[str] = []
    strategy = cfg.strategy
    if strategy.name in ("krum", "multikrum"):
        kept = 1 if strategy.name == "krum" else int(getattr(strategy, "num_nodes_to_select", 1))
        skewed = deployment or cfg.federation.partition != "iid"
        # the hospitals a round asks, as far as the config knows them
        asked = strategy.min_train_nodes if deployment else max(
            strategy.min_train_nodes, round(strategy.fraction_train * cfg.federation.hospitals))
        if skewed and 2 * kept <= asked:
            where = ("hospitals' real data, which are rarely alike in their labels" if deployment else
                     f"federation.partition={cfg.federation.partition} (alpha {cfg.federation.alpha:g}): "
                     "hospitals with different label mixes")
            out.append(
                f"strategy={strategy.name} keeps the {kept} update(s) closest to the others each round and drops "
                f"the rest; with {where}, the kept update is one hospital's view of the labels, not the "
                "federation's (measured on BreastMNIST, 5 hospitals, Dirichlet 0.5, 5 rounds: krum 0.415 test AUC, "
                "below chance, against fedmedian 0.756 and fedavg 0.710). Krum is for attackers among hospitals "
                "with alike data; for robustness under label skew use strategy=fedmedian or "
                "strategy=fedtrimmedavg (docs/benchmarks.md, strategies).")
    return out
