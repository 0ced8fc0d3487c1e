"""The run planner: which stages a run needs, what it will do with each and why, from the config,
the shards and the cache alone (no Ray, no MLflow)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY

from zoomvit.config import load_config
from zoomvit.data.demo import generate_demo_dataset
from zoomvit.pipeline.plan import MANIFEST, plan_run, shards_of
from zoomvit.pipeline.stage_table import ORDER


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan-data")
    generate_demo_dataset(root, train=32, val=16, image_size=32, samples_per_shard=16)
    return root


@pytest.fixture
def setup(data_root, tmp_path):
    config = load_config(TINY, [f"data.root={data_root}", "data.demo=null", f"artifact_root={tmp_path / 'runs'}"])
    return config, shards_of(config), tmp_path / "runs"


def _cache(step, run_id="r0"):
    step.out_dir.mkdir(parents=True)
    (step.out_dir / "model.safetensors").write_bytes(b"weights")
    manifest = {
        "stage": step.name,
        "fingerprint": step.fingerprint,
        "run_id": run_id,
        "out_dir": str(step.out_dir),
        "files": {"weights": "model.safetensors"},
        "file_sizes": {"weights": 7},
    }
    (step.out_dir / MANIFEST).write_text(json.dumps(manifest))


def test_an_empty_cache_runs_every_stage_in_order(setup):
    plan = plan_run(*setup)
    assert [s.name for s in plan] == list(ORDER)
    assert {s.action for s in plan} == {"run"} and all(s.why == "not in the cache" for s in plan)
    assert len({s.fingerprint for s in plan}) == len(plan)


def test_cached_stages_are_hits_and_the_rest_run(setup):
    config, shards, root = setup
    first = plan_run(config, shards, root)
    for step in first[:3]:
        _cache(step)
    again = plan_run(config, shards, root)
    assert [s.action for s in again] == ["cached"] * 3 + ["run"] * (len(ORDER) - 3)
    assert again[0].manifest["run_id"] == "r0" and again[0].why == "from run r0"


def test_force_recomputes_a_cached_stage(setup):
    config, shards, root = setup
    for step in plan_run(config, shards, root):
        _cache(step)
    plan = {s.name: s for s in plan_run(config, shards, root, force=["zoomer"])}
    assert plan["zoomer"].action == "run" and plan["zoomer"].why == "forced"
    assert plan["teacher"].action == "cached" and plan["zoomvit"].action == "cached"


def test_only_runs_the_named_stage_on_its_cached_upstream(setup):
    config, shards, root = setup
    for step in plan_run(config, shards, root):
        _cache(step)
    plan = plan_run(config, shards, root, only=["zoomvit"])
    assert {s.name: s.action for s in plan} == {
        "teacher": "cached",
        "relevance": "cached",
        "zoomer": "cached",
        "zoomvit": "run",
    }


def test_only_with_an_uncached_upstream_names_the_missing_stage(setup):
    plan = {s.name: s for s in plan_run(*setup, only=["zoomer"])}
    assert plan["teacher"].action == "missing" and "--only zoomer" in plan["teacher"].why
    assert plan["zoomer"].action == "run"


def test_a_config_change_changes_the_fingerprint_of_that_stage_and_everything_downstream(setup, data_root):
    config, shards, root = setup
    before = {s.name: s.fingerprint for s in plan_run(config, shards, root)}
    changed = load_config(TINY, [f"data.root={data_root}", "data.demo=null", "zoomer.width=4"])
    after = {s.name: s.fingerprint for s in plan_run(changed, shards, root)}
    assert [n for n in ORDER if before[n] != after[n]] == ["zoomer", "zoomvit", "evaluate"]


def test_an_unknown_stage_is_a_user_error(setup):
    with pytest.raises(ValueError, match="unknown stage 'zoomr'"):
        plan_run(*setup, only=["zoomr"])


def test_dry_run_prints_the_plan_and_runs_nothing(data_root, tmp_path):
    sets = ["--set", f"data.root={data_root}", "--set", "data.demo=null", "--set", f"artifact_root={tmp_path / 'runs'}"]
    proc = subprocess.run(
        [sys.executable, "pipelines/full.py", "--config", TINY, *sets, "--dry-run"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert [line.split()[:2] for line in lines] == [[n, "run"] for n in ORDER]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_stage_added_to_the_table_is_planned_and_offered_by_the_cli_with_no_other_edit(setup, monkeypatch, capsys):
    from zoomvit.pipeline.commands import full_main
    from zoomvit.pipeline.stage_table import STAGES, StageDef

    report = StageDef(name="report", sections=("evaluate",), upstream=(("evaluate", "evaluation"),), run=lambda ctx: {})
    monkeypatch.setitem(STAGES, "report", report)
    plan = plan_run(*setup)
    assert [s.name for s in plan][-2:] == ["evaluate", "report"] and plan[-1].action == "run"
    assert [s.name for s in plan_run(*setup, only=["report"])] == [*ORDER, "report"]
    with pytest.raises(SystemExit):
        full_main(["--help"])
    assert "report" in capsys.readouterr().out


def test_the_zoomvit_command_runs_the_pipeline_with_the_scripts_options(data_root, tmp_path, capsys):
    from zoomvit.cli import main

    sets = ["--set", f"data.root={data_root}", "--set", "data.demo=null", "--set", f"artifact_root={tmp_path}"]
    assert main(["run", "--config", TINY, *sets, "--dry-run"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.strip().splitlines()] == list(ORDER)
    assert main(["stage", "zoomer", "--config", TINY, *sets, "--dry-run"]) == 2, "its upstream is not cached"
    assert "teacher    missing" in capsys.readouterr().out


@pytest.mark.parametrize(
    "harm, reason",
    [
        (lambda d: (d / "model.safetensors").unlink(), "is missing"),
        (lambda d: (d / "model.safetensors").write_bytes(b"w"), "has 1 bytes, 7 when committed"),
        (lambda d: (d / MANIFEST).write_text("{not json"), "unreadable"),
    ],
    ids=["file-missing", "file-truncated", "manifest-corrupt"],
)
def test_a_damaged_cache_entry_is_recomputed_not_trusted(setup, harm, reason):
    config, shards, root = setup
    for step in plan_run(config, shards, root):
        _cache(step)
    harm(plan_run(config, shards, root)[2].out_dir)  # the zoomer's output
    plan = {s.name: s for s in plan_run(config, shards, root)}
    assert plan["zoomer"].action == "run" and "damaged" in plan["zoomer"].why and reason in plan["zoomer"].why
    assert plan["relevance"].action == "cached" and plan["zoomvit"].action == "cached"
    only = {s.name: s for s in plan_run(config, shards, root, only=["zoomvit"])}
    assert only["zoomer"].action == "missing" and "damaged" in only["zoomer"].why


def test_resource_only_settings_never_change_a_fingerprint_and_result_settings_do(setup, data_root):
    config, shards, root = setup
    base = [f"data.root={data_root}", "data.demo=null"]

    def fingerprints(*overrides):
        return {s.name: s.fingerprint for s in plan_run(load_config(TINY, [*base, *overrides]), shards, root)}

    before = fingerprints()
    resources = [
        "relevance.concurrency=4",
        "relevance.actor_threads=1",
        "relevance.batch_size=7",
        "relevance.decode_in_actor=true",
        "zoomvit.train.max_failures=5",
        "teacher.train.cpus_per_worker=2",
        "relevance.resources={cpu_ingest: 1}",
        "zoomvit.train.resources={'accelerator_type:H100': 0.01}",
    ]
    assert fingerprints(*resources) == before
    changed = fingerprints("relevance.method=rollout")
    assert [n for n in ORDER if changed[n] != before[n]] == ["relevance", "zoomer", "zoomvit", "evaluate"]
    assert fingerprints("teacher.train.lr=0.01")["teacher"] != before["teacher"]


def test_a_code_change_changes_every_fingerprint(setup, monkeypatch):
    import zoomvit.pipeline.plan as plan

    config, shards, root = setup
    before = {s.name: s.fingerprint for s in plan_run(config, shards, root)}
    assert len(plan.code_digest()) == 64
    monkeypatch.setattr(plan, "code_digest", lambda: "0" * 64)
    after = {s.name: s.fingerprint for s in plan_run(config, shards, root)}
    assert all(after[n] != before[n] for n in before)


def test_a_checkpoint_is_fingerprinted_by_its_content_not_its_name(setup, data_root, tmp_path):
    config, shards, root = setup
    weights = tmp_path / "teacher.safetensors"
    weights.write_bytes(b"weights v1")
    copy = tmp_path / "renamed.safetensors"
    copy.write_bytes(b"weights v1")

    def teacher_fingerprint(path):
        overrides = [f"data.root={data_root}", "data.demo=null", f"teacher.checkpoint={path}"]
        return plan_run(load_config(TINY, overrides), shards, root)[0].fingerprint

    first = teacher_fingerprint(weights)
    assert teacher_fingerprint(copy) == first
    weights.write_bytes(b"weights v2")
    assert teacher_fingerprint(weights) != first


def test_one_stage_script_serves_every_stage_and_no_script_shadows_the_package(data_root, tmp_path):
    scripts = sorted(p.stem for p in (REPO / "pipelines").glob("*.py"))
    assert "zoomvit" not in scripts and scripts == ["full", "relevance", "stage"]
    usage = subprocess.run([sys.executable, "pipelines/stage.py"], cwd=REPO, capture_output=True, text=True)
    assert usage.returncode == 2 and all(name in usage.stderr for name in ORDER)
    sets = ["--set", f"data.root={data_root}", "--set", "data.demo=null", "--set", f"artifact_root={tmp_path / 'runs'}"]
    proc = subprocess.run(
        [sys.executable, "pipelines/stage.py", "zoomvit", "--config", TINY, *sets, "--dry-run"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]  # nothing upstream is cached: the plan says what is missing
    plan = [line.split()[:2] for line in proc.stdout.strip().splitlines()]
    assert plan == [["teacher", "missing"], ["relevance", "missing"], ["zoomer", "missing"], ["zoomvit", "run"]]


def test_defaults_outside_a_ray_job_copy_are_the_working_directory_and_inside_it_zoomvit_home(tmp_path, monkeypatch):
    from zoomvit.pipeline.cache import artifact_root
    from zoomvit.pipeline.runner import lasting_paths
    from zoomvit.tracking.runs import resolve_tracking_uri

    for var in ("MLFLOW_TRACKING_URI", "ZOOMVIT_ARTIFACT_ROOT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ZOOMVIT_HOME", str(tmp_path / "home"))
    config = load_config(TINY)
    plain = tmp_path / "checkout"
    plain.mkdir()
    monkeypatch.chdir(plain)
    assert artifact_root(config) == plain / "runs" and resolve_tracking_uri(None) == f"sqlite:///{plain}/mlflow.db"
    assert lasting_paths(config) is config

    job_copy = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    job_copy.mkdir(parents=True)
    monkeypatch.chdir(job_copy)
    home = tmp_path / "home"
    assert artifact_root(config) == home / "runs" and resolve_tracking_uri(None) == f"sqlite:///{home}/mlflow.db"
    assert lasting_paths(config).data.root == str(home / "demo_data" / "tiny")
    assert resolve_tracking_uri("sqlite:///runs/mlflow.db") == f"sqlite:///{home}/runs/mlflow.db", "not in the copy"
    assert resolve_tracking_uri(f"sqlite:///{tmp_path}/m.db") == f"sqlite:///{tmp_path}/m.db"
    assert resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert artifact_root(load_config(TINY, [f"artifact_root={tmp_path / 'mine'}"])) == tmp_path / "mine"


def test_a_file_url_artifact_root_is_that_local_directory(tmp_path):
    from zoomvit.pipeline.cache import artifact_bucket, artifact_root

    config = load_config(TINY, [f"artifact_root=file://{tmp_path}"])
    assert artifact_root(config) == tmp_path and artifact_bucket(config) is None


def _cache_as_committed(step, files: dict[str, bytes], listed: dict[str, str], run_id="r0"):
    """A cache entry as a stage's commit writes it today: its files, and a manifest recording each
    listed output's size and content hash (``output_records``, what the runner calls at commit)."""
    from zoomvit.pipeline.plan import output_records

    step.out_dir.mkdir(parents=True)
    for rel, data in files.items():
        (step.out_dir / rel).write_bytes(data)
    sizes, hashes = output_records({key: step.out_dir / rel for key, rel in listed.items()})
    manifest = {
        "stage": step.name,
        "fingerprint": step.fingerprint,
        "run_id": run_id,
        "out_dir": str(step.out_dir),
        "files": listed,
        "file_sizes": sizes,
        "file_hashes": hashes,
    }
    (step.out_dir / MANIFEST).write_text(json.dumps(manifest))


def _commit_every_stage(config, shards, root):
    for step in plan_run(config, shards, root):
        if step.name == "relevance":  # a directory output: the maps folder, hashed per file inside
            groups = {f"train-group-0000{i}.parquet": bytes(range(200)) * (i + 1) for i in range(2)}
            _cache_as_committed(step, {**groups, "relevance.json": b"{}"}, {"maps": "."})
        elif step.name == "evaluate":
            _cache_as_committed(step, {"evaluation.json": b'{"top1": 0.41}'}, {"evaluation": "evaluation.json"})
        else:
            _cache_as_committed(step, {"model.safetensors": b"weights" * 100}, {"weights": "model.safetensors"})


def _flip_a_byte_keeping_size_and_mtime(path: Path, at: int = 5) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def test_entries_committed_with_content_hashes_are_hits_while_intact(setup):
    config, shards, root = setup
    _commit_every_stage(config, shards, root)
    assert {s.action for s in plan_run(config, shards, root)} == {"cached"}


@pytest.mark.parametrize(
    "stage, rel",
    [("zoomer", "model.safetensors"), ("evaluate", "evaluation.json"), ("relevance", "train-group-00001.parquet")],
    ids=["weights", "evaluation-json", "relevance-group-in-a-listed-directory"],
)
def test_a_byte_flipped_inside_a_cached_file_makes_the_stage_recompute_naming_the_file(setup, stage, rel):
    config, shards, root = setup
    _commit_every_stage(config, shards, root)
    damaged = next(s for s in plan_run(config, shards, root) if s.name == stage).out_dir / rel
    _flip_a_byte_keeping_size_and_mtime(damaged)
    plan = {s.name: s for s in plan_run(config, shards, root)}
    assert plan[stage].action == "run"
    assert plan[stage].why.startswith("the cached output is damaged (") and plan[stage].why.endswith(": recomputing")
    assert f"{damaged} does not match the content hash recorded when it was committed" in plan[stage].why
    untouched = [n for n in ORDER if n != stage]
    assert all(plan[n].action == "cached" for n in untouched), "only the damaged stage is recomputed"


def test_dry_run_shows_which_cached_file_changed_and_that_the_stage_will_recompute(setup, data_root, capsys):
    from zoomvit.cli import main

    config, shards, root = setup
    _commit_every_stage(config, shards, root)
    weights = next(s for s in plan_run(config, shards, root) if s.name == "zoomer").out_dir / "model.safetensors"
    _flip_a_byte_keeping_size_and_mtime(weights)
    sets = ["--set", f"data.root={data_root}", "--set", "data.demo=null", "--set", f"artifact_root={root}"]
    assert main(["run", "--config", TINY, *sets, "--dry-run"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.strip().splitlines()}
    assert lines["zoomer"].split()[1] == "run" and f"its weights file {weights} does not match" in lines["zoomer"]
    assert lines["teacher"].split()[1] == "cached"


def test_a_manifest_from_before_content_hashes_is_still_a_hit_checked_by_size(setup):
    config, shards, root = setup
    for step in plan_run(config, shards, root):
        _cache(step)  # file_sizes only, no file_hashes
    plan = plan_run(config, shards, root)
    assert {s.action for s in plan} == {"cached"}
    (plan[2].out_dir / "model.safetensors").write_bytes(b"weights!")  # its size is still checked
    assert plan_run(config, shards, root)[2].why.endswith("has 8 bytes, 7 when committed): recomputing")


@pytest.mark.parametrize("stage, rel", [("zoomer", "model.safetensors"), ("relevance", "train-group-00000.parquet")])
def test_a_renamed_or_missing_file_of_a_hashed_entry_is_still_detected(setup, stage, rel):
    config, shards, root = setup
    _commit_every_stage(config, shards, root)
    out_dir = next(s for s in plan_run(config, shards, root) if s.name == stage).out_dir
    (out_dir / rel).rename(out_dir / f"{rel}.old")
    step = next(s for s in plan_run(config, shards, root) if s.name == stage)
    assert step.action == "run" and f"file {out_dir / rel} is missing" in step.why


def test_a_truncated_file_is_caught_by_its_size_before_any_content_is_hashed(setup, monkeypatch):
    import zoomvit.integrity

    config, shards, root = setup
    _commit_every_stage(config, shards, root)
    relevance = next(s for s in plan_run(config, shards, root) if s.name == "relevance").out_dir
    group = relevance / "train-group-00001.parquet"
    group.write_bytes(group.read_bytes()[:100])
    zoomvit.integrity._sha256.cache_clear()
    hashed = []
    real = zoomvit.integrity.content_hash
    monkeypatch.setattr(zoomvit.integrity, "content_hash", lambda p: hashed.append(p) or real(p))
    step = next(s for s in plan_run(config, shards, root) if s.name == "relevance")
    assert f"{group} has 100 bytes, 400 when committed" in step.why
    assert all(Path(p).parent != relevance for p in hashed), "the relevance entry was judged by sizes alone"


def test_checkpoint_root_moves_each_training_stages_checkpoints_under_stage_and_fingerprint(tmp_path):
    from pyarrow.fs import PyFileSystem

    from zoomvit.pipeline.cache import checkpoint_location, remove_tree
    from zoomvit.train.trainer import checkpoint_storage

    fingerprint = "ab" * 32
    tiny = load_config(TINY)
    assert checkpoint_location(tiny, "teacher", fingerprint) is None, "by default inside the stage's output"
    remote = load_config(TINY, ["checkpoint_root=s3://bucket/zoomvit/ckpt/"])
    assert checkpoint_location(remote, "teacher", fingerprint) == f"s3://bucket/zoomvit/ckpt/teacher/{fingerprint}"
    local = load_config(TINY, [f"checkpoint_root=file://{tmp_path}/ckpt"])
    assert checkpoint_location(local, "zoomer", fingerprint) == f"{tmp_path}/ckpt/zoomer/{fingerprint}"

    path, fs = checkpoint_storage(f"s3://bucket/zoomvit/ckpt/teacher/{fingerprint}")
    assert path == f"bucket/zoomvit/ckpt/teacher/{fingerprint}" and isinstance(fs, PyFileSystem)
    assert type(fs.handler.fs).__name__ == "S3FileSystem", "s3fs, as the shards are read"
    assert checkpoint_storage(str(tmp_path / "ray")) == (str(tmp_path / "ray"), None)

    (tmp_path / "ckpt" / "zoomer" / fingerprint / "checkpoint_0").mkdir(parents=True)
    remove_tree(f"{tmp_path}/ckpt/zoomer/{fingerprint}")
    remove_tree(f"{tmp_path}/ckpt/zoomer/{fingerprint}")  # already gone: nothing to do
    assert list((tmp_path / "ckpt" / "zoomer").iterdir()) == []


def test_a_checkpoint_root_whose_filesystem_is_not_installed_names_the_extra(without_gcsfs):
    from zoomvit.errors import UserError
    from zoomvit.train.trainer import checkpoint_storage

    with pytest.raises(UserError, match=r"gs://.*pip install 'zoomvit\[cloud\]'"):
        checkpoint_storage("gs://bucket/ckpt/teacher/x")


def test_removing_a_stages_checkpoints_in_a_bucket_deletes_that_prefix_alone():
    """What --force does to a finished stage's checkpoints under an s3:// checkpoint_root (else Ray
    Train would restore the finished run), on a local S3 server, through the filesystem Ray Train writes with."""
    import boto3
    from servers import s3_server

    from zoomvit.pipeline.cache import remove_tree
    from zoomvit.train.trainer import checkpoint_storage

    with s3_server("ckpt"):
        for stage in ("teacher", "zoomer"):
            path, fs = checkpoint_storage(f"s3://ckpt/root/{stage}/{'ab' * 32}")
            with fs.open_output_stream(f"{path}/teacher/checkpoint_000001/model.pt") as out:
                out.write(b"weights")
        remove_tree(f"s3://ckpt/root/teacher/{'ab' * 32}")
        remove_tree(f"s3://ckpt/root/teacher/{'ab' * 32}")  # already gone: nothing to do
        keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="ckpt").get("Contents", [])]
        assert keys == [f"root/zoomer/{'ab' * 32}/teacher/checkpoint_000001/model.pt"]
