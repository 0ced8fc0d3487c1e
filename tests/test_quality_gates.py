"""Quality gates: a pipeline built on a teacher (or Zoomer) that learned nothing stops, says why,
and is marked so in MLflow; the cached stages stay usable and an override lets it through. Failed
learners are reported plainly at the end of a run."""

import io
import random
import tarfile
from pathlib import Path

import pytest
from conftest import TINY
from mlflow.tracking import MlflowClient

from zoomvit.config import load_config
from zoomvit.data.demo import generate_demo_dataset
from zoomvit.pipeline.records import near_chance
from zoomvit.pipeline.runner import run_pipeline
from zoomvit.pipeline.stage_table import QualityGateFailed, teacher_gate, zoomer_gate


def _config(*overrides):
    """tiny.yaml with the gates at their defaults (tiny.yaml turns them off for the mechanics tests)."""
    return load_config(TINY, ["gates.teacher_min_top1=null", "gates.zoomer_min_pearson=0.2", *overrides])


def test_the_teacher_gate_defaults_to_twice_chance_and_names_its_override():
    config = _config()
    assert teacher_gate(config, {"teacher": {"metrics": {"val_top1": 0.21}}}) is None
    reason = teacher_gate(config, {"teacher": {"metrics": {"val_top1": 0.12}}})
    assert "0.1200" in reason and "0.2000" in reason and "--set gates.teacher_min_top1=0" in reason
    assert teacher_gate(_config("gates.teacher_min_top1=0"), {"teacher": {"metrics": {"val_top1": 0.12}}}) is None
    assert teacher_gate(config, {"teacher": {"metrics": {}}}) is None, "a hub teacher has no training figure to gate on"


def test_the_zoomer_gate_reads_val_pearson():
    config = _config("gates.zoomer_min_pearson=0.3")
    assert zoomer_gate(config, {"zoomer": {"metrics": {"val_pearson": 0.31}}}) is None
    assert "gates.zoomer_min_pearson" in zoomer_gate(config, {"zoomer": {"metrics": {"val_pearson": 0.12}}})


def test_models_at_chance_are_named_in_the_end_of_run_warnings():
    config = _config()
    rows = [
        {"model": "zoomvit", "alpha": config.zoomvit.alpha, "headline": True, "top1": 0.104, "n": 512},
        {"model": "zoomvit", "alpha": 0.9, "headline": False, "top1": 0.5, "n": 512},
        {"model": "baseline", "alpha": None, "top1": 0.30, "n": 512},
    ]
    lines = near_chance(config, {"teacher": {"metrics": {"val_top1": 0.113}}, "evaluate": {"rows": rows}})
    assert [line.split(" ")[0] for line in lines] == ["teacher", "zoomvit"]
    assert "10.4%" in lines[1] and "chance 10.0%" in lines[1]


def _shuffle_labels(root: Path, seed: int = 0) -> None:
    """Rewrite every shard with its .cls members permuted: images no longer predict labels."""
    rng = random.Random(seed)
    for shard in sorted(root.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        labels = [data for m, data in members if m.name.endswith(".cls")]
        rng.shuffle(labels)
        it = iter(labels)
        with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
            for m, data in members:
                data = next(it) if m.name.endswith(".cls") else data
                m.size = len(data)
                tar.addfile(m, io.BytesIO(data))


@pytest.mark.slow
def test_a_teacher_trained_on_shuffled_labels_stops_the_pipeline_before_relevance(ray_local, tmp_path):
    data = tmp_path / "data"
    # the hard preset, as the pipeline would generate it (it finds its own stamp and keeps the shards)
    generate_demo_dataset(data, train=256, val=128, image_size=32, samples_per_shard=64, difficulty=1.0)
    _shuffle_labels(data)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    demo = "data.demo={train: 256, val: 128, image_size: 32, samples_per_shard: 64, preset: hard}"
    sets = [f"data.root={data}", demo, f"artifact_root={tmp_path / 'runs'}", f"tracking.uri={uri}"]
    sets.append("teacher.train.num_workers=0")  # trained in the driver: the gate is the subject, not Ray Train
    with pytest.raises(QualityGateFailed, match=r"relevance.*teacher's val top-1 .* below the floor 0\.2000"):
        run_pipeline(_config(*sets))
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("zoomvit").experiment_id
    parent = client.search_runs([experiment], filter_string="tags.`zoomvit.run_type` = 'pipeline'")[0]
    assert parent.info.status == "FAILED" and "gates.teacher_min_top1" in parent.data.tags["failure_reason"]
    stages = {
        r.data.tags["stage"]: r
        for r in client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    }
    assert stages["teacher"].info.status == "FINISHED"
    assert stages["relevance"].info.status == "FAILED" and stages["relevance"].data.tags["cache"] == "gated"
    assert "below the floor" in stages["relevance"].data.tags["failure_reason"]

    result = run_pipeline(_config(*sets, "gates.teacher_min_top1=0"), only=["relevance"])
    assert result.stages["teacher"]["cache"] == "hit", "the cached teacher stays usable"
    assert result.stages["relevance"]["cache"] == "miss"
