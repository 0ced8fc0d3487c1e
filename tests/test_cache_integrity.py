"""Content hashes of committed outputs, without Ray: hashed once per process while a file is unchanged,
again after any rewrite; a relevance group whose bytes changed is recomputed alone by the job."""

import hashlib
import json
import logging
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from zoomvit.data.relevance_store import group_path, read_metadata
from zoomvit.integrity import _sha256, content_hash
from zoomvit.relevance.job import _commit, _committed, _Group, _skips_path

FINGERPRINT = "f" * 64


def test_the_content_hash_is_the_sha256_of_the_bytes(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"weights" * 1_000_000)  # several 4 MiB chunks
    assert content_hash(path) == "sha256:" + hashlib.sha256(b"weights" * 1_000_000).hexdigest()


def test_a_file_is_hashed_once_while_unchanged_and_again_after_a_rewrite_that_keeps_size_and_mtime(tmp_path):
    path = tmp_path / "evaluation.json"
    path.write_bytes(b'{"top1": 0.41}')
    _sha256.cache_clear()
    first = content_hash(path)
    assert content_hash(path) == first and _sha256.cache_info().misses == 1, "read once while unchanged"
    st = path.stat()
    path.write_bytes(b'{"top1": 0.91}')
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: only the ctime tells
    assert content_hash(path) != first and _sha256.cache_info().misses == 2


def _row(key: str, shard: str, index: int) -> dict:
    return {
        "key": key,
        "shard": shard,
        "index": index,
        "label": 1,
        "target": 1,
        "teacher_pred": 1,
        "teacher_prob": 0.5,
        "grid_h": 2,
        "grid_w": 2,
        "relevance": np.linspace(0, 1, 4, dtype=np.float32),
        "teacher_logits": np.zeros(10, np.float32),
    }


@pytest.fixture
def two_groups(tmp_path):
    """Two relevance groups committed by the job's own commit path."""
    groups = []
    for i in range(2):
        shard = f"/data/train-00000{i}.tar"
        g = _Group(split="train", index=i, shards=[shard])
        g.rows = [_row(f"s{i}_{k}", shard, k) for k in range(64)]
        _commit(g, tmp_path, {"fingerprint": FINGERPRINT})
        groups.append(_Group(split="train", index=i, shards=[shard]))  # as a rerun sees it: nothing received
    return tmp_path, groups


def _flip_a_byte_in_the_data_pages(path) -> None:
    """Same size, footer intact (a Parquet file ends with its footer, its length, then ``PAR1``)."""
    data = bytearray(path.read_bytes())
    footer_start = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    data[footer_start // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_groups_commit_record_carries_the_content_hash_of_its_parquet_file(two_groups):
    out, groups = two_groups
    for g in groups:
        record = json.loads(_skips_path(g, out).read_text())
        assert record["sha256"] == content_hash(group_path(out, g.split, g.index)) and record["num_ok"] == 64
        assert _committed(g, out, FINGERPRINT)


def test_a_group_whose_bytes_changed_is_recomputed_alone_with_a_line_naming_it(two_groups, caplog):
    out, (first, second) = two_groups
    damaged = group_path(out, "train", 1)
    _flip_a_byte_in_the_data_pages(damaged)
    read_metadata(damaged)  # still a readable Parquet file: only its content hash tells
    job_log = logging.getLogger("zoomvit.relevance.job")  # the zoomvit logger may not propagate (logs.configure)
    job_log.addHandler(caplog.handler)
    try:
        assert _committed(first, out, FINGERPRINT), "the intact group stays cached"
        assert not _committed(second, out, FINGERPRINT), "the changed group is recomputed"
    finally:
        job_log.removeHandler(caplog.handler)
    assert (
        "relevance train group 1 is damaged (ContentMismatch: train-group-00001.parquet does not match" in caplog.text
    )
    assert "group 0" not in caplog.text


def test_a_group_committed_before_hashes_were_recorded_is_trusted_when_readable(two_groups):
    out, (first, _) = two_groups
    skips = _skips_path(first, out)
    record = json.loads(skips.read_text())
    del record["sha256"]
    skips.write_text(json.dumps(record))
    assert _committed(first, out, FINGERPRINT)
    assert pq.read_table(group_path(out, "train", 0)).num_rows == 64
