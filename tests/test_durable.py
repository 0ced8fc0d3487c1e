"""Durable writes: a reader sees the old file or the whole new one, never a part, and no temporary is left."""

import json

import pytest

from zoomvit.durable import temporary_name, write_durably, write_json_durably


def test_a_file_is_replaced_whole_and_nothing_else_is_left(tmp_path):
    path = tmp_path / "manifest.json"
    write_json_durably(path, {"a": 1})
    write_json_durably(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2} and [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "group.parquet"
    path.write_bytes(b"old")

    def half_then_crash(tmp):
        tmp.write_bytes(b"ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_durably(path, half_then_crash)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["group.parquet"]


def test_temporary_names_are_hidden_siblings_unique_per_call(tmp_path):
    names = {temporary_name(tmp_path / "x.json") for _ in range(100)}
    assert len(names) == 100 and all(n.parent == tmp_path and n.name.startswith(".x.json.") for n in names)
