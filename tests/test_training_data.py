"""The training stages' Ray Datasets: decoded splits shared within a pipeline run, and rows joined by
key with the relevance stage's maps and teacher logits."""

import numpy as np
import pytest
import torch

from zoomvit.config import load_config
from zoomvit.data.demo import generate_demo_dataset
from zoomvit.data.relevance_store import group_path, write_group
from zoomvit.relevance.attribution import normalize_maps
from zoomvit.train.data import DecodedSplits, sample_dataset, with_maps

pytestmark = pytest.mark.usefixtures("ray_local")


def _relevance_rows(keys, rng):
    return [
        {
            "key": k,
            "shard": f"s{i % 2}",
            "label": 0,
            "target": 0,
            "teacher_pred": 0,
            "teacher_prob": 0.5,
            "grid_h": 4,
            "grid_w": 4,
            "relevance": rng.random(16).astype(np.float16),
            "teacher_logits": rng.standard_normal(3).astype(np.float16),
        }
        for i, k in enumerate(keys)
    ]


def test_each_row_gets_the_map_and_logits_of_its_own_key_and_rows_without_maps_are_dropped(ray_local, tmp_path):
    rows = _relevance_rows([f"img{i:03d}" for i in range(40)], np.random.default_rng(0))
    write_group(rows[:25], group_path(tmp_path, "train", 0), {})
    write_group(rows[25:], group_path(tmp_path, "train", 1), {})
    by_key = {r["key"]: r for r in rows}
    samples = [{"key": f"img{i:03d}", "label": i} for i in range(45, -1, -3)]  # reversed; img042, img045 have no map

    ds = with_maps(ray_local.data.from_items(samples, override_num_blocks=3), tmp_path, "train", (2, 2), logits=True)
    out = ds.take_all()

    assert sorted(r["key"] for r in out) == sorted(s["key"] for s in samples if s["key"] in by_key)
    for r in out:
        source = by_key[r["key"]]
        grid = torch.from_numpy(source["relevance"].astype(np.float32)).view(1, 1, 4, 4)
        want = normalize_maps(
            torch.nn.functional.interpolate(
                grid, size=(2, 2), mode="bilinear", align_corners=False, antialias=True
            ).squeeze(1)
        )[0]
        np.testing.assert_allclose(r["map"], want.numpy(), atol=1e-6)
        np.testing.assert_allclose(r["teacher_logits"], source["teacher_logits"].astype(np.float32))
        assert r["label"] == int(r["key"][3:])


def test_relevance_maps_that_hold_a_key_twice_are_refused(ray_local, tmp_path):
    rows = _relevance_rows(["a", "b", "a"], np.random.default_rng(0))
    write_group(rows[:2], group_path(tmp_path, "val", 0), {})
    write_group(rows[2:], group_path(tmp_path, "val", 1), {})
    with pytest.raises(ValueError, match="key twice"):
        with_maps(ray_local.data.from_items([{"key": "a"}]), tmp_path, "val", (4, 4))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared")
    generate_demo_dataset(root, train=96, val=32, image_size=32, samples_per_shard=16)
    return load_config(None, [f"data.root={root}", "data.image_size=32"]).data


def test_a_runs_decoded_splits_decode_each_split_once_for_every_stage(ray_local, tiny_data):
    splits = DecodedSplits()
    train = sample_dataset(tiny_data, "train", splits=splits)
    assert sample_dataset(tiny_data, "train", splits=splits) is train
    assert sample_dataset(tiny_data, "val", splits=splits) is not train
    assert train.count() == 96 and sample_dataset(tiny_data, "train", limit=10, splits=splits).count() == 10
    assert len(splits) == 2
    assert sample_dataset(tiny_data, "train") is not train, "without the run's splits: a fresh lazy read"
    assert sample_dataset(tiny_data, "train", splits=DecodedSplits()) is not train, "another run decodes its own"


@pytest.mark.parametrize("decoded", ["per_stage", "streamed"])
def test_configs_that_do_not_share_decode_for_every_caller(ray_local, tiny_data, decoded):
    data = tiny_data.model_copy(update={"decoded": decoded})
    splits = DecodedSplits()
    first = sample_dataset(data, "train", splits=splits)
    assert sample_dataset(data, "train", splits=splits) is not first
    assert first.count() == 96 and len(splits) == 0


def _shard_order(ds) -> tuple[int, ...]:
    keys = [str(k) for k in ds.to_pandas()["key"]]
    assert len(keys) == 96 and len(set(keys)) == 96
    return tuple(dict.fromkeys(int(k.rsplit("_", 1)[1]) // 16 for k in keys))  # 16 samples per shard


def test_a_streamed_training_split_is_read_in_a_new_shard_order_every_epoch(ray_local, tiny_data):
    options = ray_local.data.DataContext.get_current().execution_options
    preserve, options.preserve_order = options.preserve_order, True  # rows come out in file order
    try:
        streamed = sample_dataset(tiny_data.model_copy(update={"decoded": "streamed"}), "train", file_shuffle_seed=0)
        orders = [_shard_order(streamed) for _ in range(3)]
        unshuffled = sample_dataset(tiny_data.model_copy(update={"decoded": "per_stage"}), "train", file_shuffle_seed=0)
        assert _shard_order(unshuffled) == tuple(range(6))
    finally:
        options.preserve_order = preserve
    assert len(set(orders)) == 3 and all(sorted(o) == list(range(6)) for o in orders)
