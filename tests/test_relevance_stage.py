import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from tarutil import write_tar

from zoomvit.config import DataConfig, RelevanceConfig, TeacherConfig
from zoomvit.data.demo import generate_demo_dataset
from zoomvit.data.relevance_store import logits_array, maps_array, read_maps, read_metadata
from zoomvit.relevance.job import run_relevance_stage

pytestmark = pytest.mark.usefixtures("ray_local")
SIZE = 32


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    generate_demo_dataset(root, train=48, val=16, image_size=SIZE, samples_per_shard=16)
    return root


def run(root, out, ckpt, **kw):
    return run_relevance_stage(
        data=DataConfig(root=str(root), image_size=SIZE, max_bad_fraction=kw.pop("max_bad_fraction", 0.05)),
        teacher=TeacherConfig(model="vit_test_patch8_32", checkpoint=ckpt),
        relevance=RelevanceConfig(
            batch_size=8,
            shards_per_group=kw.pop("shards_per_group", 1),
            splits=kw.pop("splits", ("train", "val")),
            **kw.pop("layout", {}),
        ),
        out_dir=out,
        **kw,
    )


def shard_keys(root: Path, prefix: str) -> set[str]:
    keys = set()
    for shard in root.glob(f"{prefix}-*.tar"):
        with tarfile.open(shard) as tar:
            keys |= {m.name.split(".", 1)[0] for m in tar.getmembers()}
    return keys


@pytest.fixture(scope="module")
def straight(demo, teacher_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    return out, run(demo, out, teacher_ckpt)


def test_one_parquet_row_per_sample_with_finite_non_negative_maps(demo, straight):
    tmp_path, manifest = straight
    train, val = read_maps(tmp_path, "train"), read_maps(tmp_path, "val")
    assert set(train["key"].to_pylist()) == shard_keys(demo, "train") and train.num_rows == 48
    assert set(val["key"].to_pylist()) == shard_keys(demo, "val") and val.num_rows == 16
    maps = maps_array(train)
    assert maps.shape == (48, 4, 4) and np.isfinite(maps).all() and (maps >= 0).all()
    assert all(s.endswith(".tar") for s in train["shard"].to_pylist())
    meta = read_metadata(next(tmp_path.glob("train-group-*.parquet")))
    assert meta["teacher"] == "vit_test_patch8_32" and meta["method"] == "grad_rollout" and meta["input_size"] == SIZE
    assert manifest["stats"]["groups_computed"] == 4 and manifest["stats"]["images_per_s"] > 0
    assert manifest["skips"]["counts"] == {}
    logits = logits_array(train)
    assert logits.shape == (48, 10), "the teacher's logits are kept for distillation from the cache"
    assert (logits.argmax(1) == np.asarray(train["teacher_pred"])).mean() > 0.9  # float16 ties aside


def jpeg(mode: str, size: int = SIZE) -> bytes:
    color = {"L": 128, "CMYK": (10, 20, 30, 40), "RGB": (200, 10, 10)}[mode]
    buf = io.BytesIO()
    Image.new(mode, (size, size), color).save(buf, format="JPEG")
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    import struct
    import zlib

    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    return bytes(data)


def test_bad_and_hostile_samples_are_counted_by_reason_and_good_ones_all_get_maps(teacher_ckpt, tmp_path):
    root = tmp_path / "shards"
    root.mkdir()
    write_tar(
        root / "train-000000.tar",
        [
            ("good.jpg", jpeg("RGB")),
            ("good.cls", b"1"),
            ("corrupt.jpg", b"\xff\xd8 not a jpeg"),
            ("corrupt.cls", b"2"),
            ("nolabel.jpg", jpeg("RGB")),
            ("outofrange.jpg", jpeg("RGB")),
            ("outofrange.cls", b"99"),
            ("gray.jpg", jpeg("L")),
            ("gray.cls", b"3"),
            ("cmyk.jpg", jpeg("CMYK")),
            ("cmyk.cls", b"4"),
            ("tiny.jpg", jpeg("RGB", 4)),
            ("tiny.cls", b"5"),
            ("dup.jpg", jpeg("RGB")),
            ("dup.cls", b"6"),
            ("dup.jpg", jpeg("RGB")),
            ("dup.cls", b"6"),
        ],
    )
    whole = root / "whole.tar"
    write_tar(
        whole, [(f"t{i}.{ext}", jpeg("RGB") if ext == "jpg" else b"7") for i in range(3) for ext in ("cls", "jpg")]
    )
    with tarfile.open(whole) as tar:
        cut = tar.getmember("t2.jpg").offset_data + 100
    (root / "train-000001.tar").write_bytes(whole.read_bytes()[:cut])
    whole.unlink()

    hostile = [
        *(("ok.jpg", jpeg("RGB")), ("ok.cls", b"1")),
        *(("huge_label.jpg", jpeg("RGB")), ("huge_label.cls", b"9" * 5000)),
        *(("deep_json.jpg", jpeg("RGB")), ("deep_json.cls", b"2"), ("deep_json.json", b"[" * 100_000)),
        *(("bomb.png", png_claiming(9000, 9000)), ("bomb.cls", b"3")),
    ]
    write_tar(root / "train-000002.tar", hostile)

    manifest = run(root, tmp_path / "out", teacher_ckpt, splits=("train",), max_bad_fraction=1.0)
    table = read_maps(tmp_path / "out", "train")
    # deep_json: its hostile json gives no metadata, and it is still a sample
    assert sorted(table["key"].to_pylist()) == ["cmyk", "deep_json", "dup", "good", "gray", "ok", "t0", "t1"]
    assert np.isfinite(maps_array(table)).all()
    assert manifest["skips"]["counts"] == {
        "corrupt_image": 1,
        "missing_label": 1,
        "label_out_of_range": 1,
        "tiny_image": 1,
        "duplicate_key": 1,
        "truncated_shard": 1,
        "missing_image": 1,  # t2: its .cls was read, its .jpg was cut off
        "bad_label": 1,
        "oversized_image": 1,
    }
    assert {s["key"] for s in manifest["skips"]["skipped"]} >= {"corrupt", "nolabel", "outofrange", "tiny", "dup"}
    assert json.loads((tmp_path / "out" / "train-group-00002.skips.json").read_text())["num_ok"] == 2


def test_too_many_bad_samples_fail_the_stage(teacher_ckpt, tmp_path):
    root = tmp_path / "shards"
    root.mkdir()
    write_tar(root / "train-000000.tar", [("a.jpg", b"junk"), ("a.cls", b"1"), ("b.jpg", jpeg("RGB")), ("b.cls", b"1")])
    with pytest.raises(RuntimeError, match="corrupt_image"):
        run(root, tmp_path / "out", teacher_ckpt, splits=("train",), max_bad_fraction=0.2)


def test_a_killed_run_resumes_with_only_the_missing_groups(demo, teacher_ckpt, straight, tmp_path):
    def fail_after_first(split, group):
        raise RuntimeError("injected failure after one committed group")

    with pytest.raises(RuntimeError, match="injected"):
        run(demo, tmp_path / "resumed", teacher_ckpt, on_group_committed=fail_after_first)
    committed = sorted(p.name for p in (tmp_path / "resumed").glob("*.parquet"))
    assert len(committed) == 1
    assert not list((tmp_path / "resumed").glob(".*tmp*"))

    manifest = run(demo, tmp_path / "resumed", teacher_ckpt)
    assert manifest["stats"]["groups_cached"] == 1 and manifest["stats"]["groups_computed"] == 3

    again = run(demo, tmp_path / "resumed", teacher_ckpt)
    assert again["stats"]["groups_computed"] == 0 and again["stats"]["images_computed"] == 0

    straight_dir, _ = straight
    for name in sorted(p.name for p in straight_dir.glob("*.parquet")):
        a, b = pq.read_table(tmp_path / "resumed" / name), pq.read_table(straight_dir / name)
        assert a.drop(["relevance", "teacher_logits"]).equals(b.drop(["relevance", "teacher_logits"]))
        np.testing.assert_allclose(maps_array(a), maps_array(b), rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose(logits_array(a), logits_array(b), rtol=1e-2, atol=1e-2)


def test_actors_that_decode_their_own_rows_write_the_same_maps(demo, teacher_ckpt, straight, tmp_path):
    layout = {"decode_in_actor": True, "concurrency": 2, "num_cpus_per_actor": 0.5, "actor_threads": 1}
    manifest = run(demo, tmp_path, teacher_ckpt, layout=layout)
    straight_dir, reference = straight
    assert manifest["rows"] == reference["rows"] and manifest["skips"] == reference["skips"]
    for name in sorted(p.name for p in straight_dir.glob("*.parquet")):
        a, b = pq.read_table(tmp_path / name), pq.read_table(straight_dir / name)
        assert a.drop(["relevance", "teacher_logits"]).equals(b.drop(["relevance", "teacher_logits"]))
        np.testing.assert_allclose(maps_array(a), maps_array(b), rtol=1e-3, atol=1e-6)


def test_an_actor_pool_that_would_starve_the_shard_reads_is_refused(demo, teacher_ckpt, tmp_path):
    with pytest.raises(ValueError, match="needs a whole CPU"):
        run_relevance_stage(
            data=DataConfig(root=str(demo), image_size=SIZE),
            teacher=TeacherConfig(model="vit_test_patch8_32", checkpoint=teacher_ckpt),
            relevance=RelevanceConfig(batch_size=8, concurrency=2, num_cpus_per_actor=0.75),
            out_dir=tmp_path,
        )


def test_a_teacher_is_required(demo, tmp_path):
    with pytest.raises(ValueError, match="trained teacher"):
        run(demo, tmp_path, None)
