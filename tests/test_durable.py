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


def test_an_exclusive_lock_makes_a_second_process_wait_and_is_freed_when_its_holder_dies(tmp_path, caplog):
    import logging
    import subprocess
    import sys
    import time

    from zoomvit.durable import exclusive

    entry = tmp_path / "teacher" / "abc"
    script = f"from zoomvit.durable import exclusive\nimport time\nwith exclusive({str(entry)!r}, 'x'):\n"
    script += "    print('held', flush=True)\n    time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    logging.getLogger("zoomvit.durable").addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="zoomvit.durable")
    start = time.monotonic()
    killer = __import__("threading").Timer(1.5, holder.kill)  # the holder dies without unlocking
    killer.start()
    with exclusive(entry, "[teacher] entry"):
        waited = time.monotonic() - start
    killer.join()
    logging.getLogger("zoomvit.durable").removeHandler(caplog.handler)
    assert waited >= 1.4
    assert f"[teacher] entry: waiting for pid {holder.pid}" in caplog.text
