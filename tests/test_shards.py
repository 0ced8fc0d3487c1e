"""Shard specs and the raw WebDataset reader, without Ray: ImageNet's layout for timm, brace patterns."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tarutil import write_tar

from zoomvit.data.decode import ImageTransform
from zoomvit.data.ingest import RAW_SCHEMA, decode_batch, raw_rows
from zoomvit.data.shards import expand_shards, read_info, sample_count, shard_infos, shard_key


def image_bytes(fmt: str, size: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size + 8), (10, 200, 30)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def imagenet_like(tmp_path):
    """Two shards named like timm's imagenet-1k-wds, .jpeg/.png/.webp members, an _info.json."""
    for shard, (ext, fmt) in enumerate([("jpeg", "JPEG"), ("png", "PNG")]):
        members = []
        for i in range(3):
            key = f"n0144076{shard}_{i}"
            meta = json.dumps({"filename": f"{key}.JPEG"}).encode()
            members += [(f"{key}.{ext}", image_bytes(fmt)), (f"{key}.cls", str(i).encode()), (f"{key}.json", meta)]
        write_tar(tmp_path / f"imagenet1k-train-{shard:04d}.tar", members)
    (tmp_path / "_info.json").write_text(
        json.dumps({"name": "imagenet-1k", "splits": {"train": {"num_samples": 6, "shard_lengths": [3, 3]}}})
    )
    return tmp_path


def test_brace_patterns_globs_and_directories_name_the_same_shards(imagenet_like):
    braces = expand_shards("imagenet1k-train-{0000..0001}.tar", root=str(imagenet_like))
    assert [p.rsplit("/", 1)[-1] for p in braces] == ["imagenet1k-train-0000.tar", "imagenet1k-train-0001.tar"]
    assert expand_shards(str(imagenet_like / "imagenet1k-train-*.tar")) == braces
    assert expand_shards(str(imagenet_like)) == braces
    assert [i.size > 0 for i in shard_infos(braces)] == [True, True]
    assert shard_key("s3://bucket/a/b.tar") == "bucket/a/b.tar"


def test_a_missing_shard_is_a_clear_error(imagenet_like):
    with pytest.raises(ValueError, match="imagenet1k-train-0002.tar"):
        expand_shards("imagenet1k-train-{0000..0002}.tar", root=str(imagenet_like))


def test_timms_info_json_is_read(imagenet_like):
    assert read_info(str(imagenet_like))["splits"]["train"]["shard_lengths"] == [3, 3]


def test_the_sample_count_of_any_subset_of_shards_comes_from_info_json(imagenet_like):
    info = json.loads((imagenet_like / "_info.json").read_text())
    info["splits"]["train"].update(
        filenames=["imagenet1k-train-0000.tar", "imagenet1k-train-0001.tar"], shard_lengths=[3, 2]
    )
    (imagenet_like / "_info.json").write_text(json.dumps(info))
    shards = expand_shards("imagenet1k-train-*.tar", root=str(imagenet_like))
    assert sample_count(shards) == 5
    assert sample_count(shards[1:]) == 2


def test_shards_that_info_json_does_not_count_are_a_clear_error(imagenet_like):
    shards = expand_shards("imagenet1k-train-*.tar", root=str(imagenet_like))  # its _info.json lists no file names
    with pytest.raises(ValueError, match="no sample count for 'imagenet1k-train-0000.tar'"):
        sample_count(shards)
    (imagenet_like / "_info.json").unlink()
    with pytest.raises(ValueError, match="data.decoded"):
        sample_count(shards)


def test_jpeg_and_png_members_decode_with_key_shard_and_label(imagenet_like):
    import pyarrow as pa

    transform = ImageTransform(image_size=32)
    for shard in expand_shards(str(imagenet_like)):
        with open(shard, "rb") as f:
            rows = list(raw_rows(f, shard))
        assert [r["kind"] for r in rows] == ["sample"] * 3 + ["eos"] and rows[-1]["count"] == 3
        out = decode_batch(pa.Table.from_pylist(rows, schema=RAW_SCHEMA), num_classes=10, transform=transform)
        assert list(out["kind"]) == ["sample"] * 3 + ["eos"]
        assert out["image"].shape == (4, 32, 32, 3) and out["image"].dtype == np.uint8
        assert list(out["label"][:3]) == [0, 1, 2]
        assert all(s == shard for s in out["shard"])


class FlakyStream(io.BytesIO):
    """A shard that raises ``OSError`` once its reader passes ``fail_at`` bytes."""

    def __init__(self, data: bytes, fail_at: int | None) -> None:
        super().__init__(data)
        self.fail_at = fail_at

    def read(self, size: int = -1) -> bytes:
        if self.fail_at is not None and self.tell() + (size if size >= 0 else len(self.getvalue())) > self.fail_at:
            raise OSError("connection reset by peer")
        return super().read(size)


def test_an_io_error_mid_shard_is_retried_from_the_start_without_losing_or_repeating_rows(tmp_path):
    shard = str(tmp_path / "train-0000.tar")
    noise = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(noise).save(png, format="PNG")
    write_tar(Path(shard), [m for i in range(40) for m in ((f"s{i:02d}.png", png.getvalue()), (f"s{i:02d}.cls", b"1"))])
    data = open(shard, "rb").read()
    clean = [r["key"] for r in raw_rows(io.BytesIO(data), shard)]
    seen_before_failure = []
    opened = []

    def reopen():
        seen_before_failure.append(len(rows))
        opened.append(1)
        return FlakyStream(data, None if len(opened) > 1 else len(data) * 2 // 3)

    rows = []
    for row in raw_rows(FlakyStream(data, len(data) // 3), shard, reopen=reopen, retries=3, backoff_s=0):
        rows.append(row)
    assert [r["key"] for r in rows] == clean and len(clean) == 41
    assert len(opened) == 2 and 0 < seen_before_failure[0] < seen_before_failure[1] < 40
    assert rows[-1]["kind"] == "eos" and rows[-1]["count"] == 40


def test_a_shard_that_keeps_failing_raises_naming_it_and_never_ends_with_an_eos_row(imagenet_like):
    from zoomvit.data.ingest import ShardReadError

    shard = str(imagenet_like / "imagenet1k-train-0000.tar")
    data = open(shard, "rb").read()
    rows = []
    with pytest.raises(ShardReadError, match=r"imagenet1k-train-0000\.tar: read failed after 3 attempt"):
        for row in raw_rows(FlakyStream(data, len(data) // 2), shard, reopen=lambda: FlakyStream(data, 10), retries=2,
                            backoff_s=0):  # fmt: skip
            rows.append(row)
    assert all(r["kind"] != "eos" for r in rows)


def test_rows_named_as_ray_reports_remote_shards_complete_their_group(tmp_path):
    """Ray's readers name ``s3://bucket/key`` as ``bucket/key``: the group of the full URL must still complete."""
    import pyarrow.parquet as pq

    from zoomvit.relevance.job import _collect, _Group, _GroupWriter

    url = "s3://bucket/shards/train-000000.tar"
    rows = {
        "kind": np.array(["sample", "sample", "eos"], dtype=object),
        "shard": np.array(["bucket/shards/train-000000.tar"] * 3, dtype=object),
        "key": np.array(["a", "b", ""], dtype=object),
        "index": np.array([0, 1, -1]),
        "label": np.array([3, 4, -1]),
        "target": np.array([3, 4, -1]),
        "teacher_pred": np.array([3, 1, -1]),
        "teacher_prob": np.array([0.9, 0.4, 0.0]),
        "grid_h": np.array([2, 2, 0]),
        "grid_w": np.array([2, 2, 0]),
        "relevance": np.array([np.ones(4, np.float32), np.ones(4, np.float32), None], dtype=object),
        "teacher_logits": np.array([np.zeros(10, np.float32), np.zeros(10, np.float32), None], dtype=object),
        "reason": np.array([None, None, None], dtype=object),
        "count": np.array([0, 0, 2]),
    }

    class Rows:  # what _collect reads of a Ray Dataset
        def iter_batches(self, **_):
            yield rows

    group = _Group(split="train", index=0, shards=[url])
    writer = _GroupWriter(out_dir=tmp_path, base_meta={"fingerprint": "f"}, max_bad_fraction=0.0)
    _collect(Rows(), [group], writer)
    assert writer.groups == 1 and writer.samples == 2
    (written,) = tmp_path.glob("train-group-*.parquet")
    assert set(pq.read_table(written).column("shard").to_pylist()) == {url}


def test_a_url_whose_filesystem_is_not_installed_names_the_extra_that_brings_it():
    import importlib.util

    from zoomvit.errors import UserError

    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed")
    with pytest.raises(UserError, match=r"gs://.*zoomvit\[cloud\]"):
        expand_shards("gs://bucket/imagenet/train-{000000..000003}.tar")
