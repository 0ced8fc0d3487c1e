"""Trained models in MLflow's model registry: logged without pickle, registered, promoted by an alias.

A model is logged as MLflow "models from code" (a stage's: :mod:`zoomvit.train.pyfunc_model`, with its
``model.safetensors`` and its task spec as JSON) together with this package's source (so it loads where
``zoomvit`` is not installed), with a tensor signature and an input example. Each logged model becomes
a version of the registered model ``<experiment>-<stage>``; the evaluate stage points the ``candidate``
alias at the versions it scored. Promotion is a person's decision:
``MlflowClient().set_registered_model_alias(name, "champion", version)``.
"""

from __future__ import annotations

import importlib.metadata as md
import logging
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import mlflow
from zoomvit.logs import dropped_prints, verbose

if TYPE_CHECKING:
    import numpy as np
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.pyfunc import PythonModel

    from zoomvit.tracking.runs import Tracker

CANDIDATE = "candidate"
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


def log_code_model(
    tracker: Tracker,
    run_id: str,
    *,
    name: str,
    code: Path,
    model: PythonModel,
    artifacts: dict[str, str],
    example: np.ndarray,
    metadata: dict[str, Any],
    register_as: str | None,
    tags: dict[str, str] | None = None,
) -> ModelVersion | None:
    """Log ``code`` (a file that calls ``mlflow.models.set_model``) with ``artifacts`` as the run's model
    ``name``, and this package's source beside it. Its signature comes from ``model`` (an instance of
    that code's model class, loaded here from ``artifacts``) applied to ``example``. Registered as a new
    version of ``register_as`` (with ``tags``) when given; returns that version."""
    from mlflow.models import infer_signature

    model.load_context(SimpleNamespace(artifacts=artifacts))  # what load_context reads of MLflow's context
    signature = infer_signature(example, model.predict(None, example))
    with tracker.active(run_id), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=str(code),
            artifacts=artifacts,
            code_paths=[str(PACKAGE_DIR)],
            signature=signature,
            input_example=example,
            pip_requirements=pip_requirements(),
            metadata=metadata,
        )
        if register_as is None:
            return None
        # creates the registered model when missing (or when a concurrent run just did), then the version
        with dropped_prints(*REGISTRY_PRINTS, verbose_=verbose()):
            return mlflow.register_model(info.model_uri, register_as, tags=tags)


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
