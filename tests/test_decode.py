"""Robust sample decoding: convert what can be converted, skip what cannot, count every skip."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from tarutil import write_tar

from zoomvit.data.decode import (
    IMAGE_EXTENSIONS,
    DecodedSample,
    DuplicateKeyFilter,
    ImageTransform,
    SkipReason,
    SkipReport,
    TooManyBadSamples,
    decode_sample,
    iter_tar_samples,
    parse_label,
)

S = 32
TRANSFORM = ImageTransform(image_size=S)


def encode(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def gradient(mode: str = "RGB", size: tuple[int, int] = (48, 40)) -> Image.Image:
    w, h = size
    xs, ys = np.meshgrid(np.linspace(0, 255, w), np.linspace(0, 255, h))
    rgb = np.stack([xs, ys, np.full((h, w), 128.0)], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8)).convert(mode)


def sample(key: str = "k", ext: str = "jpg", image: bytes | None = None, cls: Any = b"3", **extra: Any) -> dict:
    out: dict[str, Any] = {"__key__": key, "__url__": "shard-0.tar"}
    if image is not None:
        out[ext] = image
    if cls is not None:
        out["cls"] = cls
    out.update(extra)
    return out


def decode(s: dict, transform: ImageTransform = TRANSFORM, num_classes: int = 10):
    return decode_sample(s, num_classes=num_classes, transform=transform)


def sixteen_bit_png() -> bytes:
    values = np.array([[0, 65535] * 8] * 16, dtype=np.uint16)
    return encode(Image.fromarray(values), "PNG")


def palette_png(transparent: bool) -> bytes:
    image = gradient().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encode(image, "PNG", **({"transparency": 0} if transparent else {}))


GOOD = {
    "rgb_jpeg": ("jpg", lambda: encode(gradient(), "JPEG")),
    "grayscale_jpeg": ("jpg", lambda: encode(gradient("L"), "JPEG")),
    "cmyk_jpeg": ("jpg", lambda: encode(gradient("CMYK"), "JPEG")),
    "rgba_png": ("png", lambda: encode(gradient("RGBA"), "PNG")),
    "la_png": ("png", lambda: encode(gradient("LA"), "PNG")),
    "palette_png": ("png", lambda: palette_png(False)),
    "palette_png_with_transparency": ("png", lambda: palette_png(True)),
    "sixteen_bit_grayscale_png": ("png", sixteen_bit_png),
    "webp": ("webp", lambda: encode(gradient(), "WEBP")),
    "jpeg_extension": ("jpeg", lambda: encode(gradient(), "JPEG")),
    "uppercase_extension": ("JPG", lambda: encode(gradient(), "JPEG")),
}


@pytest.mark.parametrize("name", sorted(GOOD))
def test_every_convertible_image_decodes_to_uint8_rgb_of_the_target_size(name: str) -> None:
    ext, make = GOOD[name]
    decoded, reason = decode(sample(key=name, ext=ext, image=make()))
    assert reason is None
    assert isinstance(decoded, DecodedSample)
    assert decoded.image.dtype == np.uint8 and decoded.image.shape == (S, S, 3)
    assert (decoded.key, decoded.shard, decoded.label) == (name, "shard-0.tar", 3)


def test_image_extensions_cover_imagenet_layouts() -> None:
    assert IMAGE_EXTENSIONS == ("jpg", "jpeg", "png", "webp")


def test_grayscale_is_replicated_to_three_equal_channels() -> None:
    decoded, _ = decode(sample(ext="png", image=encode(gradient("L"), "PNG")))
    assert np.array_equal(decoded.image[..., 0], decoded.image[..., 1])
    assert np.array_equal(decoded.image[..., 1], decoded.image[..., 2])


def test_sixteen_bit_grayscale_is_rescaled_not_clipped() -> None:
    transform = ImageTransform(image_size=16, resize_mode="resize")
    decoded, _ = decode(sample(ext="png", image=sixteen_bit_png()), transform)
    assert decoded.image[0, 0].tolist() == [0, 0, 0]
    assert decoded.image[0, 1].tolist() == [255, 255, 255]


@pytest.mark.parametrize(("background", "expected"), [("black", 0), ("white", 255)])
def test_alpha_is_composited_on_the_configured_background(background: str, expected: int) -> None:
    transparent_red = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    transform = ImageTransform(image_size=16, alpha_background=background)
    decoded, _ = decode(sample(ext="png", image=encode(transparent_red, "PNG")), transform)
    assert np.all(decoded.image == expected)
    opaque_red = Image.new("RGBA", (16, 16), (255, 0, 0, 255))
    decoded, _ = decode(sample(ext="png", image=encode(opaque_red, "PNG")), transform)
    assert np.all(decoded.image == [255, 0, 0])


def test_default_alpha_background_is_black() -> None:
    assert TRANSFORM.alpha_background == "black"


def truncated_jpeg() -> bytes:
    data = encode(gradient(size=(64, 64)), "JPEG")
    return data[: len(data) // 2]


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header (with a valid CRC) claims ``width`` x ``height``; its data is a 4x4 image's."""
    import struct
    import zlib

    data = bytearray(encode(gradient(size=(4, 4)), "PNG"))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    return bytes(data)


BAD = {
    "corrupt_jpeg_bytes": (sample(image=b"\xff\xd8\xff\xe0 this is not a jpeg"), SkipReason.corrupt_image),
    "truncated_jpeg": (sample(image=truncated_jpeg()), SkipReason.corrupt_image),
    "empty_image_bytes": (sample(image=b""), SkipReason.corrupt_image),
    "no_image_member": (sample(image=None), SkipReason.missing_image),
    "only_unknown_members": (sample(image=b"GIF89a", ext="gif"), SkipReason.missing_image),
    "no_cls_member": (sample(image=encode(gradient(), "JPEG"), cls=None), SkipReason.missing_label),
    "word_label": (sample(image=encode(gradient(), "JPEG"), cls=b"cat"), SkipReason.bad_label),
    "float_label": (sample(image=encode(gradient(), "JPEG"), cls=b"3.5"), SkipReason.bad_label),
    "empty_label": (sample(image=encode(gradient(), "JPEG"), cls=b""), SkipReason.bad_label),
    "non_ascii_label": (sample(image=encode(gradient(), "JPEG"), cls="٣".encode()), SkipReason.bad_label),
    "label_equal_to_num_classes": (sample(image=encode(gradient(), "JPEG"), cls=b"10"), SkipReason.label_out_of_range),
    "negative_label": (sample(image=encode(gradient(), "JPEG"), cls=b"-1"), SkipReason.label_out_of_range),
    "tiny_4x4_image": (sample(image=encode(gradient(size=(4, 4)), "PNG"), ext="png"), SkipReason.tiny_image),
    "thin_100x5_image": (sample(image=encode(gradient(size=(100, 5)), "PNG"), ext="png"), SkipReason.tiny_image),
    "reader_error_marker": ({"__key__": "x", "__error__": "truncated_shard"}, SkipReason.truncated_shard),
    "label_of_5000_digits": (sample(image=encode(gradient(), "JPEG"), cls=b"7" * 5000), SkipReason.bad_label),
    "png_header_of_64M_pixels": (sample(image=png_claiming(8000, 8000), ext="png"), SkipReason.oversized_image),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_every_bad_sample_is_skipped_with_its_reason(name: str) -> None:
    s, expected = BAD[name]
    assert decode(s) == (None, expected)


@pytest.mark.parametrize("value", [b"3", b"3\n", b" 3 \r\n", "3", 3, np.int64(3), bytearray(b"3"), memoryview(b"3")])
def test_label_accepts_ascii_ints_and_already_decoded_ints(value: Any) -> None:
    assert parse_label(value) == 3


@pytest.mark.parametrize("value", [True, b"3.0", b"three", b"", 3.0, None, b"0x3"])
def test_label_rejects_everything_that_is_not_an_int(value: Any) -> None:
    assert parse_label(value) is None


def test_unparseable_json_is_not_a_skip_just_no_meta() -> None:
    decoded, reason = decode(sample(image=encode(gradient(), "JPEG"), json=b"{not json"))
    assert reason is None and decoded.meta is None and decoded.box is None
    decoded, reason = decode(sample(image=encode(gradient(), "JPEG"), json=b"[1, 2]"))
    assert reason is None and decoded.meta is None


@pytest.mark.parametrize("payload", [b"[" * 200_000 + b"]" * 200_000, b'{"a": "' + b"x" * (2 << 20) + b'"}'])
def test_hostile_json_deeply_nested_or_huge_gives_no_meta_without_raising(payload: bytes) -> None:
    decoded, reason = decode(sample(image=encode(gradient(), "JPEG"), json=payload))
    assert reason is None and decoded.meta is None


def test_an_image_over_max_pixels_is_skipped_from_its_header_before_decoding() -> None:
    assert Image.open(io.BytesIO(png_claiming(8000, 8000))).size == (8000, 8000)
    small = ImageTransform(image_size=S, max_pixels=48 * 40 - 1)
    assert decode(sample(image=encode(gradient(), "JPEG")), transform=small) == (None, SkipReason.oversized_image)
    assert decode(sample(image=encode(gradient(), "JPEG")))[1] is None


def test_json_meta_is_parsed_and_a_malformed_box_is_ignored() -> None:
    decoded, _ = decode(sample(image=encode(gradient(), "JPEG"), json=b'{"box": [1, 2], "scale": 0.2}'))
    assert decoded.meta == {"box": [1, 2], "scale": 0.2} and decoded.box is None


def test_center_crop_geometry_and_box_mapping_hand_computed() -> None:
    # 200x100 -> shorter side 50 -> 100x50, crop 25 px off left and right.
    transform = ImageTransform(image_size=50)
    assert transform.geometry(200, 100) == (100, 50, 25, 0)
    assert transform.map_box((60, 20, 100, 60), 200, 100) == (5.0, 10.0, 25.0, 30.0)
    assert transform.map_box((20, 0, 80, 40), 200, 100) == (0.0, 0.0, 15.0, 20.0)
    assert transform.map_box((0, 0, 40, 40), 200, 100) is None

    # crop_pct 0.875: shorter side int(56 / 0.875) = 64 -> 128x64, crop 36 left, 4 top.
    transform = ImageTransform(image_size=56, crop_pct=0.875)
    assert transform.geometry(200, 100) == (128, 64, 36, 4)
    assert transform.map_box((60, 20, 100, 60), 200, 100) == pytest.approx((2.4, 8.8, 28.0, 34.4))


def test_resize_mode_stretches_and_maps_box_per_axis() -> None:
    transform = ImageTransform(image_size=50, resize_mode="resize")
    assert transform.geometry(200, 100) == (50, 50, 0, 0)
    assert transform.map_box((60, 20, 100, 60), 200, 100) == (15.0, 10.0, 25.0, 30.0)


def bright_region(image: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(image.mean(axis=-1) > 127)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@pytest.mark.parametrize(
    ("size", "fmt", "transform"),
    [
        ((200, 100), "PNG", ImageTransform(image_size=50)),
        ((200, 100), "PNG", ImageTransform(image_size=56, crop_pct=0.875)),
        ((120, 300), "PNG", ImageTransform(image_size=40, resize_mode="resize")),
        ((1000, 800), "JPEG", ImageTransform(image_size=64)),
    ],
    ids=["center_crop", "crop_pct", "resize", "large_jpeg_draft"],
)
def test_mapped_box_lands_on_the_pixels_it_marked(size: tuple[int, int], fmt: str, transform: ImageTransform) -> None:
    box = (int(size[0] * 0.4), int(size[1] * 0.3), int(size[0] * 0.6), int(size[1] * 0.7))
    canvas = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    canvas[box[1] : box[3], box[0] : box[2]] = 255
    meta = json.dumps({"box": box}).encode()
    decoded, reason = decode(sample(image=encode(Image.fromarray(canvas), fmt), ext=fmt.lower(), json=meta), transform)
    assert reason is None and decoded.source_size == size
    assert decoded.box == pytest.approx(transform.map_box(box, *size))
    assert np.allclose(bright_region(decoded.image), decoded.box, atol=1.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"image_size": 0},
        {"image_size": 32, "crop_pct": 0.0},
        {"image_size": 32, "crop_pct": 1.5},
        {"image_size": 32, "resize_mode": "pad"},
        {"image_size": 32, "min_size": 0},
        {"image_size": 32, "alpha_background": "grey"},
    ],
)
def test_invalid_transform_raises_value_error(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ImageTransform(**kwargs)


def test_duplicate_key_filter_flags_second_and_later_occurrences() -> None:
    keys = DuplicateKeyFilter()
    assert [keys.seen(k) for k in ["a", "b", "a", "c", "a"]] == [False, False, True, False, True]
    assert len(keys) == 3


def test_a_tiny_shard_of_good_and_bad_samples_is_decoded_counted_and_deduplicated(tmp_path: Path) -> None:
    jpg = encode(gradient(), "JPEG")
    shard = tmp_path / "mixed.tar"
    write_tar(
        shard,
        [
            ("good.jpg", jpg),
            ("good.cls", b"1"),
            ("good.json", b'{"box": [0, 0, 24, 20]}'),
            ("gray.jpeg", encode(gradient("L"), "JPEG")),
            ("gray.cls", b"2\n"),
            ("broken.jpg", b"garbage"),
            ("broken.cls", b"1"),
            ("nolabel.png", encode(gradient(), "PNG")),
            ("dir/nested.webp", encode(gradient(), "WEBP")),
            ("dir/nested.cls", b"7"),
            ("good.jpg", jpg),
            ("good.cls", b"1"),
            ("twice.jpg", jpg),
            ("twice.cls", b"4"),
            ("twice.jpg", jpg),
            ("twice.cls", b"4"),
        ],
    )
    report, keys, decoded = SkipReport(), DuplicateKeyFilter(), []
    with shard.open("rb") as f:
        for s in iter_tar_samples(f, url=str(shard)):
            if keys.seen(s["__key__"]):
                report.add(SkipReason.duplicate_key, s["__key__"], s["__url__"])
                continue
            out, reason = decode(s)
            if reason is None:
                report.ok()
                decoded.append(out)
            else:
                report.add(reason, s["__key__"], s["__url__"])
    assert [d.key for d in decoded] == ["good", "gray", "dir/nested", "twice"]
    assert [d.label for d in decoded] == [1, 2, 7, 4]
    assert decoded[0].box == pytest.approx(TRANSFORM.map_box((0, 0, 24, 20), 48, 40))
    assert report.counts == {"corrupt_image": 1, "missing_label": 1, "duplicate_key": 2}
    assert {(e["key"], e["reason"]) for e in report.skipped} == {
        ("broken", "corrupt_image"),
        ("nolabel", "missing_label"),
        ("good", "duplicate_key"),
        ("twice", "duplicate_key"),
    }
    assert all(e["shard"] == str(shard) for e in report.skipped)
    assert (report.num_ok, report.total, report.bad_fraction) == (4, 8, 0.5)


def test_a_truncated_shard_yields_what_it_could_read_then_a_truncated_shard_skip(tmp_path: Path) -> None:
    shard = tmp_path / "whole.tar"
    write_tar(
        shard,
        [(f"s{i}.{ext}", data) for i in range(3) for ext, data in (("jpg", encode(gradient(), "JPEG")), ("cls", b"0"))],
    )
    raw = shard.read_bytes()
    cut = raw.index(b"s2.jpg") + 512 + 100  # inside the last image's data
    samples = list(iter_tar_samples(io.BytesIO(raw[:cut]), url="cut.tar"))
    assert [s["__key__"] for s in samples[:2]] == ["s0", "s1"]
    assert [decode(s)[1] for s in samples] == [None, None, SkipReason.truncated_shard]

    garbage = list(iter_tar_samples(io.BytesIO(b"x" * 2048), url="garbage.tar"))
    assert [decode(s)[1] for s in garbage] == [SkipReason.read_error]


def test_a_member_over_the_size_limit_is_skipped_unread_and_the_shard_reads_on(tmp_path: Path) -> None:
    jpg = encode(gradient(), "JPEG")
    shard = tmp_path / "big.tar"
    images = {"a": jpg, "b": b"\0" * 5000, "c": jpg}
    write_tar(
        shard,
        [m for i, (k, img) in enumerate(images.items()) for m in ((f"{k}.jpg", img), (f"{k}.cls", b"%d" % (i + 1)))],
    )
    with shard.open("rb") as f:
        samples = list(iter_tar_samples(f, url="big.tar", max_member_bytes=4096))
    assert [s["__key__"] for s in samples] == ["a", "b", "c"]
    assert "jpg" not in samples[1]
    assert [decode(s)[1] for s in samples] == [None, SkipReason.oversized_member, None]
    assert [decode(s)[0].label for s in (samples[0], samples[2])] == [1, 3]


def test_samples_read_by_webdataset_itself_decode(tmp_path: Path) -> None:
    import webdataset as wds

    from zoomvit.data.demo import generate_demo_dataset

    info = generate_demo_dataset(tmp_path, train=6, val=0, image_size=32)
    urls = [str(tmp_path / name) for name in info["splits"]["train"]["filenames"]]
    for raw in wds.WebDataset(urls, shardshuffle=False):
        decoded, reason = decode(raw)
        assert reason is None
        assert decoded.box == tuple(float(v) for v in decoded.meta["box"])
        assert decoded.label == decoded.meta["label"]


def test_skip_report_counts_exactly_but_keeps_at_most_max_keys() -> None:
    report = SkipReport(max_keys=2)
    for i in range(5):
        report.add(SkipReason.corrupt_image, f"k{i}", "a.tar")
    report.add("bad_label", "k5")
    report.ok(94)
    assert report.counts == {"corrupt_image": 5, "bad_label": 1}
    assert [e["key"] for e in report.skipped] == ["k0", "k1"]
    assert (report.num_skipped, report.total) == (6, 100)
    assert report.bad_fraction == pytest.approx(0.06)
    with pytest.raises(ValueError):
        report.add("not_a_reason", "k")


def test_skip_report_merge_and_round_trip() -> None:
    a, b = SkipReport(max_keys=3), SkipReport()
    a.ok(10)
    a.add(SkipReason.tiny_image, "a1", "s0")
    a.add(SkipReason.tiny_image, "a2", "s0")
    b.ok(5)
    b.add(SkipReason.tiny_image, "b1", "s1")
    b.add(SkipReason.missing_label, "b2", "s1")
    assert a.merge(b) is a
    assert a.counts == {"tiny_image": 3, "missing_label": 1}
    assert a.num_ok == 15 and a.total == 19
    assert [e["key"] for e in a.skipped] == ["a1", "a2", "b1"]
    data = json.loads(json.dumps(a.to_dict()))
    assert data["num_skipped"] == 4 and data["counts"] == {"missing_label": 1, "tiny_image": 3}
    again = SkipReport.from_dict(data)
    assert (again.counts, again.skipped, again.num_ok, again.max_keys) == (a.counts, a.skipped, a.num_ok, 3)


def test_skip_report_check_fails_only_past_the_allowed_fraction() -> None:
    report = SkipReport()
    report.check(0.0)  # empty report: nothing bad
    report.ok(95)
    for i in range(3):
        report.add(SkipReason.corrupt_image, f"c{i}")
    for i in range(2):
        report.add(SkipReason.label_out_of_range, f"l{i}")
    report.check(0.05)
    with pytest.raises(TooManyBadSamples, match=r"corrupt_image=3.*label_out_of_range=2") as excinfo:
        report.check(0.04)
    assert isinstance(excinfo.value, RuntimeError)
    with pytest.raises(ValueError):
        report.check(1.5)


def test_skip_reasons_are_strings() -> None:
    assert SkipReason.corrupt_image == "corrupt_image"
    assert {r.value for r in SkipReason} == {
        "corrupt_image",
        "missing_image",
        "missing_label",
        "bad_label",
        "label_out_of_range",
        "tiny_image",
        "duplicate_key",
        "truncated_shard",
        "read_error",
        "oversized_member",
        "oversized_image",
    }


def test_a_tar_cut_at_a_member_boundary_ends_with_a_truncated_shard_skip_and_a_whole_one_does_not(tmp_path):
    import gzip
    import tarfile

    from tarutil import write_tar

    from zoomvit.data.decode import iter_tar_samples

    whole = tmp_path / "whole.tar"
    write_tar(whole, [(f"s{i}.{ext}", b"1") for i in range(3) for ext in ("png", "cls")])
    with tarfile.open(whole) as tar:
        boundary = tar.getmember("s2.png").offset
    data = whole.read_bytes()
    for name, payload in {"cut": data[:boundary], "cut.gz": gzip.compress(data[:boundary])}.items():
        samples = list(iter_tar_samples(io.BytesIO(payload), url=name))
        assert [s["__key__"] for s in samples] == ["s0", "s1", f"{name}#truncated_shard"], name
    for payload in (data, gzip.compress(data), data[:boundary] + b"\0" * 1024):
        samples = list(iter_tar_samples(io.BytesIO(payload), url="whole"))
        assert all("__error__" not in s for s in samples), "an end-of-archive block ends a tar cleanly"
