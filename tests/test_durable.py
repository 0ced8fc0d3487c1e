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

    from zoomvit.locks import exclusive

    entry = tmp_path / "teacher" / "abc"
    script = f"from zoomvit.locks import exclusive\nimport time\nwith exclusive({str(entry)!r}, 'x'):\n"
    script += "    print('held', flush=True)\n    time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    logging.getLogger("zoomvit.locks").addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="zoomvit.locks")
    start = time.monotonic()
    killer = __import__("threading").Timer(1.5, holder.kill)  # the holder dies without unlocking
    killer.start()
    with exclusive(entry, "[teacher] entry"):
        waited = time.monotonic() - start
    killer.join()
    logging.getLogger("zoomvit.locks").removeHandler(caplog.handler)
    assert waited >= 1.4
    assert "[teacher] entry: waiting for another run" in caplog.text and f"pid {holder.pid}" in caplog.text


def _holder(entry, how: str):
    """A process holding ``entry``'s OutputLock (``shared``, ``exclusive``, or ``exclusive-then-share``:
    it writes ``entry/done`` and keeps a shared hold); its first line says it holds it."""
    import subprocess
    import sys

    script = f"""
import pathlib, time
from zoomvit.locks import OutputLock
lock = OutputLock({str(entry)!r}, 'x')
if {how!r} == 'shared':
    lock.shared()
else:
    lock.exclusive()
print('held', flush=True)
if {how!r} == 'exclusive-then-share':
    time.sleep(1.5)
    pathlib.Path({str(entry)!r}).mkdir(parents=True)
    (pathlib.Path({str(entry)!r}) / 'done').write_text('yes')
    lock.share()
time.sleep(60)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _done(entry):
    return lambda: (entry / "done").read_text() if (entry / "done").exists() else None


def test_a_reader_of_a_committed_output_waits_only_until_the_writer_commits_not_until_it_exits(tmp_path):
    import time

    from zoomvit.locks import OutputLock, read_or_claim

    entry = tmp_path / "teacher" / "abc"
    writer = _holder(entry, "exclusive-then-share")
    try:
        start = time.monotonic()
        with OutputLock(entry, "x") as lock:
            assert read_or_claim(lock, _done(entry)) == "yes"
            waited = time.monotonic() - start
        assert 1.0 <= waited < 10, "waited for the commit, then shared the output with the writer still running"
        assert writer.poll() is None
    finally:
        writer.kill()


def test_a_forced_recompute_waits_for_every_reader_and_readers_do_not_wait_for_each_other(tmp_path):
    import threading
    import time

    from zoomvit.locks import OutputLock, read_or_claim

    entry = tmp_path / "teacher" / "abc"
    entry.mkdir(parents=True)
    (entry / "done").write_text("yes")
    reader = _holder(entry, "shared")
    try:
        with OutputLock(entry, "x") as lock:
            start = time.monotonic()
            assert read_or_claim(lock, _done(entry)) == "yes", "a second reader shares it"
            assert time.monotonic() - start < 1.0
        killer = threading.Timer(1.5, reader.kill)
        killer.start()
        with OutputLock(entry, "x") as lock:
            start = time.monotonic()
            assert read_or_claim(lock, _done(entry), claim=True) is None, "claimed: the caller recomputes"
            waited = time.monotonic() - start
            assert not OutputLock(entry, "probe").try_exclusive()
        killer.join()
        assert waited >= 1.4, "--force must not take an output another run still reads"
    finally:
        reader.kill()


def test_an_output_nobody_has_written_is_claimed_exclusively_by_the_first_run(tmp_path):
    from zoomvit.locks import OutputLock, read_or_claim

    entry = tmp_path / "teacher" / "abc"
    with OutputLock(entry, "x") as lock:
        assert read_or_claim(lock, _done(entry)) is None
        other = OutputLock(entry, "other")
        assert not other.try_exclusive()
        lock.share()
        other.shared()  # a shared hold no longer blocks readers
        other.release()


def test_a_killed_writers_temporaries_are_removed_and_nothing_else(tmp_path):
    from zoomvit.durable import remove_stale_temporaries

    left = [temporary_name(tmp_path / "train-group-00001.parquet"), temporary_name(tmp_path / "ray" / "manifest.json")]
    kept = [tmp_path / "train-group-00000.parquet", tmp_path / ".hidden.tmp", tmp_path / "notes.tmp"]
    for path in [*left, *kept]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path) == 2
    assert not any(p.exists() for p in left) and all(p.exists() for p in kept)
