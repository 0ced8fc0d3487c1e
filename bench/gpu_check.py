"""The GPU path checked in one command, on a bare GPU machine (torch, timm, numpy, pyarrow, and the
wheels copied beside the checkout: pydantic, DeepSpeed built with DS_BUILD_OPS=0, hjson; no Ray, no MLflow).

    python bench/gpu_check.py            # CUDA: pipelines/configs/imagenet.yaml's models and sizes, bf16
    python bench/gpu_check.py --quick    # anywhere: tiny.yaml's models at 32 px (the fast tier runs it on CPU)

Writes one JSON file (``--out``, default bench/results/gpu_check.json) and prints a table.

- **Correctness**: ZoomViT's logits under bf16 autocast on the device against fp32 on the CPU
  (argmax agreement, max abs error); padding invariance on the device (each image's logits alone vs
  in a batch of mixed lengths, every image its own alpha, packed and padded); relevance maps under
  bf16 vs fp32 (mean per-image Pearson); the Zoomer's parameter dtype inside ZoomViT's engine (it
  must stay fp32). The training rows run bf16 on a GPU, fp32 on the CPU (DeepSpeed's CPU engine).
- **Training steps**: the project's own worker (``WorkerTrainer``, as Ray Train runs it, driven
  without Ray through ``zoomvit.train.worker_env.local_env``) through DeepSpeed at each recipe's
  ZeRO stage and precision, for the teacher (its model with ZoomViT's recipe: imagenet.yaml's teacher
  is pretrained, not trained), the Zoomer, ZoomViT and the baseline, on one fixed synthetic uint8
  batch with the recipe's augmentation on the device: img/s, step time, peak memory, the loss finite
  and falling over ``--steps`` steps (warm-up off so the recipe's learning rate acts at once).
- **Side by side, in this run**: a plain ``torch.autocast`` step of the same model and loss (the
  DeepSpeed step should run at >= 0.9x its speed); ZoomViT against timm's ViT at ZoomViT's mean
  token count (forward, and a plain training step); relevance throughput against the teacher's
  forward + backward (its lower bound).
- **Achieved TFLOP/s** of every row from the flop counter (a training step counted as 3x its forward).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, *, warmup: int, repeat: int) -> float:
    """Median seconds of ``fn()`` over ``repeat`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _pearson(a_BN: torch.Tensor, b_BN: torch.Tensor) -> float:
    a = a_BN - a_BN.mean(dim=1, keepdim=True)
    b = b_BN - b_BN.mean(dim=1, keepdim=True)
    return float(((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-12)).mean())


def synthetic_batch(config, task, batch_size: int, *, seed: int = 0) -> dict[str, np.ndarray]:
    """One batch of what the task's data carries: uint8 images (and the 2x copy a highres ZoomViT
    reads), labels, and for the Zoomer a normalised relevance map over its grid."""
    from zoomvit.train.objectives import ZoomerTask, ZoomViTTask

    rng = np.random.default_rng(seed)
    size = config.data.image_size
    columns: dict[str, np.ndarray] = {
        "image": rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8),
        "label": rng.integers(0, config.data.num_classes, batch_size).astype(np.int64),
    }
    if isinstance(task, ZoomViTTask) and task.highres:
        columns["image_hr"] = rng.integers(0, 256, (batch_size, 2 * size, 2 * size, 3), dtype=np.uint8)
    if isinstance(task, ZoomerTask):
        gh, gw = task.spec.grid
        maps = rng.random((batch_size, gh, gw)).astype(np.float32)
        columns["map"] = maps / maps.max(axis=(1, 2), keepdims=True)
    return columns


def stage_specs(config, workdir: Path) -> dict[str, tuple[Any, Any]]:
    """Each training stage's (task spec, recipe) from the config, nothing pretrained or distilled (a
    bare machine downloads nothing); ZoomViT with a random Zoomer's weights saved for it."""
    from safetensors.torch import save_file

    from zoomvit.train.objectives import build_task
    from zoomvit.train.recipes import baseline_task, teacher_task, zoomer_task, zoomvit_task

    zoomer_weights = workdir / "zoomer.safetensors"
    zoomer_spec = zoomer_task(config)
    save_file(build_task(zoomer_spec, config.zoomer.train).build_model().state_dict(), str(zoomer_weights))
    deit = config.zoomvit.train
    return {
        "teacher": (teacher_task(config).model_copy(update={"pretrained": False}), deit),
        "zoomer": (zoomer_spec, config.zoomer.train),
        "zoomvit": (zoomvit_task(config, zoomer_weights), deit),
        "baseline": (baseline_task(config), config.baseline.train),
    }


def check_config(quick: bool):
    from zoomvit.config import load_config

    none = ["distill.mode=none", "init_from_teacher=false"]
    sets = [f"{s}.{k}" for s in ("zoomvit", "baseline") for k in none]
    if quick:  # the recipe's augmentation on, as imagenet.yaml has it: crops, flips, mixup and cutmix
        augmented = [f"{s}.train.{k}" for s in ("zoomer", "zoomvit", "baseline")
                     for k in ("random_resized_crop=[0.35, 1.0]", "hflip=true")]  # fmt: skip
        mixed = [f"{s}.train.{k}" for s in ("zoomvit", "baseline") for k in ("mixup=0.8", "cutmix=1.0")]
        return load_config(str(REPO / "pipelines" / "configs" / "tiny.yaml"), [*sets, *augmented, *mixed])
    return load_config(str(REPO / "pipelines" / "configs" / "imagenet.yaml"), [*sets, "teacher.pretrained=false"])


def train_row(name, spec, recipe, config, device, *, steps: int, batch_size: int | None) -> dict[str, Any]:
    """The project's worker stepping one fixed batch through DeepSpeed, and a plain autocast step of
    the same model and loss beside it."""
    from timm.optim import create_optimizer_v2

    from zoomvit.models.flops import count_flops
    from zoomvit.train.loop import WorkerConfig, WorkerTrainer
    from zoomvit.train.objectives import build_task
    from zoomvit.train.worker_env import TensorShard, local_env

    use_gpu = device.type == "cuda"
    B = batch_size or recipe.batch_size
    recipe = recipe.model_copy(
        update={
            "batch_size": B,
            "num_workers": 1,
            "warmup_epochs": 0,
            "epochs": 1,
            "grad_accum": 1,
            "use_gpu": use_gpu,
            "precision": "auto",
        }  # fmt: skip
    )
    task = build_task(spec, recipe, seed=0)
    columns = synthetic_batch(config, task, B)
    shard = TensorShard(columns)
    env, _ = local_env(shard, shard, device=device)
    worker = WorkerConfig(name=name, task=spec, train=recipe, use_gpu=use_gpu, steps_per_epoch=steps,
                          tracking=None, verbose=False)  # fmt: skip
    _reset_peak(device)
    trainer = WorkerTrainer(worker, env)
    batch = next(shard.iter_torch_batches(batch_size=B, device=device))
    losses = [trainer.train_step(batch).item() for _ in range(steps)]
    step_s = _timed(lambda: trainer.train_step(batch), device, warmup=0, repeat=max(3, steps // 4))
    row = {
        "stage": name,
        "model": getattr(spec, "model", "zoomer"),
        "batch": B,
        "zero_stage": recipe.zero_stage,
        "dtype": str(trainer.dtype).removeprefix("torch."),
        "step_s": step_s,
        "img_per_s": B / step_s,
        "peak_mem_mb": _peak_mb(device),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "loss_finite": bool(np.isfinite(losses).all()),
        "loss_falling": bool(np.mean(losses[-3:]) < np.mean(losses[:3])),
    }
    model = trainer.engine.module
    zoomer = getattr(model, "zoomer", None)
    if zoomer is not None:
        row["zoomer_dtype"] = str(next(zoomer.parameters()).dtype).removeprefix("torch.")
    x = task.inputs(batch, trainer.dtype)
    with torch.no_grad():
        forward = count_flops(_forward(task, model), x, batch)
    row["tflops_per_s"] = 3 * forward / step_s / 1e12
    trainer.engine.destroy()
    _reset_peak(device)

    plain = build_task(spec, recipe, seed=0)
    plain_model = plain.build_model().to(device)
    optimizer = create_optimizer_v2(plain_model, opt=recipe.optimizer, lr=recipe.lr, weight_decay=recipe.weight_decay)
    amp = torch.bfloat16 if use_gpu else torch.float32

    def plain_step():
        with _autocast(device, amp):
            loss = plain.train_loss(plain_model, batch, torch.float32)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    row["plain_step_s"] = _timed(plain_step, device, warmup=2, repeat=max(3, steps // 4))
    row["deepspeed_vs_plain"] = row["plain_step_s"] / step_s
    return row


def _forward(task, model):
    from zoomvit.train.objectives import ZoomerTask, ZoomViTTask

    def forward(x, batch):
        if isinstance(task, ZoomerTask):
            return model(x, logits=True)
        if isinstance(task, ZoomViTTask):
            hr = task.inputs(batch, x.dtype, "image_hr") if task.highres else None
            return model(x, highres=hr)
        return model(x)

    return forward


def correctness(config, specs, device: torch.device, dtype: torch.dtype, *, batch_size: int) -> dict[str, Any]:
    """ZoomViT on the device in ``dtype`` vs fp32 on the CPU; padding invariance on the device; relevance
    maps in ``dtype`` vs fp32."""
    from zoomvit.relevance.attribution import relevance_maps
    from zoomvit.train.objectives import build_task

    spec, recipe = specs["zoomvit"]
    task = build_task(spec, recipe, seed=0)
    torch.manual_seed(0)
    model = task.build_model().eval()
    batch = {k: torch.as_tensor(v) for k, v in synthetic_batch(config, task, batch_size, seed=1).items()}
    x = task.inputs(batch, torch.float32)
    hr = task.inputs(batch, torch.float32, "image_hr") if task.highres else None
    model.zoom = model.zoom_config(alpha=0.3)  # a middle operating point; the padding check mixes lengths below
    with torch.no_grad():
        reference = model(x, highres=hr).float()
        model.to(device)
        with _autocast(device, dtype):
            on_device = model(x.to(device), highres=None if hr is None else hr.to(device)).float().cpu()
        alpha_B = torch.linspace(0.0, 1.0, len(x), device=device)  # every image its own token count
        out: dict[str, Any] = {
            "zoomvit_argmax_agreement": float((on_device.argmax(1) == reference.argmax(1)).float().mean()),
            "zoomvit_max_abs_error": float((on_device - reference).abs().max()),
            "zoomvit_logit_scale": float(reference.abs().max()),
        }
        for mode in ("packed", "padded"):
            model.sequences = mode
            together = model(x.to(device), highres=None if hr is None else hr.to(device), alpha=alpha_B).float()
            alone = torch.cat(
                [
                    model(
                        x[i : i + 1].to(device),
                        highres=None if hr is None else hr[i : i + 1].to(device),
                        alpha=alpha_B[i : i + 1],
                    ).float()
                    for i in range(len(x))
                ]  # fmt: skip
            )
            out[f"padding_invariance_{mode}_max_abs"] = float((together - alone).abs().max())
        model.sequences = "auto"
        _, zt = model(x.to(device), highres=None if hr is None else hr.to(device), alpha=alpha_B, return_tokens=True)
        out["zoomvit_tokens_min_max"] = [int(zt.num_tokens_B.min()), int(zt.num_tokens_B.max())]

    teacher_spec, teacher_recipe = specs["teacher"]
    teacher = build_task(teacher_spec, teacher_recipe).build_model().to(device).eval()
    xt = x.to(device)
    fp32 = relevance_maps(teacher, xt).maps_BHW.flatten(1)
    with _autocast(device, dtype):
        low = relevance_maps(teacher, xt).maps_BHW.flatten(1)
    out["relevance_pearson_vs_fp32"] = _pearson(low.float().cpu(), fp32.float().cpu())
    return out


def side_by_side(config, specs, device, dtype, *, batch_size: int, repeat: int) -> list[dict[str, Any]]:
    """ZoomViT vs timm's ViT at ZoomViT's mean tokens; relevance vs the teacher's forward + backward."""
    import timm

    from zoomvit.models.flops import count_flops
    from zoomvit.relevance.attribution import relevance_maps
    from zoomvit.train.objectives import build_task

    rows = []
    spec, recipe = specs["zoomvit"]
    task = build_task(spec, recipe, seed=0)
    zoomvit = task.build_model().to(device).eval()
    batch = {k: torch.as_tensor(v).to(device) for k, v in synthetic_batch(config, task, batch_size, seed=2).items()}
    x = task.inputs(batch, torch.float32)
    hr = task.inputs(batch, torch.float32, "image_hr") if task.highres else None
    with torch.no_grad():
        _, zt = zoomvit(x, highres=hr, return_tokens=True)
    tokens = float(zt.num_tokens_B.float().mean())
    patch = zoomvit.patch_size
    side = max(1, round(math.sqrt(tokens))) * patch
    vit = timm.create_model(
        config.baseline.model, img_size=side, num_classes=config.data.num_classes, **config.baseline.model_kwargs
    ).to(device)
    xv = torch.randn(batch_size, 3, side, side, device=device)
    for name, model, inputs in (("zoomvit", zoomvit, (x,)), (f"timm {config.baseline.model} @ {side}px", vit, (xv,))):
        kwargs = {"highres": hr} if model is zoomvit else {}
        model.eval()
        with torch.no_grad(), _autocast(device, dtype):
            fwd = _timed(lambda m=model, i=inputs, k=kwargs: m(*i, **k), device, warmup=2, repeat=repeat)
            flops = count_flops(model, *inputs, **kwargs)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(m=model, i=inputs, k=kwargs, o=optimizer):
            with _autocast(device, dtype):
                loss = m(*i, **k).float().logsumexp(1).mean()
            loss.backward()
            o.step()
            o.zero_grad(set_to_none=True)

        train_s = _timed(step, device, warmup=2, repeat=repeat)
        tok = tokens if model is zoomvit else (side // patch) ** 2
        rows.append({"row": name, "tokens": tok, "forward_img_per_s": batch_size / fwd,
                     "train_img_per_s": batch_size / train_s, "forward_tflops_per_s": flops / fwd / 1e12,
                     "train_tflops_per_s": 3 * flops / train_s / 1e12})  # fmt: skip

    teacher_spec, teacher_recipe = specs["teacher"]
    teacher = build_task(teacher_spec, teacher_recipe).build_model().to(device).eval()
    xt = torch.randn(batch_size, 3, config.data.image_size, config.data.image_size, device=device)
    with _autocast(device, dtype):
        relevance_s = _timed(lambda: relevance_maps(teacher, xt), device, warmup=1, repeat=repeat)

        def forward_backward():
            teacher.zero_grad(set_to_none=True)
            teacher(xt).float().max(1).values.sum().backward()

        lower_s = _timed(forward_backward, device, warmup=1, repeat=repeat)
    with torch.no_grad():
        flops = count_flops(teacher, xt)
    rows.append({"row": "relevance (grad rollout)", "img_per_s": batch_size / relevance_s,
                 "tflops_per_s": 3 * flops / relevance_s / 1e12})  # fmt: skip
    rows.append({"row": "teacher forward + backward (lower bound)", "img_per_s": batch_size / lower_s,
                 "tflops_per_s": 3 * flops / lower_s / 1e12,
                 "relevance_vs_lower_bound": lower_s / relevance_s})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny.yaml's models at their small size (any device)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--steps", type=int, default=20, help="training steps on the fixed batch (default 20)")
    parser.add_argument("--batch", type=int, default=None, help="per-row batch (default: the recipe's; --quick: 8)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu_check.json"))
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        os.environ["DS_ACCELERATOR"] = "cpu"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # DeepSpeed trains bf16 on GPUs only
    batch = args.batch or (8 if args.quick else None)
    config = check_config(args.quick)
    started = time.perf_counter()
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "torch": torch.__version__,
        "config": "tiny.yaml" if args.quick else "imagenet.yaml",
        "dtype": str(dtype).removeprefix("torch."),
        "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as workdir:
        specs = stage_specs(config, Path(workdir))
        result["correctness"] = correctness(config, specs, device, torch.bfloat16, batch_size=batch or 16)
        result["training"] = []
        for name, (spec, recipe) in specs.items():
            row = train_row(name, spec, recipe, config, device, steps=args.steps, batch_size=batch)
            result["training"].append(row)
            losses = f"loss {row['loss_first']:.3f} -> {row['loss_last']:.3f}"
            print(f"[gpu_check] {name}: {row['img_per_s']:.1f} img/s, {losses}")
            if "zoomer_dtype" in row:
                result["correctness"]["zoomer_dtype_in_zoomvit_engine"] = row["zoomer_dtype"]
        result["side_by_side"] = side_by_side(config, specs, device, dtype, batch_size=batch or 64, repeat=5)
    result["seconds"] = time.perf_counter() - started
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    _print(result)
    print(f"wrote {args.out}")
    return result


def _print(result: dict[str, Any]) -> None:
    print(f"\n{result['device']}, torch {result['torch']}, {result['config']}, {result['dtype']}, {result['date']}")
    for key, value in result["correctness"].items():
        print(f"  {key:<36} {value}")
    cols = ["stage", "model", "batch", "zero_stage", "dtype", "img_per_s", "step_s", "peak_mem_mb", "tflops_per_s",
            "deepspeed_vs_plain", "loss_first", "loss_last", "loss_falling"]  # fmt: skip
    print("\n" + " | ".join(cols))
    for row in result["training"]:
        print(" | ".join(f"{row.get(c):.4g}" if isinstance(row.get(c), float) else str(row.get(c)) for c in cols))
    print()
    for row in result["side_by_side"]:
        print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
