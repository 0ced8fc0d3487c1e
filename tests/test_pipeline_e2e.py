"""The tiny pipeline end to end through `ray job submit` to a local Ray head, with MLflow lineage."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY_YAML
from mlflow.tracking import MlflowClient
from servers import mlflow_server, ray_head, shutdown_ray_local

pytestmark = [pytest.mark.slow, pytest.mark.own_ray]
STAGES = ["teacher", "relevance", "zoomer", "zoomvit", "baseline", "evaluate"]
# A recomputed zoomvit trained in the driver (num_workers=0: no Ray Train worker actors, a tiny fit in
# ~2 s instead of ~30 s) where the test is about the cache and the runs, not about distributed training, which the
# reference run covers.
IN_DRIVER = ["--set", "zoomvit.train.num_workers=0"]


@pytest.fixture(scope="module")
def head():
    """A local Ray head (`ray start --head`) with its own temp dir and ports, stopped afterwards by its
    own processes; this process's Ray (``ray_local``) is shut down first, leaving the cores to it."""
    shutdown_ray_local()
    with ray_head(num_cpus=2) as head:
        yield head


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """An MLflow tracking server (mlflow/serve.sh on 127.0.0.1) and ``$ZOOMVIT_HOME``: where a plain
    ``ray job submit`` puts the demo data and the artifact cache, which the direct runs name with ``--set``."""
    root = tmp_path_factory.mktemp("pipeline")
    home = root / "zoomvit_home"
    with mlflow_server(root / "mlflow_server") as uri:
        # as a user submits: --runtime-env-json "$(zoomvit runtime-env ...)", which adds the checkout's git commit
        env = ["--env", f"ZOOMVIT_HOME={home}", "--env", f"MLFLOW_TRACKING_URI={uri}"]
        printed = subprocess.run(
            [sys.executable, "-m", "zoomvit", "runtime-env", *env], cwd=REPO, stdout=subprocess.PIPE
        )
        assert printed.returncode == 0
        yield {
            "root": root,
            "home": home,
            "uri": uri,
            "runtime_env": printed.stdout.decode(),
            "sets": [
                "--set",
                f"data.root={home / 'demo_data' / 'tiny'}",
                "--set",
                f"artifact_root={home / 'runs'}",
                "--set",
                f"tracking.uri={uri}",
            ],
        }


def pipeline(head, workspace, *args: str, submit: bool = False) -> subprocess.CompletedProcess:
    """``submit``: the README's line, ``ray job submit --working-dir . --runtime-env-json "$(zoomvit runtime-env)"
    -- python pipelines/full.py --config ...`` (no artifact root, data root or tracking URI: the cluster's
    environment gives the tracking server and ``$ZOOMVIT_HOME``); else the driver run directly with ``--set``s."""
    env = dict(head["env"])
    if submit:
        command = ["ray", "job", "submit", "--address", head["dashboard"], "--working-dir", ".",
                   "--runtime-env-json", workspace["runtime_env"], "--",
                   "python", "pipelines/full.py", "--config", TINY_YAML, *args]  # fmt: skip
    else:
        command = [sys.executable, "pipelines/full.py", "--config", TINY_YAML, *workspace["sets"], *args]
        env["RAY_ADDRESS"] = head["gcs"]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def stage_runs(client: MlflowClient, parent_id: str) -> dict[str, object]:
    runs = client.search_runs(
        [client.get_run(parent_id).info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    return {r.data.tags["stage"]: r for r in runs}


def pipeline_runs(client: MlflowClient) -> list:
    exp = client.get_experiment_by_name("zoomvit")
    return client.search_runs(
        [exp.experiment_id],
        filter_string="tags.`zoomvit.run_type` = 'pipeline'",
        order_by=["attributes.start_time ASC"],
    )


@pytest.fixture(scope="module")
def first_run(head, workspace):
    proc = pipeline(head, workspace, submit=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "Job 'raysubmit_" in proc.stdout + proc.stderr and "succeeded" in proc.stdout + proc.stderr
    client = MlflowClient(tracking_uri=workspace["uri"])
    (parent,) = pipeline_runs(client)
    (workspace["root"] / "first_run_console.txt").write_text(proc.stdout + proc.stderr)
    return client, parent


def test_the_console_of_a_whole_run_is_short_and_says_what_each_stage_did(first_run, workspace):
    # about a third of these lines are `ray job submit`'s own client output
    console = (workspace["root"] / "first_run_console.txt").read_text().splitlines()
    assert len(console) <= 120, "\n".join(console)
    assert not any("Running Dataset" in line or "\x1b[A" in line for line in console), "progress bars leaked"
    for name in STAGES:
        assert any(line.startswith(f"[{name}] done in") for line in console), name


def test_ray_job_submit_runs_every_stage_with_one_nested_mlflow_run_each(first_run, workspace, tmp_path):
    client, parent = first_run
    assert parent.info.status == "FINISHED"
    assert parent.data.params["zoomvit.alpha"] == "0.5"
    assert {"git_commit", "config_hash", "cluster_resources"} <= set(parent.data.tags)
    # the working-dir copy has no .git: the commit is the submitting checkout's ("none" without git), via the job's env
    commit, tags = json.loads(workspace["runtime_env"])["env_vars"]["ZOOMVIT_GIT_COMMIT"], parent.data.tags
    assert (tags["git_commit"], tags.get("mlflow.source.git.commit", "none")) == (commit, commit) and (
        commit == "none" or tags["git_source"] == "submitter"
    ), tags
    runs = stage_runs(client, parent.info.run_id)
    assert sorted(runs) == sorted(STAGES)
    for run in runs.values():
        assert run.info.status == "FINISHED"
        assert run.data.tags["cache"] == "miss" and len(run.data.tags["fingerprint"]) == 64
    assert runs["zoomvit"].data.tags["upstream.zoomer"] == runs["zoomer"].info.run_id
    assert runs["zoomvit"].data.tags["upstream.teacher"] == runs["teacher"].info.run_id, "init_from_teacher"
    assert runs["relevance"].data.tags["upstream.teacher"] == runs["teacher"].info.run_id
    assert runs["zoomer"].data.metrics["val_pearson"] > 0
    assert {"val_top1", "val_tokens_per_img"} <= set(runs["zoomvit"].data.metrics)

    lineage = json.loads(Path(client.download_artifacts(parent.info.run_id, "lineage.json", str(tmp_path))).read_text())
    assert {name: node["run_id"] for name, node in lineage["stages"].items()} == {
        n: r.info.run_id for n, r in runs.items()
    }
    assert "lineage.png" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "zoom_layouts.png" in {a.path for a in client.list_artifacts(runs["evaluate"].info.run_id)}
    inputs = {d.dataset.name for d in client.get_run(runs["zoomer"].info.run_id).inputs.dataset_inputs}
    assert inputs == {"shards", "relevance_maps"}


def test_each_training_stage_lowers_its_loss_with_zero2_on_two_workers(first_run, workspace):
    client, parent = first_run
    runs = stage_runs(client, parent.info.run_id)
    for name in ("teacher", "zoomer", "zoomvit", "baseline"):
        manifest = json.loads((Path(runs[name].data.params["out_dir"]) / "manifest.json").read_text())
        losses = [h["train_loss"] for h in manifest["history"]]
        assert losses[-1] < losses[0], f"{name}: {losses}"
        history = client.get_metric_history(runs[name].info.run_id, "train_loss")
        assert len(history) == len(losses), "rank 0 alone logs one value per epoch"


def test_the_evaluate_stage_reports_intervals_and_zoom_controls_at_zoomvits_token_counts(first_run, workspace):
    client, parent = first_run
    out_dir = stage_runs(client, parent.info.run_id)["evaluate"].data.params["out_dir"]
    rows = {
        row["model"]: row
        for row in json.loads((Path(out_dir) / "evaluation.json").read_text())["rows"]
        if row["model"] != "zoomvit" or row["headline"]
    }
    controls = {"zoomvit_control_random", "zoomvit_control_centre", "zoomvit_oracle_label"}
    assert {"zoomvit", "baseline", "baseline_24px", "baseline_72px"} | controls <= set(rows)
    assert [rows[n]["tokens_per_img"] for n in ("baseline_24px", "baseline", "baseline_72px")] == [9, 16, 81]
    for name, row in rows.items():
        lo, hi = row["top1_ci95"]
        assert lo <= row["top1"] <= hi, name
        assert all(k + "_ci95" in row for k in row if k.startswith("top1_size_") and not k.endswith("_ci95")), name
        assert row["gflops_padded_per_img"] >= row["gflops_per_img"] - 1e-12, name
        assert row["gflops_executed_per_img"] in (row["gflops_padded_per_img"], row["gflops_per_img"]), name
    for name in controls:  # the same number of zoomed cells per image as the Zoomer chose
        assert rows[name]["tokens_per_img"] == pytest.approx(rows["zoomvit"]["tokens_per_img"]), name
        assert rows[name]["gflops_per_img"] < rows["zoomvit"]["gflops_per_img"], "a control pays no Zoomer"
    equal = json.loads((Path(out_dir) / "evaluation.json").read_text())["equal_gflops"]
    assert equal["family"] == ["baseline_24px", "baseline", "baseline_72px"]
    g_low, g_high = equal["all"]["baseline_gflops"]
    assert equal["all"]["zoomvit_gflops"] == pytest.approx(rows["zoomvit"]["gflops_executed_per_img"])
    assert g_low <= rows["zoomvit"]["gflops_executed_per_img"] <= g_high
    lo, hi = equal["all"]["delta_top1_ci95"]
    assert lo <= equal["all"]["delta_top1"] <= hi
    metrics = stage_runs(client, parent.info.run_id)["evaluate"].data.metrics
    assert metrics["zoomvit_minus_baseline_family"] == pytest.approx(equal["all"]["delta_top1"])
    headline = client.get_run(parent.info.run_id).data.metrics  # the runs table compares pipeline runs by these
    assert headline["zoomvit_minus_family"] == pytest.approx(equal["all"]["delta_top1"])
    assert headline["zoomvit_top1"] == pytest.approx(rows["zoomvit"]["top1"])
    assert {"teacher_top1", "baseline_24px_gflops", "baseline_72px_top1"} <= set(headline)
    assert {"evaluation.json", "frontier.png"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_trained_models_are_registry_versions_and_the_candidate_alias_points_at_the_evaluated_ones(first_run):
    client, parent = first_run
    runs = stage_runs(client, parent.info.run_id)
    for stage in ("zoomer", "zoomvit", "baseline"):
        (version,) = client.search_model_versions(f"name = 'zoomvit-{stage}' and run_id = '{runs[stage].info.run_id}'")
        model = client.get_logged_model(version.source.removeprefix("models:/"))
        assert model.source_run_id == runs[stage].info.run_id
    for stage in ("zoomvit", "baseline"):
        candidate = client.get_model_version_by_alias(f"zoomvit-{stage}", "candidate")
        assert candidate.run_id == runs[stage].info.run_id, "the alias moved to what evaluate scored"
        assert parent.data.tags[f"candidate.zoomvit-{stage}"] == str(candidate.version)


def test_training_runs_carry_system_metrics_and_the_evaluate_run_its_figures(first_run):
    client, parent = first_run
    runs = stage_runs(client, parent.info.run_id)
    for stage in ("teacher", "zoomer", "zoomvit", "baseline"):
        system = {k for k in runs[stage].data.metrics if k.startswith("system/")}
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system, stage
    figures = {"frontier.png", "top1_by_size.png", "zoom_layouts.png"}
    assert figures <= {a.path for a in client.list_artifacts(runs["evaluate"].info.run_id)}
    assert {"frontier.png", "top1_by_size.png"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_a_second_plain_ray_job_submit_finds_the_first_ones_cache_outside_its_working_dir_copy(
    first_run, head, workspace
):
    client, first = first_run
    proc = pipeline(head, workspace, submit=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    second = pipeline_runs(client)[-1]
    runs = stage_runs(client, second.info.run_id)
    assert {n: r.data.tags["cache"] for n, r in runs.items()} == dict.fromkeys(STAGES, "hit")
    originals = stage_runs(client, first.info.run_id)
    assert all(runs[n].data.tags["source_run"] == originals[n].info.run_id for n in STAGES)
    assert "start (cache miss" not in proc.stdout + proc.stderr
    home = workspace["home"]
    assert (home / "demo_data" / "tiny" / "_info.json").exists() and (home / "runs" / "teacher").is_dir()


def test_only_zoomvit_with_a_new_alpha_reuses_relevance_and_zoomer(first_run, head, workspace):
    client, first = first_run
    proc = pipeline(head, workspace, "--only", "zoomvit", "--set", "zoomvit.alpha=0.3", *IN_DRIVER)
    assert proc.returncode == 0, proc.stderr[-4000:]
    latest = pipeline_runs(client)[-1]
    runs = stage_runs(client, latest.info.run_id)
    originals = stage_runs(client, first.info.run_id)
    assert runs["zoomvit"].data.tags["cache"] == "miss"
    assert "evaluate" not in runs and "baseline" not in runs
    assert all(runs[n].data.tags["cache"] == "hit" for n in ("teacher", "relevance", "zoomer"))
    assert runs["zoomvit"].data.tags["upstream.zoomer"] == originals["zoomer"].info.run_id
    assert runs["zoomer"].data.tags["source_run"] == originals["zoomer"].info.run_id
    assert runs["relevance"].data.tags["source_run"] == originals["relevance"].info.run_id


SCREENSHOTS = Path(os.environ.get("ZOOMVIT_TEST_ARTIFACTS", REPO / "test-artifacts")) / "mlflow-ui"
TRAINING_VIEW = "workflowType=machine_learning"


def _page_text(browser, url: str, *, waits_for: list[str], shot: str, until: str | None = None) -> str:
    """``url`` in a fresh browser context, as a person opening the link would, once ``waits_for`` show."""
    page = browser.new_context(viewport={"width": 1600, "height": 1200}).new_page()
    page.goto(url)
    for text in waits_for:
        page.get_by_text(text, exact=True).first.wait_for(timeout=60_000)
    if until:
        page.wait_for_function(until, timeout=60_000)
    return _kept(page, shot)


def _kept(page, shot: str) -> str:
    """The page's screenshot kept for a person to look at, and its text; the page closed."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / shot), full_page=True)
    assert (SCREENSHOTS / shot).stat().st_size > 10_000, shot
    text = page.inner_text("body")
    page.context.close()
    return text


def _runs_table(browser, url: str, *, run_name: str, metrics: list[str], shot: str) -> str:
    """The experiment's runs table with ``metrics`` chosen in its Columns menu, as a person comparing
    pipeline runs would set it up (the table shows no metric until asked)."""
    page = browser.new_context(viewport={"width": 1600, "height": 1000}).new_page()
    page.goto(url)
    page.get_by_text(run_name, exact=True).first.wait_for(timeout=60_000)
    assistant = page.get_by_role("button", name="Close", exact=True)  # MLflow's assistant panel takes the width
    if assistant.count():
        assistant.last.click()
    page.get_by_text("Columns", exact=True).first.click()
    for name in ("Dataset", "Source", "Models", *metrics):  # the attributes off, to leave room for the metrics
        page.get_by_text(name, exact=True).last.click()
    page.keyboard.press("Escape")
    page.get_by_role("columnheader").filter(has_text=metrics[-1]).first.wait_for(timeout=30_000)
    return _kept(page, shot)


CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
NO_CHROMIUM = (
    "no Chromium that Playwright can launch: run `python -m playwright install chromium` (Playwright's own build, "
    "no root), or install the system's (Debian/Ubuntu: apt-get install chromium; Fedora: dnf install chromium)"
)


def launchable_chromium(playwright) -> dict | None:
    """The launch options of the first Chromium that starts: Playwright's own build, else a system one on
    PATH under a common name (Ubuntu's `chromium-browser` may be a snap shim that does not start); None
    where none does."""
    candidates, seen = [{}], set()
    for name in CHROMIUM_NAMES:
        if (path := shutil.which(name)) and os.path.realpath(path) not in seen:
            seen.add(os.path.realpath(path))
            candidates.append({"executable_path": path})
    for options in candidates:
        try:
            playwright.chromium.launch(args=CHROMIUM_ARGS, timeout=60_000, **options).close()
            return options
        except Exception:  # no such build, or it does not start here
            continue
    return None


@pytest.fixture(scope="module")
def chromium() -> dict:
    """How to launch a Chromium here (``launchable_chromium``); the test skips, saying how to get one, where
    none starts. Module-scoped and asked for first, so that a skip comes before the pipeline runs."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        options = launchable_chromium(p)
    if options is None:
        pytest.skip(NO_CHROMIUM)
    return options


@pytest.mark.browser
def test_the_mlflow_ui_shows_runs_figures_models_and_a_comparison_in_headless_chromium(chromium, first_run, workspace):
    """The UI served by mlflow/serve.sh, driven by Playwright in whatever Chromium it can launch; the
    screenshots are kept (``$ZOOMVIT_TEST_ARTIFACTS``, default ``test-artifacts/``) for a person to look at."""
    from playwright.sync_api import sync_playwright

    client, parent = first_run
    experiment = client.get_experiment_by_name("zoomvit").experiment_id
    runs = stage_runs(client, parent.info.run_id)
    zoomvit_runs = client.search_runs(
        [experiment],
        filter_string="tags.stage = 'zoomvit' and tags.cache = 'miss'",
        order_by=["attributes.start_time ASC"],
    )
    assert len(zoomvit_runs) >= 2, "needs the alpha=0.5 run and the --only zoomvit alpha=0.3 run"
    compared = zoomvit_runs[-2:]
    run_ids = [r.info.run_id for r in compared]
    assert {r.data.params["alpha"] for r in compared} == {"0.5", "0.3"}
    base = f"{workspace['uri']}/#/experiments/{experiment}"
    compare_url = f"{workspace['uri']}/#/compare-runs?runs={json.dumps([r.info.run_id for r in compared])}"
    with sync_playwright() as p:
        browser = p.chromium.launch(args=CHROMIUM_ARGS, **chromium)
        experiment_page = _runs_table(
            browser,
            f"{base}?{TRAINING_VIEW}",
            run_name=parent.info.run_name,
            metrics=HEADLINE,
            shot="experiment_runs.png",
        )
        run_page = _page_text(
            browser,
            f"{base}/runs/{runs['zoomvit'].info.run_id}?{TRAINING_VIEW}",
            waits_for=["Model metrics", "val_top1"],
            shot="zoomvit_run.png",
        )
        figures = _page_text(
            browser,
            f"{base}/runs/{runs['evaluate'].info.run_id}/artifacts/frontier.png?{TRAINING_VIEW}",
            waits_for=["top1_by_size.png"],
            shot="evaluate_figures.png",
            until="() => [...document.images].some(image => image.naturalWidth > 300)",  # the figure shown
        )
        comparison = _page_text(
            browser,
            f"{compare_url}&experiments={json.dumps([experiment])}",
            waits_for=[],  # its metrics table shows the first metrics by name only: system/* crowd out val_*
            shot="compare.png",
            until=f"() => {json.dumps(['Comparing 2 Runs', *run_ids])}.every(t => document.body.innerText.includes(t))",
        )
        browser.close()
    assert "Model registry" in experiment_page and "Judges" not in experiment_page, "the model-training view"
    headline = parent.data.metrics
    assert all(name in experiment_page for name in HEADLINE), "the pipeline runs' own metrics are table columns"
    assert f"{headline['teacher_top1']:g}" in experiment_page, "with their values in the row (k/64: short decimals)"
    assert "System metrics" in run_page and "zoomvit-zoomvit" in run_page, "metrics tabs and the registered model"
    assert {"frontier.png", "top1_by_size.png", "zoom_layouts.png", "evaluation.json"} <= set(figures.split())
    assert all(r.info.run_id in comparison for r in compared), "both runs are in the comparison"
    params = comparison[comparison.index("Parameters") :]
    assert "alpha" in params and "0.3" in params and "0.5" in params


HEADLINE = ["zoomvit_minus_family", "zoomvit_top1", "teacher_top1"]  # what the parent run logs to compare by
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def test_a_failing_stage_fails_the_parent_and_keeps_the_upstream_cache(first_run, head, workspace):
    client, first = first_run
    # on Ray Train's workers: the error crosses from a worker to the driver (no restart: max_failures=0)
    bad = ["--set", "zoomvit.token_budget=17", "--set", "zoomvit.train.max_failures=0"]
    proc = pipeline(head, workspace, *bad)
    assert proc.returncode != 0
    failed = pipeline_runs(client)[-1]
    assert failed.info.status == "FAILED"
    runs = stage_runs(client, failed.info.run_id)
    assert runs["zoomvit"].info.status == "FAILED" and "error" in runs["zoomvit"].data.tags
    assert all(runs[n].data.tags["cache"] == "hit" for n in ("teacher", "relevance", "zoomer"))
    assert "evaluate" not in runs
    failed_dir = workspace["home"] / "runs" / "zoomvit" / runs["zoomvit"].data.tags["fingerprint"][:16]
    assert not (failed_dir / "manifest.json").exists(), "a failed stage must not look cached"


def test_a_bad_config_key_exits_non_zero_naming_the_key(workspace):
    proc = subprocess.run(
        [sys.executable, "pipelines/full.py", "--config", TINY_YAML, "--set", "zoomvit.alpah=0.3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "zoomvit.alpah" in proc.stderr


def test_only_a_stage_whose_upstream_is_not_cached_names_the_missing_stage(head, tmp_path):
    ws = {
        "sets": [
            "--set",
            f"data.root={tmp_path / 'data'}",
            "--set",
            f"artifact_root={tmp_path / 'runs'}",
            "--set",
            f"tracking.uri=sqlite:///{tmp_path / 'm.db'}",
        ]
    }
    proc = pipeline(head, ws, "--only", "zoomvit")
    assert proc.returncode == 2
    assert "'teacher'" in proc.stderr and "no cached output" in proc.stderr


def test_from_run_reuses_what_an_earlier_pipeline_run_recorded(first_run, head, workspace, tmp_path):
    client, first = first_run
    elsewhere = ["--set", f"artifact_root={tmp_path / 'empty_cache'}"]
    proc = pipeline(head, workspace, *elsewhere, "--from-run", first.info.run_id)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = stage_runs(client, pipeline_runs(client)[-1].info.run_id)
    originals = stage_runs(client, first.info.run_id)
    assert {n: r.data.tags["cache"] for n, r in runs.items()} == dict.fromkeys(STAGES, "hit")
    assert all(runs[n].data.tags["source_run"] == originals[n].info.run_id for n in STAGES)
    assert not (tmp_path / "empty_cache" / "teacher").exists()


def test_force_recomputes_a_finished_stage_from_scratch_instead_of_resuming_it(first_run, head, workspace):
    client, first = first_run
    proc = pipeline(head, workspace, "--force", "relevance,zoomer")
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = stage_runs(client, pipeline_runs(client)[-1].info.run_id)
    assert {n: r.data.tags["cache"] for n, r in runs.items()} == {
        **dict.fromkeys(STAGES, "hit"),
        "relevance": "miss",
        "zoomer": "miss",
    }
    originals = stage_runs(client, first.info.run_id)
    relevance = runs["relevance"].data.metrics
    assert (
        relevance["groups_cached"] == 0
        and relevance["groups_computed"] == originals["relevance"].data.metrics["groups_computed"] > 0
    )
    epochs = len(client.get_metric_history(originals["zoomer"].info.run_id, "train_loss"))
    assert len(client.get_metric_history(runs["zoomer"].info.run_id, "train_loss")) == epochs, (
        "every epoch trained again"
    )
    assert client.get_metric_history(runs["zoomer"].info.run_id, "start_epoch")[0].value == 0


def test_two_runs_started_together_on_one_artifact_root_both_succeed_and_compute_each_stage_once(
    first_run, head, workspace
):
    # On the reference run's cache with a new alpha: the upstream stages are hits for both, and
    # zoomvit and evaluate are computed by whichever run claims them first while the other waits.
    sets = [*workspace["sets"], "--set", "tracking.experiment=concurrent", "--set", "zoomvit.alpha=0.4", *IN_DRIVER]
    env = {**head["env"], "RAY_ADDRESS": head["gcs"]}
    command = [sys.executable, "pipelines/full.py", "--config", TINY_YAML, *sets]
    runs = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(2)]  # fmt: skip
    outputs = [r.communicate(timeout=900)[0] for r in runs]
    assert [r.returncode for r in runs] == [0, 0], "\n=====\n".join(o[-3000:] for o in outputs)
    client = MlflowClient(tracking_uri=workspace["uri"])
    exp = client.get_experiment_by_name("concurrent")
    stage_rows = client.search_runs([exp.experiment_id], filter_string="tags.`zoomvit.run_type` = 'stage'")
    computed = sorted(r.data.tags["stage"] for r in stage_rows if r.data.tags["cache"] == "miss")
    assert computed == ["evaluate", "zoomvit"], computed  # each computed by exactly one of the two runs
    assert len(stage_rows) == 2 * len(STAGES), "both runs record every stage"
    assert sum("while this run waited" in o for o in outputs) >= 1


def test_the_experiment_opens_in_mlflows_training_view_and_the_parent_holds_the_resolved_config(
    first_run, workspace, tmp_path
):
    import yaml

    client, parent = first_run
    assert client.get_experiment(parent.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    local = client.download_artifacts(parent.info.run_id, "config.yaml", str(tmp_path))
    config = yaml.safe_load(Path(local).read_text())
    assert config["name"] == "tiny" and config["data"]["root"] == str(workspace["home"] / "demo_data" / "tiny")
    assert config["zoomvit"]["alpha"] == 0.5


def test_ray_job_stop_mid_training_ends_the_pipeline_run_and_the_open_stage_run_killed(head, workspace):
    sets = [*workspace["sets"], "--set", "tracking.experiment=stopped", "--set", "teacher.train.epochs=60"]
    sets += ["--set", f"artifact_root={workspace['root'] / 'stopped'}"]
    command = ["ray", "job", "submit", "--address", head["dashboard"], "--working-dir", ".", "--no-wait", "--",
               "python", "pipelines/full.py", "--config", TINY_YAML, *sets]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, env=head["env"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    job = re.search(r"raysubmit_\w+", proc.stdout + proc.stderr).group(0)

    def ray_job(*args: str) -> str:
        done = subprocess.run(["ray", "job", *args, "--address", head["dashboard"], job], cwd=REPO, env=head["env"],
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        return done.stdout + done.stderr

    deadline = time.monotonic() + 300
    while not re.search(r"\[teacher\] epoch 2/60 train_loss=", logs := ray_job("logs")):
        assert time.monotonic() < deadline and "FAILED" not in ray_job("status"), logs[-3000:]
        time.sleep(1)
    client = MlflowClient(tracking_uri=workspace["uri"])
    experiment = client.get_experiment_by_name("stopped").experiment_id
    status = {r.data.tags.get("stage", "pipeline"): r.info.status for r in client.search_runs([experiment])}
    assert status == {"pipeline": "RUNNING", "teacher": "RUNNING"}, "the parent shows RUNNING while it runs"
    ray_job("stop")
    assert "was stopped" in ray_job("status")
    assert "stopped by SIGTERM; the runs that were open are marked KILLED" in ray_job("logs")
    runs = client.search_runs([experiment])
    status = {r.data.tags.get("stage", "pipeline"): r.info.status for r in runs}
    assert status == {"pipeline": "KILLED", "teacher": "KILLED"}, ray_job("logs")[-3000:]
