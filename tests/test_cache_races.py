"""The object-store cache under races, on a real S3-protocol server (moto, in-process): read leases that
another machine's commit honours, epochs that fence a holder that was taken over, a store that ignores
create-only puts refused, and the lost commit race forced deterministically through a proxy."""

import base64
import json
import multiprocessing
import os
import signal
import time
from contextlib import ExitStack
from pathlib import Path

import boto3
import pytest
import torch
from conftest import S3_BUCKET as BUCKET
from safetensors.torch import save_file
from servers import s3_proxy

from zoomvit.data.shards import filesystem
from zoomvit.errors import UserError
from zoomvit.pipeline.cache import bucket as bucket_module
from zoomvit.pipeline.cache import claims as claims_module
from zoomvit.pipeline.cache import store as store_module
from zoomvit.pipeline.cache.bucket import BucketCache
from zoomvit.pipeline.cache.claims import FencedOut
from zoomvit.pipeline.cache.committed import committed_output
from zoomvit.pipeline.cache.object_store import ObjectStoreCache
from zoomvit.pipeline.plan import PlannedStage, output_records


def _keys(prefix: str) -> list[str]:
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _key(url: str) -> str:
    return url.removeprefix(f"s3://{BUCKET}/")


def _staged(tmp_path: Path, run_id: str, value: float) -> Path:
    staged = tmp_path / run_id
    staged.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.full((4, 4), value)}, str(staged / "model.safetensors"))
    return staged


def _publish(cache, tmp_path, fp, run_id, value=1.0, replace=False) -> dict:
    staged = _staged(tmp_path, run_id, value)
    files = {"weights": "model.safetensors"}
    sizes, hashes = output_records({k: staged / rel for k, rel in files.items()})
    manifest = {"stage": "zoomer", "fingerprint": fp, "run_id": run_id, "out_dir": str(staged), "files": files,
                "file_sizes": sizes, "file_hashes": hashes, "metrics": {}}  # fmt: skip
    return cache.publish(staged, manifest, replace=replace)


def _read_on_another_machine(url: str, manifest: dict, home: Path, ttl: float, ready, stop) -> None:
    """A run on another machine (its own home) reading ``manifest``'s attempt under a lease until ``stop``."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # the parent's connections are not this process's
    home.mkdir(parents=True)
    os.chdir(home)
    claims_module.LEASE_TTL_S = ttl
    with BucketCache(url).lease(manifest, "pipeline run r on machine B"):
        ready.set()
        stop.wait(60)


def _reader_on_another_machine(cache, manifest: dict, home: Path, *, ttl: float):
    """A forked process holding a lease on ``manifest``'s attempt (once this returns) until its event is set."""
    fork = multiprocessing.get_context("fork")
    ready, stop = fork.Event(), fork.Event()
    reader = fork.Process(target=_read_on_another_machine, args=(cache.url, manifest, home, ttl, ready, stop))
    reader.start()
    assert ready.wait(30)
    return reader, stop


def test_a_reader_on_another_machine_keeps_a_superseded_attempt_until_its_lease_ends(
    cache, tmp_path, monkeypatch, caplog
):
    fp = "1" * 64
    entry = _key(cache.entry("zoomer", fp))
    first = _publish(cache, tmp_path, fp, "run-a")
    reader, stop = _reader_on_another_machine(cache, first, tmp_path / "b", ttl=120.0)
    monkeypatch.setattr(bucket_module, "GRACE_S", -1.0)  # only the lease keeps it
    with caplog.at_level("WARNING"):
        _publish(cache, tmp_path, fp, "run-b", value=2.0, replace=True)  # --force on this machine
    assert f"{entry}/attempts/run-a/model.safetensors" in _keys(entry), "machine B still reads run-a"
    assert "has 1 live reader(s) (pipeline run r on machine B)" in caplog.text, "--force names its live readers"
    recorded = json.loads(filesystem(cache.url).cat_file(f"{cache.entry('zoomer', fp)}/superseded/run-a.json"))
    assert recorded["by"] == "run-b" and abs(recorded["at"] - time.time()) < 60, "supersession records when"
    stop.set()
    reader.join(30)
    assert reader.exitcode == 0
    _publish(cache, tmp_path, fp, "run-c", value=3.0, replace=True)
    assert not [k for k in _keys(entry) if "/run-a/" in k or "/run-b/" in k], "no live lease: both collected"


def test_a_lease_its_reader_stopped_renewing_expires(cache, tmp_path, monkeypatch):
    fp = "2" * 64
    entry = _key(cache.entry("zoomer", fp))
    first = _publish(cache, tmp_path, fp, "run-a")
    reader, _ = _reader_on_another_machine(cache, first, tmp_path / "b", ttl=2.0)
    os.kill(reader.pid, signal.SIGKILL)  # the reader's machine is lost: its lease is never released
    reader.join(10)
    monkeypatch.setattr(bucket_module, "GRACE_S", -1.0)
    monkeypatch.setattr(claims_module, "LEASE_TTL_S", 2.0)
    _publish(cache, tmp_path, fp, "run-b", value=2.0, replace=True)
    assert f"{entry}/attempts/run-a/model.safetensors" in _keys(entry), "the lease is still within its TTL"
    time.sleep(3.5)
    _publish(cache, tmp_path, fp, "run-c", value=3.0, replace=True)
    assert not [k for k in _keys(entry) if "/run-a/" in k], "an expired lease protects nothing"


def _step(fp: str, out_dir: Path) -> PlannedStage:
    return PlannedStage("relevance", fp, out_dir, "run", "not in the cache", None)


def test_a_stalled_holder_that_was_taken_over_fails_its_next_write_and_leaves_the_new_output_alone(
    cache, tmp_path, monkeypatch
):
    monkeypatch.setattr(claims_module, "CLAIM_TTL_S", 1.0)
    fp = "3" * 64
    store_a = ObjectStoreCache(tmp_path / "a", None, cache)
    store_b = ObjectStoreCache(tmp_path / "b", None, cache)
    with ExitStack() as holds_a, ExitStack() as holds_b:
        _, writer_a = store_a.acquire(_step(fp, tmp_path / "a" / "out"), forced=False, holder="A", holds=holds_a)
        writer_a.claim._stop.set()  # A stalls: its claim is no longer renewed
        io_a = writer_a.begin("run-a", recompute=False, repairs_in_place=True, parts="*.txt")
        assert io_a.checkpoints.location.endswith("/ray/00000001"), "epoch 1 checkpoints under its own prefix"
        ckpt = f"{io_a.checkpoints.location}/zoomer/checkpoint_0/model.pt"
        filesystem(cache.url).pipe_file(ckpt, b"epoch-1 weights")
        (writer_a.out_dir / "a-group-0.txt").write_text("part of A")
        io_a.on_part([writer_a.out_dir / "a-group-0.txt"])
        time.sleep(2.5)  # past the TTL, at the store's one-second clock

        _, writer_b = store_b.acquire(_step(fp, tmp_path / "b" / "out"), forced=False, holder="B", holds=holds_b)
        assert writer_b.claim.epoch == 2, "B took over A's expired claim: the next epoch"
        io_b = writer_b.begin("run-b", recompute=False, repairs_in_place=True, parts="*.txt")
        assert io_b.checkpoints.location.endswith("/ray/00000002")
        copied = f"{io_b.checkpoints.location}/zoomer/checkpoint_0/model.pt"
        assert filesystem(cache.url).cat_file(copied) == b"epoch-1 weights", "B resumes from a copy of epoch 1"
        assert (writer_b.out_dir / "a-group-0.txt").read_text() == "part of A", "and from A's uploaded part"

        # A wakes up: every write that would outlive it is refused, and its late checkpoint stays in epoch 1
        with pytest.raises(FencedOut, match="taken over by epoch 2"):
            io_a.checkpoints.fence()
        with pytest.raises(FencedOut):
            io_a.on_part([writer_a.out_dir / "a-group-0.txt"])
        filesystem(cache.url).pipe_file(ckpt, b"late epoch-1 weights")
        assert filesystem(cache.url).cat_file(copied) == b"epoch-1 weights"

        (writer_b.out_dir / "b-group-1.txt").write_text("part of B")
        committed = writer_b.commit(_manifest_of(writer_b.out_dir, fp, "run-b"))
        (writer_a.out_dir / "b-group-1.txt").write_text("A's late copy")
        with pytest.raises(FencedOut):
            writer_a.commit(_manifest_of(writer_a.out_dir, fp, "run-a"))
    assert committed_output(cache.entry("relevance", fp))[0] == committed and committed["run_id"] == "run-b"


def _manifest_of(out_dir: Path, fp: str, run_id: str) -> dict:
    files = {"maps": "."}
    sizes, hashes = output_records({"maps": out_dir})
    return {"stage": "relevance", "fingerprint": fp, "run_id": run_id, "out_dir": str(out_dir), "files": files,
            "file_sizes": sizes, "file_hashes": hashes, "metrics": {}}  # fmt: skip


def test_a_store_that_ignores_create_only_puts_is_refused_naming_the_shared_filesystem_instead(cache, s3, monkeypatch):
    monkeypatch.setattr(store_module, "_honoured", {})
    with s3_proxy(s3, ignore_create_only=True):
        with pytest.raises(UserError, match="does not honour create-only puts.*artifact_root to a path on a shared"):
            cache.claim("zoomer", "4" * 64, "driver A", committed=None)
    monkeypatch.setattr(store_module, "_honoured", {})
    _, claim = cache.claim("zoomer", "4" * 64, "driver A", committed=None)  # the store itself honours them
    assert claim is not None


def test_a_commit_that_loses_the_race_to_a_put_landing_first_adopts_the_winner_and_deletes_its_upload(
    cache, tmp_path, s3
):
    fp = "5" * 64
    entry = cache.entry("zoomer", fp)
    winner = _publish(cache, tmp_path, fp, "run-z")
    body = filesystem(cache.url).cat_file(f"{entry}/manifest.json")
    filesystem(cache.url).rm(f"{entry}/manifest.json")  # run-z's upload is there; its manifest lands in the race
    with s3_proxy(s3, race=(f"{_key(entry)}/manifest.json", body)):
        standing = _publish(cache, tmp_path, fp, "run-a", value=2.0)
    assert standing == winner and committed_output(entry)[0] == winner
    assert not [k for k in _keys(_key(entry)) if "/run-a/" in k], "the loser deleted its own upload"


def test_a_hit_compares_each_objects_recorded_sha256_with_the_checksum_the_store_keeps(cache, tmp_path):
    fp = "6" * 64
    entry = cache.entry("zoomer", fp)
    committed = _publish(cache, tmp_path, fp, "run-a")
    weights = f"{committed['out_dir']}/model.safetensors"
    head = boto3.client("s3").head_object(Bucket=BUCKET, Key=_key(weights), ChecksumMode="ENABLED")
    assert base64.b64decode(head["ChecksumSHA256"]).hex() == committed["file_hashes"]["weights"].removeprefix("sha256:")
    assert committed_output(entry) == (committed, None)

    other = tmp_path / "other.safetensors"
    original = (tmp_path / "run-a" / "model.safetensors").read_bytes()
    other.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # same size, other bytes
    store_module.upload_file(str(other), weights)
    forged = {
        **committed,
        "object_etags": store_module.etags(committed, store_module.list_objects(committed["out_dir"])),
    }
    filesystem(cache.url).pipe_file(f"{entry}/manifest.json", json.dumps(forged).encode())
    manifest, why = committed_output(entry)
    assert manifest is None and "holds other bytes than were committed" in why, "the listing agrees with itself"
