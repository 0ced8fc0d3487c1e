"""Fault injection on the data path, with real Ray: flaky storage, damaged cache entries
(hostile samples: tests/test_relevance_stage.py).

Each test names the fault in its title and asserts what the pipeline promises: nothing lost,
nothing committed from a shard that could not be read, every bad input counted under its reason.
docs/reliability.md lists every fault and the test that shows it.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import faultfs
import pyarrow.parquet as pq
import pytest

from zoomvit.config import DataConfig, RelevanceConfig, TeacherConfig
from zoomvit.data.demo import generate_demo_dataset
from zoomvit.data.ingest import IncompleteShard, ShardReadError, read_shards
from zoomvit.relevance.job import run_relevance_stage

pytestmark = pytest.mark.usefixtures("ray_local")
SIZE = 32


def flaky(tmp_path: Path, *, fail_at: int, always: bool = False):
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    markers = tmp_path / "markers"
    markers.mkdir(exist_ok=True)
    fs = faultfs.FlakyLocalFileSystem(str(markers), fail_at, always, skip_instance_cache=True)
    return PyFileSystem(FSSpecHandler(fs))


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    generate_demo_dataset(root, train=64, val=16, image_size=SIZE, samples_per_shard=32)
    return root


def keys_of(ds) -> list[tuple[str, str]]:
    rows = ds.take_all()
    return sorted((r["kind"], f"{Path(r['shard']).name}/{r['key']}") for r in rows)


def test_an_io_error_mid_shard_is_retried_and_no_sample_is_lost_or_repeated(demo, tmp_path):
    shards = sorted(str(p) for p in demo.glob("train-*.tar"))
    clean = keys_of(read_shards(shards))
    size = Path(shards[0]).stat().st_size
    ds = read_shards(shards, filesystem=flaky(tmp_path, fail_at=size // 2), retries=2, backoff_s=0)
    assert keys_of(ds) == clean
    assert [k for k, _ in clean].count("sample") == 64 and [k for k, _ in clean].count("eos") == 2
    assert sorted(p.name for p in (tmp_path / "markers").iterdir()) == ["train-000000.tar", "train-000001.tar"]


def test_a_shard_that_always_fails_fails_the_read_naming_the_shard(demo, tmp_path):
    shards = sorted(str(p) for p in demo.glob("train-*.tar"))
    ds = read_shards(shards[:1], filesystem=flaky(tmp_path, fail_at=4096, always=True), retries=1, backoff_s=0)
    with pytest.raises(Exception, match=r"train-000000\.tar: read failed after 2 attempt") as info:
        ds.take_all()
    assert "ShardReadError" in repr(info.value) or isinstance(info.value, ShardReadError)


def relevance(root: Path, out: Path, ckpt: str, splits=("train", "val"), **data_kw):
    return run_relevance_stage(
        data=DataConfig(root=str(root), image_size=SIZE, **data_kw),
        teacher=TeacherConfig(model="vit_test_patch8_32", checkpoint=ckpt),
        relevance=RelevanceConfig(batch_size=16, shards_per_group=1, splits=splits),
        out_dir=out,
    )


@pytest.fixture(scope="module")
def committed(demo, teacher_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("committed")
    manifest = relevance(demo, out, teacher_ckpt)
    assert manifest["stats"]["groups_computed"] == 3
    return out, manifest


@pytest.mark.slow  # three relevance reruns: the fast tier keeps the read-retry and hostile-input checks
@pytest.mark.parametrize("damage", ["truncated", "not_parquet", "skips_unreadable", "byte_flipped"])
def test_a_damaged_parquet_group_is_recomputed_alone(demo, teacher_ckpt, committed, tmp_path, damage, caplog):
    source, first = committed
    out = tmp_path / "out"
    shutil.copytree(source, out)
    group = out / "train-group-00001.parquet"
    before = pq.read_table(group)
    if damage == "truncated":
        group.write_bytes(group.read_bytes()[: group.stat().st_size // 2])
    elif damage == "not_parquet":
        group.write_bytes(b"\0" * 4096)
    elif damage == "byte_flipped":  # same size, still a readable Parquet file: only its content hash tells
        data = bytearray(group.read_bytes())
        data[(len(data) - 8 - int.from_bytes(data[-8:-4], "little")) // 2] ^= 0x01  # in the data, not the footer
        group.write_bytes(bytes(data))
    else:
        group.with_suffix(".skips.json").write_text("{not json")
    job_log = logging.getLogger("zoomvit.relevance.job")  # the zoomvit logger may not propagate (logs.configure)
    job_log.addHandler(caplog.handler)
    try:
        again = relevance(demo, out, teacher_ckpt)
    finally:
        job_log.removeHandler(caplog.handler)
    assert again["stats"]["groups_cached"] == 2 and again["stats"]["groups_computed"] == 1
    assert again["rows"] == first["rows"] == 80
    maps = ["relevance", "teacher_logits"]
    assert pq.read_table(group).drop(maps).equals(before.drop(maps))
    assert "train group 1 is damaged" in caplog.text


@pytest.mark.slow  # a relevance run on Ray
def test_a_shard_cut_at_a_member_boundary_fails_the_stage_naming_it_and_its_group_is_not_committed(
    demo, teacher_ckpt, tmp_path
):
    import tarfile

    root = tmp_path / "data"
    shutil.copytree(demo, root)
    cut = root / "train-000001.tar"
    with tarfile.open(cut) as tar:
        keys = list(dict.fromkeys(m.name.split(".", 1)[0] for m in tar.getmembers()))
        boundary = next(m.offset for m in tar.getmembers() if m.name.split(".", 1)[0] == keys[20])
    cut.write_bytes(cut.read_bytes()[:boundary])  # a valid tar of the first 20 samples
    with pytest.raises(Exception, match=r"train-000001\.tar: 20 samples read .* but _info.json says 32") as info:
        relevance(root, tmp_path / "out", teacher_ckpt, splits=("train",))
    assert "IncompleteShard" in repr(info.value) or isinstance(info.value, IncompleteShard)
    assert not (tmp_path / "out" / "train-group-00001.parquet").exists()
    assert not (tmp_path / "out" / "train-group-00001.skips.json").exists()
