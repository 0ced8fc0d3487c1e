"""ZoomViT's operating point calibrated on a slice of the training shards held out of every training
stage: the slice is disjoint from what training reads, and the calibrated alpha gives the target."""

import pytest
import torch
from conftest import TINY
from safetensors.torch import save_file

from zoomvit.config import ConfigError, load_config
from zoomvit.data.demo import generate_demo_dataset
from zoomvit.models import Zoomer
from zoomvit.train.calibration import calibrate_alpha, calibrate_operating_point
from zoomvit.train.data import in_calibration_slice, sample_dataset
from zoomvit.train.recipes import _train_split


@pytest.mark.parametrize("target", [16.0, 17.5, 25.0, 40.0, 64.0])
def test_the_calibrated_alpha_gives_the_target_mean_token_count(target):
    scores = torch.rand(200, 4, 4) ** 3
    alpha = calibrate_alpha(scores, target)
    tokens = 16 + 3 * (scores > alpha).sum(dim=(1, 2)).float().mean()
    assert abs(float(tokens) - target) <= 3 / 200 + 1e-9
    assert 0.0 <= alpha <= 1.0


def test_an_unreachable_target_is_refused():
    with pytest.raises(ValueError, match="outside"):
        calibrate_alpha(torch.rand(10, 4, 4), 70.0)


def test_the_slice_is_a_stable_function_of_the_key():
    keys = [f"train_{i:08d}" for i in range(4000)]
    inside = in_calibration_slice(keys, 0.1)
    assert 0.08 < inside.mean() < 0.12
    assert (in_calibration_slice(keys[::-1], 0.1)[::-1] == inside).all(), "independent of order"
    assert not in_calibration_slice(keys, 0.0).any()


def test_a_calibrated_target_needs_a_slice_and_no_fixed_evaluation_points():
    with pytest.raises(ConfigError, match="calibration_fraction"):
        load_config(TINY, ["zoomvit.target_tokens=22"])
    with pytest.raises(ConfigError, match="evaluate.alphas"):
        load_config(TINY, ["zoomvit.target_tokens=22", "data.calibration_fraction=0.2", "evaluate.alphas=[0.5]"])
    load_config(TINY, ["zoomvit.target_tokens=22", "data.calibration_fraction=0.2"])


@pytest.fixture(scope="module")
def calibrated(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    generate_demo_dataset(root / "data", train=192, val=32, image_size=32, samples_per_shard=64)
    config = load_config(
        TINY,
        [f"data.root={root / 'data'}", "data.demo=null", "data.calibration_fraction=0.25", "zoomvit.target_tokens=22"],
    )
    zoomer = root / "zoomer.safetensors"
    torch.manual_seed(0)
    save_file(Zoomer(grid=(4, 4), width=config.zoomer.width, depth=config.zoomer.depth).state_dict(), str(zoomer))
    return config, zoomer


def test_training_stages_never_see_the_calibration_slice(calibrated):
    config, _ = calibrated
    train_ds, _ = _train_split(config, config.zoomvit.train, None)
    fit = set(train_ds.to_pandas()["key"])
    held_out = set(sample_dataset(config.data, "train", part="calibration").to_pandas()["key"])
    everything = set(sample_dataset(config.data, "train").to_pandas()["key"])
    assert held_out and fit and not fit & held_out
    assert fit | held_out == everything and len(everything) == 192


def test_the_operating_point_is_calibrated_on_the_slice_to_the_target(calibrated):
    config, zoomer = calibrated
    op = calibrate_operating_point(config, zoomer)
    assert abs(op["calibration_tokens_per_img"] - 22) <= 3 / op["calibration_samples"] + 1e-6
    lo, hi = op["train_alpha"]
    assert lo <= op["alpha"] <= hi
    assert 0.15 * 192 < op["calibration_samples"] < 0.35 * 192
    gflops = calibrate_operating_point(
        config.model_copy(
            update={"zoomvit": config.zoomvit.model_copy(update={"target_tokens": None, "target_gflops": 1e-9})}
        ),
        zoomer,
    )
    assert gflops["target_tokens"] == 16.0, "a budget below the cheapest layout falls back to no zoom"
