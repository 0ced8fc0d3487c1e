"""The fine-detail benchmark: a preset whose class a half-size view cannot read, a family
that reads its own pixels, controls at ZoomViT's own token counts, and costs matched per bucket."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import REPO
from PIL import Image

import zoomvit.models  # noqa: F401
from zoomvit.config import ConfigError, load_config
from zoomvit.data.decode import ImageTransform
from zoomvit.data.demo import DemoSpec, generate_demo_dataset, render_sample
from zoomvit.data.probe import crop_accuracy, detail_survival, probe_samples
from zoomvit.evaluation import control_scores, matched_scores
from zoomvit.evaluation.controls import nearest_2x
from zoomvit.models import ZOOM

FINE = str(REPO / "pipelines" / "configs" / "fine.yaml")
SPEC = DemoSpec(train=600, val=200, image_size=128, style="fine", seed=1)


def _members(shard: Path) -> dict[str, bytes]:
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_the_fine_preset_records_each_images_stratum_and_object_box(tmp_path):
    info = generate_demo_dataset(tmp_path, train=64, val=0, image_size=128, style="fine", samples_per_shard=64)
    assert info["generator"]["style"] == "fine"
    members = _members(tmp_path / "train-000000.tar")
    metas = [json.loads(v) for k, v in members.items() if k.endswith(".json")]
    assert {m["stratum"] for m in metas} == {"fine", "coarse"}
    for m in metas:
        x0, y0, x1, y1 = m["box"]
        assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128
        side = (x1 - x0) / 128
        assert 0.25 <= side <= 0.375 if m["stratum"] == "fine" else 0.5 <= side <= 0.7
    coarse = sum(m["stratum"] == "coarse" for m in metas) / len(metas)
    assert 0.1 <= coarse <= 0.4, "about a quarter of the images are the coarse stratum"
    with Image.open(io.BytesIO(members["train_00000000.jpg"])) as img:
        assert img.size == (128, 128) and img.format == "JPEG"


def test_the_classes_are_textures_no_clutter_tile_mimics_and_a_half_size_view_averages_away():
    from zoomvit.data.fine import NUM_TEXTURES, texture, tiles

    table = tiles()
    assert table.shape[1:] == (8, 8), "one tile per 8 px patch of the stored image"
    classes = table[:NUM_TEXTURES]
    variants = {
        (sign * np.roll(c, (dy, dx), axis=(0, 1))).astype(np.int8).tobytes() for c in classes for sign in (1, -1)
        for dy in range(0, 8, 2) for dx in range(0, 8, 2)
    }  # fmt: skip
    assert not any(t.astype(np.int8).tobytes() in variants for t in table[NUM_TEXTURES:])
    assert len({c.tobytes() for c in classes}) == NUM_TEXTURES
    for c in classes:  # every aligned 2 x 2 block sums to zero: a 2x down-sampling sees flat grey
        assert np.allclose(texture(c, 16).reshape(8, 2, 8, 2).sum(axis=(1, 3)), 0)


def test_fine_rendering_is_deterministic_and_follows_the_seed():
    assert render_sample(SPEC, "val", 3).jpeg == render_sample(SPEC, "val", 3).jpeg
    other = DemoSpec(train=1, val=4, image_size=128, style="fine", seed=2)
    assert render_sample(other, "val", 3).jpeg != render_sample(SPEC, "val", 3).jpeg


def test_a_fine_texture_leaves_no_trace_at_half_size_and_survives_whole_at_full_size():
    samples = probe_samples(SPEC, "val", 40)
    half, full = detail_survival(samples, 64), detail_survival(samples, 128)
    assert half["fine"] < 0.01, "the fine texture's energy is above the half-size view's Nyquist frequency"
    assert full["fine"] == pytest.approx(1.0)
    assert half["coarse"] > 0.5, "the coarse stratum keeps most of its texture at any size"


def test_the_half_size_decode_of_a_fine_object_is_a_blank_panel():
    sample = next(s for s in probe_samples(SPEC, "val", 20) if s.stratum == "fine")
    x0, y0, x1, y1 = sample.box
    pad = (x1 - x0) // 4  # the panel's interior, inside its frame
    with Image.open(io.BytesIO(sample.jpeg)) as img:
        full = ImageTransform(image_size=128).apply(img).astype(float)
    with Image.open(io.BytesIO(sample.jpeg)) as img:
        half = ImageTransform(image_size=64).apply(img).astype(float)
    inner_full = full[y0 + pad : y1 - pad, x0 + pad : x1 - pad].mean(-1)
    inner_half = half[(y0 + pad) // 2 : (y1 - pad) // 2, (x0 + pad) // 2 : (x1 - pad) // 2].mean(-1)
    assert inner_full.std() > 4 * inner_half.std()


@pytest.mark.slow
def test_a_crop_classifier_reads_fine_textures_at_full_size_and_guesses_at_half_size():
    train = [s for s in probe_samples(SPEC, "train", 600) if s.stratum == "fine"]
    val = [s for s in probe_samples(SPEC, "val", 200) if s.stratum == "fine"]
    full = crop_accuracy(train, val, 128, epochs=8, width=16)["fine"]
    half = crop_accuracy(train, val, 64, epochs=8, width=16)["fine"]
    assert full >= 0.6 and half <= 0.2, (full, half)


def test_the_fine_config_puts_the_teacher_and_each_family_member_at_its_own_size():
    config = load_config(FINE)
    assert config.data.demo.style == "fine" and config.data.demo.image_size == 2 * config.data.image_size
    assert config.teacher.input_size == 128 and config.zoomvit.reads_highres
    assert [(m.name, m.input_size, m.model_kwargs["img_size"]) for m in config.baseline.family] == [
        (f"baseline_{size}px", size, size) for size in (72, 80, 88, 96)
    ]
    assert config.data.at_size(96).image_size == 96 and config.data.at_size(None) is config.data


def test_a_teacher_at_another_size_cannot_be_run_on_the_students_images():
    with pytest.raises(ConfigError, match="teacher.input_size"):
        load_config(FINE, ["zoomvit.distill.mode=soft", "zoomvit.distill.source=model"])


@pytest.mark.usefixtures("ray_local")
def test_each_family_member_trains_on_the_source_decoded_at_its_own_size(tmp_path):
    from zoomvit.train.recipes import _train_split, baseline_input_sizes

    generate_demo_dataset(tmp_path, train=6, val=2, image_size=128, style="fine", samples_per_shard=8)
    config = load_config(FINE, [f"data.root={tmp_path}", "data.demo=null"])
    members = _members(tmp_path / "train-000000.tar")

    def decode(key: str, side: int) -> np.ndarray:
        with Image.open(io.BytesIO(members[f"{key}.jpg"])) as img:
            return ImageTransform(image_size=side).apply(img)

    checked = 0
    for name, size in baseline_input_sizes(config).items():
        side = size or config.data.image_size
        ds, _ = _train_split(config, config.baseline.train, None, input_size=size)
        for row in ds.iter_rows():
            assert row["image"].shape == (side, side, 3), name
            assert np.array_equal(row["image"], decode(row["key"], side)), f"{name}: not a direct decode at {side}"
            if side != config.data.image_size:
                low = Image.fromarray(decode(row["key"], config.data.image_size))
                resized = np.asarray(low.resize((side, side), Image.Resampling.BICUBIC))
                assert np.abs(row["image"].astype(int) - resized).mean() > 1, f"{name}: a resize of the 64 px decode"
            checked += 1
    assert checked >= 3 * 4


@pytest.mark.parametrize("kind", ["random", "centre", "teacher", "box"])
def test_a_control_zooms_its_own_cells_with_zoomvits_token_count_and_keep_rate(kind):
    model = timm.create_model("zoomvit_test_patch8_32", with_zoomer=False, keep_rate=0.8).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    importance = torch.rand(4, 4, 4, generator=g)
    ranking = control_scores(
        kind, (4, 4, 4), generator=g, teacher_BHW=torch.rand(4, 4, 4, generator=g),
        box_B4=torch.tensor([[0.0, 0.0, 12.0, 12.0]] * 4), image_size=32,
    )  # fmt: skip
    alpha = 0.55
    ours = model.tokenize(x, importance, alpha=alpha)
    theirs = model.tokenize(x, matched_scores(importance, ranking), alpha=alpha)
    assert torch.equal(ours.num_tokens_B, theirs.num_tokens_B)
    for b in range(4):
        k = int((importance[b] > alpha).sum())
        top = set(ranking[b].flatten().argsort(descending=True, stable=True)[:k].tolist())
        zoomed = {
            (y0 // 8) * 4 + x0 // 8
            for (x0, y0, _, _), level, valid in zip(
                theirs.box_BL4[b].tolist(), theirs.level_BL[b].tolist(), theirs.valid_BL[b].tolist()
            )
            if valid and level == ZOOM
        }
        assert zoomed <= top, "only the control's cells are zoomed (keep_rate may prune some)"


def test_the_upsample_control_reads_zoomvits_cells_from_the_repeated_low_resolution_image():
    model = timm.create_model("zoomvit_test_patch8_32", with_zoomer=False, zoom_source="highres").eval()
    x = torch.randn(2, 3, 32, 32)
    scores = torch.rand(2, 4, 4)
    real = model.tokenize(x, scores, highres=torch.randn(2, 3, 64, 64), alpha=0.5)
    control = model.tokenize(x, scores, highres=nearest_2x(x), alpha=0.5)
    upsample = timm.create_model("zoomvit_test_patch8_32", with_zoomer=False, zoom_source="upsample")
    upsample.load_state_dict(model.state_dict())
    reference = upsample.eval().tokenize(x, scores, alpha=0.5)
    assert torch.equal(real.num_tokens_B, control.num_tokens_B)
    assert torch.allclose(control.tokens_BLD, reference.tokens_BLD)


def test_equal_gflops_within_a_part_uses_zoomvits_own_cost_over_that_parts_images():
    from zoomvit.evaluation.stage import _equal_gflops, _Scores
    from zoomvit.models.flops import TokenCostTable

    cost = TokenCostTable(None)
    cost.gflops = {(16, 0): 1.0, (28, 4): 2.0}
    n = 400
    rng = np.random.default_rng(0)
    small = np.arange(n) < n // 2  # the small objects zoom: 28 tokens; the large ones do not: 16
    zoom = _Scores()
    zoom.hits, zoom.top5 = [rng.random(n) < 0.5], [np.ones(n, bool)]
    zoom.counts = [np.where(small, 28, 16)]
    zoom.zoomed = [np.where(small, 4, 0)]
    scores = {}
    for name in ("baseline", "baseline_big"):
        s = _Scores()
        s.hits, s.top5, s.counts = [rng.random(n) < 0.5], [np.ones(n, bool)], [np.full(n, 16)]
        scores[(name, None)] = s
    rows = [
        {"model": "baseline", "family": True, "gflops_per_img": 0.5},
        {"model": "baseline_big", "family": True, "gflops_per_img": 2.5},
    ]
    parts = {"size_small": small, "size_large": ~small}
    out = _equal_gflops(rows, zoom, scores, parts, cost, 0.1, None)
    assert out["all"]["zoomvit_gflops"] == pytest.approx(1.6) and out["all"]["zoomvit_tokens"] == 22
    assert out["all"]["bracket_ratio"] == pytest.approx(5.0)
    assert out["size_small"]["zoomvit_gflops"] == pytest.approx(2.1)
    assert out["size_small"]["zoomvit_tokens"] == 28 and out["size_small"]["weight_high"] == pytest.approx(0.8)
    assert out["size_large"]["zoomvit_gflops"] == pytest.approx(1.1)
    assert out["size_large"]["weight_high"] == pytest.approx(0.3)
    mixed = np.arange(n) % 2 == 0  # every batch of two pads its 16-token image to 28
    zoom.counts, zoom.zoomed = [np.where(mixed, 28, 16)], [np.where(mixed, 4, 0)]
    padded = _equal_gflops(rows, zoom, scores, {}, cost, 0.1, 2)
    assert padded["all"]["zoomvit_gflops"] == pytest.approx(2.1), "as executed, padded: each image pays 28 tokens"


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_the_evaluate_stage_pairs_own_size_family_members_and_matches_controls_to_zoomvits_tokens(tmp_path):
    from safetensors.torch import save_file

    from zoomvit.config import TrainConfig
    from zoomvit.evaluation import evaluate_models
    from zoomvit.train.objectives import build_task
    from zoomvit.train.recipes import baseline_tasks, zoomvit_task

    generate_demo_dataset(tmp_path / "data", train=4, val=24, image_size=128, style="fine", samples_per_shard=16)
    config = load_config(FINE, [f"data.root={tmp_path / 'data'}", "data.demo=null", "evaluate.num_figures=1"])
    torch.manual_seed(0)
    zoom = build_task(zoomvit_task(config, None, inference=True), TrainConfig()).build_model()
    save_file(zoom.state_dict(), str(tmp_path / "zoomvit.safetensors"))
    weights = {}
    for name, task in baseline_tasks(config).items():
        save_file(build_task(task, TrainConfig()).build_model().state_dict(), str(tmp_path / f"{name}.safetensors"))
        weights[name] = tmp_path / f"{name}.safetensors"
    result = evaluate_models(
        config,
        zoomvit_weights=tmp_path / "zoomvit.safetensors",
        baseline_weights=weights,
        relevance_dir=None,
        out_dir=tmp_path / "out",
        alpha=0.5,
    )
    rows = {r["model"]: r for r in result["rows"] if r["model"] != "zoomvit" or r["headline"]}
    controls = {f"zoomvit_control_{k}" for k in ("random", "centre", "upsample")} | {"zoomvit_oracle_box"}
    assert controls <= set(rows), "no relevance maps: no label oracle; a highres ZoomViT: an upsample control"
    assert "zoomvit_oracle_label" not in rows
    for name in controls:
        assert rows[name]["tokens_per_img"] == rows["zoomvit"]["tokens_per_img"], name
        assert rows[name]["n"] == rows["zoomvit"]["n"] == 24
    family = ("baseline", "baseline_72px", "baseline_80px", "baseline_88px", "baseline_96px")
    assert [(rows[n]["input_size"], rows[n]["tokens_per_img"]) for n in family] == [
        (64, 64),
        (72, 81),
        (80, 100),
        (88, 121),
        (96, 144),
    ]
    gflops = [rows[n]["gflops_per_img"] for n in family]
    assert gflops == sorted(gflops) and len(set(gflops)) == len(gflops)
    zoom = rows["zoomvit"]
    assert zoom["gflops_executed_per_img"] == zoom["gflops_per_img"], "a fixed number of zoomed cells pads nothing"
    assert result["cost_as_executed"] == "padded"
    parts = result["parts"]
    assert parts["stratum_fine"] + parts["stratum_coarse"] == 24
    for name in ("stratum_fine", "stratum_coarse"):
        assert f"top1_{name}" in rows["baseline_96px"] and f"top1_{name}_ci95" in rows["zoomvit"]
    for name, paired in result["equal_gflops"].items():
        if isinstance(paired, dict):
            assert {"zoomvit_gflops", "zoomvit_tokens", "delta_top1", "delta_top1_ci95"} <= set(paired), name
    assert (tmp_path / "out" / "frontier.png").exists()
