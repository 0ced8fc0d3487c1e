"""The bucket cache on the GCS protocol, through gcsfs, against the storage emulator from the package
registries (gcp-storage-emulator). The emulator does not honour ``ifGenerationMatch=0``, so it is also
a real instance of a store whose create-only puts are not exclusive: the cache refuses it. Past that
check, the GCS listing (``updated`` times, ``etag``/``md5Hash``) drives commits, hits and damage."""

import contextlib
import importlib.util
import json

import pytest
import torch
from safetensors.torch import save_file
from servers import gcs_server

from zoomvit.data.shards import filesystem
from zoomvit.errors import UserError
from zoomvit.pipeline.cache import store as store_module
from zoomvit.pipeline.cache.bucket import BucketCache
from zoomvit.pipeline.cache.claims import claim_state, claims
from zoomvit.pipeline.cache.committed import committed_output
from zoomvit.pipeline.cache.store import list_objects, mtime_of
from zoomvit.pipeline.plan import output_records

pytestmark = pytest.mark.skipif(
    not (importlib.util.find_spec("gcsfs") and importlib.util.find_spec("gcp_storage_emulator")),
    reason="gcsfs and gcp-storage-emulator (dev extras) are not installed",
)
BUCKET = "zoomvit-cache"


@pytest.fixture(scope="module")
def gcs():
    with gcs_server(BUCKET) as endpoint:
        yield endpoint


@pytest.fixture
def cache(gcs, request, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return BucketCache(f"gs://{BUCKET}/{request.node.name[:50]}")


@contextlib.contextmanager
def _exclusivity_assumed(url: str):
    """Past the create-only check, which this emulator fails (see the module docstring)."""
    saved = dict(store_module._honoured)
    store_module._honoured[store_module.bare(url).split("/", 1)[0]] = True
    try:
        yield
    finally:
        store_module._honoured.clear()
        store_module._honoured.update(saved)


def _publish(cache, tmp_path, fp, run_id, replace=False) -> dict:
    staged = tmp_path / run_id
    staged.mkdir(parents=True)
    save_file({"w": torch.ones(4, 4)}, str(staged / "model.safetensors"))
    files = {"weights": "model.safetensors"}
    sizes, hashes = output_records({k: staged / rel for k, rel in files.items()})
    manifest = {"stage": "zoomer", "fingerprint": fp, "run_id": run_id, "out_dir": str(staged), "files": files,
                "file_sizes": sizes, "file_hashes": hashes, "metrics": {}}  # fmt: skip
    return cache.publish(staged, manifest, replace=replace)


def test_a_gcs_store_that_ignores_generation_zero_preconditions_is_refused(cache):
    store_module._honoured.clear()
    with pytest.raises(UserError, match="does not honour create-only puts"):
        cache.claim("zoomer", "1" * 64, "driver A", committed=None)


def test_on_gcs_a_commit_is_a_hit_and_a_rewritten_object_is_damage_read_from_the_listing(cache, tmp_path):
    fp = "2" * 64
    entry = cache.entry("zoomer", fp)
    with _exclusivity_assumed(cache.url):
        committed = _publish(cache, tmp_path, fp, "run-a")
    listing = list_objects(committed["out_dir"])
    info = listing["model.safetensors"]
    assert committed["object_etags"]["weights"] == info["etag"], "GCS's etag stands for the content"
    assert abs(mtime_of(info) - mtime_of({"updated": info["updated"]})) < 1e-6 and mtime_of(info) > 1.7e9
    assert committed_output(entry) == (committed, None)

    filesystem(cache.url).pipe_file(f"{committed['out_dir']}/model.safetensors", b"x" * info["size"])
    manifest, why = committed_output(entry)
    assert manifest is None and "was rewritten since it was committed" in why


def test_on_gcs_a_claim_expires_by_the_objects_updated_time(cache, monkeypatch):
    from zoomvit.pipeline.cache import claims as claims_module

    fp = "3" * 64
    with _exclusivity_assumed(cache.url):
        _, claim = cache.claim("zoomer", fp, "driver A", committed=None)
    base = f"{cache.entry('zoomer', fp)}/claims"
    (number, info), *_ = claims(base).items()
    assert number == 1 and json.loads(filesystem(cache.url).cat_file(claim.path))["holder"] == "driver A"
    assert claim_state(claim.path, info)["free"] is False
    monkeypatch.setattr(claims_module, "CLAIM_TTL_S", -1.0)
    assert claim_state(claim.path, info)["free"] is True
