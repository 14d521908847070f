"""Retention of the task results (chain/retention.py), log rotation (chain/processes.py) and the
free-space alarm (chain/diskspace.py)."""

from __future__ import annotations

import errno
import logging
import os
import time
from pathlib import Path

import pytest

from chain import diskspace
from chain.diskspace import DiskSettings, DiskWatch, is_disk_full, measure
from chain.processes import rotate_log
from chain.retention import sweep_result_files, sweep_results
from chain.settings import ChainSettings

DAY = 86400


def _file(path: Path, age_days: float, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    stamp = time.time() - age_days * DAY
    os.utime(path, (stamp, stamp))
    return path


def test_old_result_files_go_and_everything_else_stays(tmp_path: Path) -> None:
    old_build = _file(tmp_path / "wnm-build-aa", 15)
    old_published = _file(tmp_path / "wnm-published-bb", 20)
    fresh = _file(tmp_path / "wnm-build-cc", 13)
    kept = [_file(tmp_path / "publication-ledger.sqlite3", 400),
            _file(tmp_path / "publication-ledger.sqlite3-wal", 400),
            _file(tmp_path / "claims" / "wnm-build-in-a-subdir", 400),
            _file(tmp_path / "metadata-records" / "urn.json", 400),
            _file(tmp_path / "other-file", 400)]
    settings = ChainSettings(_env_file=None, results_dir=tmp_path, results_retention_days=14)
    assert sweep_results(settings) == 2
    assert not old_build.exists() and not old_published.exists()
    assert fresh.exists() and all(path.exists() for path in kept)
    assert sweep_result_files(tmp_path / "missing", 0) == 0
    assert sweep_result_files(tmp_path, 12 * DAY) == 1  # the 13-day-old one


def test_rotate_log_keeps_three_copies_and_the_open_file(tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    writer = log.open("ab")  # a child process's stdout: append mode
    for round_ in range(5):
        writer.write(f"round {round_}\n".encode() * 100)
        writer.flush()
        assert rotate_log(log, max_bytes=500)
    writer.write(b"after\n")
    writer.flush()
    writer.close()
    assert log.read_bytes() == b"after\n"  # the child's next lines start the new file
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "worker.log", "worker.log.1", "worker.log.2", "worker.log.3"]
    assert log.with_name("worker.log.1").read_text().startswith("round 4")
    assert log.with_name("worker.log.3").read_text().startswith("round 2")
    assert not rotate_log(log, max_bytes=500)  # small: untouched
    assert not rotate_log(tmp_path / "none.log", max_bytes=1)


def test_disk_watch_logs_once_per_change_and_names_the_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    free = {"blocks": 50}

    class Stat:
        f_frsize = 4096
        f_blocks = 1000

        @property
        def f_bavail(self) -> int:
            return free["blocks"]

    monkeypatch.setattr(diskspace.os, "statvfs", lambda path: Stat())
    watch = DiskWatch([tmp_path / "results" / "not-yet"], min_free_percent=10)
    with caplog.at_level(logging.INFO, logger="chain.diskspace"):
        first = watch.check()
        watch.check()
    assert first[0].low and first[0].free_bytes == 50 * 4096 and first[0].free_percent == 5.0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(tmp_path / "results" / "not-yet") in warnings[0].getMessage()
    assert watch.low_paths == [str(tmp_path / "results" / "not-yet")]
    free["blocks"] = 500
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="chain.diskspace"):
        assert not watch.check()[0].low
    assert "back above" in caplog.records[0].getMessage() and watch.low_paths == []


def test_measure_a_real_file_system_and_recognise_a_full_disk(tmp_path: Path) -> None:
    usage = measure(tmp_path / "a" / "b", min_free_percent=0)
    assert usage.total_bytes > 0 and 0 <= usage.free_percent <= 100 and not usage.low
    assert measure(tmp_path, min_free_percent=100.0).low
    full = OSError(errno.ENOSPC, "No space left on device")
    try:
        try:
            raise full
        except OSError as exc:
            raise RuntimeError("writing a result failed") from exc
    except RuntimeError as wrapped:
        assert is_disk_full(wrapped)
    assert is_disk_full(Exception("sqlite3.OperationalError: database or disk is full"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))


def test_disk_settings_paths(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WIS2_DISK_PATHS", f'["{tmp_path}/pg", "{tmp_path}/results"]')
    monkeypatch.setenv("WIS2_DISK_MIN_FREE_PERCENT", "5")
    settings = DiskSettings(_env_file=None)
    assert settings.min_free_percent == 5
    assert settings.paths_with(tmp_path / "results") == [tmp_path / "results", tmp_path / "pg"]


def test_a_run_waits_for_space_then_goes_on_and_names_the_disk_when_it_gives_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from chain.diskspace import DiskFull, DiskUsage, retry_when_disk_full

    free = iter([10 * 2**20, 0, 0, 5 * 2**20, 5 * 2**20])  # space, then full, then freed

    def fake_measure(path: Path, min_free_percent: float) -> DiskUsage:
        value = next(free)
        return DiskUsage(path=str(path), free_bytes=value, total_bytes=2**30,
                         free_percent=0.0, low=True)

    monkeypatch.setattr(diskspace, "measure", fake_measure)
    calls: list[int] = []

    def write() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return "published"

    with caplog.at_level(logging.WARNING, logger="chain.diskspace"):
        assert retry_when_disk_full(write, tmp_path, reserve_bytes=2**20, timeout=60,
                                    poll=0) == "published"
    assert len(calls) == 2
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "no space left on the disk holding" in messages and str(tmp_path) in messages
    assert "disk full" in messages  # the wait, naming the path
    monkeypatch.setattr(diskspace, "measure", lambda path, pct: DiskUsage(
        path=str(path), free_bytes=0, total_bytes=1, free_percent=0.0, low=True))
    with pytest.raises(DiskFull, match=str(tmp_path)):
        retry_when_disk_full(lambda: "never", tmp_path, reserve_bytes=0, timeout=0.2, poll=0.05)
    with pytest.raises(ValueError):  # other errors are not retried
        monkeypatch.setattr(diskspace, "measure", lambda path, pct: DiskUsage(
            path=str(path), free_bytes=2**30, total_bytes=2**31, free_percent=50.0, low=False))
        retry_when_disk_full(lambda: int("x"), tmp_path, reserve_bytes=0, timeout=1, poll=0)


def test_an_io_error_counts_as_a_full_disk_only_when_the_disk_is_full(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite reports a WAL write that found no space as 'disk I/O error' (seen on a full
    tmpfs): retried as a full disk when the disk is full, raised otherwise."""
    import sqlite3

    from chain.diskspace import DiskUsage, out_of_space

    error = sqlite3.OperationalError("disk I/O error")
    free = {"bytes": 0}
    monkeypatch.setattr(diskspace, "measure", lambda path, pct: DiskUsage(
        path=str(path), free_bytes=free["bytes"], total_bytes=2**30, free_percent=0.0, low=True))
    assert out_of_space(error, tmp_path, reserve_bytes=2**20)
    free["bytes"] = 2**30
    assert not out_of_space(error, tmp_path, reserve_bytes=2**20)
    assert out_of_space(OSError(errno.ENOSPC, "No space left on device"), tmp_path, 0)
