"""The listener's housekeeping: dead-letter retention, the free-space metric and health check."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from chain import diskspace
from listener.deadletters import DeadLetter, DeadLetterStore
from listener.service import Listener

from .helpers import settings


def test_dead_letters_older_than_the_retention_are_removed(tmp_path: Path) -> None:
    store = DeadLetterStore(tmp_path / "dl")
    now = datetime.now(UTC)
    old = store.add(DeadLetter.new("t/1", b"{old", "not_json", "not JSON",
                                   received=now - timedelta(days=31)))
    replayed_old = store.add(DeadLetter.new("t/2", b"{r", "not_json", "not JSON",
                                            received=now - timedelta(days=40)))
    store.mark_replayed(replayed_old.id, "t/2")
    # received long ago, but again yesterday: kept (retention counts from the last reception)
    store.add(DeadLetter.new("t/3", b"{again", "not_json", "x", received=now - timedelta(days=90)))
    again = store.add(DeadLetter.new("t/3", b"{again", "not_json", "x",
                                     received=now - timedelta(days=1)))
    fresh = store.add(DeadLetter.new("t/4", b"{new", "not_json", "x"))
    removed = store.remove_older_than(30 * 86400)
    assert {x.id for x in removed} == {old.id, replayed_old.id}
    assert {x.id for x in store.list(include_replayed=True)} == {again.id, fresh.id}


def test_low_disk_sets_the_metric_and_fails_the_health_check(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    free = {"blocks": 50}

    class Stat:
        f_frsize, f_blocks = 4096, 1000

        @property
        def f_bavail(self) -> int:
            return free["blocks"]

    monkeypatch.setattr(diskspace.os, "statvfs", lambda path: Stat())
    monkeypatch.setenv("WIS2_DISK_MIN_FREE_PERCENT", "10")

    async def build() -> Listener:  # the listener's parts need a running loop
        return Listener(settings(deadletter_dir=tmp_path / "dl"))

    listener = asyncio.run(build())
    listener.session.connected = True
    listener.housekeeping()
    health = listener.health()
    assert health["status"] == "disk_low" and health["disk_low"] == [str(tmp_path / "dl")]
    text = listener.metrics.render().decode()
    assert f'wis2_listener_disk_low{{path="{tmp_path / "dl"}"}} 1.0' in text
    assert f'wis2_listener_disk_free_bytes{{path="{tmp_path / "dl"}"}} 204800.0' in text
    free["blocks"] = 900
    listener.housekeeping()
    assert listener.health()["status"] == "ok"
    assert f'wis2_listener_disk_low{{path="{tmp_path / "dl"}"}} 0.0' in (
        listener.metrics.render().decode())
