import math

import pytest
import timm
import torch

from zoomvit.models import COARSE, NORMAL, ZOOM, ZoomConfig, ZoomViT


@pytest.fixture
def model() -> ZoomViT:
    return timm.create_model("zoomvit_test_patch8_32", coarse=True).eval()


def coverage(box_L4: torch.Tensor, valid_L: torch.Tensor, size: int) -> torch.Tensor:
    counts = torch.zeros(size, size, dtype=torch.long)
    for (x0, y0, x1, y1), ok in zip(box_L4.tolist(), valid_L.tolist()):
        if ok:
            counts[y0:y1, x0:x1] += 1
    return counts


@pytest.mark.parametrize(
    ("alpha", "coarse_alpha"),
    [(0.0, None), (0.2, None), (0.5, None), (0.8, None), (1.0, None), (0.2, 0.1), (0.5, 0.2), (0.8, 0.5), (1.0, 1.0)],
)
def test_every_pixel_is_covered_by_exactly_one_valid_token(model, alpha, coarse_alpha):
    images = torch.randn(6, 3, 32, 32)
    scores = torch.rand(6, 4, 4)
    zt = model.tokenize(images, scores, alpha=alpha, coarse_alpha=coarse_alpha)
    for b in range(6):
        assert torch.equal(coverage(zt.box_BL4[b], zt.valid_BL[b], 32), torch.ones(32, 32, dtype=torch.long))


def test_alpha_above_every_score_gives_the_uniform_patch_tokens(model):
    scores = torch.rand(2, 4, 4) * 0.9
    zt = model.tokenize(torch.randn(2, 3, 32, 32), scores, alpha=0.95)
    assert zt.valid_BL.all() and zt.tokens_BLD.shape[1] == 16
    assert (zt.level_BL == NORMAL).all()
    for b in range(2):
        boxes = {tuple(box) for box in zt.box_BL4[b].tolist()}
        assert boxes == {(8 * c, 8 * r, 8 * c + 8, 8 * r + 8) for r in range(4) for c in range(4)}


def test_alpha_below_every_score_zooms_every_cell(model):
    scores = torch.rand(2, 4, 4) * 0.5 + 0.5
    zt = model.tokenize(torch.randn(2, 3, 32, 32), scores, alpha=0.4)
    assert zt.valid_BL.all() and zt.tokens_BLD.shape[1] == 64
    assert (zt.level_BL == ZOOM).all()
    assert ((zt.box_BL4[..., 2] - zt.box_BL4[..., 0]) == 4).all()


def test_uniform_layout_reproduces_the_timm_vit_with_the_same_weights():
    zoomvit = timm.create_model("zoomvit_test_patch8_32", with_zoomer=False).eval()
    vit = timm.create_model("vit_test_patch8_32").eval()
    vit.load_state_dict({k: v for k, v in zoomvit.state_dict().items() if k != "zoom_embed"})
    with torch.no_grad():
        zoomvit.zoom_embed.zero_()
        images = torch.randn(3, 3, 32, 32)
        flat = torch.full((3, 4, 4), 0.5)  # equal scores keep raster order
        torch.testing.assert_close(zoomvit(images, flat, alpha=0.9), vit(images), rtol=1e-5, atol=1e-5)


def test_zoomed_token_is_the_shared_patch_projection_of_the_upsampled_cell(model):
    images = torch.randn(1, 3, 32, 32)
    scores = torch.zeros(1, 4, 4)
    scores[0, 1, 2] = 1.0
    zt = model.tokenize(images, scores, alpha=0.5)
    first = zt.box_BL4[0, 0].tolist()
    assert zt.level_BL[0, 0] == ZOOM and first == [16, 8, 20, 12]
    up = torch.nn.functional.interpolate(images, scale_factor=2, mode="bilinear", align_corners=False)
    patch = up[:, :, 16:24, 32:40]
    expected = model.patch_embed.proj(patch).flatten(1)
    pos = torch.nn.functional.interpolate(
        model.pos_embed[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2), size=(8, 8), mode="bilinear", align_corners=False
    )[0, :, 2, 4]
    torch.testing.assert_close(zt.tokens_BLD[0, 0], expected[0] + pos + model.zoom_embed[ZOOM + 1])


def test_tokens_are_ordered_by_importance(model):
    zt = model.tokenize(torch.randn(4, 3, 32, 32), torch.rand(4, 4, 4), alpha=0.5, coarse_alpha=0.2)
    for b in range(4):
        imp = zt.importance_BL[b][zt.valid_BL[b]]
        assert (imp[:-1] >= imp[1:]).all()


def test_coarse_tokens_appear_only_for_blocks_of_four_unimportant_cells(model):
    scores = torch.full((1, 4, 4), 0.9)
    scores[0, :2, :2] = 0.05  # one low block
    scores[0, 2:, 2:] = torch.tensor([[0.05, 0.05], [0.05, 0.5]])  # not all low
    zt = model.tokenize(torch.randn(1, 3, 32, 32), scores, alpha=0.95, coarse_alpha=0.1)
    coarse = zt.box_BL4[0][zt.level_BL[0] == COARSE].tolist()
    assert coarse == [[0, 0, 16, 16]]
    assert int(zt.num_tokens_B[0]) == 16 - 4 + 1


def test_fewer_tokens_and_fewer_gflops_as_alpha_rises(model):
    from zoomvit.models import zoomvit_flops

    images, scores = torch.randn(4, 3, 32, 32), torch.rand(4, 4, 4)
    reports = [zoomvit_flops(model, images, scores, alpha=a) for a in (0.0, 0.3, 0.6, 0.9, 1.0)]
    tokens = [r.tokens for r in reports]
    gflops = [r.gflops for r in reports]
    assert tokens == sorted(tokens, reverse=True) and tokens[0] == 64 and tokens[-1] == 16
    assert gflops == sorted(gflops, reverse=True) and gflops[0] > 2 * gflops[-1]


@pytest.mark.parametrize("budget", [16, 25, 40, 64])
def test_budget_mode_gives_every_image_exactly_k_tokens(model, budget):
    zt = model.tokenize(torch.randn(5, 3, 32, 32), torch.rand(5, 4, 4), token_budget=budget)
    assert zt.tokens_BLD.shape[1] == budget and zt.valid_BL.all()
    assert coverage(zt.box_BL4[0], zt.valid_BL[0], 32).eq(1).all()


def test_budget_mode_zooms_the_most_important_cells(model):
    scores = torch.rand(1, 4, 4)
    zt = model.tokenize(torch.randn(1, 3, 32, 32), scores, token_budget=16 + 3 * 2)
    top2 = set(scores.flatten().topk(2).indices.tolist())
    zoomed_cells = {(y0 // 8) * 4 + x0 // 8 for (x0, y0, _, _), lvl in zip(zt.box_BL4[0].tolist(), zt.level_BL[0]) if lvl == ZOOM}
    assert zoomed_cells == top2


@pytest.mark.parametrize("budget", [15, 17, 65])
def test_unreachable_budget_is_a_clear_error(model, budget):
    with pytest.raises(ValueError, match="token_budget"):
        model.tokenize(torch.randn(1, 3, 32, 32), torch.rand(1, 4, 4), token_budget=budget)


def test_pruning_keeps_the_most_important_fraction(model):
    scores = torch.rand(3, 4, 4)
    full = model.tokenize(torch.randn(3, 3, 32, 32), scores, alpha=0.5)
    pruned = model.tokenize(torch.randn(3, 3, 32, 32), scores, alpha=0.5, keep_rate=0.5)
    for b in range(3):
        n = int(full.num_tokens_B[b])
        assert int(pruned.num_tokens_B[b]) == math.ceil(0.5 * n)
        k = int(pruned.num_tokens_B[b])
        assert torch.equal(pruned.box_BL4[b, :k], full.box_BL4[b, :k])


def test_score_maps_of_the_wrong_grid_are_rejected(model):
    with pytest.raises(ValueError, match="grid"):
        model(torch.randn(1, 3, 32, 32), torch.rand(1, 5, 5))


def test_invalid_zoom_configs_are_rejected():
    with pytest.raises(ValueError, match="coarse_alpha"):
        ZoomConfig(alpha=0.2, coarse_alpha=0.5)
    with pytest.raises(ValueError, match="keep_rate"):
        ZoomConfig(keep_rate=0.0)
