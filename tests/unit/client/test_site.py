"""The hospital's site config and array file: validation, node config, and the data the ClientApp trains on."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from medfed.client.daemon import child_environment, node_config_arg
from medfed.client.node import NodeEnv
from medfed.client.site import SiteConfig, load_site_config, node_config_for, resolve_site, write_site_config
from medfed.common import keys
from medfed.common.config import compose_config
from medfed.common.data.site_files import load_array_file
from medfed.common.errors import ConfigError, SiteDataError


def _data(path: Path, n: int = 40, labels: np.ndarray | None = None) -> Path:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    np.savez(path, images=images, labels=labels if labels is not None else np.arange(n) % 2)
    return path


def _site(tmp_path: Path, **kw: object) -> Path:
    values = {"site_id": "hospital-a", "data_path": str(_data(tmp_path / "d.npz")), "n_classes": 2, **kw}
    write_site_config(SiteConfig(**values), tmp_path / "site.yaml")  # type: ignore[arg-type]
    return tmp_path / "site.yaml"


def test_site_config_round_trip_and_node_config(tmp_path: Path) -> None:
    path = _site(tmp_path, max_epsilon=math.inf, approved_apps=["a" * 64], threads=1)
    site = load_site_config(path)
    assert site.max_epsilon == math.inf and site.approves("a" * 64) and not site.approves("b" * 64)
    node = node_config_for(site)
    assert node[keys.NODE_SITE_CONFIG] == str(path.resolve())
    assert node[keys.NODE_STATE_DIR] == str(tmp_path.resolve() / "state")  # relative to the file's folder
    assert node[keys.NODE_THREADS] == 1.0  # the site's CPU share reaches its ClientApp
    assert node[keys.NODE_SECURE_RNG] is True  # a deployed site asks for a secure RNG unless it opts out
    text = node_config_arg(node)
    assert 'max-epsilon=inf' in text and f'site-config="{path.resolve()}"' in text and "secure-rng=true" in text
    opted_out = node_config_for(load_site_config(_site(tmp_path, secure_rng=False)))
    assert "secure-rng=false" in node_config_arg(opted_out)


def test_two_hospitals_on_one_machine_get_their_own_flower_home(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = load_site_config(_site(tmp_path / "a"))
    b = load_site_config(_site(tmp_path / "b"))

    homes = {child_environment(site)["FLWR_HOME"] for site in (a, b)}

    assert homes == {str(a.state_path / "flwr-home"), str(b.state_path / "flwr-home")}


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ({"site_id": "Jane Doe"}, "site_id="),
        ({"n_classes": 1}, "n_classes=1"),
        ({"max_delta": 0.5e1}, "max_delta="),
        ({"approved_apps": ["nope"]}, "not a sha256"),
        ({"val_fraction": 1.0}, "val_fraction="),
        ({"threads": -1}, "threads=-1 is out of range"),
        ({"secure_rng": "maybe"}, "secure_rng='maybe' must be true or false"),
        ({"max_epsilon": "ten"}, r"max_epsilon='ten' is not a number; write a float in the site config \(e.g. 10.0\)"),
        ({"min_noise": [1]}, r"min_noise=\[1\] is not a number"),
        ({"runtime_port": "90x"}, "runtime_port='90x' is not a whole number"),
        ({"runtime_port": 9094.5}, "runtime_port=9094.5 is not a whole number"),
        ({"runtime_port": 70000}, r"runtime_port=70000 is out of range; it must lie in \[1, 65535\]"),
        ({"image_size": True}, "image_size=True is not a number"),
        ({"device": "gpu"}, "device='gpu' is not a device; use auto"),
        ({"device": "cuda:x"}, "device='cuda:x' is not a device"),
        ({"device_memory_gb": -1}, r"device_memory_gb=-1.0 is out of range; it must be a finite number >= 0"),
        ({"device_memory_gb": "eight"}, "device_memory_gb='eight' is not a number"),
        ({"loader_workers": -1}, "loader_workers=-1 is out of range; it must be an integer >= 0"),
        ({"loader_workers": 1.5}, "loader_workers=1.5 is out of range"),
        ({"pin_memory": "yes"}, "pin_memory='yes' must be true or false"),
        ({"cudnn_benchmark": 1}, "cudnn_benchmark=1 must be true or false"),
    ],
)
def test_bad_site_config_values_name_the_key(tmp_path: Path, edit: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SiteConfig(**{"site_id": "a", "data_path": "d.npz", "n_classes": 2, **edit})  # type: ignore[arg-type]


def test_numbers_written_as_text_in_the_file_are_read_as_numbers_and_typos_name_the_key(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("site_id: a\ndata_path: d.npz\nn_classes: 2\nmax_epsilon: '3'\nruntime_port: '9095'\n")
    site = load_site_config(tmp_path / "a.yaml")
    assert site.max_epsilon == 3.0 and site.runtime_port == 9095
    (tmp_path / "b.yaml").write_text("site_id: a\ndata_path: d.npz\nn_classes: 2\nmax_epsilon: ten\n")
    with pytest.raises(ConfigError, match="max_epsilon='ten' is not a number"):
        load_site_config(tmp_path / "b.yaml")


def test_unknown_and_missing_keys_in_the_file(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("site_id: a\ndata_path: d.npz\nn_classes: 2\nmax_epsilom: 3\n")
    with pytest.raises(ConfigError, match="max_epsilom"):
        load_site_config(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("site_id: a\n")
    with pytest.raises(ConfigError, match="lacks"):
        load_site_config(tmp_path / "b.yaml")


def test_deployment_site_data_comes_from_the_site_config(tmp_path: Path) -> None:
    path = _site(tmp_path)
    site = resolve_site(compose_config([]), NodeEnv.resolve({keys.NODE_SITE_CONFIG: str(path)}, {}))
    assert site.site_id == "hospital-a"
    assert len(site.train) + len(site.val) == 40 and len(site.val) == 8  # stratified 20 %
    assert site.train.images.dtype == np.float32 and site.train.images.max() <= 1.0
    assert site.info.channels == 1 and site.info.spatial_dims == 2 and site.info.n_classes == 2


def test_bad_labels_are_refused_with_counts_not_values(tmp_path: Path) -> None:
    path = _data(tmp_path / "d.npz", labels=np.array([0, 1, 7, 1] * 10))
    with pytest.raises(SiteDataError, match=r"10 labels are outside 0..1 \(first at image index 2\)"):
        load_array_file(path, n_classes=2)
    csv = tmp_path / "labels.csv"
    csv.write_text("index,label\n0,1\n1,0\n")
    with pytest.raises(SiteDataError, match="38 of 40 images have no label"):
        load_array_file(path, n_classes=2, labels_csv=csv)
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(SiteDataError, match="not a readable .npz"):
        load_array_file(tmp_path / "broken.npz", n_classes=2)


def test_edits_of_the_site_config_count_from_the_next_message_on(tmp_path: Path) -> None:
    # Prepare: the daemon started with cap 10 and secure RNG on (its node config says so)
    path = _site(tmp_path, max_epsilon=10.0, require_dp=True)
    started = node_config_for(load_site_config(path))
    site = load_site_config(path)

    # Execute: the hospital lowers its cap, switches the secure RNG off and opts out of DP
    import dataclasses

    write_site_config(dataclasses.replace(site, max_epsilon=3.0, secure_rng=False, require_dp=False), path)
    env = NodeEnv.resolve(started, {})

    # Assert: the next message's ClientApp reads the file as it is now
    cap = env.cap(compose_config([]).federation)
    assert cap.max_epsilon == 3.0 and cap.secure_rng is False
    assert env.policy.require_dp is False


def test_the_daemon_says_which_edits_need_a_restart(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import dataclasses
    import logging
    import os

    from medfed.client.daemon import HospitalDaemon

    path = _site(tmp_path)
    site = load_site_config(path)
    daemon = HospitalDaemon(site)
    caplog.set_level(logging.INFO, logger="medfed.client.daemon")

    def edit(**changes: object) -> None:
        write_site_config(dataclasses.replace(site, **changes), path)  # type: ignore[arg-type]
        os.utime(path, (daemon._config_mtime + 1, daemon._config_mtime + 1))
        daemon.check_config()

    edit(max_epsilon=3.0)
    assert "count from the next message on" in caplog.text and "restart" not in caplog.text
    edit(superlink="coordinator.example.org:9092", runtime_port=9999)
    assert "site.yaml changed superlink, runtime_port" in caplog.text and "restart it" in caplog.text
    path.write_text("site_id: a\ndata_path: d.npz\nn_classes: 2\nmax_epsilon: ten\n")
    os.utime(path, (daemon._config_mtime + 1, daemon._config_mtime + 1))
    daemon.check_config()
    assert "is now invalid" in caplog.text and "max_epsilon='ten'" in caplog.text


def test_the_site_decides_its_hardware_whatever_the_recipe_says(tmp_path: Path) -> None:
    # Prepare: the site config says cpu, 0.5 GiB, 2 loader workers, pinned memory, no cuDNN autotuning; the
    # coordinator's recipe asks for cuda and 80 GiB
    path = _site(tmp_path, device="cpu", device_memory_gb=0.5, loader_workers=2, pin_memory=True,
                 cudnn_benchmark=False)
    node = node_config_for(load_site_config(path))
    recipe = compose_config(["train.device=cuda", "train.device_memory_gb=80"])

    # Execute
    env = NodeEnv.resolve(node, {})
    cfg = env.recipe(recipe)

    # Assert
    assert node[keys.NODE_DEVICE] == "cpu" and node[keys.NODE_DEVICE_MEMORY_GB] == 0.5
    assert 'device="cpu"' in node_config_arg(node) and "cudnn-benchmark=false" in node_config_arg(node)
    assert (cfg.train.device, cfg.train.device_memory_gb, cfg.train.loader_workers, cfg.train.pin_memory) == (
        "cpu", 0.5, 2, True)
    assert env.cudnn_benchmark is False
    assert cfg.train.lr == recipe.train.lr  # the learning recipe stays the coordinator's
    # a simulated hospital follows the recipe
    simulated = NodeEnv.resolve({keys.NODE_PARTITION_ID: 0}, {})
    assert simulated.recipe(recipe) is recipe and simulated.cudnn_benchmark is True
