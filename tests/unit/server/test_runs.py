"""A finished run in which no hospital ever answered is a failure, unless they all refused on purpose."""

from __future__ import annotations

import pytest

from medfed.common.errors import RunFailed
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
