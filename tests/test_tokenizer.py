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


def _pixel_part_of_first_token(model, images, highres=None):
    """The first token's patch projection without bias: the token of ``images`` minus that of zeros
    (position and level embeddings cancel). Cell (row 1, col 2) is the only zoomed one."""
    scores = torch.zeros(1, 4, 4)
    scores[0, 1, 2] = 1.0
    zero_hr = None if highres is None else torch.zeros_like(highres)
    with torch.no_grad():
        zt = model.tokenize(images, scores, alpha=0.5, highres=highres)
        assert zt.level_BL[0, 0] == ZOOM and zt.box_BL4[0, 0].tolist() == [16, 8, 20, 12]
        return (
            zt.tokens_BLD[0, 0]
            - model.tokenize(torch.zeros_like(images), scores, alpha=0.5, highres=zero_hr).tokens_BLD[0, 0]
        )


def _projection_of(model, zoomed_2x, row: int = 2, col: int = 4):
    """W . pixels of the P x P window at fine cell (row, col) of a 2x image."""
    patch = zoomed_2x[:, :, 8 * row : 8 * row + 8, 8 * col : 8 * col + 8]
    with torch.no_grad():
        return model.patch_embed.proj(patch).flatten(1)[0] - model.patch_embed.proj.bias


def test_zoomed_token_by_default_sees_exactly_its_cell_with_pixels_repeated_as_the_official_code(model):
    images = torch.randn(1, 3, 32, 32)
    nearest = images.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    torch.testing.assert_close(
        _pixel_part_of_first_token(model, images), _projection_of(model, nearest), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("source,resample", [("upsample", "nearest"), ("upsample", "bilinear"), ("highres", "nearest")])
def test_a_zoomed_token_is_the_shared_projection_of_its_cell_in_the_configured_zoom_image(source, resample):
    model = timm.create_model("zoomvit_test_patch8_32", zoom_source=source, zoom_resample=resample).eval()
    images, highres = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 64, 64)
    candidates = {
        ("upsample", "nearest"): images.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3),
        ("upsample", "bilinear"): torch.nn.functional.interpolate(
            images, scale_factor=2, mode="bilinear", align_corners=False
        ),
        ("highres", "nearest"): highres,
    }
    got = _pixel_part_of_first_token(model, images, highres if source == "highres" else None)
    for key, zoomed in candidates.items():
        close = torch.allclose(got, _projection_of(model, zoomed), rtol=1e-5, atol=1e-5)
        assert close == (key == (source, resample)), key


def test_zoom_pixels_rejects_a_missing_or_misshapen_highres_copy():
    from zoomvit.models.tokenizer import zoom_pixels

    images = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="highres"):
        zoom_pixels(images, source="highres")
    with pytest.raises(ValueError, match="highres"):
        zoom_pixels(images, source="highres", highres_BCHW=torch.randn(2, 3, 48, 48))
    with pytest.raises(ValueError, match="zoom_source"):
        timm.create_model("zoomvit_test_patch8_32", zoom_source="sharpen")


def test_highres_zoom_reads_the_real_pixels_of_the_2x_copy_and_costs_the_same_flops():
    from zoomvit.models import zoomvit_flops

    up = timm.create_model("zoomvit_test_patch8_32").eval()
    hi = timm.create_model("zoomvit_test_patch8_32", zoom_source="highres").eval()
    hi.load_state_dict(up.state_dict())
    images = torch.randn(2, 3, 32, 32)
    scores = torch.rand(2, 4, 4)
    with torch.no_grad():
        same = hi(images, scores, alpha=0.5, highres=images.repeat_interleave(2, 2).repeat_interleave(2, 3))
        torch.testing.assert_close(same, up(images, scores, alpha=0.5))
        different = hi(images, scores, alpha=0.5, highres=torch.randn(2, 3, 64, 64))
        assert not torch.allclose(different, same)
        with pytest.raises(ValueError, match="highres"):
            hi(images, scores, alpha=0.5)
    highres = torch.randn(2, 3, 64, 64)
    assert (
        zoomvit_flops(hi, images, scores, alpha=0.5, highres=highres).gflops
        == zoomvit_flops(up, images, scores, alpha=0.5).gflops
    )


def test_position_embedding_is_evaluated_at_every_token_centre_including_the_border_ring():
    """With an affine position embedding over the patch centres, the true value at any token's
    centre is known in closed form: zoomed sub-cells of the outer ring lie beyond the outermost
    patch centres and must be extrapolated, not clamped."""
    model = timm.create_model("zoomvit_test_patch8_32", coarse=True).eval()
    D = model.embed_dim
    a, b, c = torch.randn(D), torch.randn(D), torch.randn(D)

    def affine(x, y):
        return a * x + b * y + c

    with torch.no_grad():
        model.pos_embed[0, 1:] = torch.stack([affine(8 * col + 4, 8 * row + 4) for row in range(4) for col in range(4)])
        scores = torch.rand(1, 4, 4)
        for alpha, coarse_alpha in ((0.0, None), (1.0, None), (1.0, 1.0)):
            zt = model.tokenize(torch.zeros(1, 3, 32, 32), scores, alpha=alpha, coarse_alpha=coarse_alpha)
            for token, (x0, y0, x1, y1), level in zip(
                zt.tokens_BLD[0], zt.box_BL4[0].tolist(), zt.level_BL[0].tolist()
            ):
                pos = token - model.patch_embed.proj.bias - model.zoom_embed[level + 1]
                torch.testing.assert_close(pos, affine((x0 + x1) / 2, (y0 + y1) / 2), rtol=1e-4, atol=1e-4)


def test_tied_scores_keep_the_four_sub_cells_of_a_cell_together(model):
    scores = torch.full((1, 4, 4), 0.9)  # every cell tied
    zt = model.tokenize(torch.randn(1, 3, 32, 32), scores, alpha=0.5)
    cells = [(y0 // 8) * 4 + x0 // 8 for x0, y0, _, _ in zt.box_BL4[0].tolist()]
    assert all(len(set(cells[i : i + 4])) == 1 for i in range(0, 64, 4))
    pruned = model.tokenize(torch.randn(1, 3, 32, 32), scores, alpha=0.5, keep_rate=8 / 64)
    kept = [(y0 // 8) * 4 + x0 // 8 for x0, y0, _, _ in pruned.box_BL4[0][pruned.valid_BL[0]].tolist()]
    assert sorted(kept) == [0, 0, 0, 0, 1, 1, 1, 1]


def test_tied_scores_in_budget_mode_go_to_the_lowest_cells():
    model = timm.create_model("zoomvit_test_patch8_32").eval()
    scores = torch.full((2, 4, 4), 0.5)
    scores[1, 3, 3] = 0.9
    zt = model.tokenize(torch.randn(2, 3, 32, 32), scores, token_budget=16 + 3 * 3)
    zoomed = [
        sorted(
            {
                (y0 // 8) * 4 + x0 // 8
                for (x0, y0, _, _), lvl in zip(zt.box_BL4[b].tolist(), zt.level_BL[b])
                if lvl == ZOOM
            }
        )
        for b in range(2)
    ]
    assert zoomed == [[0, 1, 2], [0, 1, 15]]


def test_alpha_and_budget_can_differ_per_image():
    model = timm.create_model("zoomvit_test_patch8_32").eval()
    scores = torch.rand(3, 4, 4)
    alpha_B = torch.tensor([0.0, 0.5, 1.0])
    zt = model.tokenize(torch.randn(3, 3, 32, 32), scores, alpha=alpha_B)
    for b in range(3):
        alone = model.tokenize(torch.randn(1, 3, 32, 32), scores[b : b + 1], alpha=float(alpha_B[b]))
        assert int(zt.num_tokens_B[b]) == int(alone.num_tokens_B[0])
    budgets = torch.tensor([16, 25, 64])
    zb = model.tokenize(torch.randn(3, 3, 32, 32), scores, token_budget=budgets)
    assert zb.num_tokens_B.tolist() == [16, 25, 64]


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
    zoomed_cells = {
        (y0 // 8) * 4 + x0 // 8 for (x0, y0, _, _), lvl in zip(zt.box_BL4[0].tolist(), zt.level_BL[0]) if lvl == ZOOM
    }
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
