"""A hospital's hardware check: its device, and a model too big for its memory refused at the first message."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MessageType, RecordDict

from medfed.client.app import SiteFailure, app
from medfed.client.node import NodeEnv
from medfed.client.preflight import hospital_memory, site_device
from medfed.common import keys
from medfed.common.config import compose_config, run_config_from_overrides
from medfed.common.hardware import GIB
from medfed.common.models import build_model
from tests.conftest import instruction

OVERRIDES = ["dataset.n_train=240", "dataset.n_test=60", "federation.hospitals=3"]


def _context(tmp_path, overrides=(), **node) -> Context:
    return Context(
        run_id=1,
        node_id=7,
        node_config={keys.NODE_PARTITION_ID: 1, "num-partitions": 3, **node},
        state=RecordDict(),
        run_config=run_config_from_overrides([*OVERRIDES, *overrides],
                                             **{keys.RUN_CACHE_DIR: str(tmp_path / "cache")}),
    )


def _message(message_type: str):
    cfg = compose_config(OVERRIDES)
    arrays = ArrayRecord(build_model(cfg.model, spatial_dims=2, in_channels=1, n_classes=2).state_dict())
    content = RecordDict({keys.ARRAYS: arrays, keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: 0})})
    return instruction(content, message_type)


@pytest.mark.parametrize("message_type", [MessageType.EVALUATE, MessageType.TRAIN])
def test_a_model_too_big_for_the_site_memory_is_refused_at_the_first_message(tmp_path, message_type):
    # Prepare: the site declares 0.01 GiB for its CPU (the small CNN needs about 57 MiB at batch 32)
    context = _context(tmp_path, **{keys.NODE_DEVICE: "cpu", keys.NODE_DEVICE_MEMORY_GB: 0.01})

    # Execute
    with pytest.raises(SiteFailure) as info:
        app(_message(message_type), context)

    # Assert: a refusal by the site's policy, with what it needs and what to change, and no path
    text = str(info.value)
    assert keys.site_refusal(text) is keys.SiteRefusal.POLICY
    assert "This hospital refuses the run on cpu (device_memory_gb in its site config: 0.01 GiB)" in text
    assert "training this model needs about" in text and "10.2 MiB are available" in text
    assert "train.batch_size" in text
    assert str(tmp_path) not in text and "/" not in text


def test_a_model_that_fits_trains(tmp_path):
    context = _context(tmp_path, **{keys.NODE_DEVICE: "cpu", keys.NODE_DEVICE_MEMORY_GB: 4.0})
    out = app(_message(MessageType.TRAIN), context)
    assert not out.has_error() and keys.ARRAYS in out.content


def test_a_simulated_hospital_checks_the_recipe_memory(tmp_path):
    context = _context(tmp_path, ["train.device_memory_gb=0.001"])
    with pytest.raises(SiteFailure, match=r"on cpu \(train.device_memory_gb: 0.001 GiB\): training this model"):
        app(_message(MessageType.EVALUATE), context)


def test_a_site_device_the_machine_lacks_is_named(tmp_path, monkeypatch):
    # Prepare
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    context = _context(tmp_path, **{keys.NODE_DEVICE: "cuda"})

    # Execute / Assert: the site's key, not the recipe's
    with pytest.raises(SiteFailure, match="ConfigError: device='cuda' but this machine has no CUDA device"):
        app(_message(MessageType.EVALUATE), context)


def test_a_simulated_hospital_counts_its_share_of_a_gpu(monkeypatch):
    # Prepare: one 80 GiB GPU (faked), two hospitals per GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=80 * GIB))
    cfg = compose_config(["train.device=cuda", "federation.gpus_per_hospital=0.5"])
    env = NodeEnv.resolve({keys.NODE_PARTITION_ID: 0}, {})

    # Execute
    device = site_device(cfg, env)
    available, source = hospital_memory(cfg, env, device)

    # Assert
    assert device == torch.device("cuda")
    assert available == 40 * GIB and "federation.gpus_per_hospital=0.5" in source
