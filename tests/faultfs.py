"""A local fsspec filesystem whose reads fail on purpose (tests/conftest.py puts tests/ on Ray workers' path)."""

from pathlib import Path

import fsspec.implementations.local


class FlakyLocalFileSystem(fsspec.implementations.local.LocalFileSystem):
    """Local files whose reads raise ``OSError`` past byte ``fail_at``: on every open when ``always``,
    else on the first open of each file only (a marker file per shard records it, across processes)."""

    def __init__(self, markers: str, fail_at: int, always: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.markers, self.fail_at, self.always = markers, fail_at, always

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        marker = Path(self.markers) / Path(path).name
        if "r" not in mode or (marker.exists() and not self.always):
            return f
        marker.touch()
        fail_at, read = self.fail_at, f.read

        def flaky_read(size=-1):
            if f.tell() + (size if size is not None and size >= 0 else 1 << 62) > fail_at:
                raise OSError(f"injected: connection reset while reading {Path(path).name}")
            return read(size)

        f.read = flaky_read
        return f
