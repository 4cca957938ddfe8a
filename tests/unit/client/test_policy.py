"""A deployed hospital's own policy (its site config), enforced by the real ClientApp at every message, whatever the
coordinator's run config asks: DP required, SecAgg+ required, the stages it answers, evaluation limits, its own
calibration grid, Grad-CAM off by default."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, MessageType, RecordDict

from medfed.client.app import SiteFailure, app
from medfed.client.policy import DEFAULT_STAGES, MAX_CALIBRATION_POINTS, SitePolicy, parse_stages
from medfed.client.site import SiteConfig, load_site_config, node_config_for, site_policy, write_site_config
from medfed.common import keys
from medfed.common.config import compose_config, run_config_from_overrides
from medfed.common.errors import ConfigError
from medfed.common.models import build_model
from tests.conftest import instruction

RECIPE = ["train.rounds=3", "train.local_epochs=1", "train.batch_size=16"]


def _site(tmp_path: Path, **policy: object) -> dict[str, object]:
    """A deployed hospital: an array file, a site config with ``policy``, the node config its daemon writes."""
    rng = np.random.default_rng(0)
    labels = np.arange(60) % 2
    images = (rng.random((60, 1, 28, 28)) * 0.2 + labels[:, None, None, None] * 0.5).astype(np.float32)
    np.savez(tmp_path / "data.npz", images=images, labels=labels)
    write_site_config(SiteConfig(site_id="st-marys", data_path="data.npz", n_classes=2, secure_rng=False,
                                 **policy), tmp_path / "site.yaml")  # type: ignore[arg-type]
    return node_config_for(load_site_config(tmp_path / "site.yaml"))


def _context(node_config: dict[str, object], overrides: list[str], run_id: int = 1) -> Context:
    return Context(run_id=run_id, node_id=7, node_config=node_config, state=RecordDict(),
                   run_config=run_config_from_overrides(overrides))


def _message(message_type: str, overrides: list[str], config: dict[str, object], run_id: int = 1):
    cfg = compose_config(overrides)
    arrays = ArrayRecord(build_model(cfg.model, spatial_dims=2, in_channels=1, n_classes=2).state_dict())
    return instruction(RecordDict({keys.ARRAYS: arrays, keys.CONFIG: ConfigRecord(config)}), message_type,
                       run_id=run_id)


def _train(node_config, overrides, server_round=1):
    context = _context(node_config, overrides)
    return app(_message(MessageType.TRAIN, overrides, {keys.SERVER_ROUND: server_round}), context), context


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ([], r"PolicyRefusal: This hospital trains only with its own differential privacy .* privacy=none"),
        (["privacy=central_dp"], r"PolicyRefusal: .*require_dp.* privacy=central_dp"),
    ],
)
def test_a_site_that_requires_dp_refuses_a_run_without_it(tmp_path, overrides, reason):
    # Prepare: a site config without policy keys (the safe defaults: require_dp)
    node_config = _site(tmp_path)

    # Execute / Assert: refused before anything is read or spent
    with pytest.raises(SiteFailure, match=reason):
        _train(node_config, [*RECIPE, *overrides])
    assert not (tmp_path / "state" / "privacy").exists()


def test_a_site_that_requires_dp_trains_under_privacy_dp_and_records_it(tmp_path):
    node_config = _site(tmp_path)

    out, _ = _train(node_config, [*RECIPE, "privacy=dp", "privacy.target_epsilon=8"])

    assert not out.has_error(), out.error
    assert out.content[keys.METRICS][keys.EPSILON] > 0
    assert list((tmp_path / "state" / "privacy").glob("*.json"))


def test_a_research_site_that_opts_out_trains_without_dp(tmp_path):
    out, _ = _train(_site(tmp_path, require_dp=False), RECIPE)
    assert not out.has_error(), out.error


def test_a_site_that_requires_secure_aggregation_refuses_plain_updates(tmp_path):
    node_config = _site(tmp_path, require_dp=False, require_secure_aggregation=True)
    with pytest.raises(SiteFailure, match="PolicyRefusal: .*secure aggregation.*privacy.secure_aggregation=true"):
        _train(node_config, RECIPE)


def test_a_site_answers_one_evaluate_per_round_and_only_rounds_of_the_run(tmp_path):
    # Prepare
    context = _context(_site(tmp_path, require_dp=False), RECIPE)

    def evaluate(server_round):
        return app(_message(MessageType.EVALUATE, RECIPE, {keys.SERVER_ROUND: server_round}), context)

    # Execute / Assert: the first request of a round is answered, the second is not (the 1,000-request probe)
    assert not evaluate(1).has_error()
    with pytest.raises(SiteFailure, match="PolicyRefusal: This hospital already answered the evaluate request of "
                                          "round 1"):
        evaluate(1)
    assert not evaluate(2).has_error()
    with pytest.raises(SiteFailure, match=r"answers evaluate requests for rounds 0\.\.3 of a run; .* round 4"):
        evaluate(4)


def test_a_site_without_the_evaluate_stage_refuses_evaluation(tmp_path):
    context = _context(_site(tmp_path, require_dp=False, stages=["train"]), RECIPE)
    with pytest.raises(SiteFailure, match="does not answer 'evaluate' requests"):
        app(_message(MessageType.EVALUATE, RECIPE, {keys.SERVER_ROUND: 1}), context)


def _final(context, stage: str, **config: object):
    request = {keys.SERVER_ROUND: 3, keys.FINAL_STAGE: stage, **config}
    return app(_message(MessageType.EVALUATE, RECIPE, request), context)


def test_each_final_stage_is_answered_once_and_the_grid_is_bounded(tmp_path):
    # Prepare
    context = _context(_site(tmp_path, require_dp=False), RECIPE)
    huge = [0.5 + i / 100 for i in range(500)]

    # Execute / Assert: the 500-point grid of a probing coordinator is refused
    with pytest.raises(SiteFailure, match=f"500 temperatures; this hospital answers at most {MAX_CALIBRATION_POINTS}"):
        _final(context, keys.STAGE_CALIBRATE, **{keys.TEMPERATURES: huge})
    out = _final(context, keys.STAGE_CALIBRATE, **{keys.TEMPERATURES: [0.5, 1.0, 2.0]})
    assert len(out.content[keys.METRICS][keys.NLL_SUMS]) == 3
    with pytest.raises(SiteFailure, match="already answered the 'calibrate' stage of this run"):
        _final(context, keys.STAGE_CALIBRATE, **{keys.TEMPERATURES: [0.5, 1.0, 2.0]})


def test_a_site_with_its_own_calibration_grid_uses_it(tmp_path):
    context = _context(_site(tmp_path, require_dp=False, calibration_grid=[0.8, 1.0, 1.25, 1.5]), RECIPE)
    out = _final(context, keys.STAGE_CALIBRATE, **{keys.TEMPERATURES: [float(t) for t in range(1, 40)]})
    assert len(out.content[keys.METRICS][keys.NLL_SUMS]) == 4


@pytest.mark.parametrize(("stages", "saved"), [(list(DEFAULT_STAGES), 0), ([*DEFAULT_STAGES, "gradcam"], 2)])
def test_grad_cam_maps_are_written_only_when_the_site_allows_them(tmp_path, stages, saved):
    overrides = [*RECIPE, "evaluate.gradcam_samples=2"]
    context = _context(_site(tmp_path, require_dp=False, stages=stages), overrides)
    request = {keys.SERVER_ROUND: 3, keys.FINAL_STAGE: keys.STAGE_RELIABILITY, keys.TEMPERATURE: 1.0}
    out = app(_message(MessageType.EVALUATE, overrides, request), context)
    assert out.content[keys.METRICS][keys.GRADCAM_SAVED] == saved
    assert len(list((tmp_path / "state" / "explanations").rglob("*.png"))) >= saved
    if saved == 0:
        assert not (tmp_path / "state" / "explanations").exists()


def test_an_old_site_config_gets_the_safe_defaults_and_says_so(tmp_path):
    # Prepare: a site config written before the policy keys existed
    _site(tmp_path)
    text = (tmp_path / "site.yaml").read_text()
    old = "\n".join(line for line in text.splitlines()
                    if not line.startswith(("require_", "stages", "calibration_grid", "- ")))
    (tmp_path / "site.yaml").write_text(old + "\n")

    # Execute
    site = load_site_config(tmp_path / "site.yaml")

    # Assert
    assert set(site.defaults_applied) == {"require_dp", "require_secure_aggregation", "stages", "calibration_grid"}
    assert site_policy(site) == SitePolicy(require_dp=True, stages=DEFAULT_STAGES)
    assert "gradcam" not in site_policy(site).stages


@pytest.mark.parametrize(
    ("policy", "match"),
    [
        ({"stages": ["train", "gradcams"]}, r"stages holds \['gradcams'\], which are not stages; allowed: train"),
        ({"require_dp": "yes"}, "require_dp='yes' must be true or false"),
        ({"calibration_grid": [1.0, -2.0]}, "calibration_grid must hold at most 100 temperatures, each > 0"),
    ],
)
def test_mistyped_policy_keys_are_refused_with_the_allowed_values(tmp_path, policy, match):
    with pytest.raises(ConfigError, match=match):
        SiteConfig(site_id="a", data_path="x", n_classes=2, **policy)  # type: ignore[arg-type]


def test_hospital_init_requires_dp_unless_the_site_opts_out(tmp_path):
    from typer.testing import CliRunner

    from medfed.cli.main import app as cli

    from medfed.common.pki import create_ca

    create_ca(tmp_path)  # init checks the CA certificate and that the data decode
    np.savez(tmp_path / "data.npz", images=np.zeros((10, 1, 8, 8), np.float32), labels=np.arange(10) % 2)
    common = ["hospital", "init", "--data-path", str(tmp_path / "data.npz"), "--n-classes", "2", "--superlink",
              "127.0.0.1:9093", "--ca", str(tmp_path / "ca.crt")]
    runner = CliRunner()
    assert runner.invoke(cli, [*common, "--dir", str(tmp_path / "strict"), "--site-id", "a"]).exit_code == 0
    assert runner.invoke(cli, [*common, "--dir", str(tmp_path / "research"), "--site-id", "b",
                               "--no-require-dp"]).exit_code == 0
    assert load_site_config(tmp_path / "strict" / "site.yaml").require_dp is True
    assert load_site_config(tmp_path / "research" / "site.yaml").require_dp is False
    assert parse_stages(load_site_config(tmp_path / "strict" / "site.yaml").stages) == DEFAULT_STAGES


def test_no_path_of_the_hospital_leaves_in_an_error(tmp_path):
    # Prepare: a node config whose site config path names a doctor (the finding: it was sent as it was)
    folder = tmp_path / "radiology_dr_smith"
    node_config = {**_site(tmp_path), keys.NODE_SITE_CONFIG: str(folder / "site.yaml")}

    # Execute
    with pytest.raises(SiteFailure) as info:
        _train(node_config, [*RECIPE, "privacy=dp"])

    # Assert: the reason says what is wrong, without the path
    text = str(info.value)
    assert "Site config <path> does not exist" in text
    assert "radiology_dr_smith" not in text and str(tmp_path) not in text


@pytest.mark.parametrize(
    ("text", "public"),
    [
        ("file 3 (john_doe_ct.dcm) unreadable", "file 3 (<file>) unreadable"),
        ("C:\\Users\\smith\\data.npz missing", "<path> missing"),
        ("labels in demo/site-0/labels.csv", "labels in <path>"),
        ("set secure_rng: false in site.yaml (see https://example.org/a/b)",
         "set secure_rng: false in site.yaml (see https://example.org/a/b)"),
        ("epsilon 2.998 of its cap 3 (delta 1e-05)", "epsilon 2.998 of its cap 3 (delta 1e-05)"),
        # names with spaces: a quoted span goes whole, and so do the words inside one path
        ("/data/Doe John (1958)/CT 2.dcm", "<path> <file>"),
        ("C:\\Daten\\Patient Anna Schmidt\\x.dcm", "<path><file>"),
        ("cannot read 'Patient Anna Schmidt.npz'", "cannot read '<file>'"),
        ("No such file or directory: '/srv/Smith, Jane/img 1.png'", "No such file or directory: '<path>'"),
        ('the manifest /data/labels.csv row 3 names "Doe^John/ct.dcm", missing',
         'the manifest <path> row 3 names "<path>", missing'),
        ("see /a/b and /c/d for details; 'fix it' in site.yaml",
         "see <path> and <path> for details; 'fix it' in site.yaml"),
        ("this hospital's site config (see docs/operations.md, 'A secure RNG for DP'); don't",
         "this hospital's site config (see <path>, 'A secure RNG for DP'); don't"),
        ("no series in 'C:\\Users\\Anna Smith\\scan 1'", "no series in '<path>'"),
        ("reading Doe\\ct failed", "reading <path> failed"),
    ],
)
def test_public_text_drops_paths_and_file_names_and_keeps_the_rest(text, public):
    from medfed.client.redact import public_text

    assert public_text(text) == public


@pytest.mark.parametrize(("stages", "answers"), [(list(DEFAULT_STAGES), False), ([*DEFAULT_STAGES, "audit"], True)])
def test_the_privacy_audit_runs_only_where_the_site_lists_it_and_sends_scalars_only(tmp_path, stages, answers):
    # Prepare: the run asks for the audit; a site with the default stages, and one that lists "audit"
    overrides = [*RECIPE, "evaluate.audit=true"]
    context = _context(_site(tmp_path, require_dp=True, stages=stages), [*overrides, "privacy=dp"])
    request = {keys.SERVER_ROUND: 3, keys.FINAL_STAGE: keys.STAGE_AUDIT}

    # Execute / Assert
    if not answers:
        with pytest.raises(SiteFailure, match="does not answer 'audit' requests"):
            app(_message(MessageType.EVALUATE, [*overrides, "privacy=dp"], request), context)
        return
    out = app(_message(MessageType.EVALUATE, [*overrides, "privacy=dp"], request), context)
    metrics = dict(out.content[keys.METRICS])
    audit = {k: v for k, v in metrics.items() if k.startswith(keys.AUDIT_PREFIX)}
    assert set(audit) == {f"{keys.AUDIT_PREFIX}loss-{m}" for m in ("auc", "tpr_at_0.01", "tpr_at_0.001")}
    assert all(isinstance(v, float) for v in audit.values())
    assert set(metrics) - set(audit) == {keys.NUM_EXAMPLES} and metrics[keys.NUM_EXAMPLES] == 1  # no timing
    assert list(out.content.array_records) == []  # no arrays, no counts of the site's images
    with pytest.raises(SiteFailure, match="already answered the 'audit' stage"):
        app(_message(MessageType.EVALUATE, [*overrides, "privacy=dp"], request), context)


def test_a_run_that_asks_for_no_audit_gets_none(tmp_path):
    context = _context(_site(tmp_path, require_dp=False, stages=[*DEFAULT_STAGES, "audit"]), RECIPE)
    with pytest.raises(SiteFailure, match=r"asks for no privacy audit \(evaluate.audit=false\)"):
        app(_message(MessageType.EVALUATE, RECIPE, {keys.SERVER_ROUND: 3, keys.FINAL_STAGE: keys.STAGE_AUDIT}),
            context)
