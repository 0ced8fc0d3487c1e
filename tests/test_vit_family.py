"""The ViT family's tools around ZoomViT: DeiT distillation, fine-tuning strategies, resolution
changes of pretrained weights, any timm classifier as a baseline, regularisation switches."""

import functools
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import TINY
from pydantic import ValidationError
from timm.models.vision_transformer import VisionTransformer
from timm.optim import create_optimizer_v2

from zoomvit.config import ConfigError, DistillConfig, TrainConfig, load_config
from zoomvit.models import adapt_pos_embed, load_pretrained
from zoomvit.train.data import rand_augment_batch
from zoomvit.train.objectives import build_task
from zoomvit.train.task_specs import ClassifierSpec, ZoomViTSpec

TRAIN = TrainConfig(random_resized_crop=None, hflip=False, lr=1e-2)
LABELS = {"num_classes": 10, "mean": (0.5,) * 3, "std": (0.5,) * 3}


def _distill(distill):
    return DistillConfig(**{"alpha": 0.5, "tau": 1.0, "token": True, "source": "cache", **distill}) if distill else {}


def classifier(model="vit_test_patch8_32", distill=None, **train):
    spec = ClassifierSpec(model=model, **LABELS, **({"distill": _distill(distill)} if distill else {}))
    return build_task(spec, TrainConfig.model_validate({**TRAIN.model_dump(), **train}))


@functools.cache
def zoomer_checkpoint() -> str:
    """A Zoomer's weights for the test ZoomViT (ZoomViT refuses to train without one)."""
    from safetensors.torch import save_file

    from zoomvit.models import Zoomer

    path = Path(tempfile.mkdtemp()) / "zoomer.safetensors"
    save_file(Zoomer(grid=(4, 4), width=8, depth=1).state_dict(), str(path))
    return str(path)


def zoomvit_task(distill=None, **train):
    spec = ZoomViTSpec(
        model="zoomvit_test_patch8_32",
        **LABELS,
        alpha=0.5,
        train_alpha=(0.3, 0.6),
        train_budget=None,
        num_cells=16,
        coarse_alpha=None,
        keep_rate=1.0,
        token_budget=None,
        zoom_source="upsample",
        zoom_resample="nearest",
        zoomer_checkpoint=zoomer_checkpoint(),
        zoomer_width=8,
        zoomer_depth=1,
        zoomer_head="global",
        **({"distill": _distill(distill)} if distill else {}),
    )
    return build_task(spec, TrainConfig.model_validate({**TRAIN.model_dump(), **train}))


def batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    teacher = torch.randn(n, 10, generator=g)
    teacher[torch.arange(n), (labels + 3) % 10] += 10.0  # the teacher disagrees with every label
    return {
        "image": torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g),
        "label": labels,
        "teacher_logits": teacher,
    }


# --- DeiT distillation ------------------------------------------------------------------------------


def test_hard_distillation_uses_the_teachers_argmax_where_label_and_teacher_disagree():
    task = classifier("deit_test_distilled_patch8_32", distill={"mode": "hard", "alpha": 0.5})
    model = task.build_model().train()
    b = batch()
    assert bool((b["teacher_logits"].argmax(1) != b["label"]).all())
    torch.manual_seed(0)
    loss = task.train_loss(model, b, torch.float32)
    torch.manual_seed(0)
    cls, dist = model(task.inputs(b, torch.float32))
    expected = 0.5 * F.cross_entropy(cls, b["label"]) + 0.5 * F.cross_entropy(dist, b["teacher_logits"].argmax(1))
    with_labels = 0.5 * F.cross_entropy(cls, b["label"]) + 0.5 * F.cross_entropy(dist, b["label"])
    assert torch.allclose(loss, expected, atol=1e-5)
    assert not torch.allclose(loss, with_labels, atol=1e-3)


def test_soft_distillation_is_the_kl_divergence_at_temperature_tau():
    task = classifier("deit_test_distilled_patch8_32", distill={"mode": "soft", "alpha": 1.0, "tau": 3.0})
    model = task.build_model().train()
    b = batch()
    loss = task.train_loss(model, b, torch.float32)
    _, dist = model(task.inputs(b, torch.float32))
    kl = F.kl_div(F.log_softmax(dist / 3, 1), F.softmax(b["teacher_logits"] / 3, 1), reduction="batchmean") * 9
    assert torch.allclose(loss, kl, atol=1e-5)


def test_the_distillation_head_exists_only_when_asked_for_and_evaluation_averages_the_heads():
    plain = zoomvit_task().build_model()
    assert not hasattr(plain, "head_dist") and plain.num_prefix_tokens == 1
    distilled = zoomvit_task(distill={"mode": "soft"}).build_model()
    assert hasattr(distilled, "head_dist") and distilled.num_prefix_tokens == 2
    x = torch.randn(3, 3, 32, 32)
    distilled.train()
    cls, dist = distilled(x)
    distilled.eval()
    with torch.no_grad():
        averaged = distilled(x)
        zt = distilled.tokenize(x)
        seq = distilled.forward_tokens(zt)
        heads = (distilled.head(distilled.fc_norm(seq[:, 0])) + distilled.head_dist(distilled.fc_norm(seq[:, 1]))) / 2
    assert cls.shape == dist.shape == averaged.shape == (3, 10)
    assert torch.allclose(averaged, heads, atol=1e-5)

    with pytest.raises(ValueError, match="no distillation token"):
        classifier("vit_test_patch8_32", distill={"mode": "hard"}).build_model()
    one_head = classifier("vit_test_patch8_32", distill={"mode": "hard", "token": False}).build_model()
    assert not hasattr(one_head, "head_dist")


def test_cached_teacher_logits_refuse_mixup():
    with pytest.raises(ValueError, match="mixup"):
        classifier("deit_test_distilled_patch8_32", distill={"mode": "soft"}, mixup=0.8)


# --- fine-tuning strategies ---------------------------------------------------------------------------


def _train_steps(task, steps=3):
    model = task.build_model().train()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = create_optimizer_v2(model, opt="adamw", lr=1e-2, weight_decay=0.05)
    for i in range(steps):
        optimizer.zero_grad()
        task.train_loss(model, batch(seed=i), torch.float32).backward()
        optimizer.step()
    after = model.state_dict()
    changed = {k for k, v in after.items() if v.is_floating_point() and not torch.equal(v, before[k])}
    return model, changed


def test_linear_probing_trains_only_the_head():
    task = classifier(finetune="linear")
    model, changed = _train_steps(task)
    assert changed == {"head.weight", "head.bias"}
    assert task.param_counts["trainable_params"] == sum(p.numel() for p in model.head.parameters())


def test_linear_probing_of_zoomvit_also_trains_the_zoom_embedding():
    _, changed = _train_steps(zoomvit_task(finetune="linear"))
    assert changed == {"head.weight", "head.bias", "zoom_embed"}


def test_partial_finetuning_leaves_exactly_the_first_k_blocks_unchanged():
    task = classifier(finetune="partial", freeze_blocks=1)
    model, changed = _train_steps(task)
    frozen = {k for k in model.state_dict() if k.startswith(("blocks.0.", "patch_embed.", "pos_embed", "cls_token"))}
    assert not changed & frozen
    assert {k for k in model.state_dict() if k.startswith("blocks.1.")} <= changed
    assert {"head.weight", "norm.weight"} <= changed


def test_finetune_settings_are_validated():
    with pytest.raises(ValidationError, match="freeze_blocks"):
        TrainConfig(finetune="partial")
    with pytest.raises(ValidationError, match="only read with finetune=partial"):
        TrainConfig(freeze_blocks=2)
    with pytest.raises(ValueError, match="blocks"):
        classifier(finetune="partial", freeze_blocks=5).build_model()


# --- resolution changes -------------------------------------------------------------------------------


def _smooth(grid: int, dim: int) -> torch.Tensor:
    """A smooth function of each cell centre's position in [0, 1]^2, one frequency per channel."""
    c = (torch.arange(grid) + 0.5) / grid
    y, x = torch.meshgrid(c, c, indexing="ij")
    k = torch.arange(dim) / dim
    return (torch.sin(math.pi * (x[..., None] + k)) * torch.cos(math.pi * (0.5 * y[..., None] - k))).reshape(
        1, grid * grid, dim
    )


def _pooled_vit(img_size: int) -> VisionTransformer:
    """No blocks and mean pooling: on a flat image every patch token is the same, so the output
    depends on the position embedding only through its mean over the grid."""
    return VisionTransformer(
        img_size=img_size,
        patch_size=16,
        embed_dim=32,
        depth=0,
        num_heads=2,
        num_classes=5,
        global_pool="avg",
        class_token=True,
    )


@pytest.mark.parametrize(("src", "dst"), [(224, 96), (96, 224)])
def test_a_checkpoint_loads_into_another_resolution_with_an_interpolated_position_embedding(src, dst):
    torch.manual_seed(0)
    source = _pooled_vit(src).eval()
    grid_src, grid_dst = src // 16, dst // 16
    with torch.no_grad():
        source.pos_embed[:, 1:] = _smooth(grid_src, 32)
        source.pos_embed[:, :1] = 0.7
    target = _pooled_vit(dst).eval()
    report = load_pretrained(target, source.state_dict())
    assert "pos_embed" in report["loaded"] and not report["missing"]
    assert torch.equal(target.pos_embed[:, :1], source.pos_embed[:, :1]), "the class token's position is kept apart"
    error = (target.pos_embed[:, 1:].detach() - _smooth(grid_dst, 32)).abs().reshape(grid_dst, grid_dst, 32)
    assert float(error.mean()) < 0.02
    assert float(error[1:-1, 1:-1].max()) < 0.05, "inside the source grid's span the resampling interpolates"

    with torch.no_grad():
        flat_dst, flat_src = torch.full((1, 3, dst, dst), 0.25), torch.full((1, 3, src, src), 0.25)
        assert torch.allclose(target(flat_dst), source(flat_src), atol=0.03)


def test_zoomvit_and_a_distilled_deit_take_a_vit_checkpoint_of_another_size():
    source = timm.create_model("vit_test_patch8_32", img_size=32)
    zoom = timm.create_model("zoomvit_test_patch8_32", img_size=64, distilled=True)
    report = load_pretrained(zoom, source.state_dict())
    assert "pos_embed" in report["loaded"] and "blocks.0.attn.qkv.weight" in report["loaded"]
    assert torch.equal(zoom.pos_embed[:, :1], source.pos_embed[:, :1])
    assert torch.equal(zoom.pos_embed[:, 1:2], source.pos_embed[:, :1]), (
        "a new distillation position starts as the class token's"
    )
    assert zoom(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    pos = adapt_pos_embed(source.pos_embed, src_prefix=1, dst_prefix=1, new_grid=(8, 8))
    assert torch.allclose(zoom.pos_embed[:, 2:], pos[:, 1:])


def test_a_swin_checkpoint_goes_through_timms_own_filter():
    kwargs = dict(embed_dim=24, depths=(1, 1), num_heads=(1, 2), num_classes=10)
    source = timm.create_model("swin_tiny_patch4_window7_224", img_size=32, window_size=4, **kwargs)
    target = timm.create_model("swin_tiny_patch4_window7_224", img_size=64, window_size=8, **kwargs)
    report = load_pretrained(target, source.state_dict())
    assert any("relative_position_bias_table" in k for k in report["loaded"])
    assert target(torch.randn(1, 3, 64, 64)).shape == (1, 10)


# --- regularisation -----------------------------------------------------------------------------------


def test_regularisation_switches_reach_the_model_and_the_data():
    model = classifier(drop_path=0.2).build_model()
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    out = rand_augment_batch({"image": images, "label": np.arange(6)}, spec="rand-m9-n3-mstd0.5")
    assert out["image"].shape == images.shape and out["image"].dtype == np.uint8
    assert (out["image"] != images).any() and np.array_equal(out["label"], np.arange(6))
    with pytest.raises(ValidationError, match="ema_decay"):
        TrainConfig(ema_decay=0.99, zero_stage=3)


# --- any timm classifier as a baseline (Ray Train + DeepSpeed, 2 CPU workers) ---------------------------


@pytest.mark.slow
def test_the_baseline_stage_trains_a_swin_and_a_hybrid_and_evaluates_them_side_by_side(ray_local, tmp_path):
    from zoomvit.data.demo import generate_demo_dataset
    from zoomvit.evaluation import evaluate_models
    from zoomvit.train.recipes import train_baselines
    from zoomvit.train.recipes import zoomvit_task as zoomvit_spec

    generate_demo_dataset(tmp_path / "data", train=128, val=32, image_size=32, samples_per_shard=64)
    swin = {"img_size": 32, "window_size": 4, "embed_dim": 24, "depths": [1, 1], "num_heads": [1, 2]}
    hybrid = {"img_size": 32, "embed_dim": 32, "depth": 1, "num_heads": 2}
    config = load_config(
        TINY,
        [
            f"data.root={tmp_path / 'data'}",
            "baseline.train.epochs=1",
            "baseline.train.num_workers=0",  # trained in the driver: the models are the subject, not Ray Train
            "baseline.train.ema_decay=0.9",
            "baseline.train.drop_path=0.1",
            "baseline.model=swin_tiny_patch4_window7_224",
            "baseline.input_sizes=[]",
            f"baseline.model_kwargs={swin}",
            f"baseline.others=[{{name: hybrid, model: vit_tiny_r_s16_p8_224, model_kwargs: {hybrid}}}]",
        ],
    )
    results = train_baselines(config, tmp_path / "baseline")
    assert set(results) == {"baseline", "hybrid"}
    for name, result in results.items():
        assert result.weights.exists(), name
        assert np.isfinite(result.history[-1]["train_loss"])
        assert "ema_val_top1" in result.history[-1]

    zoomvit = timm.create_model("zoomvit_test_patch8_32")
    from safetensors.torch import save_file

    save_file(zoomvit.state_dict(), str(tmp_path / "zoomvit.safetensors"))
    assert zoomvit_spec(config, None).model == "zoomvit_test_patch8_32"
    table = evaluate_models(
        config,
        zoomvit_weights=tmp_path / "zoomvit.safetensors",
        baseline_weights={name: r.weights for name, r in results.items()},
        relevance_dir=None,
        out_dir=tmp_path / "evaluate",
    )
    rows = {row["model"]: row for row in table["rows"] if not row["model"].startswith("zoomvit")}
    assert set(rows) == {"baseline", "hybrid"}, "the Swin baseline and the hybrid side by side"
    for row in rows.values():
        assert row["gflops_per_img"] > 0 and row["img_per_s"] > 0 and 0 <= row["top1"] <= 1


def test_distillation_adds_the_teacher_or_the_relevance_stage_upstream_only_when_asked():
    from zoomvit.pipeline.stage_table import STAGES

    def upstream(name, *overrides):
        return [u for u, _ in STAGES[name].upstream_for(load_config(TINY, list(overrides)))]

    scratch = "zoomvit.init_from_teacher=false"  # tiny.yaml fine-tunes ZoomViT from its teacher
    assert upstream("zoomvit", scratch) == ["zoomer"] and upstream("baseline") == []
    assert upstream("zoomvit", scratch, "zoomvit.distill.mode=hard") == ["zoomer", "teacher"]
    plain_views = "baseline.train.random_resized_crop=null"  # cached logits describe the unaugmented image
    assert upstream("baseline", "baseline.distill.mode=soft", "baseline.distill.source=cache", plain_views) == [
        "relevance"
    ]


def test_students_initialised_from_the_teacher_read_it_upstream_and_start_from_its_weights(tmp_path):
    from safetensors.torch import save_file

    from zoomvit.models import Zoomer
    from zoomvit.pipeline.stage_table import STAGES
    from zoomvit.train.recipes import baseline_tasks, train_baselines, train_zoomvit, zoomvit_task

    config = load_config(TINY, ["zoomvit.init_from_teacher=true", "baseline.init_from_teacher=true"])
    assert [u for u, _ in STAGES["zoomvit"].upstream_for(config)] == ["zoomer", "teacher"]
    assert [u for u, _ in STAGES["baseline"].upstream_for(config)] == ["teacher"]

    teacher = timm.create_model(config.teacher.model, num_classes=config.data.num_classes)
    path = tmp_path / "teacher.safetensors"
    save_file(teacher.state_dict(), str(path))
    zoomer = tmp_path / "zoomer.safetensors"
    save_file(Zoomer(grid=(4, 4), width=config.zoomer.width, depth=config.zoomer.depth).state_dict(), str(zoomer))
    student = build_task(zoomvit_task(config, zoomer, teacher_weights=path), config.zoomvit.train).build_model()
    for name in ("blocks.1.mlp.fc1.weight", "pos_embed", "cls_token", "head.weight", "patch_embed.proj.weight"):
        assert torch.equal(student.state_dict()[name], teacher.state_dict()[name]), name
    assert zoomvit_task(config, None).init_checkpoint is None, "building the architecture to load trained weights"

    p4 = (
        "baseline.others=[{name: vit_p4, model: vit_test_patch8_32, model_kwargs: {patch_size: 4}, "
        "init_from_teacher: true}]"
    )
    with_p4 = load_config(TINY, [p4])
    assert [u for u, _ in STAGES["baseline"].upstream_for(with_p4)] == ["teacher"], (
        "one of the others starts from the teacher"
    )
    p4_model = build_task(baseline_tasks(with_p4, path)["vit_p4"], with_p4.baseline.train).build_model()
    assert p4_model.patch_embed.grid_size == (8, 8)
    assert torch.equal(
        p4_model.state_dict()["blocks.1.mlp.fc1.weight"], teacher.state_dict()["blocks.1.mlp.fc1.weight"]
    )
    with pytest.raises(ValueError, match="init_from_teacher needs"):
        train_zoomvit(config, tmp_path / "zoomer.safetensors", tmp_path)
    with pytest.raises(ValueError, match="init_from_teacher needs"):
        train_baselines(config, tmp_path)
    with pytest.raises(ConfigError, match="one way to initialise"):
        load_config(TINY, ["baseline.init_from_teacher=true", "baseline.init_checkpoint=x.safetensors"])


def test_a_student_whose_init_checkpoint_has_no_fitting_patch_embedding_is_refused(tmp_path):
    from safetensors.torch import save_file

    from zoomvit.errors import UserError
    from zoomvit.models import Zoomer
    from zoomvit.train.recipes import zoomvit_task

    config = load_config(TINY, ["zoomvit.init_from_teacher=true"])
    hybrid = timm.create_model("vit_test_convstem_patch8_32", num_classes=config.data.num_classes)
    path = tmp_path / "hybrid_teacher.safetensors"
    save_file(hybrid.state_dict(), str(path))
    zoomer = tmp_path / "zoomer.safetensors"
    save_file(Zoomer(grid=(4, 4), width=config.zoomer.width, depth=config.zoomer.depth).state_dict(), str(zoomer))
    spec = zoomvit_task(config, zoomer, teacher_weights=path)
    unfit = r"no patch embedding that fits \(patch_embed.proj.bias, patch_embed.proj.weight\)"
    with pytest.raises(UserError, match=unfit):
        build_task(spec, config.zoomvit.train).build_model()
