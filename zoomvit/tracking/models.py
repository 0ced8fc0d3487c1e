"""Trained models in MLflow: logged without pickle, registered, and promoted by an alias.

A stage's model is logged as MLflow "models from code" (``pyfunc_model.py``) carrying its
``model.safetensors``, its task spec as JSON and this package's source (so it loads where ``zoomvit``
is not installed), with a tensor signature and an input example. Each logged model becomes a version
of the registered model ``<experiment>-<stage>``; the evaluate stage points the ``candidate`` alias at
the versions it scored. Promotion is a person's decision: ``MlflowClient().set_registered_model_alias(
name, "champion", version)``.
"""

from __future__ import annotations

import importlib.metadata as md
import logging
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np

import mlflow
from zoomvit.logs import dropped_prints, verbose

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

    from zoomvit.tracking.runs import Tracker
    from zoomvit.train.specs import TaskSpec

CANDIDATE = "candidate"
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
PACKAGE_DIR = Path(__file__).resolve().parents[1]
# what the model's code imports (zoomvit itself travels as code, not as a requirement)
REQUIREMENTS = ("torch", "torchvision", "timm", "safetensors", "numpy", "pydantic", "pyyaml", "pillow", "mlflow")
# what mlflow.register_model prints for every version (the console says which versions the alias moved to)
REGISTRY_PRINTS = (r"^Successfully registered model", r"^Registered model .* already exists", r"^Created version")
log = logging.getLogger(__name__)


def registered_name(experiment: str, stage: str) -> str:
    return f"{experiment}-{stage}"


def pip_requirements() -> list[str]:
    return [f"{name}=={md.version(name).split('+')[0]}" for name in REQUIREMENTS]


def log_stage_model(
    tracker: Tracker,
    run_id: str,
    *,
    name: str,
    spec: TaskSpec,
    weights: Path,
    image_size: int,
    register_as: str | None,
) -> ModelVersion | None:
    """Log ``weights`` (a trained ``spec``) as the run's model ``name``; register it as a new version of
    ``register_as`` when given. Returns that version."""
    from mlflow.models import infer_signature

    from zoomvit.tracking.pyfunc_model import StageModel

    side = 2 * image_size if getattr(spec, "zoom_source", None) == "highres" else image_size
    example_BHWC = np.random.default_rng(0).integers(0, 256, size=(1, side, side, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(spec.model_dump_json(indent=2))
        artifacts = {"weights": str(weights), "spec": str(spec_path)}
        probe = StageModel()
        probe.load_context(SimpleNamespace(artifacts=artifacts))  # what load_context reads of MLflow's context
        signature = infer_signature(example_BHWC, probe.predict(None, example_BHWC))
        with tracker.active(run_id), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=str(PYFUNC_CODE),
                artifacts=artifacts,
                code_paths=[str(PACKAGE_DIR)],
                signature=signature,
                input_example=example_BHWC,
                pip_requirements=pip_requirements(),
                metadata={"task": spec.task, "input": "uint8 images (B, H, W, 3)", "mean": spec.mean, "std": spec.std},
            )
            if register_as is None:
                return None
            # creates the registered model when missing (or when a concurrent run just did), then the version
            with dropped_prints(*REGISTRY_PRINTS, verbose_=verbose()):
                return mlflow.register_model(info.model_uri, register_as, tags={"stage": name})


def move_alias(tracker: Tracker, name: str, run_id: str, alias: str = CANDIDATE) -> str | None:
    """Point ``alias`` of registered model ``name`` at the version logged by ``run_id``; the version, or
    None (with a warning) when that run registered none in this tracking store."""
    quoted = name.replace("'", "\\'")
    versions = tracker.client.search_model_versions(f"name = '{quoted}' and run_id = '{run_id}'")
    if not versions:
        log.warning("no version of %s comes from run %s in %s: alias %r not moved", name, run_id, tracker.uri, alias)
        return None
    version = max(versions, key=lambda v: int(v.version)).version
    tracker.client.set_registered_model_alias(name, alias, version)
    return version
