"""Run directory and model selection: validation selects, test only reports; resume state round-trips."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from medfed.server.runs import RunDirectory, json_safe
from medfed.server.tracking import RunTracker, SiteRound, selection_key, weighted_metrics


def _sites(val_auc_a: float, val_auc_b: float) -> dict[str, SiteRound]:
    return {
        "hospital-0": SiteRound(n_train=40, n_val=10, train_loss=0.5, train_s=1.0, eval_s=0.1, val={"auc": val_auc_a, "acc": 0.5, "loss": 0.7}),
        "hospital-1": SiteRound(n_train=120, n_val=30, train_loss=0.3, train_s=2.0, eval_s=0.2, val={"auc": val_auc_b, "acc": 0.9, "loss": 0.4}),
    }


def test_weighted_metrics_by_validation_size_skip_undefined():
    # Execute
    val = weighted_metrics(_sites(0.6, math.nan))
    both = weighted_metrics(_sites(0.6, 0.8))

    # Assert (by hand)
    assert val["auc"] == pytest.approx(0.6)
    assert both["auc"] == pytest.approx((10 * 0.6 + 30 * 0.8) / 40)
    assert both["acc"] == pytest.approx((10 * 0.5 + 30 * 0.9) / 40)


def test_selection_prefers_defined_auc_then_lower_loss():
    assert selection_key({"auc": 0.7}) > selection_key({"auc": 0.6})
    assert selection_key({"auc": 0.51}) > selection_key({"auc": math.nan, "loss": 0.01})
    assert selection_key({"auc": math.nan, "loss": 0.2}) > selection_key({"auc": math.nan, "loss": 0.3})


def test_selection_breaks_auc_ties_on_balanced_accuracy_then_loss():
    one_class = {"auc": 1.0, "bal_acc": 0.5, "loss": 0.30}  # ranks perfectly, says one class at 0.5
    separates = {"auc": 1.0, "bal_acc": 1.0, "loss": 0.60}
    assert selection_key(separates) > selection_key(one_class)
    assert selection_key({"auc": 1.0, "bal_acc": 1.0, "loss": 0.1}) > selection_key(separates)
    assert selection_key({"auc": 0.9, "bal_acc": 1.0, "loss": 0.1}) < selection_key(one_class)


def _tied(bal_acc: float, loss: float) -> dict[str, SiteRound]:
    return {"hospital-0": SiteRound(n_train=40, n_val=10, train_loss=0.5, train_s=1.0, eval_s=0.1,
                                    val={"auc": 1.0, "acc": 0.5, "bal_acc": bal_acc, "loss": loss})}


def test_tied_validation_auc_never_makes_a_one_class_model_best_and_a_full_tie_goes_to_the_later_round(tmp_path):
    # Prepare: validation AUC 1.000 in every round (the synthetic demo); round 1 says one class
    tracker = RunTracker(RunDirectory(tmp_path / "run"), mode="fedavg", total_rounds=4, t0=time.time())
    arrays = {"w": np.zeros(2, dtype=np.float32)}

    # Execute
    tracker.record_round(1, sites=_tied(0.5, 0.40), test=None, arrays=arrays)
    tracker.record_round(2, sites=_tied(1.0, 0.30), test=None, arrays=arrays)
    tracker.record_round(3, sites=_tied(1.0, 0.35), test=None, arrays=arrays)  # worse loss: round 2 stays best
    assert tracker.finish(arrays)["best"]["round"] == 2
    tracker.record_round(4, sites=_tied(1.0, 0.30), test=None, arrays=arrays)  # a full tie: more training wins

    # Assert
    assert tracker.finish(arrays)["best"]["round"] == 4


def test_best_model_file_holds_the_best_rounds_weights_not_the_latest(tmp_path):
    # Prepare: each round's model differs; round 2 is best on validation (issue 28: writing best_model.pt every
    # round went unnoticed while every round's arrays were the same)
    from medfed.common.models.weights import load_checkpoint

    run = RunDirectory(tmp_path / "run")
    tracker = RunTracker(run, mode="fedavg", total_rounds=3, t0=time.time())
    weights = {r: {"w": np.full(2, float(r), dtype=np.float32)} for r in (1, 2, 3)}

    # Execute
    for server_round, auc in ((1, 0.6), (2, 0.9), (3, 0.7)):
        tracker.record_round(server_round, sites=_sites(auc, auc), test=None, arrays=weights[server_round])
    tracker.finish(weights[3])

    # Assert
    best, meta = load_checkpoint(run.best_model_path)
    assert meta["round"] == 2 and np.array_equal(best["w"], weights[2]["w"])
    final, _ = load_checkpoint(run.path / "model.pt")
    assert np.array_equal(final["w"], weights[3]["w"])


def test_best_round_is_chosen_on_validation_never_on_test(tmp_path):
    # Prepare: round 2 has the better validation AUC but the worse test AUC
    run = RunDirectory(tmp_path / "run")
    tracker = RunTracker(run, mode="fedavg", total_rounds=3, t0=time.time())
    arrays = {"w": np.zeros(2, dtype=np.float32)}

    # Execute
    tracker.add_compute(0.5)  # the server's evaluation of the initial model
    tracker.record_round(1, sites=_sites(0.6, 0.6), test={"auc": 0.95, "acc": 0.9}, arrays=arrays)
    tracker.record_round(2, sites=_sites(0.9, 0.9), test={"auc": 0.70, "acc": 0.6}, arrays=arrays)
    tracker.record_round(3, sites=_sites(0.7, 0.7), test={"auc": 0.99, "acc": 0.99}, arrays=arrays)
    summary = tracker.finish(arrays)

    # Assert
    assert summary["best"]["round"] == 2
    assert summary["best"]["test"]["auc"] == pytest.approx(0.70)
    assert summary["final"]["round"] == 3
    assert summary["sites"]["hospital-1"]["n_train"] == 120
    assert summary["sites"]["hospital-1"]["val"]["auc"] == pytest.approx(0.9)  # at the best round
    assert summary["compute_s"] == pytest.approx(0.5 + 3 * (1.0 + 0.1 + 2.0 + 0.2))
    lines = [json.loads(line) for line in run.metrics_path.read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2, 3]
    assert run.model_path.is_file() and run.best_model_path.is_file() and run.last_checkpoint_path.is_file()
    on_disk = json.loads(run.summary_path.read_text())
    assert on_disk["best"]["round"] == 2


def test_tracker_state_survives_a_restart(tmp_path):
    # Prepare: two rounds, then a "crash" after a third metrics line without checkpoint
    run = RunDirectory(tmp_path / "run")
    tracker = RunTracker(run, mode="fedavg", total_rounds=4, t0=time.time())
    arrays = {"w": np.ones(2, dtype=np.float32)}
    tracker.record_round(1, sites=_sites(0.8, 0.8), test=None, arrays=arrays)
    tracker.record_round(2, sites=_sites(0.6, 0.6), test=None, arrays=arrays)
    run.append_metrics({"round": 3})

    # Execute: what the ServerApp does on --resume
    weights, meta = run.load_last_checkpoint()
    run.truncate_metrics(int(meta["round"]))
    resumed = RunTracker(run, mode="fedavg", total_rounds=4, t0=time.time(), state=meta["tracker"])
    resumed.record_round(3, sites=_sites(0.9, 0.9), test=None, arrays=arrays)

    # Assert
    assert meta["round"] == 2
    np.testing.assert_array_equal(weights["w"], arrays["w"])
    assert [r["round"] for r in run.read_metrics()] == [1, 2, 3]
    assert resumed.best_round == 3
    assert resumed.state.compute_s == pytest.approx(3 * 3.3)


def test_local_mode_summarises_each_hospital_at_its_own_best_round(tmp_path):
    # Prepare
    tracker = RunTracker(RunDirectory(tmp_path / "run"), mode="local", total_rounds=2, t0=time.time())
    r1 = _sites(0.9, 0.5)
    r1["hospital-0"].test, r1["hospital-1"].test = {"auc": 0.8, "acc": 0.7}, {"auc": 0.6, "acc": 0.5}
    r2 = _sites(0.7, 0.8)
    r2["hospital-0"].test, r2["hospital-1"].test = {"auc": 0.9, "acc": 0.8}, {"auc": 0.7, "acc": 0.6}

    # Execute
    tracker.record_round(1, sites=r1, test=None, arrays=None)
    tracker.record_round(2, sites=r2, test=None, arrays=None)
    summary = tracker.finish(None)

    # Assert: hospital-0 selects round 1 (test 0.8), hospital-1 round 2 (test 0.7)
    assert summary["sites"]["hospital-0"]["best_round"] == 1
    assert summary["sites"]["hospital-1"]["best_round"] == 2
    assert summary["local"]["test_auc"] == pytest.approx({"mean": 0.75, "min": 0.7, "max": 0.8})
    assert summary["best"]["test"]["auc"] == pytest.approx(0.75)


def test_json_safe_writes_strict_json():
    assert json_safe({"a": math.nan, "b": [np.float32(1.5), math.inf], "c": np.int64(3)}) == {"a": None, "b": [1.5, None], "c": 3}


def test_a_run_directory_has_one_writer_at_a_time(tmp_path):
    # Prepare: another process holds the run's lock (as the ServerApp of an interrupted run still exiting would)
    import subprocess
    import sys

    from medfed.common.errors import ConfigError

    run = RunDirectory(tmp_path / "run")
    holder = subprocess.Popen(
        [sys.executable, "-c", "from medfed.server.runs import RunDirectory; "
         f"import time\nwith RunDirectory({str(run.path)!r}).exclusive():\n print('held', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"

        # Execute / Assert: a second writer is refused with what to do
        with pytest.raises(ConfigError, match=r"Another process is still writing the run in .*run"):
            with run.exclusive(timeout=0.5):
                pass
    finally:
        holder.kill()
        holder.wait()
    # once the holder is gone (killed: no clean-up), the lock is free
    with run.exclusive(timeout=5):
        pass


def test_personalised_models_are_selected_on_their_own_validation_and_reported_per_site(tmp_path):
    # Prepare: the hospitals' reply metrics (as the ClientApp sends them); round 1 has the better personalised
    # validation AUC, round 2 the better global one and the better personalised *test* AUC
    from medfed.server.tracking import site_rounds

    def evaluate(global_auc: float, personal_auc: float, personal_test: float, finetuned: bool) -> dict:
        metrics = {"n-val": 10, "val-auc": global_auc, "pval-auc": personal_auc, "ptest-auc": personal_test,
                   "ensval-auc": (global_auc + personal_auc) / 2, "enstest-auc": personal_test - 0.1}
        if finetuned:
            metrics.update({"ftval-auc": personal_auc + 0.01, "fttest-auc": personal_test + 0.01, "ft-epoch": 2})
        return metrics

    train = {"hospital-0": {"n-train": 40, "train-loss": 0.5}, "hospital-1": {"n-train": 40, "train-loss": 0.5}}
    run = RunDirectory(tmp_path / "run")
    tracker = RunTracker(run, mode="fedavg", total_rounds=2, t0=time.time())

    # Execute
    tracker.record_round(1, sites=site_rounds(train, {s: evaluate(0.6, 0.9, 0.70, False) for s in train}),
                         test={"auc": 0.8}, arrays=None)
    tracker.record_round(2, sites=site_rounds(train, {"hospital-0": evaluate(0.8, 0.8, 0.95, True),
                                                      "hospital-1": evaluate(0.8, 0.8, 0.85, True)}),
                         test={"auc": 0.8}, arrays=None)
    summary = tracker.finish(None)

    # Assert: the global best is round 2, the personalised best round 1 (its validation), tested at round 1
    assert summary["best"]["round"] == 2
    assert summary["personalized"]["round"] == 1
    assert summary["personalized"]["val"]["auc"] == pytest.approx(0.9)
    assert summary["personalized"]["test"]["auc"]["mean"] == pytest.approx(0.70)
    assert summary["personalized"]["sites"]["hospital-1"]["test"]["auc"] == pytest.approx(0.70)
    assert summary["finetuned"]["round"] == 2
    assert summary["finetuned"]["test"]["auc"]["mean"] == pytest.approx(0.91)  # mean of 0.96 and 0.86
    assert summary["finetuned"]["sites"]["hospital-0"]["epoch"] == 2
    # the ensemble's own validation picks round 2 (0.80 > 0.75), tested there
    assert summary["ensemble"]["round"] == 2 and summary["ensemble"]["val"]["auc"] == pytest.approx(0.80)
    assert summary["ensemble"]["test"]["auc"]["mean"] == pytest.approx(0.80)
    lines = [json.loads(line) for line in run.metrics_path.read_text().splitlines()]
    assert lines[0]["sites"]["hospital-0"]["personal"]["val"]["auc"] == pytest.approx(0.9)
    assert "finetuned" not in lines[0]["sites"]["hospital-0"]


def test_tensorboard_events_hold_the_rounds_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from medfed.server.tracking import site_rounds

    # Prepare
    run = RunDirectory(tmp_path / "run")
    tracker = RunTracker(run, mode="fedavg", total_rounds=2, t0=time.time(), tensorboard=True)
    train = {"hospital-0": {"n-train": 40, "train-loss": 0.5, "epsilon": 1.5, "delta": 1e-5}}

    # Execute: two rounds, then the end of the run
    for server_round, auc in ((1, 0.6), (2, 0.7)):
        evaluate = {"hospital-0": {"n-val": 10, "val-auc": auc, "val-loss": 0.4}}
        tracker.record_round(server_round, sites=site_rounds(train, evaluate), test={"auc": auc + 0.1},
                             arrays=None)
    tracker.finish(None)

    # Assert
    events = EventAccumulator(str(run.path / "tensorboard"))
    events.Reload()
    val_auc = [(e.step, round(e.value, 4)) for e in events.Scalars("val/auc")]
    assert val_auc == [(1, 0.6), (2, 0.7)]
    assert [round(e.value, 4) for e in events.Scalars("test/auc")] == [0.7, 0.8]
    assert [e.value for e in events.Scalars("site/hospital-0/epsilon")] == [1.5, 1.5]
    assert "privacy/max_epsilon" in events.Tags()["scalars"]


def test_tensorboard_without_its_package_is_refused_before_training(monkeypatch):
    import builtins

    from medfed.common.config import TrackingConfig
    from medfed.common.errors import ConfigError

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == "tensorboard":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ConfigError, match=r"medfed\[tensorboard\]"):
        TrackingConfig(tensorboard=True).require_runtime()
    TrackingConfig(tensorboard=False).require_runtime()  # off: nothing needed


def test_tracker_state_round_trips_through_the_checkpoint_format(tmp_path):
    # Prepare: a run with personalised parts, per-site privacy and central DP, checkpointed after round 2
    from medfed.server.tracking import TrackerState, site_rounds

    run = RunDirectory(tmp_path / "run")
    tracker = RunTracker(run, mode="fedavg", total_rounds=3, t0=time.time())
    train = {"hospital-0": {"n-train": 40, "train-loss": 0.5, "epsilon": 1.5, "delta": 1e-5}}
    for server_round, auc in ((1, 0.6), (2, math.nan)):
        tracker.note_central_privacy(epsilon=0.5 * server_round, delta=1e-6, accountant_state={"steps": server_round})
        evaluate = {"hospital-0": {"n-val": 10, "val-auc": auc, "val-loss": 0.4, "pval-auc": 0.7, "ftval-auc": 0.8}}
        tracker.record_round(server_round, sites=site_rounds(train, evaluate), test=None, arrays={"w": np.ones(2)})

    # Execute
    _, meta = run.load_last_checkpoint()
    restored = TrackerState.from_checkpoint(meta["tracker"])

    # Assert: the same mapping comes back (nan as None: checkpoint metadata is strict JSON), with its types
    assert list(meta["tracker"]) == ["compute_s", "wall_s", "best", "site_best", "site_sizes", "last", "dropped_total",
                                     "site_privacy", "accountant_state", "run_privacy", "personal_best",
                                     "ensemble_best", "finetuned", "mode", "noised_auc_max", "privacy_assumptions",
                                     "improved", "stopped_early"]
    assert restored.to_checkpoint(wall_s=meta["tracker"]["wall_s"], mode="fedavg") == meta["tracker"]
    assert restored.best.server_round == 1 and restored.last.val["auc"] is None
    assert restored.run_privacy.run_epsilon == pytest.approx(1.0) and restored.accountant_state == {"steps": 2}
    assert restored.site_privacy["hospital-0"].epsilon == pytest.approx(1.5)
    assert restored.personal_best.sites["hospital-0"]["val"]["auc"] == pytest.approx(0.7)


def test_a_checkpoint_state_missing_newer_keys_resumes_with_their_defaults(tmp_path):
    # Prepare: tracker state as an older checkpoint holds it (no personalisation or central DP keys)
    old = {"compute_s": 3.0, "wall_s": 10.0, "best": {"round": 1, "val": {"auc": 0.7}, "test": None},
           "last": {"round": 1, "val": {"auc": 0.7}, "test": None}, "site_best": {}, "dropped_total": 1,
           "site_sizes": {"hospital-0": {"n_train": 40, "n_val": 10}}, "mode": "fedavg"}
    run = RunDirectory(tmp_path / "run")

    # Execute
    tracker = RunTracker(run, mode="fedavg", total_rounds=2, t0=time.time(), state=old)
    tracker.record_round(2, sites=_sites(0.6, 0.6), test=None, arrays=None)
    summary = tracker.finish(None)

    # Assert: round 1 stays the best; counts continue
    assert summary["best"]["round"] == 1
    assert summary["dropped"] == 1 and summary["compute_s"] == pytest.approx(3.0 + 3.3)
    assert "personalized" not in summary and "privacy" not in summary


def test_extra_sinks_see_every_round_and_the_summary(tmp_path):
    # Prepare: a sink as a console display would be
    class Display:
        def __init__(self) -> None:
            self.rounds, self.summary, self.closed = [], None, False

        def on_round(self, record):
            self.rounds.append(record["round"])

        def on_summary(self, summary):
            self.summary = summary

        def close(self):
            self.closed = True

    display = Display()
    tracker = RunTracker(RunDirectory(tmp_path / "run"), mode="fedavg", total_rounds=2, t0=time.time(), sinks=[display])

    # Execute
    tracker.record_round(1, sites=_sites(0.6, 0.6), test=None, arrays=None)
    tracker.record_round(2, sites=_sites(0.8, 0.8), test=None, arrays=None)
    summary = tracker.finish(None)

    # Assert
    assert display.rounds == [1, 2]
    assert display.summary is summary and display.summary["best"]["round"] == 2
    assert display.closed


def _noised_site(labels, probs, noise_std):
    from medfed.common.noised_stats import EvalStatistics, noise_rng

    stats = EvalStatistics.of(labels, probs)
    noisy = EvalStatistics.from_vector(2, stats.vector() + noise_rng().normal(0, noise_std, stats.vector().shape))
    return SiteRound(val=noisy.metrics(), n_val=len(labels), noised=noisy, noise_std=noise_std)


def test_noised_validation_is_pooled_with_the_standard_error_its_noise_puts_on_the_auc():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    p1 = np.clip(0.5 + 0.3 * (labels - 0.5) + rng.normal(0, 0.2, 400), 0.01, 0.99)
    probs = np.stack([1 - p1, p1], axis=1)

    quiet = weighted_metrics({"a": _noised_site(labels[:200], probs[:200], 0.01),
                              "b": _noised_site(labels[200:], probs[200:], 0.01)})
    loud = weighted_metrics({"a": _noised_site(labels[:200], probs[:200], 20.0),
                             "b": _noised_site(labels[200:], probs[200:], 20.0)})

    from medfed.common.metrics import classification_metrics

    assert quiet["auc"] == pytest.approx(classification_metrics(labels, probs)["auc"], abs=0.02)  # pooled, not mean
    assert quiet["auc_noise_se"] < 0.005 < 0.05 < loud["auc_noise_se"]


def test_noised_validation_selects_the_latest_round_within_one_standard_error_of_the_best():
    from medfed.server.tracking.selection import select_global
    from medfed.server.tracking.state import TrackerState

    state = TrackerState()
    rounds = {1: 0.70, 2: 0.80, 3: 0.76, 4: 0.60, 5: 0.83, 6: 0.79}

    chosen = [r for r, auc in rounds.items() if select_global(state, r, {"auc": auc, "auc_noise_se": 0.05}, None)]

    assert chosen == [1, 2, 3, 5, 6]  # 3 and 6 are within 0.05 of the best so far; 4 is not
    assert state.best is not None and state.best.server_round == 6 and state.noised_auc_max == 0.83
    # a round whose AUC the noise leaves undefined, or unbounded, is indistinguishable from the best: the later wins
    assert select_global(state, 7, {"auc": math.nan, "auc_noise_se": math.inf}, None)
    assert select_global(state, 8, {"auc": 0.1, "auc_noise_se": math.inf}, None)
    assert not select_global(state, 9, {"auc": 0.1, "auc_noise_se": 0.05}, None)
    exact = TrackerState()
    assert [r for r, auc in rounds.items() if select_global(exact, r, {"auc": auc}, None)] == [1, 2, 5]
    restored = TrackerState.from_checkpoint(state.to_checkpoint(wall_s=1.0, mode="fedavg"))
    assert restored.noised_auc_max == 0.83


@pytest.mark.parametrize(("aucs", "patience", "stops_after"), [
    ((0.6, 0.8, 0.7, 0.75, 0.9, 0.95), 2, 4),  # rounds 3 and 4 do not beat round 2's 0.8
    ((0.6, 0.8, 0.7, 0.85, 0.7, 0.7), 2, None),  # round 4 improves; round 6 would stop: it is the planned end
    ((0.6, 0.8, 0.8, 0.8, 0.9, 0.9), 2, 4),  # a tie is no improvement (though selection lets it win)
    ((0.6, 0.5, 0.4, 0.3, 0.2, 0.1), 0, None),  # patience 0: every planned round
])
def test_patience_stops_after_that_many_rounds_without_a_better_validation_and_reports_the_best(
        tmp_path, aucs, patience, stops_after):
    # Prepare: a 6-round run whose weighted validation AUCs are `aucs`
    tracker = RunTracker(RunDirectory(tmp_path / "run"), mode="fedavg", total_rounds=6, t0=time.time(),
                         patience=patience)
    arrays = {"w": np.zeros(2, dtype=np.float32)}

    # Execute: the runner records rounds until the tracker says stop
    recorded = 0
    for server_round, auc in enumerate(aucs, start=1):
        tracker.record_round(server_round, sites=_sites(auc, auc), test=None, arrays=arrays)
        recorded = server_round
        if tracker.stopped_early is not None:
            break
    summary = tracker.finish(arrays)

    # Assert: stopped where patience ran out (never at the planned end: that is no early stop), the best
    # validation round reported
    expected = stops_after if stops_after is not None and stops_after < 6 else 6
    assert recorded == expected and summary["rounds"] == expected and summary["planned_rounds"] == 6
    if stops_after is not None and stops_after < 6:
        assert f"train.patience={patience}" in summary["stopped"] and f"after round {expected} of 6" in summary["stopped"]
    else:
        assert tracker.stopped_early is None and "stopped" not in summary
    best_auc = max(aucs[:expected])
    assert summary["best"]["val"]["auc"] == pytest.approx(best_auc)


def test_a_run_stopped_early_stays_stopped_when_resumed(tmp_path):
    # Prepare: a run stopped by patience after round 3; its checkpoint
    from medfed.common.models.weights import load_checkpoint

    run = RunDirectory(tmp_path / "run")
    tracker = RunTracker(run, mode="fedavg", total_rounds=10, t0=time.time(), patience=2)
    arrays = {"w": np.zeros(2, dtype=np.float32)}
    for server_round, auc in ((1, 0.9), (2, 0.8), (3, 0.7)):
        tracker.record_round(server_round, sites=_sites(auc, auc), test=None, arrays=arrays)
    assert tracker.stopped_early is not None

    # Execute: the tracker a resumed session builds from the last checkpoint
    _, meta = load_checkpoint(run.last_checkpoint_path)
    resumed = RunTracker(run, mode="fedavg", total_rounds=10, t0=time.time(), patience=2, state=meta["tracker"])

    # Assert: still stopped (the runner trains no further), with the same reason and the same improvement round
    assert meta["round"] == 3 and resumed.stopped_early == tracker.stopped_early
    assert resumed.state.improved is not None and resumed.state.improved.server_round == 1


@pytest.mark.parametrize(("bad", "says"), [(-1, "must be an integer >= 0"), (1.5, "could not be converted to Integer"),
                                           (True, "could not be converted to Integer")])
def test_patience_must_be_a_whole_number_of_rounds(bad, says):
    from medfed.common.config import compose_config
    from medfed.common.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"train.patience.*{says}"):
        compose_config([f"train.patience={bad}"])


def test_a_change_below_a_millionth_is_no_improvement_for_patience(tmp_path):
    # Prepare: the same AUC every round, the loss falling by 1e-12 a round (a learning rate too small to matter
    # still moves zero biases), then by 0.01
    tracker = RunTracker(RunDirectory(tmp_path / "run"), mode="fedavg", total_rounds=6, t0=time.time(), patience=2)
    arrays = {"w": np.zeros(2, dtype=np.float32)}

    def sites(loss: float) -> dict[str, SiteRound]:
        return {"hospital-0": SiteRound(n_train=40, n_val=10, train_loss=0.5, train_s=1.0, eval_s=0.1,
                                        val={"auc": 0.8, "acc": 0.5, "loss": loss})}

    # Execute / Assert: rounds 2 and 3 are ties of round 1; patience runs out after round 3
    for server_round, loss in ((1, 0.7), (2, 0.7 - 1e-12), (3, 0.7 - 2e-12)):
        tracker.record_round(server_round, sites=sites(loss), test=None, arrays=arrays)
    assert tracker.stopped_early is not None and "than round 1's" in tracker.stopped_early

    # and a loss 0.01 lower is an improvement
    other = RunTracker(RunDirectory(tmp_path / "other"), mode="fedavg", total_rounds=6, t0=time.time(), patience=2)
    for server_round, loss in ((1, 0.7), (2, 0.69), (3, 0.69)):
        other.record_round(server_round, sites=sites(loss), test=None, arrays=arrays)
    assert other.stopped_early is None and other.state.improved.server_round == 2
