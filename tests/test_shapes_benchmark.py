"""The shapes benchmark (presets ``shapes`` and ``shapes2``): a small shape at any pixel offset whose
class a half-size view cannot read, written and probed through the data path."""

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from zoomvit.cli import main
from zoomvit.data.decode import ImageTransform
from zoomvit.data.demo import DemoSpec, generate_demo_dataset, preset_image_size, render_layers, render_sample
from zoomvit.data.fine import encode_jpeg
from zoomvit.data.probe import detail_survival, probe_samples
from zoomvit.data.shapes import GLYPHS, fine_layer, strokes_coverage
from zoomvit.data.shapes2 import SILHOUETTES, fill_coverage

STYLES = ("shapes", "shapes2")
SHAPES = {
    "shapes": [strokes_coverage(glyph, 2.5) for glyph in GLYPHS.values()],
    "shapes2": [fill_coverage(silhouette) for silhouette in SILHOUETTES.values()],
}


def _metas(shard: Path) -> list[dict]:
    with tarfile.open(shard) as tar:
        return [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]


def _decode(jpeg: bytes, size: int) -> np.ndarray:
    with Image.open(io.BytesIO(jpeg)) as img:
        return ImageTransform(image_size=size).apply(img).astype(np.float64)


@pytest.mark.parametrize("style", STYLES)
def test_a_shape_moved_by_whole_pixels_is_the_same_shape_and_by_part_of_one_another_image(style):
    centre = (60.3, 57.8)
    for coverage in SHAPES[style][:4]:

        def at(dx: float, dy: float = 0.0, coverage=coverage) -> np.ndarray:
            return fine_layer(coverage, 128, (centre[0] + dx, centre[1] + dy), 7.0, 0.2)

        base = at(0)
        for k in (1, 2, 3, 5, 8):  # one pixel flips the carrier under the shape, nothing else
            assert np.allclose(at(k), (-1) ** k * np.roll(base, k, axis=1), atol=1e-5)
            assert np.allclose(at(0, k), (-1) ** k * np.roll(base, k, axis=0), atol=1e-5)
        for fraction in (0.25, 0.5, 0.75):  # not quantised to any grid: a part of a pixel moves it
            moved = at(fraction)
            assert np.abs(moved - base).max() > 0.05
            weight_base, weight_moved = np.abs(base), np.abs(moved)
            xs = np.arange(128)[None, :]
            shift = (weight_moved * xs).sum() / weight_moved.sum() - (weight_base * xs).sum() / weight_base.sum()
            assert shift == pytest.approx(fraction, abs=0.15)


@pytest.mark.parametrize("style", STYLES)
def test_every_class_appears_at_every_offset_on_an_8_px_grid(style):
    spec = DemoSpec(train=1, val=60, style=style, seed=1)
    residues: dict[int, set[int]] = {}
    for i in range(60):
        r = render_layers(spec, "val", i)
        residues.setdefault(r.label, set()).add(r.box[0] % 8)
    assert sorted(residues) == list(range(10))
    assert set().union(*residues.values()) == set(range(8))
    assert sum(len(found) >= 3 for found in residues.values()) >= 8, residues


@pytest.mark.parametrize("style", STYLES)
def test_bytes_depend_only_on_the_arguments_and_each_sample_has_its_own_stream(style):
    spec = DemoSpec(train=6, val=8, style=style, seed=1)
    jpeg = render_sample(spec, "val", 5).jpeg
    assert render_sample(spec, "val", 5).jpeg == jpeg
    fewer = DemoSpec(train=1, val=6, style=style, seed=1)
    assert render_sample(fewer, "val", 5).jpeg == jpeg, "a sample does not depend on how many others there are"
    assert render_sample(DemoSpec(train=6, val=8, style=style, seed=2), "val", 5).jpeg != jpeg
    assert render_sample(spec, "train", 5).jpeg != jpeg


@pytest.mark.parametrize("style", STYLES)
def test_the_shards_record_each_images_box_and_stratum_at_the_styles_own_size(tmp_path, style):
    info = generate_demo_dataset(tmp_path, train=40, val=0, style=style, samples_per_shard=40, seed=1)
    assert info["generator"]["image_size"] == 128, "the style stores twice a 64 px model's input"
    names = (tmp_path / "classes.txt").read_text().split()
    assert len(names) == len(set(names)) == 10
    metas = _metas(tmp_path / "train-000000.tar")
    assert {m["stratum"] for m in metas} == {"fine", "coarse"}
    for m in metas:
        x0, y0, x1, y1 = m["box"]
        assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128
        side = (x1 - x0) / 128
        assert (0.2 <= side <= 0.32) if m["stratum"] == "fine" else (0.48 <= side <= 0.72), m
    with tarfile.open(tmp_path / "train-000000.tar") as tar:
        jpeg = tar.extractfile("train_00000000.jpg").read()
    with Image.open(io.BytesIO(jpeg)) as img:
        assert img.size == (128, 128) and img.format == "JPEG"


@pytest.mark.parametrize("style", STYLES)
def test_a_half_size_decode_loses_the_fine_shape_and_a_full_size_decode_keeps_it(style):
    """The probe's question on a few images, through the data path's decodes (at 64 px: libjpeg's
    half-size DCT decode): the share of the class's own layer each decode shows, with and without it."""
    spec = DemoSpec(train=1, val=24, style=style, seed=1)
    kept: dict[str, dict[int, list[float]]] = {"fine": {64: [], 128: []}, "coarse": {64: [], 128: []}}
    for i in range(24):
        r = render_layers(spec, "val", i)
        with_shape, without = encode_jpeg(r.pixels), encode_jpeg(np.clip(r.pixels - r.glyph_layer, 0, 1))
        energy = float(((r.glyph_layer * 255) ** 2).sum())
        for size in (64, 128):
            shown = ((_decode(with_shape, size) - _decode(without, size)) ** 2).sum() * (128 / size) ** 2
            kept[r.stratum][size].append(shown / energy)
    assert np.mean(kept["fine"][128]) > 0.8, "the stored pixels hold the shape"
    assert np.mean(kept["fine"][64]) < 0.05, "the 64 px decode holds almost none of it"
    assert np.mean(kept["coarse"][64]) > 0.5, "a large shape survives at any size"
    samples = probe_samples(spec, "val", 24)
    assert detail_survival(samples, 64)["fine"] < 0.05 and detail_survival(samples, 128)["fine"] == pytest.approx(1)


def test_a_fine_shape_is_drawn_only_inside_its_plate():
    spec = DemoSpec(train=1, val=12, style="shapes", seed=1)
    for i in range(12):
        r = render_layers(spec, "val", i)
        x0, y0, x1, y1 = r.box
        outside = np.abs(r.glyph_layer[..., 0]).copy()
        outside[y0:y1, x0:x1] = 0
        assert outside.max() < 0.05 * np.abs(r.glyph_layer).max(), "only the smoothing's faint ringing leaves the plate"


@pytest.mark.parametrize(("preset", "size"), [("default", 64), ("hard", 64), ("fine", 128), ("shapes", 128)])
def test_demo_data_stores_each_presets_own_size_unless_told(tmp_path, preset, size):
    assert preset_image_size(preset) == size
    assert main(["demo-data", str(tmp_path / "a"), "--preset", preset, "--train", "2", "--val", "0"]) == 0
    assert json.loads((tmp_path / "a" / "_info.json").read_text())["generator"]["image_size"] == size
    assert main(["demo-data", str(tmp_path / "b"), "--preset", preset, "--train", "2", "--val", "0",
                 "--image-size", "96"]) == 0  # fmt: skip
    assert json.loads((tmp_path / "b" / "_info.json").read_text())["generator"]["image_size"] == 96


def test_the_probe_command_records_its_command_commit_and_a_row_per_size(tmp_path, capsys):
    out = tmp_path / "probe.json"
    argv = ["probe", "--preset", "shapes2", "--sizes", "64", "128", "--train", "12", "--val", "6", "--epochs", "1"]
    assert main([*argv, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["command"].startswith("zoomvit probe --preset shapes2 --image-size 128 --seed 1")
    assert result["preset"] == "shapes2" and result["stored_size"] == 128 and "commit" in result["git"]
    assert [row["size"] for row in result["rows"]] == [64, 128]
    assert "crop top-1" in capsys.readouterr().out


def test_the_shapes_config_is_the_fine_benchmarks_recipe_on_a_development_split():
    from zoomvit.config import load_config

    shapes = load_config(str(REPO / "pipelines" / "configs" / "shapes.yaml"))
    fine = load_config(str(REPO / "pipelines" / "configs" / "fine.yaml"))
    assert shapes.data.demo.style == "shapes" and shapes.data.demo.image_size == 2 * shapes.data.image_size
    assert shapes.data.demo.seed == 1 != fine.data.demo.seed
    for section in ("teacher", "relevance", "zoomer", "zoomvit", "baseline"):
        assert getattr(shapes, section) == getattr(fine, section), section
    large = max(shapes.evaluate.size_buckets)
    assert 0.32 < large < 0.48, "the largest bucket is exactly the coarse stratum (fine boxes <= 0.32, coarse >= 0.48)"
    assert math.isclose(shapes.data.calibration_fraction, fine.data.calibration_fraction)
