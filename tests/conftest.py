import os
from pathlib import Path

os.environ.setdefault("RAY_ACCEPT_CALLABLE_OR_CLASS_AS_CONSTRUCTOR", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller takes one report per worker per poll, and a worker's next report waits for it:
# at the default 2 s poll every epoch of the tests' tiny fits lasts 2 s (bench/fit_overhead.py). Set
# before anything starts Ray, so every driver, `ray start` head and job the tests launch inherits it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# One machine is never preempted: Ray Train's preemption watcher (an actor, so a process, per fit, ~2 s
# of a tiny fit on 2 cores) stays off, as scripts/demo.sh turns it off.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

import pytest
import torch

import zoomvit.models  # noqa: F401  (registers the timm variants)

REPO = Path(__file__).resolve().parents[1]  # the repository root; commands the tests run start here
TINY_YAML = "pipelines/configs/tiny.yaml"  # the tests' config, relative to REPO (what a command run there names)
TINY = str(REPO / TINY_YAML)  # the same, absolute (what load_config is given)


def pytest_collection_modifyitems(items):
    """Tests marked ``own_ray`` (a cluster of their own, which they shut ``ray_local`` down for) run after the
    others, in their order, so the modules that share ``ray_local`` start it once, not again after each;
    ``own_ray(first=True)`` and ``own_ray(last=True)`` run before and after the other ``own_ray`` tests."""

    def key(item):
        mark = item.get_closest_marker("own_ray")
        return (0, 0) if mark is None else (1, -1 if mark.kwargs.get("first") else int(bool(mark.kwargs.get("last"))))

    items.sort(key=key)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def _ray_session():
    yield
    from servers import shutdown_ray_local

    shutdown_ray_local()


@pytest.fixture(scope="module")
def ray_local(_ray_session):
    """Ray in this process (2 CPUs, no dashboard), started by the first module that asks and kept for
    the next ones (starting it costs ~6 s), in a temp dir of its own; a test that starts a cluster of its
    own (marked ``own_ray``, run last) calls ``shutdown_ray_local()`` first, and a module that asks after
    it starts Ray again."""
    import ray
    from ray.data import DataContext
    from servers import local_ray_temp_dir

    if not ray.is_initialized():
        tests_dir = str(Path(__file__).resolve().parent)  # helpers the workers unpickle (tests/faultfs.py)
        path = os.pathsep.join(p for p in (tests_dir, os.environ.get("PYTHONPATH", "")) if p)
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            configure_logging=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": path}},
            _temp_dir=local_ray_temp_dir(),
        )
    DataContext.get_current().enable_progress_bars = False
    return ray


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> str:
    """An untrained ``vit_test_patch8_32`` (seeded) saved as safetensors: a teacher for relevance tests."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_file(timm.create_model("vit_test_patch8_32").state_dict(), str(path))
    return str(path)


@pytest.fixture
def demo_data(tmp_path):
    """Writes a small demo dataset under ``tmp_path`` and returns its root: ``demo_data()`` is 16 train and
    8 val images of 32 px in shards of 8 at ``tmp_path / "data"``; keyword arguments go to
    ``generate_demo_dataset``."""
    from zoomvit.data.demo import generate_demo_dataset

    def write(name: str = "data", **kwargs) -> Path:
        root = tmp_path / name
        generate_demo_dataset(root, **{"train": 16, "val": 8, "image_size": 32, "samples_per_shard": 8, **kwargs})
        return root

    return write


@pytest.fixture
def without_gcsfs(monkeypatch):
    """As where gcsfs is not installed (it is a dev dependency): importing it fails, fsspec has not loaded it."""
    import importlib
    import sys

    registry = importlib.import_module("fsspec.registry")._registry  # fsspec.registry is the public mapping
    monkeypatch.setitem(sys.modules, "gcsfs", None)
    for protocol in ("gs", "gcs"):
        monkeypatch.delitem(registry, protocol, raising=False)


S3_BUCKET = "cache"


@pytest.fixture(scope="module")
def s3():
    """An in-process S3 server (moto) holding the bucket ``S3_BUCKET``, for one test module."""
    from servers import s3_server

    with s3_server(S3_BUCKET) as endpoint:
        yield endpoint


@pytest.fixture
def cache(s3, request, tmp_path, monkeypatch):
    """An empty bucket cache root of its own in ``S3_BUCKET``, per test; this machine's home in ``tmp_path``."""
    from zoomvit.pipeline.cache.bucket import BucketCache

    monkeypatch.chdir(tmp_path)
    return BucketCache(f"s3://{S3_BUCKET}/{request.node.name[:60]}")
