"""Personalisation at a hospital (layers kept local, fine-tuning) and simulated poisoning: the pieces, and the
ClientApp called as Flower calls it, round after round with the same Context."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MessageType, RecordDict
from torch import nn

from medfed.client.app import app
from medfed.client.attacks import poison
from medfed.client.personalization import (
    finetune,
    keep_local_layers,
    local_layer_names,
    restore_local_layers,
    shared_state,
)
from medfed.common import keys
from medfed.common.config import FederationConfig, ModelConfig, compose_config, run_config_from_overrides
from medfed.common.errors import ConfigError
from medfed.common.models import build_model
from tests.conftest import instruction

BASE = ["dataset.n_train=240", "dataset.n_test=60", "federation.hospitals=3", "model.width=8"]


def _model(name: str = "smallcnn") -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(name=name, width=8), spatial_dims=2, in_channels=1, n_classes=2)


def _numpy(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["smallcnn", "resnet18"])
def test_local_layers_are_the_norm_layers_the_head_or_both(name):
    model = _model(name)
    norm, head = local_layer_names(model, "norm"), local_layer_names(model, "head")
    assert norm and all(".norm" in k for k in norm)
    assert head == ["head.weight", "head.bias"]
    assert local_layer_names(model, "norm_head") == [k for k in model.state_dict() if k in norm or k in head]
    assert local_layer_names(model, "none") == []
    assert not any("conv" in k for k in norm)


def test_a_choice_that_selects_nothing_is_refused():
    with pytest.raises(ValueError, match="personalize.local_layers=norm selects no layer of Sequential"):
        local_layer_names(nn.Sequential(nn.Linear(2, 2)), "norm")


def test_kept_layers_go_back_as_received_and_come_back_next_round():
    # Prepare: a hospital that trained (every weight moved)
    model = _model()
    received = _numpy(model)
    names = local_layer_names(model, "norm")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    # Execute
    sent = shared_state(model, received, names)
    kept = keep_local_layers(model, names)
    fresh = _model()  # the next round's global model
    restored = restore_local_layers(fresh, kept, names)

    # Assert: the kept layers are sent as received (never the hospital's own); the rest as trained
    assert all(np.array_equal(sent[k].numpy(), received[k]) for k in names)
    assert all(np.array_equal(sent[k].numpy(), received[k] + 1.0) for k in received if k not in names)
    assert restored and all(np.array_equal(fresh.state_dict()[k].numpy(), received[k] + 1.0) for k in names)
    assert restore_local_layers(_model(), None, names) is False  # round 1: nothing kept yet
    assert restore_local_layers(_model(), kept, local_layer_names(_model(), "head")) is False  # another choice


def test_a_simulated_attacker_scales_or_replaces_its_update_and_nobody_else_does():
    model = _model()
    received = _numpy(model)
    state = {k: torch.as_tensor(v) + 0.5 for k, v in received.items()}
    federation = FederationConfig(hospitals=5, attack="scale", attackers=1, attack_scale=100.0)

    scaled = poison(state, received, federation, partition_id=0, seed=1)
    noisy = poison(state, received, FederationConfig(hospitals=5, attack="noise", attack_scale=1.0), 0, seed=1)

    assert all(np.allclose(scaled[k].numpy(), received[k] + 50.0) for k in received)
    assert all(noisy[k].shape == state[k].shape for k in state)
    assert not any(np.allclose(noisy[k].numpy(), state[k].numpy()) for k in state)
    assert poison(state, received, federation, partition_id=1, seed=1) is state  # an honest hospital
    assert poison(state, received, federation, partition_id=None, seed=1) is state  # a deployed hospital never


def test_finetuning_keeps_the_best_validation_epoch_including_none():
    model = nn.Linear(1, 1)
    aucs = iter([0.7, 0.9, 0.6])  # epoch 0 (as received), 1, 2

    def train_one_epoch(candidate: nn.Module, epoch: int) -> None:
        with torch.no_grad():
            candidate.weight.fill_(float(epoch))

    best = finetune(model, 2, train_one_epoch, lambda m: {"auc": next(aucs)})
    assert best.epoch == 1 and best.val == {"auc": 0.9} and float(best.model.weight) == 1.0

    worse = iter([0.8, 0.7, 0.6])
    kept = finetune(model, 2, train_one_epoch, lambda m: {"auc": next(worse)})
    assert kept.epoch == 0 and torch.equal(kept.model.weight, model.weight)  # fine-tuning did not help


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["personalize.local_layers=norm", "privacy=dp"], r"personalize.\* cannot run with privacy=dp"),
        (["personalize.finetune_epochs=-1"], r"personalize.finetune_epochs=-1 is out of range"),
        (["federation.attack=scale", "federation.hospitals=3", "federation.attackers=3"],
         r"federation.attackers=3 is out of range"),
        (["federation.attack=flip"], r"federation.attack='flip' is not allowed"),
    ],
)
def test_bad_personalisation_and_attack_options_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        compose_config(overrides)


# --- the ClientApp, as Flower calls it ----------------------------------------------------------------------------
def _context(tmp_path, extra: list[str], run: str = "run") -> Context:
    run_config = run_config_from_overrides(
        [*BASE, *extra], **{keys.RUN_CACHE_DIR: str(tmp_path / "cache"), keys.RUN_DIR: str(tmp_path / run)}
    )
    return Context(run_id=1, node_id=7, node_config={keys.NODE_PARTITION_ID: 0, "num-partitions": 3},
                   state=RecordDict(), run_config=run_config)


def _message(message_type: str, arrays: ArrayRecord, server_round: int):
    content = RecordDict({keys.ARRAYS: arrays, keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: server_round})})
    return instruction(content, message_type)


def test_a_hospital_keeps_its_norm_layers_and_reports_personalised_metrics(tmp_path):
    # Prepare: FedBN with 2 fine-tuning epochs after the last (2nd) round
    context = _context(tmp_path, ["personalize.local_layers=norm", "personalize.finetune_epochs=2", "train.rounds=2"])
    global_model = ArrayRecord(_model().state_dict())
    received = {k: v.numpy() for k, v in global_model.items()}
    names = local_layer_names(_model(), "norm")

    # Execute: two rounds of train + evaluate with the same global model and Context
    replies = []
    for server_round in (1, 2):
        replies.append(app(_message(MessageType.TRAIN, global_model, server_round), context))
    kept = context.state.array_records[keys.STATE_LOCAL_LAYERS]
    mid = app(_message(MessageType.EVALUATE, global_model, 1), context)
    last = app(_message(MessageType.EVALUATE, global_model, 2), context)

    # Assert: the norm layers went back exactly as received, the rest trained; the trained norm layers stayed here
    for reply in replies:
        sent = {k: v.numpy() for k, v in reply.content[keys.ARRAYS].items()}
        assert all(np.array_equal(sent[k], received[k]) for k in names)
        assert any(not np.allclose(sent[k], received[k]) for k in sent if k not in names)
    assert sorted(kept.keys()) == sorted(names)
    assert any(not np.allclose(kept[k].numpy(), received[k]) for k in names)
    # global and personalised metrics, validation and (simulation) test; fine-tuning only after the last round
    metrics = mid.content[keys.METRICS]
    assert {"val-auc", "pval-auc", "ptest-auc"} <= set(metrics.keys())
    assert metrics["pval-loss"] != metrics["val-loss"]  # the personalised model is not the global one
    assert not any(k.startswith("ftval-") for k in metrics.keys())
    assert {"ensval-auc", "enstest-auc"} <= set(metrics.keys())  # global + personalised, averaged
    assert metrics["ensval-loss"] not in (metrics["val-loss"], metrics["pval-loss"])
    final = last.content[keys.METRICS]
    assert {"ftval-auc", "fttest-auc", keys.FINETUNED_EPOCH, "ensval-auc"} <= set(final.keys())
    assert 0 <= final[keys.FINETUNED_EPOCH] <= 2


def test_the_simulated_attacker_sends_a_far_update_and_the_others_train_honestly(tmp_path):
    # Prepare: hospital 0 of 3 is the attacker
    global_model = ArrayRecord(_model().state_dict())
    received = {k: v.numpy() for k, v in global_model.items()}

    def distance(partition: int) -> float:
        context = _context(tmp_path, ["federation.attack=scale", "federation.attackers=1"])
        context.node_config[keys.NODE_PARTITION_ID] = partition
        reply = app(_message(MessageType.TRAIN, global_model, 1), context)
        sent = {k: v.numpy() for k, v in reply.content[keys.ARRAYS].items()}
        return float(np.sqrt(sum(((sent[k] - received[k]) ** 2).sum() for k in sent)))

    # Execute / Assert: 100 x its own update is far beyond an honest hospital's
    assert distance(0) > 20 * distance(1)


def test_kept_layers_survive_a_coordinator_restart(tmp_path):
    # Prepare: round 1 of a run with local heads, then the run resumes as a new Flower run (a fresh Context)
    extra = ["personalize.local_layers=head", "train.rounds=3"]
    global_model = ArrayRecord(_model().state_dict())
    before = _context(tmp_path, extra)
    app(_message(MessageType.TRAIN, global_model, 1), before)
    expected = app(_message(MessageType.EVALUATE, global_model, 1), before).content[keys.METRICS]

    # Execute: the resumed run's hospital (same run directory) and another run's (a different one)
    resumed = app(_message(MessageType.EVALUATE, global_model, 1), _context(tmp_path, extra)).content[keys.METRICS]
    other = app(_message(MessageType.EVALUATE, global_model, 1), _context(tmp_path, extra, run="other"))
    other_metrics = other.content[keys.METRICS]

    # Assert: the resumed hospital found its head on disk; another run starts from the global model
    assert resumed["pval-loss"] == expected["pval-loss"] != expected["val-loss"]
    assert other_metrics["pval-loss"] == other_metrics["val-loss"]
