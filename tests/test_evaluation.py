"""The evidence protocol of the evaluate stage: intervals that cover, zoom controls that zoom the cells
they claim, a baseline family at the token counts it claims, and ZoomViT compared with that family
at equal GFLOPs on the same images."""

import numpy as np
import pytest
import timm
import torch
from conftest import TINY

import zoomvit.models  # noqa: F401
from zoomvit.config import ConfigError, load_config
from zoomvit.evaluation import bootstrap_ci, control_scores, paired_delta_at_equal_gflops
from zoomvit.models.flops import uniform_tokens, zoomvit_flops
from zoomvit.train.objectives import build_task
from zoomvit.train.recipes import baseline_input_sizes, baseline_tasks


def test_bootstrap_intervals_cover_the_true_accuracy_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    covered = 0
    for trial in range(200):
        hits = rng.random(300) < 0.3
        lo, hi = bootstrap_ci(hits, resamples=500, seed=trial)
        covered += lo <= 0.3 <= hi
    assert 0.89 <= covered / 200 <= 0.99


def test_zoom_controls_pick_seeded_random_cells_and_the_centre_cells():
    first = control_scores("random", (3, 4, 4), generator=torch.Generator().manual_seed(0))
    again = control_scores("random", (3, 4, 4), generator=torch.Generator().manual_seed(0))
    assert torch.equal(first, again) and not torch.equal(first[0], first[1])
    centre = control_scores("centre", (2, 4, 4), generator=torch.Generator())
    zoomvit = timm.create_model("zoomvit_test_patch8_32", with_zoomer=False).eval()
    zt = zoomvit.tokenize(torch.randn(2, 3, 32, 32), centre, token_budget=torch.tensor([16 + 3 * 4, 16 + 3 * 1]))
    for b, k in ((0, 4), (1, 1)):
        cells = {
            (y0 // 8, x0 // 8)
            for (x0, y0, _, _), lvl in zip(zt.box_BL4[b].tolist(), zt.level_BL[b].tolist())
            if lvl == 1
        }
        assert len(cells) == k and cells <= {(1, 1), (1, 2), (2, 1), (2, 2)}
    teacher = torch.rand(2, 4, 4)
    assert torch.equal(control_scores("teacher", (2, 4, 4), generator=torch.Generator(), teacher_BHW=teacher), teacher)


def test_the_baseline_family_is_the_baseline_at_each_input_size_with_that_many_tokens():
    config = load_config(TINY, ["baseline.input_sizes=[24, 48]"])
    tasks = baseline_tasks(config)
    assert list(tasks) == ["baseline", "baseline_24px", "baseline_48px"]
    sizes = baseline_input_sizes(config)
    assert sizes == {"baseline": None, "baseline_24px": 24, "baseline_48px": 48}, "each member reads its own pixels"
    tokens, gflops = {}, {}
    for name, task in tasks.items():
        model = build_task(task, config.baseline.train).build_model().eval()
        side = sizes[name] or config.data.image_size
        x = torch.randn(2, 3, side, side)
        assert model(x).shape == (2, 10), name
        tokens[name] = uniform_tokens(model)
        gflops[name] = zoomvit_flops(model, x).gflops
    assert tokens == {"baseline": 16, "baseline_24px": 9, "baseline_48px": 36}
    assert gflops["baseline_24px"] < gflops["baseline"] < gflops["baseline_48px"]


def test_a_family_member_starts_from_the_same_weights_with_its_position_grid_resampled(tmp_path):
    from safetensors.torch import save_file

    teacher = timm.create_model("vit_test_patch8_32", num_classes=10)
    save_file(teacher.state_dict(), str(tmp_path / "teacher.safetensors"))
    config = load_config(TINY, ["baseline.input_sizes=[48]", "baseline.init_from_teacher=true"])
    task = baseline_tasks(config, tmp_path / "teacher.safetensors")["baseline_48px"]
    member = build_task(task, config.baseline.train).build_model()
    assert member.pos_embed.shape[1] == 1 + 36
    assert torch.equal(member.blocks[0].attn.qkv.weight, teacher.blocks[0].attn.qkv.weight)
    assert torch.equal(member.patch_embed.proj.weight, teacher.patch_embed.proj.weight)


@pytest.mark.parametrize("sizes", ["[32, 32]", "[0]"])
def test_baseline_input_sizes_must_be_distinct_and_positive(sizes):
    with pytest.raises(ConfigError, match="input_sizes"):
        load_config(TINY, [f"baseline.input_sizes={sizes}"])


def test_equal_gflops_comparison_interpolates_the_family_and_pairs_the_same_images():
    rng = np.random.default_rng(0)
    low, high = rng.random(4000) < 0.4, rng.random(4000) < 0.6
    # halfway between the two family points, an identical model is no better than their interpolation
    same = np.where(rng.random(4000) < 0.5, low, high)
    paired = paired_delta_at_equal_gflops(same, 1.5, [(2.0, high), (1.0, low)])
    assert paired["weight_high"] == pytest.approx(0.5)
    lo, hi = paired["delta_top1_ci95"]
    assert lo <= 0 <= hi and not paired["significant"]
    better = high | (rng.random(4000) < 0.5)
    paired = paired_delta_at_equal_gflops(better, 1.5, [(1.0, low), (2.0, high)])
    assert paired["delta_top1"] == pytest.approx(better.mean() - (low.mean() + high.mean()) / 2)
    assert paired["significant"] and paired["delta_top1_ci95"][0] > 0


def test_equal_gflops_comparison_never_extrapolates_the_family():
    hits = np.ones(10)
    assert paired_delta_at_equal_gflops(hits, 3.0, [(1.0, hits), (2.0, hits)]) is None
    assert paired_delta_at_equal_gflops(hits, 1.5, [(1.0, hits)]) is None


def test_a_family_of_a_model_without_an_input_size_is_a_clear_error():
    config = load_config(TINY, ["baseline.input_sizes=[48]", "baseline.model=resnet18"])
    task = baseline_tasks(config)["baseline_48px"]
    with pytest.raises(ValueError, match="does not take"):
        build_task(task, config.baseline.train).build_model()


def test_gflops_are_measured_once_per_token_count_and_padding_never_costs_less():
    from zoomvit.models.flops import TokenCostTable, count_flops

    model = timm.create_model("zoomvit_test_patch8_32", with_zoomer=False).eval()
    x = torch.randn(6, 3, 32, 32)
    budgets = torch.tensor([16, 19, 25, 16, 28, 19])  # 0, 1, 3, 0, 4, 1 zoomed cells
    scores = torch.rand(6, 4, 4)
    table = TokenCostTable(model)
    _, zt = model(x, scores, token_budget=budgets, return_tokens=True)
    table.observe(x, scores, zt.num_tokens_B, zt.zoomed_cells_B, token_budget=budgets)
    assert sorted(table.gflops) == [(16, 0), (19, 1), (25, 3), (28, 4)]
    alone = count_flops(model, x[2:3], scores[2:3], token_budget=budgets[2:3]) / 1e9
    assert table.gflops[(25, 3)] == pytest.approx(alone)
    counts, zoomed = zt.num_tokens_B.numpy(), zt.zoomed_cells_B.numpy()
    assert table.gflops[(16, 0)] < table.gflops[(19, 1)] < table.gflops[(25, 3)] < table.gflops[(28, 4)]
    unpadded = table.unpadded(counts, zoomed)
    assert unpadded == pytest.approx(np.mean([table.gflops[(int(n), int(z))] for n, z in zip(counts, zoomed)]))
    assert table.padded(counts, zoomed, batch_size=1) == pytest.approx(unpadded)
    assert table.padded(counts, zoomed, batch_size=3) >= unpadded
    assert table.padded(counts, zoomed, batch_size=6) == pytest.approx(table.gflops[(28, 4)]), (
        "one batch: every image pays the longest"
    )


def test_a_folded_cell_costs_its_sub_cell_embeddings_and_a_fold_batch_pads_nothing():
    from zoomvit.models.flops import TokenCostTable

    model = timm.create_model("zoomvit_test_patch8_32", with_zoomer=False, zoom_merge="fold").eval()
    x, scores = torch.randn(4, 3, 32, 32), torch.rand(4, 4, 4)
    cells = torch.tensor([0, 2, 5, 2])
    _, zt = model(x, scores, zoom_cells=cells, return_tokens=True)
    assert zt.num_tokens_B.tolist() == [16] * 4 and zt.zoomed_cells_B.tolist() == [0, 2, 5, 2]
    table = TokenCostTable(model)
    table.observe(x, scores, zt.num_tokens_B, zt.zoomed_cells_B, zoom_cells=cells)
    assert table.gflops[(16, 0)] < table.gflops[(16, 2)] < table.gflops[(16, 5)]
    counts, zoomed = zt.num_tokens_B.numpy(), zt.zoomed_cells_B.numpy()
    assert table.padded(counts, zoomed, batch_size=4) == pytest.approx(table.unpadded(counts, zoomed))


def test_the_pipeline_run_carries_the_verdict_the_runs_table_compares():
    from zoomvit.pipeline.records import headline_metrics

    manifests = {
        "teacher": {"metrics": {"val_top1": 0.81}},
        "evaluate": {
            "rows": [
                {"model": "zoomvit", "headline": True, "top1": 0.6, "gflops_per_img": 0.09, "tokens_per_img": 100.0},
                {"model": "zoomvit", "headline": False, "top1": 0.5, "gflops_per_img": 0.07, "tokens_per_img": 80.0},
                {"model": "baseline", "family": True, "top1": 0.4, "gflops_per_img": 0.06, "tokens_per_img": 64.0},
                {"model": "baseline_96px", "family": True, "top1": 0.45, "gflops_per_img": 0.14, "tokens_per_img": 144},
                {"model": "zoomvit_control_random", "top1": 0.3, "gflops_per_img": 0.08, "tokens_per_img": 100.0},
            ],
            "equal_gflops": {
                "family": ["baseline", "baseline_96px"],
                "all": {"delta_top1": 0.17, "delta_top1_ci95": [0.15, 0.19]},
                "stratum_fine": {"delta_top1": 0.2, "delta_top1_ci95": [0.18, 0.22]},
                "size_lt0.3": None,
            },
        },
    }
    metrics = headline_metrics(manifests)
    assert metrics["teacher_top1"] == 0.81
    assert (metrics["zoomvit_top1"], metrics["zoomvit_gflops"], metrics["zoomvit_tokens"]) == (0.6, 0.09, 100.0)
    assert metrics["baseline_96px_top1"] == 0.45 and metrics["baseline_gflops"] == 0.06
    assert metrics["zoomvit_minus_family"] == 0.17 and metrics["zoomvit_minus_family_ci95_low"] == 0.15
    assert metrics["zoomvit_minus_family_fine_ci95_high"] == 0.22
    assert not any("control" in k for k in metrics), "controls stay in the evaluate run"
