"""The demo dataset generator: ImageNet-layout WebDataset shards of small digits in clutter."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY
from PIL import Image

from zoomvit.cli import main
from zoomvit.data.demo import CLASS_NAMES, TAR_MTIME, generate_demo_dataset, split_indices

ARGS = dict(train=40, val=20, image_size=64, seed=3, samples_per_shard=16)


def sha256_by_name(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def read_members(path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    return out, generate_demo_dataset(out, **ARGS)


def test_writes_shards_classes_and_info(dataset: tuple[Path, dict]) -> None:
    out, info = dataset
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "_info.json",
        "classes.txt",
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
        "val-000000.tar",
        "val-000001.tar",
    ]
    assert (out / "classes.txt").read_text().splitlines() == list(CLASS_NAMES) == [str(d) for d in range(10)]
    assert json.loads((out / "_info.json").read_text()) == info
    assert info["num_classes"] == 10
    assert info["splits"]["train"] == {
        "name": "train",
        "num_samples": 40,
        "shard_lengths": [16, 16, 8],
        "filenames": ["train-000000.tar", "train-000001.tar", "train-000002.tar"],
    }
    assert info["splits"]["val"]["num_samples"] == 20
    assert info["splits"]["val"]["shard_lengths"] == [16, 4]


def test_shard_lengths_match_tar_contents(dataset: tuple[Path, dict]) -> None:
    out, info = dataset
    for split in info["splits"].values():
        for name, length in zip(split["filenames"], split["shard_lengths"], strict=True):
            keys = {m.name.split(".")[0] for m, _ in read_members(out / name)}
            assert len(keys) == length


def test_members_are_key_jpg_cls_json_with_fixed_headers(dataset: tuple[Path, dict]) -> None:
    out, _ = dataset
    seen: set[str] = set()
    for shard in sorted(out.glob("*.tar")):
        members = read_members(shard)
        assert len(members) % 3 == 0
        for i in range(0, len(members), 3):
            names = [m.name for m, _ in members[i : i + 3]]
            key = names[0].rsplit(".", 1)[0]
            assert names == [f"{key}.jpg", f"{key}.cls", f"{key}.json"]
            split = shard.name.split("-")[0]
            assert re.fullmatch(rf"{split}_\d{{8}}", key)
            assert key not in seen
            seen.add(key)
        for member, data in members:
            assert (member.mtime, member.uid, member.gid, member.uname, member.gname) == (TAR_MTIME, 0, 0, "", "")
            if member.name.endswith(".cls"):
                assert re.fullmatch(rb"[0-9]", data)
            if member.name.endswith(".jpg"):
                image = Image.open(io.BytesIO(data))
                assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (64, 64))
    assert len(seen) == 60


def test_json_records_box_scale_label_and_filename(dataset: tuple[Path, dict]) -> None:
    out, _ = dataset
    members = dict((m.name, data) for m, data in read_members(out / "train-000000.tar"))
    meta = json.loads(members["train_00000000.json"])
    x0, y0, x1, y1 = meta["box"]
    assert meta["label"] == int(members["train_00000000.cls"])
    assert meta["filename"] == "train_00000000.jpg"
    assert x1 - x0 == y1 - y0
    assert meta["scale"] == pytest.approx((x1 - x0) / 64)


def test_same_arguments_give_identical_bytes_and_another_seed_does_not(
    tmp_path: Path, dataset: tuple[Path, dict]
) -> None:
    out, _ = dataset
    generate_demo_dataset(tmp_path / "again", **ARGS)
    assert sha256_by_name(tmp_path / "again") == sha256_by_name(out)

    generate_demo_dataset(tmp_path / "other", **{**ARGS, "seed": 4})
    other = sha256_by_name(tmp_path / "other")
    for name, digest in sha256_by_name(out).items():
        if name.endswith(".tar"):
            assert other[name] != digest


def test_webdataset_reads_the_shards(dataset: tuple[Path, dict]) -> None:
    import webdataset as wds

    out, info = dataset
    for split in ("train", "val"):
        urls = [str(out / name) for name in info["splits"][split]["filenames"]]
        samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
        assert len(samples) == info["splits"][split]["num_samples"]
        for sample in samples:
            assert sample["__key__"].startswith(f"{split}_")
            assert sample["jpg"].size == (64, 64)
            assert 0 <= sample["cls"] < 10
            assert sample["json"]["label"] == sample["cls"]
            x0, y0, x1, y1 = sample["json"]["box"]
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64


def test_digit_is_small_and_brighter_than_the_clutter(dataset: tuple[Path, dict]) -> None:
    out, info = dataset
    scales, contrasts = [], []
    for name in info["splits"]["train"]["filenames"]:
        members = dict((m.name, data) for m, data in read_members(out / name))
        for key in {n.split(".")[0] for n in members}:
            meta = json.loads(members[f"{key}.json"])
            gray = np.asarray(Image.open(io.BytesIO(members[f"{key}.jpg"])).convert("L"), dtype=np.float64) / 255
            x0, y0, x1, y1 = meta["box"]
            inside = np.zeros(gray.shape, dtype=bool)
            inside[y0:y1, x0:x1] = True
            scales.append(meta["scale"])
            contrasts.append(np.percentile(gray[inside], 99) - np.percentile(gray[~inside], 99))
    assert np.mean(scales) < 0.5
    assert min(scales) >= 0.18 - 1 / 64 and max(scales) <= 0.45 + 1 / 64
    assert np.median(contrasts) > 0.2


def test_train_and_val_use_disjoint_digit_images(dataset: tuple[Path, dict]) -> None:
    out, info = dataset
    sources: dict[str, set[int]] = {}
    for split in ("train", "val"):
        sources[split] = {
            json.loads(data)["source_index"]
            for name in info["splits"][split]["filenames"]
            for m, data in read_members(out / name)
            if m.name.endswith(".json")
        }
        assert sources[split] <= set(split_indices(split).tolist())
    assert not sources["train"] & sources["val"]
    assert not set(split_indices("train").tolist()) & set(split_indices("val").tolist())


def test_photo_clutter_changes_the_images(tmp_path: Path) -> None:
    plain = generate_demo_dataset(tmp_path / "plain", train=4, val=0)
    photo = generate_demo_dataset(tmp_path / "photo", train=4, val=0, photo_clutter=True)
    assert plain["generator"]["photo_clutter"] is False and photo["generator"]["photo_clutter"] is True
    shard = "train-000000.tar"
    assert (tmp_path / "plain" / shard).read_bytes() != (tmp_path / "photo" / shard).read_bytes()


def test_regenerating_with_fewer_samples_removes_stale_shards(tmp_path: Path) -> None:
    generate_demo_dataset(tmp_path, train=12, val=4, samples_per_shard=4)
    assert len(list(tmp_path.glob("train-*.tar"))) == 3
    info = generate_demo_dataset(tmp_path, train=4, val=0, samples_per_shard=4)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["train-000000.tar"]
    assert info["splits"]["val"] == {"name": "val", "num_samples": 0, "shard_lengths": [], "filenames": []}


@pytest.mark.parametrize(
    "overrides",
    [
        {"train": -1},
        {"val": -5},
        {"train": 0, "val": 0},
        {"image_size": 15},
        {"samples_per_shard": 0},
        {"seed": -1},
        {"digit_scale": (0.5, 0.2)},
        {"digit_scale": (0.0, 0.2)},
        {"digit_scale": (0.2, 1.5)},
        {"num_clutter": -1},
        {"noise_std": -0.1},
        {"train": 2.5},
    ],
)
def test_invalid_arguments_raise_value_error(tmp_path: Path, overrides: dict) -> None:
    with pytest.raises(ValueError):
        generate_demo_dataset(tmp_path, **{"train": 4, "val": 2, **overrides})


def test_cli_demo_data_writes_shards(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    argv = [
        "demo-data",
        str(out),
        "--train",
        "6",
        "--val",
        "3",
        "--image-size",
        "32",
        "--seed",
        "1",
        "--samples-per-shard",
        "4",
    ]
    assert main(argv) == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "train-000001.tar", "val-000000.tar"]
    info = json.loads((out / "_info.json").read_text())
    assert info["generator"]["image_size"] == 32 and info["generator"]["seed"] == 1
    printed = capsys.readouterr().out.strip()
    assert printed.count("\n") == 0 and "6 train" in printed and "3 val" in printed


def test_cli_reports_invalid_arguments_without_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo-data", str(tmp_path), "--train", "-1"]) == 2
    assert "train and val must be >= 0" in capsys.readouterr().err


def test_cli_keeps_the_traceback_of_an_error_that_is_not_the_users(tmp_path: Path, monkeypatch) -> None:
    import zoomvit.data.demo

    def broken(*args, **kwargs):
        raise ValueError("a bug inside the generator")

    monkeypatch.setattr(zoomvit.data.demo, "generate_demo_dataset", broken)
    with pytest.raises(ValueError, match="a bug inside the generator"):
        main(["demo-data", str(tmp_path), "--train", "4"])


def test_the_pipeline_regenerates_a_demo_dataset_made_with_other_settings(tmp_path: Path) -> None:
    from zoomvit.config import load_config
    from zoomvit.pipeline.runner import ensure_demo_data

    tiny = TINY
    small = ["data.demo.train=32", "data.demo.val=16", "data.demo.samples_per_shard=16", f"data.root={tmp_path}"]
    ensure_demo_data(load_config(tiny, small))
    first = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")}
    ensure_demo_data(load_config(tiny, small))
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")} == first, "same settings: kept as it is"

    ensure_demo_data(load_config(tiny, [*small, "data.demo.train=48"]))
    info = json.loads((tmp_path / "_info.json").read_text())
    assert info["splits"]["train"]["num_samples"] == 48
    assert sorted(p.name for p in tmp_path.glob("train-*.tar")) == [
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
    ]


def _users_dataset(root: Path) -> dict[str, bytes]:
    """Shards named like the generator's, with an _info.json that is not the generator's."""
    root.mkdir(parents=True, exist_ok=True)
    files = {
        "train-000000.tar": b"the user's train shard",
        "val-000000.tar": b"the user's val shard",
        "_info.json": json.dumps({"name": "imagenet-1k", "splits": {}}).encode(),
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    return files


@pytest.mark.parametrize("info", [True, False], ids=["foreign-info", "no-info"])
def test_the_demo_generator_never_overwrites_shards_it_did_not_write(tmp_path: Path, info: bool) -> None:
    files = _users_dataset(tmp_path)
    if not info:
        (tmp_path / "_info.json").unlink()
        del files["_info.json"]
    with pytest.raises(ValueError, match="did not write"):
        generate_demo_dataset(tmp_path, train=4, val=2)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files


def test_a_demo_config_pointed_at_a_users_dataset_stops_instead_of_replacing_it(tmp_path: Path) -> None:
    from zoomvit.config import load_config
    from zoomvit.pipeline.runner import ensure_demo_data

    files = _users_dataset(tmp_path)
    tiny = TINY
    with pytest.raises(ValueError, match="refusing to overwrite them"):
        ensure_demo_data(load_config(tiny, [f"data.root={tmp_path}"]))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files


def test_the_hard_preset_has_smaller_digits_and_brighter_colourful_clutter(tmp_path: Path) -> None:
    from zoomvit.data.demo import DemoSpec, render_sample

    easy, hard = DemoSpec(train=200, val=0), DemoSpec(train=200, val=0, difficulty=1.0)
    easy_scale = np.mean([render_sample(easy, "train", i).scale for i in range(200)])
    hard_scale = np.mean([render_sample(hard, "train", i).scale for i in range(200)])
    assert hard_scale < 0.75 * easy_scale

    def clutter_stats(spec):
        saturation, brightness = [], []
        for i in range(40):
            sample = render_sample(spec, "train", i)
            rgb = np.asarray(Image.open(io.BytesIO(sample.jpeg)), dtype=np.float32) / 255
            outside = np.ones(rgb.shape[:2], dtype=bool)
            x0, y0, x1, y1 = sample.box
            outside[y0:y1, x0:x1] = False
            pixels = rgb[outside]
            saturation.append(float((pixels.max(1) - pixels.min(1)).mean()))
            brightness.append(float(np.quantile(pixels.max(1), 0.99)))
        return np.mean(saturation), np.mean(brightness)

    (easy_sat, easy_bright), (hard_sat, hard_bright) = clutter_stats(easy), clutter_stats(hard)
    assert hard_sat > easy_sat and hard_bright > easy_bright


def test_difficulty_is_validated_and_stamped(tmp_path: Path) -> None:
    info = generate_demo_dataset(tmp_path, train=4, val=0, difficulty=0.5)
    assert info["generator"]["difficulty"] == 0.5
    with pytest.raises(ValueError, match="difficulty"):
        generate_demo_dataset(tmp_path / "x", train=4, val=0, difficulty=1.5)
