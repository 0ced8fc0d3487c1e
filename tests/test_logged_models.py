"""Trained models in MLflow: no pickle anywhere, loadable and servable in a fresh process with the
trained weights' logits, registered, and promoted by the candidate alias."""

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY
from safetensors.torch import save_file
from servers import free_port

from zoomvit.config import TrainConfig, load_config
from zoomvit.pipeline.records import log_stage_model
from zoomvit.pipeline.stage_table import STAGES
from zoomvit.tracking.registry import CANDIDATE, move_alias
from zoomvit.tracking.runs import Tracker
from zoomvit.train.data import to_model_input
from zoomvit.train.objectives import build_task

CONFIG = load_config(TINY)
SIZE = CONFIG.data.image_size


def _trained(stage: str, tmp_path: Path):
    spec = STAGES[stage].model_spec(CONFIG, {})
    torch.manual_seed(1)
    model = build_task(spec.for_inference(), TrainConfig()).build_model()
    for p in model.parameters():  # weights no init would give, so a load that drops any of them shows
        p.data.add_(0.01 * torch.randn_like(p))
    weights = tmp_path / f"{stage}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return spec, weights


@pytest.fixture()
def tracker(tmp_path):
    return Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "models-test")


def _logged(tracker, stage, tmp_path, register=True):
    spec, weights = _trained(stage, tmp_path)
    run_id = tracker.start(stage)
    version = log_stage_model(
        tracker,
        run_id,
        name=stage,
        spec=spec,
        weights=weights,
        image_size=SIZE,
        register_as=f"models-test-{stage}" if register else None,
    )
    tracker.end(run_id)
    return spec, weights, run_id, version


def _model_dir(tracker, run_id, stage) -> Path:
    import mlflow

    mlflow.set_tracking_uri(tracker.uri)
    (model,) = tracker.client.search_logged_models(
        experiment_ids=[tracker.experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    return Path(mlflow.artifacts.download_artifacts(model.artifact_location))


def test_logged_models_hold_no_pickle_and_load_in_a_fresh_process_with_the_trained_logits(tracker, tmp_path):
    from zoomvit.train.objectives import load_trained

    logged = {stage: _logged(tracker, stage, tmp_path) for stage in ("zoomvit", "baseline", "zoomer")}
    for stage, (_, _, run_id, _) in logged.items():
        model_dir = _model_dir(tracker, run_id, stage)
        flavors = yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]
        assert set(flavors) == {"python_function"}, stage
        assert flavors["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model", "models from code"
        assert "python_model" not in flavors["python_function"], f"{stage}: no pickled PythonModel"
        assert not [p for p in model_dir.rglob("*") if p.suffix in {".pkl", ".pickle", ".pt", ".pth"}], stage
        assert (model_dir / "code" / "zoomvit" / "models" / "zoomvit.py").exists(), "the package travels with it"
        assert "zoomvit" not in (model_dir / "requirements.txt").read_text().split("\n"), stage
        assert json.loads((model_dir / "serving_input_example.json").read_text()), stage

    images_BHWC = np.random.default_rng(3).integers(0, 256, size=(3, SIZE, SIZE, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images_BHWC)
    script = (  # one fresh process loads every model, by its registry URI
        "import sys, numpy as np, mlflow; mlflow.set_tracking_uri(sys.argv[1]); images = np.load(sys.argv[2])\n"
        "for uri, out in zip(sys.argv[3::2], sys.argv[4::2]):\n"
        "    np.save(out, mlflow.pyfunc.load_model(uri).predict(images))"
    )
    args = [a for stage, (*_, version) in logged.items()
            for a in (f"models:/{version.name}/{version.version}", str(tmp_path / f"{stage}.npy"))]  # fmt: skip
    subprocess.run(
        [sys.executable, "-c", script, tracker.uri, str(tmp_path / "images.npy"), *args],
        check=True,
        cwd=tmp_path,
        timeout=240,
    )
    for stage, (spec, weights, _, _) in logged.items():
        reference = load_trained(spec, weights)
        with torch.no_grad():
            expected = reference(to_model_input(torch.from_numpy(images_BHWC), spec.mean, spec.std)).numpy()
        np.testing.assert_allclose(np.load(tmp_path / f"{stage}.npy"), expected, rtol=1e-4, atol=1e-5, err_msg=stage)


def test_each_logged_model_is_a_new_registry_version_and_the_alias_moves_to_the_one_evaluated(tracker, tmp_path, capfd):
    _, _, first_run, first = _logged(tracker, "baseline", tmp_path)
    _, _, second_run, second = _logged(tracker, "baseline", tmp_path)
    said = capfd.readouterr()
    chatter = re.search(r"registered model|Created version", said.out + said.err, flags=re.IGNORECASE)
    assert not chatter, "registry chatter on the console"
    name = "models-test-baseline"
    assert (int(first.version), int(second.version)) == (1, 2)
    assert {v.run_id for v in tracker.client.search_model_versions(f"name = '{name}'")} == {first_run, second_run}
    assert int(move_alias(tracker, name, first_run)) == 1
    assert int(tracker.client.get_model_version_by_alias(name, CANDIDATE).version) == 1
    assert int(move_alias(tracker, name, second_run)) == 2
    assert tracker.client.get_model_version_by_alias(name, CANDIDATE).run_id == second_run
    assert move_alias(tracker, name, "no-such-run") is None, "an unknown run moves nothing"
    assert int(tracker.client.get_model_version_by_alias(name, CANDIDATE).version) == 2


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_the_logged_models_logits(tracker, tmp_path):
    import mlflow

    _, _, run_id, version = _logged(tracker, "baseline", tmp_path)
    model_dir = _model_dir(tracker, run_id, "baseline")
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracker.uri}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model_dir), "--env-manager", "local"]
    server = subprocess.Popen([*cmd, "-h", "127.0.0.1", "-p", str(port)], cwd=tmp_path, env=env)
    try:
        body = (model_dir / "serving_input_example.json").read_bytes()
        deadline = time.monotonic() + 180
        while True:
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
                )
                answer = json.loads(urllib.request.urlopen(request, timeout=30).read())
                break
            except OSError:
                assert server.poll() is None, "mlflow models serve exited"
                assert time.monotonic() < deadline, "mlflow models serve did not answer within 180 s"
                time.sleep(2)
    finally:
        server.terminate()
        server.wait(30)
    mlflow.set_tracking_uri(tracker.uri)
    local = mlflow.pyfunc.load_model(str(model_dir))
    example = np.asarray(json.loads(body)["inputs"], dtype=np.uint8)
    np.testing.assert_allclose(np.asarray(answer["predictions"]), local.predict(example), rtol=1e-4, atol=1e-5)


def test_the_logged_zoomvit_carries_the_calibrated_operating_point_its_stage_trained_for():
    calibrated = {"alpha": 0.37, "train_alpha": [0.1, 0.9]}
    assert STAGES["zoomvit"].model_spec(CONFIG, {"calibration": calibrated}).alpha == pytest.approx(0.37)
    assert STAGES["zoomvit"].model_spec(CONFIG, {}).alpha == CONFIG.zoomvit.alpha
