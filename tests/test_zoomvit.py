import pytest
import timm
import torch

from zoomvit.models import Zoomer, ZoomViT, load_backbone_state_dict


@pytest.fixture
def model() -> ZoomViT:
    return timm.create_model("zoomvit_test_patch8_32", coarse_alpha=0.1).eval()


def test_an_image_has_the_same_logits_alone_and_in_a_padded_batch(model):
    images = torch.randn(4, 3, 32, 32)
    scores = torch.rand(4, 4, 4)
    scores[0] = 0.0  # 16 - coarse merges: the shortest
    scores[1] = 1.0  # every cell zoomed: 64 tokens
    with torch.no_grad():
        batch_logits, zt = model(images, scores, alpha=0.5, return_tokens=True)
        assert len(set(zt.num_tokens_B.tolist())) >= 3, "the batch must mix token counts"
        for i in range(4):
            alone = model(images[i : i + 1], scores[i : i + 1], alpha=0.5)
            torch.testing.assert_close(batch_logits[i : i + 1], alone, rtol=1e-5, atol=1e-5)


def test_avg_pooling_ignores_padding_too():
    model = timm.create_model("zoomvit_test_patch8_32", global_pool="avg").eval()
    images, scores = torch.randn(3, 3, 32, 32), torch.rand(3, 4, 4)
    with torch.no_grad():
        batch = model(images, scores, alpha=0.5)
        for i in range(3):
            torch.testing.assert_close(
                batch[i], model(images[i : i + 1], scores[i : i + 1], alpha=0.5)[0], rtol=1e-5, atol=1e-5
            )


def test_the_attached_zoomer_supplies_the_scores_when_none_are_given(model):
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images), model(images, model.zoomer(images)))


def test_a_model_without_zoomer_asks_for_scores():
    model = timm.create_model("zoomvit_test_patch8_32", with_zoomer=False)
    with pytest.raises(ValueError, match="Zoomer"):
        model(torch.randn(1, 3, 32, 32))


def test_gradients_reach_the_backbone_and_the_zoom_embedding_but_not_a_frozen_zoomer(model):
    model.train()
    model.zoomer.freeze()
    loss = model(torch.randn(2, 3, 32, 32)).logsumexp(1).mean()
    loss.backward()
    assert model.zoom_embed.grad is not None and model.zoom_embed.grad.abs().sum() > 0
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.zoomer.parameters())


def test_zoomvit_small_is_registered_with_a_deit_small_backbone():
    model = timm.create_model("zoomvit_small_patch16_224", num_classes=5)
    assert isinstance(model, ZoomViT)
    assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (384, 12, 6)
    assert model.grid == (14, 14) and model.patch_size == 16


def test_a_timm_deit_state_dict_loads_into_zoomvit_where_shapes_match():
    deit = timm.create_model("deit_tiny_patch16_224", num_classes=7)
    model = timm.create_model("zoomvit_tiny_patch16_224", num_classes=7, img_size=112)
    report = load_backbone_state_dict(model, deit.state_dict())
    assert report["skipped"] == []
    assert "zoom_embed" in report["missing"]
    assert all(k == "zoom_embed" or k.startswith("zoomer.") for k in report["missing"])
    torch.testing.assert_close(model.blocks[3].mlp.fc1.weight, deit.blocks[3].mlp.fc1.weight)
    assert model.pos_embed.shape == (1, 1 + 7 * 7, 192)


def test_the_baseline_is_timms_vision_transformer():
    baseline = timm.create_model("vit_demo_patch8_64")
    assert type(baseline) is timm.models.vision_transformer.VisionTransformer
    assert baseline(torch.randn(1, 3, 64, 64)).shape == (1, 10)


@pytest.mark.parametrize(("size", "patch", "grid"), [(64, 8, (8, 8)), (224, 16, (14, 14))])
def test_zoomer_maps_an_image_to_its_patch_grid_in_unit_range(size, patch, grid):
    zoomer = Zoomer(grid=grid, width=16)
    out = zoomer(torch.randn(2, 3, size, size))
    assert out.shape == (2, *grid)
    assert out.min() >= 0 and out.max() <= 1


def test_zoomer_gradients_flow_and_stop_when_frozen():
    zoomer = Zoomer(grid=(8, 8), width=16)
    zoomer(torch.randn(2, 3, 64, 64)).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in zoomer.parameters())
    zoomer.zero_grad(set_to_none=True)
    zoomer.freeze().train()
    assert not zoomer.training
    out = zoomer(torch.randn(2, 3, 64, 64))
    assert not out.requires_grad
    assert all(not p.requires_grad and p.grad is None for p in zoomer.parameters())


# --- fidelity to the paper and the official code ------------------------------------------------------


def test_a_zoomvit_made_from_a_vits_weights_is_that_vit_before_training():
    """The zoom-level embedding starts at zero: with alpha above every score (no zoom, tokens in
    importance order) a fresh ZoomViT with a ViT's weights gives that ViT's logits."""
    vit = timm.create_model("vit_test_patch8_32").eval()
    model = timm.create_model("zoomvit_test_patch8_32").eval()
    load_backbone_state_dict(model, vit.state_dict())
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        scores = torch.rand(4, 4, 4) * 0.9
        torch.testing.assert_close(model(images, scores, alpha=0.95), vit(images), rtol=1e-5, atol=1e-5)


def test_the_global_zoomer_head_lets_every_cell_see_the_whole_image():
    """It starts as the local head (each cell the average of its 2x2 block) and can learn to read
    the whole image; the local head never can, whatever its weights."""
    images = torch.randn(1, 3, 64, 64)
    corner = images.clone()
    corner[:, :, :8, :8] += 5.0  # top-left corner only

    def far_cell_change(zoomer):
        with torch.no_grad():
            return float((zoomer(corner) - zoomer(images))[0, 7, 7].abs())

    torch.manual_seed(0)
    zoomers = {head: Zoomer(grid=(8, 8), width=8, depth=1, head=head).eval() for head in ("global", "local")}
    assert far_cell_change(zoomers["global"]) == 0.0 and far_cell_change(zoomers["local"]) == 0.0
    with torch.no_grad():  # as training would: weights anywhere
        for zoomer in zoomers.values():
            for p in zoomer.parameters():
                p.add_(0.1 * torch.randn_like(p))
    assert far_cell_change(zoomers["local"]) == 0.0  # outside the receptive field
    assert far_cell_change(zoomers["global"]) > 1e-6


def test_the_global_zoomer_head_is_the_official_one():
    zoomer = Zoomer(grid=(14, 14), width=64, depth=2)
    assert zoomer.head_kind == "global"
    assert (zoomer.project.in_features, zoomer.project.out_features) == (4 * 14 * 14, 14 * 14)
    with pytest.raises(ValueError, match="head"):
        Zoomer(grid=(8, 8), head="attention")


def test_a_frozen_zoomer_stays_fp32_when_the_model_is_cast_to_bf16():
    model = timm.create_model("zoomvit_test_patch8_32").eval()
    model.zoomer.freeze()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        fp32_scores = model.importance(images)
        model.to(torch.bfloat16)
        assert model.patch_embed.proj.weight.dtype == torch.bfloat16
        assert all(p.dtype == torch.float32 for p in model.zoomer.parameters())
        bf16_scores = model.importance(images)
        assert bf16_scores.dtype == torch.float32
        assert torch.equal(bf16_scores, fp32_scores)
        logits = model(images)  # the bf16 backbone takes fp32 images
        assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


@pytest.mark.parametrize("pool", ["max", "avgmax", ""])
def test_a_pooling_zoomvit_cannot_honour_is_refused(pool):
    with pytest.raises(ValueError, match="global_pool"):
        timm.create_model("zoomvit_test_patch8_32", global_pool=pool)
