"""The stage cache in object storage (``artifact_root: s3://...``): commits by a conditional put of the
manifest naming the attempt's own prefix, hits checked from one listing, damage found without reading
content, a lost commit race, a forced replacement, a resume from parts of an earlier attempt, and the
stage outputs read straight from the bucket. On an in-process S3 server (moto), no mock of S3."""

import contextlib
import json
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import boto3
import numpy as np
import pytest
import torch
from conftest import S3_BUCKET as BUCKET
from conftest import TINY
from safetensors.torch import save_file

from zoomvit.config import load_config
from zoomvit.data.relevance_store import GROUP_FILES, read_maps, write_group
from zoomvit.pipeline.cache import bucket as bucket_module
from zoomvit.pipeline.cache import claims as claims_module
from zoomvit.pipeline.cache.bucket import BucketCache, staging_root
from zoomvit.pipeline.cache.committed import committed_output
from zoomvit.pipeline.cache.object_store import ObjectStoreCache
from zoomvit.pipeline.plan import output_records, plan_run, shards_of
from zoomvit.relevance.job import skips_path


def _keys(prefix: str = "") -> list[str]:
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _key(url: str) -> str:
    return url.removeprefix(f"s3://{BUCKET}/")


def _stage_weights(staged: Path, value: float = 1.0) -> None:
    staged.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.full((4, 4), value)}, str(staged / "model.safetensors"))


def _stage_groups(staged: Path, fingerprint: str) -> None:
    staged.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 3), ("val", 2)):
        rows = [
            {"key": f"{split}{i}", "shard": f"{split}.tar", "label": i, "target": i, "teacher_pred": i,
             "teacher_prob": 0.5, "grid_h": 2, "grid_w": 2, "relevance": np.full(4, i, np.float32),
             "teacher_logits": np.zeros(3, np.float32)}
            for i in range(n)
        ]  # fmt: skip
        path = staged / f"{split}-group-00000.parquet"
        write_group(rows, path, {"fingerprint": fingerprint, "split": split})
        skips_path(path).write_text(json.dumps({"counts": {}}))


def _manifest(stage: str, fingerprint: str, staged: Path, files: dict[str, str], run_id: str) -> dict:
    sizes, hashes = output_records({key: staged / rel for key, rel in files.items()})
    return {"stage": stage, "fingerprint": fingerprint, "run_id": run_id, "out_dir": str(staged), "files": files,
            "file_sizes": sizes, "file_hashes": hashes, "metrics": {}}  # fmt: skip


@contextlib.contextmanager
def _timeout(seconds: float):
    """TimeoutError in this (the main) thread when the block outlasts ``seconds``."""

    def expire(*_):
        raise TimeoutError

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _publish(cache, tmp_path, stage="zoomer", fp="f" * 64, run_id="run-a", value=1.0, replace=False) -> dict:
    staged = tmp_path / run_id
    if stage == "relevance":
        _stage_groups(staged, fp)
        files = {"maps": "."}
    else:
        _stage_weights(staged, value)
        files = {"weights": "model.safetensors"}
    return cache.publish(staged, _manifest(stage, fp, staged, files, run_id), replace=replace)


def test_a_bucket_artifact_root_names_the_cache_of_record_and_stages_on_this_machine(s3, tmp_path, monkeypatch):
    from zoomvit.pipeline.cache import artifact_bucket, artifact_root, checkpoint_location, open_cache

    monkeypatch.chdir(tmp_path)  # outside a Ray job's working-dir copy: the working directory
    config = load_config(TINY, [f"artifact_root=s3://{BUCKET}/zoomvit/"])
    assert artifact_bucket(config) == BucketCache(f"s3://{BUCKET}/zoomvit")
    assert artifact_root(config) == staging_root(f"s3://{BUCKET}/zoomvit") == tmp_path / "staging/s3/cache/zoomvit"
    fp = "ab" * 32
    cache = open_cache(config)
    assert (
        isinstance(cache, ObjectStoreCache)
        and cache.location("teacher", fp) == f"s3://{BUCKET}/zoomvit/teacher/{fp[:16]}"
    )
    moved = load_config(TINY, [f"artifact_root=s3://{BUCKET}/zoomvit", "checkpoint_root=s3://other/ckpt"])
    assert checkpoint_location(moved, "teacher", fp) == f"s3://other/ckpt/teacher/{fp}"


def test_a_bucket_artifact_root_whose_filesystem_is_not_installed_names_the_extra(without_gcsfs):
    from zoomvit.errors import UserError
    from zoomvit.pipeline.cache import artifact_root

    with pytest.raises(UserError, match=r"gs://.*pip install 'zoomvit\[cloud\]'"):
        artifact_root(load_config(TINY, ["artifact_root=gs://bucket/zoomvit"]))


def test_a_published_output_is_an_intact_hit_read_straight_from_the_bucket(cache, tmp_path):
    from zoomvit.models.loading import load_state_dict_file

    fp = "1" * 64
    weights = _publish(cache, tmp_path, "zoomer", fp, "run-a", value=3.0)
    maps = _publish(cache, tmp_path, "relevance", fp, "run-b")
    entry = cache.entry("zoomer", fp)
    assert weights["out_dir"] == f"{entry}/attempts/run-a"
    assert committed_output(entry) == (weights, None)
    assert _keys(_key(entry)) == [f"{_key(entry)}/attempts/run-a/model.safetensors", f"{_key(entry)}/manifest.json"]
    assert torch.equal(load_state_dict_file(f"{weights['out_dir']}/model.safetensors")["w"], torch.full((4, 4), 3.0))
    table = read_maps(maps["out_dir"], "train")
    assert table.num_rows == 3 and read_maps(maps["out_dir"]).num_rows == 5
    assert set(maps["object_etags"]["maps"]) == set(maps["file_sizes"]["maps"]) == {
        "train-group-00000.parquet", "train-group-00000.skips.json", "val-group-00000.parquet",
        "val-group-00000.skips.json"}  # fmt: skip


def test_a_missing_weights_file_in_the_bucket_is_a_clear_error_naming_it(cache):
    from zoomvit.models.loading import load_state_dict_file

    with pytest.raises(ValueError, match="does not exist"):
        load_state_dict_file(f"{cache.url}/nowhere/model.safetensors")


@pytest.mark.parametrize("harm, reason", [("delete", "is missing"), ("rewrite", "was rewritten since it was committed"),
                                          ("truncate", "bytes, ")])  # fmt: skip
def test_a_deleted_rewritten_or_cut_object_makes_the_entry_damaged_without_reading_it(cache, tmp_path, harm, reason):
    fp = "2" * 64
    manifest = _publish(cache, tmp_path, "relevance", fp, "run-a")
    key = f"{_key(manifest['out_dir'])}/val-group-00000.parquet"
    s3 = boto3.client("s3")
    if harm == "delete":
        s3.delete_object(Bucket=BUCKET, Key=key)
    else:
        data = bytearray(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
        data[-20] ^= 0xFF  # inside the Parquet footer: same size, other content
        s3.put_object(Bucket=BUCKET, Key=key, Body=bytes(data if harm == "rewrite" else data[:100]))
    found, why = committed_output(cache.entry("relevance", fp))
    assert found is None and reason in why and "val-group-00000.parquet" in why


def test_of_two_runs_committing_one_output_the_later_adopts_the_first_and_deletes_its_own_upload(cache, tmp_path):
    fp = "3" * 64
    first = _publish(cache, tmp_path, "zoomer", fp, "run-a", value=1.0)
    second = _publish(cache, tmp_path, "zoomer", fp, "run-b", value=2.0)
    assert second == first and committed_output(cache.entry("zoomer", fp))[0]["run_id"] == "run-a"
    assert not [k for k in _keys(_key(cache.entry("zoomer", fp))) if "/run-b/" in k], "the loser's upload is gone"


def test_a_forced_commit_replaces_the_manifest_and_keeps_the_superseded_attempt_until_the_grace_ends(
    cache, tmp_path, monkeypatch
):
    fp = "4" * 64
    entry = _key(cache.entry("zoomer", fp))
    _publish(cache, tmp_path, "zoomer", fp, "run-a", value=1.0)
    forced = _publish(cache, tmp_path, "zoomer", fp, "run-b", value=2.0, replace=True)
    assert committed_output(cache.entry("zoomer", fp))[0] == forced
    assert f"{entry}/attempts/run-a/model.safetensors" in _keys(entry), "a run that planned with run-a still reads it"
    monkeypatch.setattr(bucket_module, "GRACE_S", -1.0)
    _publish(cache, tmp_path, "zoomer", fp, "run-c", value=3.0, replace=True)
    assert _keys(entry) == [f"{entry}/attempts/run-c/model.safetensors", f"{entry}/manifest.json"]


def test_parts_an_earlier_attempt_uploaded_seed_the_next_one_and_nothing_staged_is_overwritten(cache, tmp_path):
    fp = "5" * 64
    crashed = tmp_path / "crashed"
    _stage_groups(crashed, fp)
    train = sorted(crashed.glob("train-group-*"))
    cache.upload(crashed, train, cache.attempt("relevance", fp, "run-crashed"))  # uploaded as committed; no manifest
    assert committed_output(cache.entry("relevance", fp)) == (None, None), "parts alone are not a commit"
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / train[0].name).write_bytes(b"already here")
    assert cache.seed("relevance", fp, resumed, GROUP_FILES) == 1
    assert (resumed / train[0].name).read_bytes() == b"already here"
    assert (resumed / train[1].name).read_bytes() == train[1].read_bytes()
    assert cache.seed("relevance", "6" * 64, tmp_path / "other", GROUP_FILES) == 0


def test_the_plan_reads_the_bucket_every_stage_runs_then_every_stage_is_a_hit(cache, tmp_path, demo_data):
    data = demo_data()
    config = load_config(TINY, [f"data.root={data}", "data.demo=null", f"artifact_root={cache.url}"])
    shards, staging = shards_of(config), tmp_path / "staging"
    plan = plan_run(config, shards, ObjectStoreCache(staging, None, cache))
    assert [s.action for s in plan] == ["run"] * len(plan)
    for step in plan:
        _publish(cache, tmp_path / step.name, step.name, step.fingerprint, f"run-{step.name}")
    again = plan_run(config, shards, ObjectStoreCache(staging, None, cache))
    assert [(s.action, s.manifest["out_dir"]) for s in again] == [
        ("cached", cache.attempt(s.name, s.fingerprint, f"run-{s.name}")) for s in plan
    ]
    assert not staging.exists(), "planning reads the bucket; it stages nothing"
    forced = plan_run(config, shards, ObjectStoreCache(staging, None, cache), force=["zoomer"])
    assert [s.action for s in forced if s.name == "zoomer"] == ["run"]


@contextlib.contextmanager
def _two_stage_table(crash: list[bool], seen: dict, slow: float = 0.0):
    """The runner's stage table replaced by two quick stages (named after config sections, as the runner
    logs each stage's own): ``teacher`` writes weights; ``relevance`` reads them through the URL its
    context names and commits two parts one by one (it fails after the first while ``crash[0]``)."""
    import fsspec

    from zoomvit.pipeline import stage_table

    def make(ctx):
        time.sleep(slow)
        (ctx.out_dir / "model.bin").write_bytes(b"weights of " + ctx.fingerprint[:8].encode())
        return {"files": {"weights": "model.bin"}, "metrics": {}}

    def parts(ctx):
        source = stage_table._upstream_file(ctx, "teacher", "weights")
        with fsspec.open(source, "rb") as f:
            seen["upstream"], seen["source"] = f.read(), source
        seen["reused"] = 0
        for name in ("a-group-0.txt", "b-group-1.txt"):
            path = ctx.out_dir / name
            if path.exists():
                seen["reused"] += 1
                continue
            path.write_bytes(name.encode() * 10)
            ctx.on_part([path])
            if crash[0]:
                raise RuntimeError("killed after the first part")
        (ctx.out_dir / "relevance.json").write_text("{}")  # the job's manifest, which the runner logs
        return {"files": {"maps": "."}, "metrics": {}}

    quick = {
        "teacher": stage_table.StageDef(name="teacher", sections=("data",), upstream=(), run=make),
        "relevance": stage_table.StageDef(name="relevance", sections=("data",), upstream=(("teacher", "weights"),),
                                    run=parts, repairs_in_place=True, parts=GROUP_FILES),
    }  # fmt: skip
    saved = dict(stage_table.STAGES)  # restored in its order: the table's order is the run order
    stage_table.STAGES.clear()
    stage_table.STAGES.update(quick)
    try:
        yield
    finally:
        stage_table.STAGES.clear()
        stage_table.STAGES.update(saved)


def test_a_run_on_a_bucket_root_commits_there_resumes_parts_from_a_crashed_attempt_and_then_hits(
    cache, tmp_path, monkeypatch, demo_data
):
    data = demo_data()
    monkeypatch.chdir(tmp_path)
    config = load_config(TINY, [f"data.root={data}", "data.demo=null", f"artifact_root={cache.url}",
                                f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])  # fmt: skip
    crash, seen = [True], {}
    with _two_stage_table(crash, seen):
        _crash_resume_hit_force(config, cache, crash, seen)


def _crash_resume_hit_force(config, cache, crash, seen):
    from zoomvit.pipeline.runner import run_pipeline

    staging = staging_root(cache.url)

    with pytest.raises(RuntimeError, match="killed after the first part"):
        run_pipeline(config)
    teacher, _ = committed_output(f"{cache.url}/teacher/{_only_entry(cache, 'teacher')}")
    assert teacher is not None
    assert not list((staging / "teacher").glob("*/model.bin")), "a committed output's staging copy is removed"
    crashed = [k for k in _keys(_key(cache.url)) if "/relevance/" in k and "/claims/" not in k]
    assert [k.rsplit("/", 1)[-1] for k in crashed] == ["a-group-0.txt"], "the first part reached the bucket; no commit"
    assert seen["upstream"].startswith(b"weights of ") and seen["source"].startswith(f"{cache.url}/teacher/")

    crash[0] = False
    for part in (staging / "relevance").glob("*/a-group-0.txt"):
        part.unlink()  # as on another machine: only the bucket has the crashed attempt's part
    result = run_pipeline(config)
    assert result.computed == ["relevance"] and seen["reused"] == 1, "resumed from the part in the bucket"
    parts, _ = committed_output(result.stages["relevance"]["out_dir"].rsplit("/attempts/", 1)[0])
    assert parts["run_id"] == result.stages["relevance"]["run_id"] and sorted(parts["files"]) == ["maps"]
    assert sorted(parts["file_sizes"]["maps"]) == ["a-group-0.txt", "b-group-1.txt", "relevance.json"]
    assert any(k.endswith(f"lineage/{result.run_id}/lineage.json") for k in _keys(_key(cache.url)))

    again = run_pipeline(config)
    assert again.computed == [] and [s["cache"] for s in again.stages.values()] == ["hit", "hit"]
    assert again.stages["relevance"]["source_run"] == parts["run_id"]

    forced = run_pipeline(config, force=["teacher"])
    assert forced.computed == ["teacher"], "fingerprints come from the config: downstream stays a hit"
    replaced, _ = committed_output(forced.stages["teacher"]["out_dir"].rsplit("/attempts/", 1)[0])
    assert replaced["run_id"] == forced.stages["teacher"]["run_id"] != teacher["run_id"]


def _only_entry(cache, stage: str) -> str:
    (entry,) = {k.split("/")[2] for k in _keys(f"{_key(cache.url)}/{stage}/")}
    return entry


def test_a_second_driver_waits_for_a_live_claim_and_takes_the_output_once_it_is_committed(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(bucket_module, "POLL_S", 0.05)
    fp = "7" * 64
    none, first = cache.claim(
        "zoomer", fp, "driver A", committed=lambda: committed_output(cache.entry("zoomer", fp))[0]
    )
    assert none is None and first is not None
    waited: dict = {}
    second = threading.Thread(
        target=lambda: waited.update(
            result=cache.claim(
                "zoomer", fp, "driver B", committed=lambda: committed_output(cache.entry("zoomer", fp))[0]
            )
        )
    )
    with first:
        second.start()
        time.sleep(0.5)
        assert second.is_alive(), "B waits while A's claim is alive"
        first.check()
        committed = _publish(cache, tmp_path, "zoomer", fp, "run-a")
    second.join(timeout=30)
    assert waited["result"] == (committed, None), "B takes A's output; it computes nothing"


def test_a_driver_that_wins_a_claim_after_the_holder_committed_and_released_takes_the_output(cache, tmp_path):
    fp = "6" * 64
    _, first = cache.claim("zoomer", fp, "driver A", committed=None)
    looks = []

    def committed():  # B's first look comes before A commits; A then commits and releases before B claims
        looks.append(1)
        if len(looks) == 1:
            with first:
                _publish(cache, tmp_path, "zoomer", fp, "run-a")
            return None
        return committed_output(cache.entry("zoomer", fp))[0]

    manifest, claim = cache.claim("zoomer", fp, "driver B", committed=committed)
    assert claim is None and manifest["run_id"] == "run-a", "the manifest is read again after a claim is won"
    (number, state), *_ = sorted(claims_module.claims(f"{cache.entry('zoomer', fp)}/claims").items(), reverse=True)
    assert (
        number == 2
        and json.loads(
            bucket_module.filesystem(cache.url).cat_file(f"{cache.entry('zoomer', fp)}/claims/00000002.json")
        )["released"]
    ), "B's unneeded claim is released at once"


def test_a_retried_manifest_put_that_had_landed_keeps_its_own_committed_attempt(cache, tmp_path):
    fp = "5" * 64
    entry = _key(cache.entry("zoomer", fp))
    first = _publish(cache, tmp_path, "zoomer", fp, "run-a")
    weights = f"{entry}/attempts/run-a/model.safetensors"
    uploaded = boto3.client("s3").head_object(Bucket=BUCKET, Key=weights)["LastModified"]
    time.sleep(1.1)
    again = _publish(cache, tmp_path, "zoomer", fp, "run-a")  # the same put once more: the store answers 412
    assert again == first and committed_output(cache.entry("zoomer", fp))[0] == first
    now = boto3.client("s3").head_object(Bucket=BUCKET, Key=weights)["LastModified"]
    assert now == uploaded, "its own committed upload is neither deleted nor uploaded again"


def test_a_claim_names_the_machine_by_hostname_boot_id_and_a_token_of_its_home(cache, tmp_path, monkeypatch):
    fp = "a" * 64
    base = f"{cache.entry('zoomer', fp)}/claims"
    _, mine = cache.claim("zoomer", fp, "driver A", committed=None, held_lock="/x/a.lock")
    state = json.loads(bucket_module.filesystem(cache.url).cat_file(mine.path))
    assert {"host", "boot_id", "home_token", "pid"} <= set(state) and state["pid"] == os.getpid()
    (tmp_path / "other-container").mkdir()
    monkeypatch.chdir(tmp_path / "other-container")
    assert claims_module.host_identity()["home_token"] != state["home_token"], "another home: another machine"
    with pytest.raises(TimeoutError):  # same hostname and lock path, another home: that driver may be alive
        with _timeout(1.0):
            cache.claim("zoomer", fp, "driver B", committed=None, held_lock="/x/a.lock")
    assert max(claims_module.claims(base)) == 1


def test_a_claim_its_holder_stopped_renewing_expires_and_is_taken_over_and_the_old_holder_cannot_commit(
    cache, monkeypatch
):
    monkeypatch.setattr(claims_module, "CLAIM_TTL_S", 2.0)  # renewed every 0.5 s; the store's clock ticks in seconds
    fp = "8" * 64
    _, dead = cache.claim("zoomer", fp, "driver A", committed=None, held_lock="/x/a.lock")  # nothing renews it
    time.sleep(3.0)
    _, taker = cache.claim("zoomer", fp, "driver B", committed=None, held_lock="/x/b.lock")
    assert taker is not None and taker.path.endswith("/claims/00000002.json")
    with pytest.raises(OSError, match="was taken over by epoch 2"):
        dead.check()
    with taker:
        taker.check()
        with pytest.raises(TimeoutError):  # another lock on this host: another driver's claim, alive
            with _timeout(1.0):
                cache.claim("zoomer", fp, "driver D", committed=None, held_lock="/elsewhere/d.lock")
        _, here = cache.claim("zoomer", fp, "driver B again", committed=None, held_lock=taker.lock)
        assert here.path.endswith("/claims/00000003.json"), (
            "a claim from this host under the lock this driver now holds exclusively is a dead driver's"
        )
    with here:  # released on exit
        pass
    _, after = cache.claim("zoomer", fp, "driver C", committed=None)
    assert after.path.endswith("/claims/00000004.json"), "a released claim is free at once, expired or not"


def test_a_forced_recompute_waits_for_the_live_claim_not_for_a_committed_output(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(bucket_module, "POLL_S", 0.05)
    fp = "9" * 64
    _publish(cache, tmp_path, "zoomer", fp, "run-a")
    _, first = cache.claim("zoomer", fp, "driver A", committed=None)
    got: dict = {}
    forced = threading.Thread(target=lambda: got.update(result=cache.claim("zoomer", fp, "driver B", committed=None)))
    with first:
        forced.start()
        time.sleep(0.5)
        assert forced.is_alive()
    forced.join(timeout=30)
    manifest, claim = got["result"]
    assert manifest is None and claim.path.endswith("/claims/00000002.json")


def _drive(config, machine: Path, results) -> None:
    """One driver on its own "machine": its own working directory, so its own staging root and locks."""
    import s3fs

    from zoomvit.pipeline.runner import run_pipeline

    s3fs.S3FileSystem.clear_instance_cache()  # the parent's connections are not this process's
    machine.mkdir(parents=True)
    os.chdir(machine)
    result = run_pipeline(config)
    results.put({name: node["cache"] for name, node in result.stages.items()})


def test_two_drivers_on_two_machines_sharing_a_bucket_compute_each_stage_once(cache, tmp_path, monkeypatch, demo_data):
    from zoomvit.tracking.runs import Tracker

    monkeypatch.setattr(bucket_module, "POLL_S", 0.2)
    data = demo_data()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = load_config(TINY, [f"data.root={data}", "data.demo=null", f"artifact_root={cache.url}",
                                f"tracking.uri={uri}"])  # fmt: skip
    Tracker(uri, config.tracking.experiment)  # the tracking database exists before both drivers open it
    fork = multiprocessing.get_context("fork")
    results = fork.Queue()
    with _two_stage_table([False], {}, slow=2.0):
        drivers = [fork.Process(target=_drive, args=(config, tmp_path / m, results)) for m in ("a", "b")]
        for d in drivers:
            d.start()
        for d in drivers:
            d.join(timeout=120)
    assert [d.exitcode for d in drivers] == [0, 0]
    caches = [results.get(timeout=5) for _ in drivers]
    for stage in ("teacher", "relevance"):
        assert sorted(c[stage] for c in caches) == ["hit", "miss"], f"{stage} computed once: {caches}"
    entries = {k.split("/")[2] for k in _keys(f"{_key(cache.url)}/teacher/") if "/attempts/" in k}
    attempts = {k.split("/")[4] for k in _keys(f"{_key(cache.url)}/teacher/") if "/attempts/" in k}
    assert len(entries) == 1 and len(attempts) == 1, "one upload: the second driver waited, then took it"
