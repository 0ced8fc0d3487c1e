"""Shard specs and the raw WebDataset reader, without Ray: ImageNet's layout for timm, brace patterns."""

import io
import json
import logging
import tarfile
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


def test_a_url_whose_filesystem_is_not_installed_names_the_extra_that_brings_it(without_gcsfs):
    from zoomvit.errors import UserError

    with pytest.raises(UserError, match=r"gs://.*zoomvit\[cloud\]"):
        expand_shards("gs://bucket/imagenet/train-{000000..000003}.tar")


def three_sample_shard(directory: Path, claimed: int, *, cut_before: str | None = None) -> str:
    """``train-000000.tar`` of three samples (optionally cut where member ``cut_before`` starts: a valid,
    shorter tar but for its missing end-of-archive block) beside an ``_info.json`` that, as the demo
    generator's and timm's do, counts ``claimed``."""
    shard = directory / "train-000000.tar"
    write_tar(
        shard,
        [(f"s{i}.{ext}", image_bytes("PNG") if ext == "png" else b"1") for i in range(3) for ext in ("png", "cls")],
    )
    if cut_before is not None:
        with tarfile.open(shard) as tar:
            offset = tar.getmember(cut_before).offset
        shard.write_bytes(shard.read_bytes()[:offset])
    info = {
        "splits": {
            "train": {"name": "train", "num_samples": claimed, "filenames": [shard.name], "shard_lengths": [claimed]}
        }
    }
    (directory / "_info.json").write_text(json.dumps(info))
    return str(shard)


def read_as_the_datasource_does(shard: str) -> list[dict]:
    """Raw rows of one shard with the sample count the reader looks up for it (its ``_info.json``'s)."""
    from zoomvit.data.shards import expected_samples

    rows = []
    with open(shard, "rb") as f:
        for row in raw_rows(f, shard, expected=expected_samples([shard]).get(shard_key(shard))):
            rows.append(row)
    return rows


def test_a_shard_cut_at_a_member_boundary_is_incomplete_naming_the_shard_and_both_counts(tmp_path):
    from zoomvit.data.ingest import IncompleteShard

    shard = three_sample_shard(tmp_path, claimed=3, cut_before="s2.png")
    with open(shard, "rb") as f:  # without a count: two samples, then the missing end-of-archive block counted
        rows = list(raw_rows(f, shard))
    assert [r["kind"] for r in rows] == ["sample", "sample", "error", "eos"]
    assert rows[2]["reason"] == "truncated_shard"
    rows = []
    with pytest.raises(IncompleteShard, match=r"train-000000\.tar: 2 samples read .* but _info.json says 3") as err:
        rows.extend(read_as_the_datasource_does(shard))
    assert "end-of-archive block" in str(err.value) and "not committed" in str(err.value)
    assert rows == [], "the check runs before the end-of-shard row, so nothing downstream sees the shard complete"


def test_a_shard_whose_samples_match_its_info_json_count_ends_with_its_eos_row(tmp_path):
    rows = read_as_the_datasource_does(three_sample_shard(tmp_path, claimed=3))
    assert [r["kind"] for r in rows] == ["sample"] * 3 + ["eos"] and rows[-1]["count"] == 3


def test_a_shard_holding_more_samples_than_its_info_json_says_is_refused_too(tmp_path):
    from zoomvit.data.ingest import IncompleteShard

    with pytest.raises(IncompleteShard, match=r"3 samples read through to the end of the tar, but _info.json says 2"):
        read_as_the_datasource_does(three_sample_shard(tmp_path, claimed=2))


def test_counted_skips_are_samples_read_but_the_marker_of_a_tar_cut_mid_member_is_not(tmp_path):
    from zoomvit.data.ingest import IncompleteShard

    shard = tmp_path / "train-000000.tar"
    members = [("a.png", image_bytes("PNG")), ("a.cls", b"1"), ("a.png", image_bytes("PNG")), ("a.cls", b"1")]
    members += [("b.png", b"not an image"), ("b.cls", b"x")]  # a duplicate key, then a sample that will not decode
    write_tar(shard, members)
    info = {"splits": {"train": {"filenames": [shard.name], "shard_lengths": [3]}}}
    (tmp_path / "_info.json").write_text(json.dumps(info))
    rows = read_as_the_datasource_does(str(shard))  # three samples read, one a counted skip: complete
    assert [(r["kind"], r["reason"]) for r in rows] == [
        ("sample", None),
        ("error", "duplicate_key"),
        ("sample", None),
        ("eos", None),
    ]
    cut = tmp_path / "cut"
    cut.mkdir()
    whole = Path(three_sample_shard(cut, claimed=3))
    with tarfile.open(whole) as tar:
        inside = tar.getmember("s1.png").offset_data + 10
    whole.write_bytes(whole.read_bytes()[:inside])  # the tar ends inside s1.png's data
    cut_short = r"1 samples read .*\(it was cut short: it ends mid-member.*\), but _info.json says 3"
    with pytest.raises(IncompleteShard, match=cut_short):
        read_as_the_datasource_does(str(whole))


def test_per_shard_counts_are_read_from_timms_splits_and_from_a_shardlist(tmp_path):
    from zoomvit.data.shards import expected_samples, shard_lengths

    timm_style = {"splits": {"train": {"filenames": ["a-0.tar", "a-1.tar"], "shard_lengths": [5, 4], "num_samples": 9}}}
    assert shard_lengths(timm_style) == {"a-0.tar": 5, "a-1.tar": 4}
    shardlist = {
        "shardlist": [{"url": "https://host/x/b-0.tar", "num_samples": 7}, {"filename": "b-1.tar", "nsamples": 2}]
    }
    assert shard_lengths(shardlist) == {"b-0.tar": 7, "b-1.tar": 2}
    junk = {"splits": {"train": {"shard_lengths": [3]}}, "shardlist": [{"url": "c.tar", "num_samples": "7"}, 3]}
    assert shard_lengths(junk) == {} and shard_lengths([1, 2]) == {}, "no per-shard count: nothing is checked"
    (tmp_path / "_info.json").write_text(json.dumps(shardlist))
    assert expected_samples([str(tmp_path / "b-1.tar"), str(tmp_path / "b-9.tar")]) == {str(tmp_path / "b-1.tar"): 2}
    assert sample_count([str(tmp_path / "b-0.tar"), str(tmp_path / "b-1.tar")]) == 9


def test_an_unreadable_info_json_checks_no_counts_and_says_so(tmp_path, caplog):
    from zoomvit.data.shards import expected_samples

    (tmp_path / "_info.json").write_text("{not json")
    shards_log = logging.getLogger("zoomvit.data.shards")  # the zoomvit logger may not propagate (logs.configure)
    shards_log.addHandler(caplog.handler)
    try:
        assert expected_samples([str(tmp_path / "train-000000.tar")]) == {}
    finally:
        shards_log.removeHandler(caplog.handler)
    assert "_info.json is unreadable" in caplog.text
    assert expected_samples([str(tmp_path / "elsewhere" / "train-000000.tar")]) == {}, "no _info.json: no counts"
