"""What a zoomed cell's fine view does to the cell's own token: replace it, sit beside it, or fold
into it; a fixed count of zoomed cells; the gate that zooms only where the 2x copy holds detail."""

import pytest
import timm
import torch
from conftest import TINY

from zoomvit.config import load_config
from zoomvit.models import NORMAL, ZOOM
from zoomvit.models.tokenizer import detail_energy
from zoomvit.train.calibration import alpha_for_cells, calibrate_alpha


def _model(**kwargs):
    return timm.create_model("zoomvit_test_patch8_32", with_zoomer=False, **kwargs).eval()


def _cells_covered(zt, b: int, level: int) -> set[tuple[int, int]]:
    keep = zt.valid_BL[b] & (zt.level_BL[b] == level)
    return {(int(x0) // 8, int(y0) // 8) for x0, y0, *_ in zt.box_BL4[b][keep].tolist()}


def test_add_keeps_the_base_token_of_every_cell_and_adds_four_fine_tokens_per_zoomed_cell():
    scores = torch.rand(3, 4, 4)
    zt = _model(zoom_merge="add").tokenize(torch.randn(3, 3, 32, 32), scores, alpha=0.5)
    zoomed = (scores > 0.5).flatten(1).sum(1)
    assert zt.num_tokens_B.tolist() == (16 + 4 * zoomed).tolist()
    for b in range(3):
        assert len(_cells_covered(zt, b, NORMAL)) == 16, "every cell keeps its P x P token"
        fine = zt.valid_BL[b] & (zt.level_BL[b] == ZOOM)
        assert int(fine.sum()) == 4 * int(zoomed[b])


def test_replace_drops_the_base_token_of_a_zoomed_cell():
    scores = torch.rand(2, 4, 4)
    zt = _model().tokenize(torch.randn(2, 3, 32, 32), scores, alpha=0.5)
    for b in range(2):
        assert len(_cells_covered(zt, b, NORMAL)) == 16 - int((scores[b] > 0.5).sum())


def test_fold_keeps_one_token_per_cell_and_starts_as_the_plain_vit():
    fold, plain = _model(zoom_merge="fold"), _model()
    plain.load_state_dict({k: v for k, v in fold.state_dict().items() if not k.startswith("zoom_fold")})
    x, scores = torch.randn(3, 3, 32, 32), torch.rand(3, 4, 4)
    logits, zt = fold(x, scores, alpha=0.3, return_tokens=True)
    assert zt.num_tokens_B.tolist() == [16, 16, 16]
    assert zt.zoomed_cells_B.tolist() == (scores > 0.3).flatten(1).sum(1).tolist()
    assert torch.allclose(logits, plain(x, torch.zeros_like(scores), alpha=0.5), atol=1e-5), (
        "the fold projection and zoom embedding start at zero"
    )


def test_fold_changes_only_the_zoomed_cells_tokens_with_their_own_fine_pixels():
    model = _model(zoom_merge="fold")
    torch.nn.init.normal_(model.zoom_fold.weight)
    x, scores = torch.randn(1, 3, 32, 32), torch.zeros(1, 4, 4)
    scores[0, 1, 2] = 1.0
    base = model.tokenize(x, torch.zeros(1, 4, 4), alpha=0.5)
    zt = model.tokenize(x, scores, alpha=0.5)
    zoom_row = int((zt.level_BL[0] == ZOOM).nonzero())
    assert zt.box_BL4[0, zoom_row].tolist() == [16, 8, 24, 16]

    def by_box(tokens):
        return {tuple(box): tok for box, tok in zip(tokens.box_BL4[0].tolist(), tokens.tokens_BLD[0])}

    before, after = by_box(base), by_box(zt)
    changed = [box for box in before if not torch.allclose(before[box], after[box], atol=1e-6)]
    assert changed == [(16, 8, 24, 16)]
    x2 = x.clone()
    x2[..., :8, :8] += 1.0  # pixels of another cell: the folded token does not read them
    again = model.tokenize(x2, scores, alpha=0.5)
    assert torch.allclose(again.tokens_BLD[0, zoom_row], zt.tokens_BLD[0, zoom_row], atol=1e-6)


@pytest.mark.parametrize("merge", ["replace", "add", "fold"])
def test_an_image_gets_the_same_logits_alone_or_in_a_padded_batch(merge):
    model = _model(zoom_merge=merge)
    if model.zoom_fold is not None:
        torch.nn.init.normal_(model.zoom_fold.weight, std=0.02)
    x, scores = torch.randn(4, 3, 32, 32), torch.rand(4, 4, 4)
    batch = model(x, scores, alpha=0.5)
    for i in range(4):
        assert torch.allclose(model(x[i : i + 1], scores[i : i + 1], alpha=0.5), batch[i : i + 1], atol=1e-5)


@pytest.mark.parametrize("merge,tokens", [("replace", 25), ("add", 28), ("fold", 16)])
def test_zoom_cells_zooms_the_top_k_cells_of_every_image(merge, tokens):
    scores = torch.rand(5, 4, 4)
    zt = _model(zoom_merge=merge).tokenize(torch.randn(5, 3, 32, 32), scores, zoom_cells=3)
    assert zt.zoomed_cells_B.tolist() == [3] * 5 and zt.num_tokens_B.tolist() == [tokens] * 5
    third_B = scores.flatten(1).topk(3).values[:, -1]
    for b in range(5):
        assert zt.importance_BL[b][zt.level_BL[b] == ZOOM].min() >= third_B[b], "each image's own top 3"


def test_detail_energy_is_zero_where_the_2x_copy_adds_nothing_and_high_on_a_pixel_checkerboard():
    low = torch.randn(1, 3, 32, 32)
    highres = low.repeat_interleave(2, 2).repeat_interleave(2, 3)
    checker = (torch.arange(64)[:, None] + torch.arange(64)[None]) % 2 * 2.0 - 1.0
    highres[..., 16:32, 16:32] += checker[16:32, 16:32]  # the 2x copy of cell (row 1, column 1)
    energy = detail_energy(highres, (4, 4))
    assert energy[0, 1, 1] > 0.9
    energy[0, 1, 1] = 0
    assert energy.abs().max() < 1e-5


def test_the_detail_gate_closes_cells_without_detail_and_needs_the_2x_copy():
    model = timm.create_model("zoomvit_test_patch8_32", zoom_source="highres", detail_gate=0.1).eval()
    x = torch.randn(2, 3, 32, 32)
    flat = x.repeat_interleave(2, 2).repeat_interleave(2, 3)
    assert (model.importance(x, flat) == 0).all()
    assert torch.equal(model.importance(x, flat + 1.0), torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="2x resolution copy"):
        model.importance(x)
    with pytest.raises(ValueError, match="needs zoom_source='highres'"):
        timm.create_model("zoomvit_test_patch8_32", detail_gate=0.1)


def test_calibration_counts_the_tokens_a_zoomed_cell_adds_with_each_merge():
    scores = torch.rand(50, 4, 4)
    for per_cell in (3, 4):
        alpha = calibrate_alpha(scores, 16 + per_cell * 2.0, tokens_per_cell=per_cell)
        assert (scores > alpha).flatten(1).sum(1).float().mean() == pytest.approx(2.0, abs=0.03)
    assert alpha_for_cells(scores, 2.0) == calibrate_alpha(scores, 22.0)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["zoomvit.merge=fold", "zoomvit.token_budget=16"], "zoom_cells"),
        (["zoomvit.merge=fold", "zoomvit.target_tokens=20", "data.calibration_fraction=0.1"], "target_gflops"),
        (["zoomvit.merge=add", "zoomvit.coarse_alpha=0.0"], "merge=replace"),
        (["zoomvit.detail_gate=0.1"], "zoom_source=highres"),
        (["zoomvit.zoom_cells=2", "zoomvit.token_budget=22"], "zoom_cells"),
        (["zoomvit.zoom_cells=2", "evaluate.alphas=[0.5]"], "leave evaluate.alphas"),
    ],
)
def test_zoom_settings_that_cannot_hold_together_are_clear_errors(overrides, message):
    with pytest.raises(Exception, match=message):
        load_config(TINY, overrides)
