"""Robust per-sample decoding of WebDataset samples: convert what can be converted, skip and count the rest.

A sample is a mapping as webdataset or Ray Data produce it: ``__key__``, optional ``__url__`` (the
shard) and one entry per tar member extension holding the raw member bytes (``jpg``/``jpeg``/
``png``/``webp``, ``cls``, ``json``). :func:`decode_sample` never raises on bad data; it returns
``(None, SkipReason)`` instead, and a :class:`SkipReport` counts skips by reason so a stage can log
them and fail only past a configured bad-sample fraction.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import IO, Any

import numpy as np
from PIL import Image

from zoomvit.data.image_transform import MAX_IMAGE_PIXELS as MAX_IMAGE_PIXELS
from zoomvit.data.image_transform import ImageTransform
from zoomvit.data.image_transform import to_rgb as to_rgb

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
LABEL_EXTENSION = "cls"
META_EXTENSION = "json"
ERROR_FIELD = "__error__"

MAX_MEMBER_BYTES = 64 << 20  # a tar member larger than this is skipped unread (ImageNet's largest JPEG: ~15 MB)
_MAX_LABEL_DIGITS = 18
_MAX_META_BYTES = 1 << 20
_TRUNCATION_MESSAGES = frozenset({"unexpected end of data", "truncated header", "empty file"})


class SkipReason(StrEnum):
    corrupt_image = "corrupt_image"
    missing_image = "missing_image"
    missing_label = "missing_label"
    bad_label = "bad_label"
    label_out_of_range = "label_out_of_range"
    tiny_image = "tiny_image"
    duplicate_key = "duplicate_key"
    truncated_shard = "truncated_shard"
    read_error = "read_error"
    oversized_member = "oversized_member"
    oversized_image = "oversized_image"


class TooManyBadSamples(RuntimeError):
    """The fraction of skipped samples exceeded the configured maximum."""


@dataclass(frozen=True, kw_only=True)
class DecodedSample:
    key: str
    shard: str | None
    image: np.ndarray
    label: int
    meta: dict[str, Any] | None
    box: tuple[float, float, float, float] | None
    source_size: tuple[int, int]
    image_hr: np.ndarray | None = None


def _lookup(sample: Mapping[str, Any], extension: str) -> Any:
    if extension in sample:
        return sample[extension]
    for name, value in sample.items():
        if isinstance(name, str) and name.lower() == extension:
            return value
    return None


def _as_bytes(value: Any) -> bytes | None:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 1:
        return value.tobytes()
    return None


def parse_label(value: Any) -> int | None:
    """An int label from ``b"3"``, ``b"3\\n"``, ``"3"`` or an int; None when it is not an integer."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iu":
        return int(value)
    raw = _as_bytes(value)
    if raw is not None:
        try:
            value = raw.decode("ascii")
        except UnicodeDecodeError:
            return None
    if isinstance(value, str):
        text = value.strip()
        digits = text[1:] if text[:1] in ("+", "-") else text
        if digits.isascii() and digits.isdigit() and len(digits) <= _MAX_LABEL_DIGITS:
            return int(text)
    return None


def parse_meta(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if isinstance(value, dict):
        return value
    raw = _as_bytes(value)
    if len(raw if raw is not None else str(value)) > _MAX_META_BYTES:
        return None
    try:
        parsed = json.loads(raw if raw is not None else value)
    except (TypeError, ValueError, RecursionError):
        return None
    return parsed if isinstance(parsed, dict) else None


def _meta_box(meta: Mapping[str, Any] | None) -> tuple[float, float, float, float] | None:
    if meta is None:
        return None
    box = meta.get("box")
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        return None
    try:
        values = tuple(float(v) for v in box)
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in values):
        return None
    return values  # type: ignore[return-value]


def _open_image(value: Any) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, np.ndarray) and value.ndim in (2, 3) and value.dtype == np.uint8:
        return Image.fromarray(value)
    raw = _as_bytes(value)
    if raw is None:
        raise TypeError(f"cannot decode an image from {type(value).__name__}")
    return Image.open(io.BytesIO(raw))


def decode_sample(
    sample: Mapping[str, Any], *, num_classes: int, transform: ImageTransform
) -> tuple[DecodedSample | None, SkipReason | None]:
    """Decode one sample to ``(DecodedSample, None)`` or ``(None, reason)``; never raises on bad data.

    Checks run cheapest first: reader errors, image present, label present / integer / in
    ``[0, num_classes)``, image size (not tiny, not oversized) from its header, image decodes. A
    ``.json`` that does not parse (or is over 1 MiB, or nested too deeply) gives ``meta=None`` but is
    not a skip: the metadata is optional. ``box`` is the json ``box`` mapped into the output image.
    """
    error = sample.get(ERROR_FIELD)
    if error is not None:
        try:
            return None, SkipReason(str(error))
        except ValueError:
            return None, SkipReason.read_error
    key = sample.get("__key__")
    key = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
    url = sample.get("__url__")
    shard = None if url is None else (url.decode("utf-8", "replace") if isinstance(url, bytes) else str(url))

    image_value = next((v for ext in IMAGE_EXTENSIONS if (v := _lookup(sample, ext)) is not None), None)
    if image_value is None:
        return None, SkipReason.missing_image
    label_value = _lookup(sample, LABEL_EXTENSION)
    if label_value is None:
        return None, SkipReason.missing_label
    label = parse_label(label_value)
    if label is None:
        return None, SkipReason.bad_label
    if not 0 <= label < num_classes:
        return None, SkipReason.label_out_of_range

    try:
        img = _open_image(image_value)
        width, height = img.size
        if min(width, height) < transform.min_size:
            return None, SkipReason.tiny_image
        if width * height > transform.max_pixels:
            return None, SkipReason.oversized_image
        image = transform.apply(img)
        image_hr = transform.apply(_open_image(image_value), scale=2) if transform.highres else None
    except Exception:
        return None, SkipReason.corrupt_image

    meta = parse_meta(_lookup(sample, META_EXTENSION))
    box = _meta_box(meta)
    return (
        DecodedSample(
            key=key,
            shard=shard,
            image=image,
            label=label,
            meta=meta,
            box=None if box is None else transform.map_box(box, width, height),
            source_size=(width, height),
            image_hr=image_hr,
        ),
        None,
    )


class DuplicateKeyFilter:
    """Remembers keys of one stream; ``seen(key)`` is True from a key's second occurrence on."""

    def __init__(self) -> None:
        self._keys: set[str] = set()

    def seen(self, key: str) -> bool:
        if key in self._keys:
            return True
        self._keys.add(key)
        return False

    def __len__(self) -> int:
        return len(self._keys)


@dataclass(kw_only=True)
class SkipReport:
    """Counts decoded and skipped samples by reason; keeps the first ``max_keys`` skipped keys."""

    max_keys: int = 1000
    num_ok: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    skipped: list[dict[str, str | None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.max_keys < 0:
            raise ValueError(f"max_keys must be >= 0, got {self.max_keys}")

    def add(self, reason: SkipReason | str, key: str, shard: str | None = None) -> None:
        reason = SkipReason(reason)
        self.counts[reason.value] = self.counts.get(reason.value, 0) + 1
        if len(self.skipped) < self.max_keys:
            self.skipped.append({"key": key, "shard": shard, "reason": reason.value})

    def ok(self, n: int = 1) -> None:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self.num_ok += n

    @property
    def num_skipped(self) -> int:
        return sum(self.counts.values())

    @property
    def total(self) -> int:
        return self.num_ok + self.num_skipped

    @property
    def bad_fraction(self) -> float:
        return self.num_skipped / self.total if self.total else 0.0

    def merge(self, other: SkipReport) -> SkipReport:
        """Add ``other``'s counts and keys into this report (in place) and return it."""
        self.num_ok += other.num_ok
        for reason, count in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + count
        room = self.max_keys - len(self.skipped)
        if room > 0:
            self.skipped.extend(dict(entry) for entry in other.skipped[:room])
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_ok": self.num_ok,
            "num_skipped": self.num_skipped,
            "total": self.total,
            "bad_fraction": self.bad_fraction,
            "counts": dict(sorted(self.counts.items())),
            "skipped": [dict(entry) for entry in self.skipped],
            "max_keys": self.max_keys,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SkipReport:
        counts = {str(SkipReason(reason)): int(count) for reason, count in data.get("counts", {}).items()}
        return cls(
            max_keys=int(data.get("max_keys", 1000)),
            num_ok=int(data.get("num_ok", 0)),
            counts=counts,
            skipped=[dict(entry) for entry in data.get("skipped", [])],
        )

    def summary(self) -> str:
        by_reason = ", ".join(f"{reason}={count}" for reason, count in sorted(self.counts.items()))
        return f"{self.num_skipped} of {self.total} samples skipped ({self.bad_fraction:.2%})" + (
            f": {by_reason}" if by_reason else ""
        )

    def check(self, max_bad_fraction: float) -> None:
        """Raise :class:`TooManyBadSamples` when ``bad_fraction > max_bad_fraction``."""
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction!r}")
        if self.bad_fraction > max_bad_fraction:
            raise TooManyBadSamples(f"{self.summary()}; allowed at most {max_bad_fraction:.2%}")


_END_SEEN = "_zoomvit_end_block_seen"


class _EndMarkedTarInfo(tarfile.TarInfo):
    """Notes on the archive when its header read finds the all-zero end-of-archive block (tarfile
    stops the same way, silently, at the end of the stream)."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            setattr(tar, _END_SEEN, True)
            raise


def iter_tar_samples(
    fileobj: IO[bytes], *, url: str | None = None, max_member_bytes: int = MAX_MEMBER_BYTES
) -> Iterator[dict[str, Any]]:
    """Group a WebDataset tar stream's members into sample dicts (``__key__``, ``__url__``, ext -> bytes).

    Members are grouped like webdataset does: key = path up to the first dot of the file name,
    extension = the rest. A member whose extension the current sample already has starts a new
    sample with the same key (for :class:`DuplicateKeyFilter` to flag) instead of failing the
    shard as Ray's ``read_webdataset`` does. A stream that ends early or is not a tar yields the samples read so
    far, then one marker sample whose ``__error__`` is ``truncated_shard`` or ``read_error``, which
    :func:`decode_sample` turns into that skip reason. A tar cut exactly at a member boundary
    is told from a complete one by the end-of-archive block every tar writer appends: without it the
    stream also ends with ``truncated_shard``. A member over ``max_member_bytes``
    is not read: its sample carries ``__error__ = oversized_member``. An ``OSError`` from the stream
    (an I/O failure, possibly transient) propagates: the caller retries or fails the shard.
    """
    current: dict[str, Any] | None = None
    error: SkipReason | None = None
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=_EndMarkedTarInfo) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                directory, _, base = member.name.rpartition("/")
                stem, dot, extension = base.partition(".")
                if not dot or not stem:
                    continue
                key = f"{directory}/{stem}" if directory else stem
                oversized = member.size > max_member_bytes
                payload = b""
                if not oversized:
                    data = tar.extractfile(member)
                    payload = data.read() if data is not None else b""
                    if len(payload) != member.size:
                        error = SkipReason.truncated_shard
                        break
                if current is None or current["__key__"] != key or extension in current:
                    if current is not None:
                        yield current
                    current = {"__key__": key, "__url__": url}
                if oversized:
                    current[ERROR_FIELD] = SkipReason.oversized_member.value
                else:
                    current[extension] = payload
        if error is None and not getattr(tar, _END_SEEN, False):
            error = SkipReason.truncated_shard  # cut at a member boundary: it reads as a shorter, valid tar
    except EOFError:
        error = SkipReason.truncated_shard
    except tarfile.ReadError as exc:
        error = SkipReason.truncated_shard if str(exc) in _TRUNCATION_MESSAGES else SkipReason.read_error
    except tarfile.TarError:
        error = SkipReason.read_error
    if current is not None:
        yield current
    if error is not None:
        yield {"__key__": f"{url or '<stream>'}#{error.value}", "__url__": url, ERROR_FIELD: error.value}
