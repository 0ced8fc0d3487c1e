import numpy as np
import pytest
import timm
import torch

from zoomvit.relevance import METHODS, relevance_maps


def slow_grad_rollout(model, image_CHW: torch.Tensor, target: int) -> torch.Tensor:
    """Chefer et al. 2021 written out plainly: explicit attention, one image, one layer at a time."""
    x = model.patch_embed(image_CHW[None])
    x = torch.cat([model.cls_token, x], dim=1) + model.pos_embed
    attentions = []
    for block in model.blocks:
        attn = block.attn
        h = block.norm1(x)
        n, d = h.shape[1], h.shape[2]
        q, k, v = attn.qkv(h).reshape(1, n, 3, attn.num_heads, d // attn.num_heads).permute(2, 0, 3, 1, 4)
        a = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        a.retain_grad()
        attentions.append(a)
        x = x + attn.proj((a @ v).transpose(1, 2).reshape(1, n, d))
        x = x + block.mlp(block.norm2(x))
    logits = model.head(model.norm(x)[:, 0])
    logits[0, target].backward()
    n = x.shape[1]
    relevance = torch.eye(n)
    for a in attentions:
        weighted = torch.zeros(n, n)
        for head in range(a.shape[1]):
            weighted += (a.grad[0, head] * a[0, head]).clamp(min=0)
        weighted /= a.shape[1]
        relevance = relevance + weighted @ relevance
    return relevance[0, 1:].reshape(model.patch_embed.grid_size).detach()


@pytest.fixture
def teacher():
    return timm.create_model("vit_test_patch8_32", num_classes=5).eval()


def test_gradient_rollout_equals_the_plain_reference(teacher):
    images = torch.randn(3, 3, 32, 32)
    labels = torch.tensor([0, 3, 4])
    result = relevance_maps(teacher, images, method="grad_rollout", labels_B=labels)
    for i in range(3):
        expected = slow_grad_rollout(teacher, images[i], int(labels[i]))
        torch.testing.assert_close(result.maps_BHW[i], expected, rtol=1e-4, atol=1e-6)


def test_without_labels_the_teachers_prediction_is_explained(teacher):
    images = torch.randn(2, 3, 32, 32)
    result = relevance_maps(teacher, images)
    assert torch.equal(result.target_B, teacher(images).argmax(1))
    for i in range(2):
        torch.testing.assert_close(
            result.maps_BHW[i], slow_grad_rollout(teacher, images[i], int(result.target_B[i])), rtol=1e-4, atol=1e-6
        )


@pytest.mark.parametrize("method", METHODS)
def test_maps_are_finite_non_negative_and_on_the_patch_grid(teacher, method):
    result = relevance_maps(teacher, torch.randn(4, 3, 32, 32), method=method)
    assert result.maps_BHW.shape == (4, 4, 4)
    assert torch.isfinite(result.maps_BHW).all() and (result.maps_BHW >= 0).all()
    assert result.prob_B.shape == (4,) and ((result.prob_B > 0) & (result.prob_B <= 1)).all()


def test_the_teachers_attention_settings_are_restored(teacher):
    flags = [True, False]
    for block, flag in zip(teacher.blocks, flags):
        block.attn.fused_attn = flag
    teacher.train()
    relevance_maps(teacher, torch.randn(1, 3, 32, 32))
    assert [b.attn.fused_attn for b in teacher.blocks] == flags
    assert teacher.training
    assert all(len(b.attn.attn_drop._forward_hooks) == 0 for b in teacher.blocks)


def test_an_unknown_method_is_rejected(teacher):
    with pytest.raises(ValueError, match="method"):
        relevance_maps(teacher, torch.randn(1, 3, 32, 32), method="lrp")


def one_patch_task(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random levels in [-0.5, 0.5] per 8 px patch; cell (1, 2) holds +-1 and its sign is the label."""
    levels = torch.rand((n, 1, 4, 4), generator=generator) - 0.5
    sign = torch.randint(0, 2, (n,), generator=generator).float() * 2 - 1
    levels[:, 0, 1, 2] = sign
    images = levels.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3).expand(-1, 3, -1, -1)
    images = images + 0.1 * torch.randn(images.shape, generator=generator)
    return images.contiguous(), (sign > 0).long()


@pytest.fixture(scope="module")
def one_patch_model():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = timm.create_model("vit_test_patch8_32", num_classes=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(200):
        images, labels = one_patch_task(32, generator)
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    images, labels = one_patch_task(64, generator)
    return model, images, labels


@pytest.mark.parametrize("method", METHODS)
def test_the_one_patch_that_decides_the_class_gets_the_highest_relevance(one_patch_model, method):
    """On average every method finds the decisive patch; the class-specific gradient rollout also singles
    it out image by image (the class-agnostic ones by a margin that varies with the torch build)."""
    model, images, labels = one_patch_model
    result = relevance_maps(model, images, labels_B=labels, method=method)
    assert (result.pred_B == labels).float().mean() > 0.95, "the fixture model must have learned the task"
    mean_map = result.maps_BHW.mean(dim=0).flatten()
    others = torch.cat([mean_map[:6], mean_map[7:]])
    assert int(mean_map.argmax()) == 1 * 4 + 2
    class_specific = method == "grad_rollout"
    assert mean_map[6] > (2 if class_specific else 1.5) * others.max()
    per_image = (result.maps_BHW.flatten(1).argmax(dim=1) == 6).float().mean()
    assert per_image > (0.5 if class_specific else 0.25), "chance is 1/16"


def test_a_distilled_teacher_is_explained_through_both_of_its_decision_tokens():
    from zoomvit.relevance.attribution import _grad_rollout, attention_probes

    teacher = timm.create_model("deit_test_distilled_patch8_32", num_classes=5).eval()
    images, labels = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])
    result = relevance_maps(teacher, images, labels_B=labels)
    with torch.enable_grad(), attention_probes(teacher) as attns:
        logits = teacher(images)  # eval: the mean of the class and distillation heads
        R = _grad_rollout(attns, torch.autograd.grad(logits.gather(1, labels[:, None]).sum(), attns))
    both = R[:, :2, 2:].mean(dim=1).reshape(3, 4, 4).clamp(min=0)
    class_only = R[:, 0, 2:].reshape(3, 4, 4).clamp(min=0)
    torch.testing.assert_close(result.maps_BHW, both)
    assert not torch.allclose(result.maps_BHW, class_only)


@pytest.mark.parametrize("pool", ["avg", "map"])
def test_a_teacher_without_a_decision_token_is_refused(pool):
    teacher = timm.create_model("vit_test_patch8_32", num_classes=5, global_pool=pool).eval()
    with pytest.raises(ValueError, match="global_pool"):
        relevance_maps(teacher, torch.randn(1, 3, 32, 32))


def test_a_conv_stem_hybrid_teacher_is_explained_on_the_same_patch_grid_as_its_students():
    import zoomvit.models  # noqa: F401

    torch.manual_seed(0)
    hybrid = timm.create_model("vit_test_convstem_patch8_32").eval()
    student = timm.create_model("vit_test_patch8_32")
    assert tuple(hybrid.patch_embed.grid_size) == tuple(student.patch_embed.grid_size) == (4, 4)
    x = torch.randn(3, 3, 32, 32)
    x_shifted = x.clone()
    x_shifted[:, :, :8, :8] += 1.0  # the top-left patch only
    features = hybrid.patch_embed.eval()
    changed = (features(x_shifted) - features(x)).abs().sum(-1)[0].reshape(4, 4) > 1e-6
    assert changed[0, 0] and changed[0, 1] and changed[1, 0] and not changed[3, 3]  # tokens see neighbours
    for method in METHODS:
        maps = relevance_maps(hybrid, x, method=method).maps_BHW
        assert maps.shape == (3, 4, 4) and torch.isfinite(maps).all()
    np.testing.assert_allclose(
        relevance_maps(hybrid, x[:1], method="grad_rollout", labels_B=torch.tensor([2])).maps_BHW[0],
        slow_grad_rollout(hybrid, x[0], 2),
        rtol=1e-4,
        atol=1e-6,
    )


def test_a_student_takes_the_hybrid_teachers_transformer_but_not_its_stem():
    import zoomvit.models  # noqa: F401
    from zoomvit.models.loading import load_pretrained

    hybrid = timm.create_model("vit_test_convstem_patch8_32")
    student = timm.create_model("vit_test_patch8_32")
    result = load_pretrained(student, hybrid.state_dict())
    assert set(result["missing"]) == {"patch_embed.proj.weight", "patch_embed.proj.bias"}
    assert all(k.startswith("patch_embed.proj.") for k in result["skipped"])
    torch.testing.assert_close(student.blocks[0].attn.qkv.weight, hybrid.blocks[0].attn.qkv.weight)
    torch.testing.assert_close(student.pos_embed, hybrid.pos_embed)
