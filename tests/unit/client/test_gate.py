"""The gate's audit line of an outgoing message: size, content address, epsilon and layout, never values."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.error import Error

from medfed.client.gate import UnapprovedApp, audit_entry


pytestmark = pytest.mark.usefixtures("task_identity")  # Flower stamps replies with the running task's identity


def _reply(content: RecordDict | None = None, error: Error | None = None) -> Message:
    request = Message(RecordDict(), dst_node_id=7, message_type="train")
    return Message(content, reply_to=request) if error is None else Message(error, reply_to=request)


def test_audit_entry_of_a_train_reply() -> None:
    content = RecordDict({
        "arrays": ArrayRecord({"w": torch.ones(3, 4)}),
        "metrics": MetricRecord({"num-examples": 10, "epsilon": 1.5, "epsilon-charged": 0.25}),
        "site": ConfigRecord({"site-id": "hospital-a"}),
    })
    entry = audit_entry(_reply(content), site_id="hospital-a", server_round=3, received_model="cd" * 32)
    assert entry["round"] == 3 and entry["type"] == "train" and entry["epsilon"] == 1.5
    assert entry["epsilon_charged"] == 0.25
    assert entry["direction"] == "out" and entry["stage"] == "train" and entry["received_model"] == "cd" * 32
    # every scalar sent, never the arrays
    assert entry["values"] == {"num-examples": 10, "epsilon": 1.5, "epsilon-charged": 0.25, "site-id": "hospital-a"}
    assert entry["bytes"] > 48 and len(entry["sha256"]) == 64
    assert entry["records"]["arrays"] == {"kind": "ArrayRecord", "arrays": 1, "elements": 12}
    assert entry["records"]["site"] == {"kind": "ConfigRecord", "keys": ["site-id"], "types": ["str"]}
    assert "hospital-a" not in str(entry["records"])  # keys and kinds only, never values
    # a different payload has a different address
    other = RecordDict({"arrays": ArrayRecord({"w": torch.zeros(3, 4)})})
    assert audit_entry(_reply(other), site_id="hospital-a")["sha256"] != entry["sha256"]


def test_audit_entry_of_an_error_reply() -> None:
    entry = audit_entry(_reply(error=Error(code=0, reason="refused")), site_id="hospital-a")
    assert entry["error"] == "refused" and entry["records"] == {} and entry["epsilon"] is None
    assert entry["refusal"] is None and entry["values"] == {}


def test_a_policy_refusal_is_audited_with_its_kind_and_reason() -> None:
    reason = "<class 'medfed.client.app.SiteFailure'>:<'PolicyRefusal: This hospital trains only with its own DP'>"
    entry = audit_entry(_reply(error=Error(code=0, reason=reason)), site_id="hospital-a")
    assert entry["refusal"] == "PolicyRefusal" and entry["error"] == reason


def test_the_model_received_is_identified_by_its_digest() -> None:
    from medfed.client.gate import model_sha256
    from tests.conftest import instruction

    def request(value: float):
        return instruction(RecordDict({"arrays": ArrayRecord({"w": torch.full((2, 2), value)})}), "evaluate")

    assert model_sha256(request(1.0)) == model_sha256(request(1.0)) != model_sha256(request(0.0))
    assert model_sha256(instruction(RecordDict({"config": ConfigRecord({"x": 1})}), "evaluate")) is None


def test_a_final_stage_request_is_named_in_the_audit() -> None:
    from medfed.client.gate import _final_stage, _server_round
    from tests.conftest import instruction

    request = instruction(RecordDict({"config": ConfigRecord({"final-stage": "calibrate"})}), "evaluate")
    entry = audit_entry(_reply(RecordDict({"metrics": MetricRecord({"nll-sums": [1.0, 2.0]})})), site_id="a",
                        server_round=_server_round(request), stage=_final_stage(request))

    assert entry["round"] is None and entry["stage"] == "calibrate"
    assert entry["records"]["metrics"] == {"kind": "MetricRecord", "keys": ["nll-sums"]}


def test_refusal_names_the_bundle_and_the_fix() -> None:
    text = str(UnapprovedApp("hospital-a", "ab" * 32))
    assert "ab" * 32 in text and "medfed hospital approve" in text


@pytest.mark.parametrize("case", ["approved", "bytes-differ-from-claim", "not-approved"])
def test_a_bundle_runs_only_when_its_bytes_hash_to_an_approved_sha256(tmp_path, case) -> None:
    # Prepare: a site that approves one bundle; the bundle Flower hands over claims a hash and carries bytes
    import hashlib
    import json

    from flwr.app import Context
    from flwr.supercore.fab import Fab
    from flwr.supercore.run import Run

    from medfed.client.gate import _Gate
    from medfed.client.site import SiteConfig, write_site_config
    from medfed.common import keys
    from tests.conftest import instruction

    approved_bytes, other_bytes = b"the approved app bundle", b"a tampered app bundle"
    approved = hashlib.sha256(approved_bytes).hexdigest()
    write_site_config(SiteConfig(site_id="hospital-a", data_path="d.npz", n_classes=2, approved_apps=[approved]),
                      tmp_path / "site.yaml")
    content, claimed = {"approved": (approved_bytes, approved),
                        "bytes-differ-from-claim": (other_bytes, approved),  # claims the approved hash, is not it
                        "not-approved": (other_bytes, hashlib.sha256(other_bytes).hexdigest())}[case]
    context = Context(run_id=3, node_id=7, node_config={keys.NODE_SITE_CONFIG: str(tmp_path / "site.yaml")},
                      state=RecordDict(), run_config={})
    pulled = (instruction(RecordDict(), "train"), context, Run.create_empty(3), Fab(claimed, content, {}))
    gate = _Gate()
    installed = []

    # Execute
    gate.pull(lambda client: pulled)(None)
    install = gate.install(lambda *args, **kwargs: installed.append(True))

    # Assert
    if case == "approved":
        install()
        assert installed == [True] and gate.refusal is None
        return
    with pytest.raises(UnapprovedApp, match=hashlib.sha256(content).hexdigest()):
        install()
    assert installed == []
    (entry,) = [json.loads(line) for line in (tmp_path / "state" / "audit.jsonl").read_text().splitlines()]
    assert entry["event"] == "refused-app" and entry["claimed_sha256"] == claimed
    assert entry["fab_sha256"] == hashlib.sha256(content).hexdigest()
