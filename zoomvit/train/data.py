"""Ray Datasets for training: decoded samples (optionally with their relevance maps), and the
per-batch GPU/CPU-side transforms the workers apply."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from zoomvit.config import DataConfig
from zoomvit.data.decode import ImageTransform
from zoomvit.relevance.attribution import normalize_maps

TRAIN_COLUMNS = ["key", "image", "label", "box", "stratum"]


class DecodedSplits:
    """The decoded splits one pipeline run shares: given to :func:`sample_dataset` with
    ``data.decoded: shared``, each split is decoded once, materialized, and the same dataset is handed
    to every later stage of the run. Without one, every call reads the shards afresh."""

    def __init__(self) -> None:
        self._datasets: dict[tuple[str, str, bool], Any] = {}

    def __len__(self) -> int:
        return len(self._datasets)

    def get(self, data: DataConfig, split: str, highres: bool, read: Callable[[], Any]) -> Any:
        """The run's decoded ``split``, materializing ``read()`` the first time it is asked for."""
        key = (data.model_dump_json(), split, highres)
        if key not in self._datasets:
            self._datasets[key] = read().materialize()
        return self._datasets[key]


def in_calibration_slice(keys: np.ndarray, fraction: float) -> np.ndarray:
    """Whether each sample key belongs to the held-out calibration slice: a hash of the key alone,
    so the slice is the same whatever the shard order, worker or run."""
    if fraction <= 0:
        return np.zeros(len(keys), dtype=bool)
    digests = [int.from_bytes(hashlib.sha256(str(k).encode()).digest()[:8], "big") for k in keys]
    return np.asarray(digests, dtype=np.float64) / 2.0**64 < fraction


def _select_part(batch: dict[str, np.ndarray], *, fraction: float, calibration: bool) -> dict[str, np.ndarray]:
    keep = in_calibration_slice(batch["key"], fraction) == calibration
    return {k: v[keep] for k, v in batch.items()}


def sample_dataset(
    data: DataConfig,
    split: str,
    *,
    limit: int | None = None,
    file_shuffle_seed: int | None = None,
    highres: bool = False,
    part: Literal["all", "fit", "calibration"] = "all",
    splits: DecodedSplits | None = None,
):
    """Decoded good samples of a split as a Ray Dataset with columns key, image, label, box (and
    image_hr, the same crop at twice the resolution, with ``highres``). ``part`` of the train split:
    ``fit`` (what training stages read) leaves out the calibration slice (``data.calibration_fraction``),
    ``calibration`` is that slice alone. ``file_shuffle_seed``: with ``data.decoded: streamed``, read the
    shards in a new seeded order every execution (every epoch). ``splits``: the run's shared decoded
    splits (read for ``data.decoded: shared``)."""
    if part != "all" and split != "train":
        raise ValueError(f"the calibration slice is part of the train split, not of {split!r}")
    if part == "calibration" and data.calibration_fraction == 0:
        raise ValueError("data.calibration_fraction is 0: there is no calibration slice")
    ds = _decoded(data, split, file_shuffle_seed=file_shuffle_seed, highres=highres, splits=splits)
    if part != "all" and data.calibration_fraction > 0:
        ds = ds.map_batches(
            _select_part,
            fn_kwargs={"fraction": data.calibration_fraction, "calibration": part == "calibration"},
            batch_format="numpy",
        )
    return ds.limit(limit) if limit else ds


def _decoded(
    data: DataConfig, split: str, *, file_shuffle_seed: int | None, highres: bool, splits: DecodedSplits | None
):
    def read():
        from ray.data import FileShuffleConfig

        from zoomvit.data.ingest import keep_samples, read_decoded

        transform = ImageTransform(
            image_size=data.image_size, resize_mode=data.resize_mode, crop_pct=data.crop_pct, highres=highres
        )
        shuffle = (
            FileShuffleConfig(seed=file_shuffle_seed)
            if data.decoded == "streamed" and file_shuffle_seed is not None
            else None
        )
        ds = read_decoded(data.shard_paths(split), num_classes=data.num_classes, transform=transform, shuffle=shuffle)
        columns = [*TRAIN_COLUMNS, "image_hr"] if highres else TRAIN_COLUMNS
        return ds.map_batches(keep_samples, fn_kwargs={"columns": columns}, batch_format="numpy")

    if splits is not None and data.decoded == "shared":
        return splits.get(data, split, highres, read)
    return read()


def relevance_targets(
    relevance_dir: str | Path, split: str, grid: tuple[int, int] | None, *, logits: bool = False
) -> dict[str, np.ndarray]:
    """The relevance stage's rows of a split sorted by key: ``keys``, and ``maps`` (normalised per
    image, resized to ``grid``; when ``grid`` is given) and/or the teacher's ``logits``."""
    from zoomvit.data.relevance_store import logits_array, maps_array, read_maps
    from zoomvit.relevance.attribution import normalize_maps

    table = read_maps(relevance_dir, split)
    keys = np.asarray(table["key"].to_pylist(), dtype=str)
    order = np.argsort(keys, kind="stable")
    if len(np.unique(keys)) != len(keys):
        raise ValueError(
            f"the {split} relevance maps in {str(relevance_dir)!r} hold a sample key twice: "
            "keys must be unique across shards"
        )
    out = {"keys": keys[order]}
    if grid is not None:
        maps = torch.from_numpy(maps_array(table))
        if tuple(maps.shape[1:]) != tuple(grid):
            maps = F.interpolate(
                maps.unsqueeze(1), size=grid, mode="bilinear", align_corners=False, antialias=True
            ).squeeze(1)
        out["maps"] = normalize_maps(maps).numpy().astype(np.float32)[order]
    if logits:
        out["logits"] = logits_array(table)[order]
    return out


def with_maps(ds, relevance_dir: str | Path, split: str, grid: tuple[int, int] | None, *, logits: bool = False):
    """``ds`` joined by key with the relevance stage's maps (``grid`` given) and/or teacher logits."""
    import ray

    from zoomvit.data.relevance_store import attach_targets

    targets_ref = ray.put(relevance_targets(relevance_dir, split, None if grid is None else tuple(grid), logits=logits))
    return ds.map_batches(attach_targets, fn_kwargs={"targets_ref": targets_ref}, batch_format="numpy")


def rand_augment_batch(batch: dict[str, np.ndarray], *, spec: str) -> dict[str, np.ndarray]:
    """timm's RandAugment (``spec`` as in timm's train script, e.g. 'rand-m9-mstd0.5-inc1') on uint8 HWC images."""
    from PIL import Image
    from timm.data.auto_augment import rand_augment_transform

    images = batch["image"]
    fill = tuple(int(v) for v in images.reshape(-1, 3).mean(0)) if len(images) else (128, 128, 128)
    transform = rand_augment_transform(spec, {"translate_const": int(images.shape[1] * 0.45), "img_mean": fill})
    out = (
        np.stack([np.asarray(transform(Image.fromarray(img)), dtype=np.uint8) for img in images])
        if len(images)
        else images
    )
    return {**batch, "image": out}


def numpy_batch_input(batch: dict[str, np.ndarray], data: DataConfig, column: str = "image") -> torch.Tensor:
    """A numpy batch's uint8 HWC images (``column``) as normalised model input."""
    return to_model_input(torch.from_numpy(np.require(batch[column], requirements="W")), data.mean, data.std)


def to_model_input(images_BHWC: torch.Tensor, mean, std) -> torch.Tensor:
    x = images_BHWC.permute(0, 3, 1, 2).float() / 255.0
    mean_t = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def random_resized_crop_boxes(
    B: int, H: int, W: int, scale: tuple[float, float], generator: torch.Generator
) -> torch.Tensor:
    """Per-image crop boxes (left, top, width, height) in pixels: area fraction in ``scale``, aspect 3/4..4/3."""
    area = H * W * torch.empty(B).uniform_(*scale, generator=generator)
    ratio = torch.exp(torch.empty(B).uniform_(np.log(3 / 4), np.log(4 / 3), generator=generator))
    w = torch.sqrt(area * ratio).clamp(max=W).round().clamp(min=1)
    h = torch.sqrt(area / ratio).clamp(max=H).round().clamp(min=1)
    left = torch.floor(torch.rand(B, generator=generator) * (W - w + 1))
    top = torch.floor(torch.rand(B, generator=generator) * (H - h + 1))
    return torch.stack([left, top, w, h], dim=1)


def crop_and_resize(x_BCHW: torch.Tensor, boxes_B4: torch.Tensor) -> torch.Tensor:
    """Each image's box resized bilinearly to the full size in one batched ``grid_sample``; equal to
    ``F.interpolate(crop, align_corners=False)`` of each crop (samples clamped to the box's pixels)."""
    B, C, H, W = x_BCHW.shape
    left, top, w, h = boxes_B4.to(x_BCHW.device, torch.float32).unbind(1)

    def axis(start, length, size):  # source pixel coordinate of each output pixel, normalised for grid_sample
        out = torch.arange(size, device=x_BCHW.device, dtype=torch.float32)
        src = start[:, None] + ((out[None] + 0.5) * length[:, None] / size - 0.5).clamp(min=0)
        src = torch.minimum(src, start[:, None] + length[:, None] - 1)
        return (src + 0.5) / size * 2 - 1

    gx, gy = axis(left, w, W), axis(top, h, H)
    grid = torch.stack([gx[:, None, :].expand(B, H, W), gy[:, :, None].expand(B, H, W)], dim=-1)
    return F.grid_sample(x_BCHW, grid.to(x_BCHW.dtype), mode="bilinear", padding_mode="border", align_corners=False)


class Views(NamedTuple):
    """One augmented batch: the model input, and what must follow it pixel for pixel."""

    x_BCHW: torch.Tensor
    maps_BHW: torch.Tensor | None = None
    highres_BCHW: torch.Tensor | None = None


def augment(
    x_BCHW: torch.Tensor,
    *,
    scale: tuple[float, float] | None,
    hflip: bool,
    generator: torch.Generator,
    maps_BHW: torch.Tensor | None = None,
    highres_BCHW: torch.Tensor | None = None,
) -> Views:
    """Per-image random resized crop (aspect 3/4..4/3) and horizontal flip. Relevance maps and the
    2x resolution copy get the same crop boxes (scaled to their size) and flips; a cropped map is
    renormalised to [0, 1] like the teacher's maps."""
    B, _, H, W = x_BCHW.shape
    if scale is not None:
        boxes_B4 = random_resized_crop_boxes(B, H, W, scale, generator)
        x_BCHW = crop_and_resize(x_BCHW, boxes_B4)
        if highres_BCHW is not None:
            highres_BCHW = crop_and_resize(highres_BCHW, boxes_B4 * (highres_BCHW.shape[-1] / W))
        if maps_BHW is not None:
            gh, gw = maps_BHW.shape[1:]
            grid_boxes = boxes_B4 * torch.tensor([gw / W, gh / H, gw / W, gh / H])
            maps_BHW = normalize_maps(crop_and_resize(maps_BHW.unsqueeze(1).float(), grid_boxes).squeeze(1))
    if hflip:
        flip = torch.rand(B, generator=generator) < 0.5
        x_BCHW = torch.where(flip.view(B, 1, 1, 1).to(x_BCHW.device), x_BCHW.flip(-1), x_BCHW)
        if highres_BCHW is not None:
            highres_BCHW = torch.where(
                flip.view(B, 1, 1, 1).to(highres_BCHW.device), highres_BCHW.flip(-1), highres_BCHW
            )
        if maps_BHW is not None:
            maps_BHW = torch.where(flip.view(B, 1, 1).to(maps_BHW.device), maps_BHW.flip(-1), maps_BHW)
    return Views(x_BCHW, maps_BHW, highres_BCHW)


def size_bucket_names(edges: tuple[float, ...]) -> list[str]:
    """The object-size buckets' names, smallest first (``unknown``: a sample without a box)."""
    return [f"lt{edges[0]}"] + [f"{a}-{b}" for a, b in zip(edges[:-1], edges[1:])] + [f"ge{edges[-1]}"]


def size_bucket(box_B4: np.ndarray, image_size: int, edges: tuple[float, ...]) -> list[str]:
    """Object-size bucket names from boxes (relative side length = sqrt(area) / image side)."""
    names = size_bucket_names(edges)
    out = []
    for box in box_B4:
        if not np.isfinite(box).all():
            out.append("unknown")
            continue
        side = float(np.sqrt(max(box[2] - box[0], 0) * max(box[3] - box[1], 0))) / image_size
        out.append(names[int(np.searchsorted(np.asarray(edges), side, side="right"))])
    return out
