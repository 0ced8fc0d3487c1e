"""How ZoomViT and its Zoomer train: per-image operating points, evaluation only inside what training
covered, the Zoomer on the crops ZoomViT will show it, and loud refusals instead of silent fallbacks."""

import pickle
import re
import tomllib

import pytest
import torch
from conftest import REPO, TINY
from pydantic import TypeAdapter, ValidationError
from safetensors.torch import save_file

from zoomvit.config import ConfigError, TrainConfig, load_config
from zoomvit.models import Zoomer
from zoomvit.train.data import augment
from zoomvit.train.objectives import build_task
from zoomvit.train.recipes import train_zoomvit, zoomvit_task
from zoomvit.train.task_specs import ClassifierSpec, TaskSpec, ZoomerSpec, ZoomViTSpec


def _zoomvit(tmp_path, *overrides):
    config = load_config(TINY, ["zoomvit.init_from_teacher=false", *overrides])
    zoomer = tmp_path / "zoomer.safetensors"
    save_file(Zoomer(grid=(4, 4), width=config.zoomer.width, depth=config.zoomer.depth).state_dict(), str(zoomer))
    return config, build_task(zoomvit_task(config, zoomer), config.zoomvit.train)


def test_training_draws_an_alpha_per_image_inside_train_alpha(tmp_path):
    _, task = _zoomvit(tmp_path, "zoomvit.train_alpha=[0.2, 0.7]")
    alpha_B = task.operating_points(64)["alpha"]
    assert alpha_B.shape == (64,) and len(set(alpha_B.tolist())) == 64
    assert alpha_B.min() >= 0.2 and alpha_B.max() <= 0.7


def test_budget_mode_training_draws_a_reachable_budget_per_image(tmp_path):
    _, task = _zoomvit(tmp_path, "zoomvit.train_budget=[16, 28]", "zoomvit.token_budget=22")
    cells_B = task.operating_points(256)["zoom_cells"]
    assert set(cells_B.tolist()) == {0, 1, 2, 3, 4}
    model = task.build_model().eval()
    with torch.no_grad():
        _, zt = model(torch.randn(8, 3, 32, 32), zoom_cells=cells_B[:8], return_tokens=True)
    assert zt.num_tokens_B.tolist() == (16 + 3 * cells_B[:8]).tolist()


def test_budget_mode_with_added_tokens_counts_four_per_zoomed_cell(tmp_path):
    _, task = _zoomvit(tmp_path, "zoomvit.train_budget=[16, 24]", "zoomvit.token_budget=20", "zoomvit.merge=add")
    cells_B = task.operating_points(256)["zoom_cells"]
    assert set(cells_B.tolist()) == {0, 1, 2}
    model = task.build_model().eval()
    with torch.no_grad():
        _, zt = model(torch.randn(8, 3, 32, 32), zoom_cells=cells_B[:8], return_tokens=True)
    assert zt.num_tokens_B.tolist() == (16 + 4 * cells_B[:8]).tolist()


def test_a_fixed_zoom_cells_model_gives_every_image_the_same_shape(tmp_path):
    _, task = _zoomvit(tmp_path, "zoomvit.zoom_cells=3", "zoomvit.merge=fold")
    assert task.operating_points(8) == {}
    model = task.build_model().eval()
    with torch.no_grad():
        _, zt = model(torch.randn(8, 3, 32, 32), return_tokens=True)
    assert zt.zoomed_cells_B.tolist() == [3] * 8 and zt.num_tokens_B.tolist() == [16] * 8
    assert bool(zt.valid_BL.all()), "no padding"


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["zoomvit.train_alpha=[0.1, 0.6]", "evaluate.alphas=[0.05]"], "outside zoomvit.train_alpha"),
        (["zoomvit.train_alpha=[0.1, 0.6]", "zoomvit.alpha=1.01"], "outside zoomvit.train_alpha"),
        (["evaluate.budgets=[16]"], "train_budget"),
        (
            ["zoomvit.train_budget=[16, 22]", "zoomvit.token_budget=19", "evaluate.budgets=[25]"],
            "outside zoomvit.train_budget",
        ),
        (["zoomvit.train_budget=[16, 22]", "zoomvit.token_budget=19", "evaluate.alphas=[0.5]"], "budget mode"),
    ],
)
def test_evaluating_zoomvit_outside_what_training_covered_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, overrides)


def test_evaluating_inside_the_trained_range_is_accepted():
    load_config(TINY, ["zoomvit.train_alpha=[0.1, 1.0]", "zoomvit.alpha=0.1", "evaluate.alphas=[0.3, 1.0]"])
    load_config(TINY, ["zoomvit.train_budget=[16, 40]", "zoomvit.token_budget=22", "evaluate.budgets=[16, 28, 40]"])


def test_zoomvit_refuses_to_train_with_a_random_zoomer(tmp_path):
    config = load_config(TINY, ["zoomvit.init_from_teacher=false"])
    with pytest.raises(ValueError, match="zoomer stage's trained weights"):
        train_zoomvit(config, None, tmp_path)
    with pytest.raises(ValueError, match="zoomer stage's trained weights"):
        build_task(zoomvit_task(config, None), config.zoomvit.train).build_model()
    inference = zoomvit_task(config, None, inference=True)
    assert build_task(inference, config.zoomvit.train).build_model() is not None  # the architecture alone


@pytest.mark.parametrize(
    "augmentation",
    [
        "train.random_resized_crop=[0.5, 1.0]",
        "train.hflip=true",
        "train.rand_augment=rand-m9-mstd0.5",
        "train.mixup=0.8",
        "train.cutmix=1.0",
    ],
)
@pytest.mark.parametrize("section", ["zoomvit", "baseline"])
def test_cached_teacher_logits_refuse_every_augmentation(section, augmentation):
    plain = [
        f"{section}.train.random_resized_crop=null",
        f"{section}.distill.mode=soft",
        f"{section}.distill.source=cache",
    ]
    load_config(TINY, plain)
    with pytest.raises(ConfigError, match=augmentation.split(".")[1].split("=")[0]):
        load_config(TINY, [*plain, f"{section}.{augmentation}"])


def test_highres_zoom_refuses_augmentations_its_2x_copy_cannot_follow():
    load_config(TINY, ["zoomvit.zoom_source=highres"])
    with pytest.raises(ConfigError, match="mixup"):
        load_config(TINY, ["zoomvit.zoom_source=highres", "zoomvit.train.mixup=0.8"])


def test_the_zoomer_trains_on_random_resized_crops_with_maps_cropped_alike():
    train = TrainConfig(random_resized_crop=(0.5, 1.0), hflip=True)
    spec = ZoomerSpec(
        grid=(8, 8), width=8, depth=1, head="global", loss="bce", topk_fraction=0.25, num_classes=10,
        mean=(0.5,) * 3, std=(0.5,) * 3,
    )  # fmt: skip
    task = build_task(spec, train, seed=3)
    model = task.build_model()
    g = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.randint(0, 256, (6, 64, 64, 3), dtype=torch.uint8, generator=g),
        "map": torch.rand(6, 8, 8, generator=g),
    }
    loss = task.train_loss(model, batch, torch.float32)
    views = augment(
        task.inputs(batch, torch.float32),
        scale=(0.5, 1.0),
        hflip=True,
        generator=torch.Generator().manual_seed(3),
        maps_BHW=batch["map"],
    )
    torch.testing.assert_close(loss, task._loss(model(views.x_BCHW, logits=True), views.maps_BHW))
    sums = task.evaluate(model.eval(), [batch], torch.float32)
    assert {"val_pearson", "val_crop_pearson", "val_crop_topk_overlap"} <= set(sums)


def test_the_declared_python_floor_covers_the_standard_library_the_package_uses():
    floor = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    major, minor = map(int, re.match(r">=\s*(\d+)\.(\d+)", floor).groups())
    needs_311 = {"from enum import StrEnum", "import tomllib", "from typing import Self", "ExceptionGroup"}
    used = {n for path in (REPO / "zoomvit").rglob("*.py") for n in needs_311 if n in path.read_text()}
    assert not used or (major, minor) >= (3, 11), f"{sorted(used)} need Python 3.11, requires-python says {floor}"


@pytest.mark.parametrize("head", ["global", "local"])
def test_the_runner_reloads_a_trained_zoomer_of_either_head(tmp_path, head):
    from zoomvit.pipeline.stage_table import STAGES

    config = load_config(TINY, [f"zoomer.head={head}"])
    zoomer = Zoomer(grid=(4, 4), width=config.zoomer.width, depth=config.zoomer.depth, head=head)
    save_file(zoomer.state_dict(), str(tmp_path / "zoomer.safetensors"))
    loaded = STAGES["zoomer"].load_model(config, tmp_path / "zoomer.safetensors")
    assert loaded.head_kind == head and loaded.frozen


@pytest.mark.parametrize("where", ["spec", "train", "distill"])
def test_a_misspelled_or_renamed_training_option_fails_validation(tmp_path, where):
    config, _ = _zoomvit(tmp_path)
    spec = zoomvit_task(config, tmp_path / "zoomer.safetensors").model_dump()
    renamed = {"drop_pth": 0.1}  # what a rename leaves behind
    with pytest.raises(ValidationError, match="drop_pth"):
        if where == "spec":
            TypeAdapter(TaskSpec).validate_python({**spec, **renamed})
        elif where == "train":
            TrainConfig.model_validate({**config.zoomvit.train.model_dump(), **renamed})
        else:
            TypeAdapter(TaskSpec).validate_python({**spec, "distill": {**spec["distill"], **renamed}})


def test_a_spec_missing_a_field_fails_instead_of_taking_a_worker_side_default(tmp_path):
    config, _ = _zoomvit(tmp_path)
    spec = zoomvit_task(config, tmp_path / "zoomer.safetensors").model_dump()
    del spec["keep_rate"]
    with pytest.raises(ValidationError, match="keep_rate"):
        ZoomViTSpec.model_validate(spec)


def test_specs_are_frozen_and_cross_process_boundaries_intact(tmp_path):
    config, _ = _zoomvit(tmp_path)
    spec = zoomvit_task(config, tmp_path / "zoomer.safetensors")
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert TypeAdapter(TaskSpec).validate_python(spec.model_dump()) == spec, "the discriminator picks ZoomViTSpec"
    with pytest.raises(ValidationError, match="frozen"):
        spec.alpha = 0.9


def test_the_worker_reads_the_recipe_it_was_given_not_a_default():
    from zoomvit.train.objectives import ClassifierTask

    train = TrainConfig(finetune="partial", freeze_blocks=1, drop_path=0.2)
    spec = ClassifierSpec(model="vit_test_patch8_32", num_classes=10, mean=(0.5,) * 3, std=(0.5,) * 3)
    task = build_task(spec, train)
    assert isinstance(task, ClassifierTask) and task.train == train
    model = task.build_model()
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any(n.startswith("blocks.0.") for n in frozen) and not any(n.startswith("blocks.1.") for n in frozen)
    assert model.blocks[1].drop_path1.drop_prob == pytest.approx(0.2)
