"""A finished run in which no hospital ever answered is a failure, unless they all refused on purpose; a run in
which no hospital trained says so and why."""

from __future__ import annotations

import pytest

from medfed.common.errors import PolicyRefusal, PrivacyBudgetExceeded, RunFailed
from medfed.server.runs import RunDirectory

CRASH = "<class 'flwr.clientapp.client_app.ClientAppException'>:<'ModuleNotFoundError while handling train'>"
AT_CAP = "<class 'medfed.client.app.SiteFailure'>:<'PrivacyBudgetExceeded: Privacy cap reached'>"
POLICY = "<class 'medfed.client.app.SiteFailure'>:<'PolicyRefusal: This hospital trains only with its own DP'>"


def _run(tmp_path, reasons: list[str], sites: dict) -> RunDirectory:
    run = RunDirectory(tmp_path / "run")
    run.path.mkdir(parents=True)
    run.append_metrics({"round": 1, "dropped": [{"site": f"h{i}", "phase": "train", "reason": r}
                                                for i, r in enumerate(reasons)]})
    run.write_summary({"sites": sites, "best": None})
    return run


def _unanswered(run: RunDirectory) -> RunFailed | None:
    return run.unanswered(run.read_summary())


def test_a_run_where_every_hospital_failed_is_a_failure_naming_the_first_reason(tmp_path):
    failed = _unanswered(_run(tmp_path, [CRASH, CRASH, AT_CAP], {}))
    assert isinstance(failed, RunFailed)
    assert "2 request(s) failed and 1 were refused" in str(failed) and "ModuleNotFoundError" in str(failed)


@pytest.mark.parametrize(
    ("reasons", "sites"),
    [
        ([AT_CAP, POLICY], {}),  # every hospital refused on purpose: a clean end that says why
        ([CRASH], {"hospital-1": {"n_train": 10}}),  # another hospital answered
        ([], {"hospital-0": {"n_train": 10}}),
    ],
)
def test_refusals_or_any_answer_are_no_failure(tmp_path, reasons, sites):
    assert _unanswered(_run(tmp_path, reasons, sites)) is None


def _rounds(tmp_path, rounds: list[tuple[list[str], dict]]) -> RunDirectory:
    """A finished run: per round, the training requests' refusal reasons and the sites' records."""
    run = RunDirectory(tmp_path / "run")
    run.path.mkdir(parents=True)
    for number, (reasons, sites) in enumerate(rounds, start=1):
        run.append_metrics({"round": number, "sites": sites, "dropped": [
            {"site": f"h{i}", "phase": "train", "reason": r} for i, r in enumerate(reasons)]})
    return run


EVALUATED_ONLY = {"hospital-0": {"trained": False, "val": {"auc": 1.0}}}


@pytest.mark.parametrize(("reasons", "error", "says"), [
    ([AT_CAP, AT_CAP], PrivacyBudgetExceeded, "4 refused at a privacy cap or out of privacy reach"),
    ([AT_CAP, POLICY], PolicyRefusal, "2 refused by site policy"),
    ([AT_CAP, CRASH], RunFailed, "2 failed"),
])
def test_a_run_in_which_no_hospital_trained_says_so_and_why(tmp_path, reasons, error, says):
    # the hospitals evaluated the initial model each round but none trained
    run = _rounds(tmp_path, [(reasons, EVALUATED_ONLY), (reasons, EVALUATED_ONLY)])

    nowhere = run.trained_nowhere()

    assert type(nowhere) is error
    assert "No hospital trained in this run (2 round(s)" in str(nowhere) and says in str(nowhere)
    assert "Privacy cap reached" in str(nowhere) or "ModuleNotFoundError" in str(nowhere)


@pytest.mark.parametrize("sites", [
    {"hospital-0": {"trained": True}},
    {"hospital-0": {"n_train": 10}},  # an older run's metrics: nothing says it did not train
])
def test_a_run_in_which_some_hospital_trained_in_some_round_trained(tmp_path, sites):
    run = _rounds(tmp_path, [([AT_CAP], EVALUATED_ONLY), ([], sites)])
    assert run.trained_nowhere() is None
