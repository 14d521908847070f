"""The broker's persistence directory full (a 1 MB tmpfs this test mounts, root needed): what
mosquitto acknowledges, and what it loses.

The listener is away (its persistent session holds the events: a deploy, a restart), the file
server publishes `BEFORE` events (saved: `bench.faults.wait_for_broker_save`), the persistence
directory's file system is filled, and the file server publishes more. Measured with mosquitto
2.0.11 and the node's settings (`autosave_on_changes true`, `autosave_interval 1`: a save of the
whole in-memory database, written to `mosquitto.db.new` and renamed over `mosquitto.db`, after
every change):

1. mosquitto **acknowledges every event it can no longer save** (a success PUBACK: the file
   server cannot tell) and logs `Error: No space left on device.` at each failed save; it keeps
   running and keeps the events in memory. When a save fails while writing, the last good
   database stays: SIGKILLed then, or stopped (SIGTERM: its final save fails too), it comes back
   without **every event acknowledged while the disk was full** (the `BEFORE` events survive).
2. When the only part of a save that fails is its last buffered block (written when the file is
   closed, an error mosquitto does not check), mosquitto renames the cut file over its good
   database: with nothing written at all, an **empty database**: after a restart, "Persistence
   file is empty", every queued event and the listener's session itself are gone (the listener
   then starts a new session: what was sent before it subscribed again is lost too);
3. ... and with a part written, a **corrupt database**: mosquitto **refuses to start**
   ("Couldn't open database") until the file is removed (which loses everything in it).
4. Once space is freed, the next change (any event) saves everything held in memory: a crash
   after that loses nothing.

Which of 1-3 happens depends only on how much space is left when a save begins (the tests set
it exactly: a file of the chosen size kept while filling, then deleted). Mosquitto has no setting
to refuse a message it cannot persist: the node cannot be made safe here, so its disk alarm
(`chain/diskspace.py`) watches the broker's persistence directory (the local node's listener:
`WIS2_DISK_PATHS`) and an operator hears of it long before the disk is full.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.faults import wait_for_broker_save
from broker.launcher import RunningBroker, start_broker
from chain.diskspace import DiskWatch
from chain.mqtt import Publisher
from chain.processes import ProcessFailed
from tests.fixtures.broker import broker_test_config
from tests.fixtures.disks import fill, free_bytes, small_tmpfs
from tests.fixtures.listener_session import come_back, subscribe_and_leave

pytestmark = [pytest.mark.integration]

TOPIC = "diffusion/files/coriolis/argo/csv"
BEFORE = 10
WHILE_FULL = 20
PAGE = 4096  # tmpfs allocates pages; glibc's stdio writes a file in blocks of this size too
SAVE_ERROR = "Error: No space left on device."


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RunningBroker]:
    """A broker whose persistence directory is a 1 MB tmpfs, with the listener's persistent
    session and the listener away."""
    run_dir = tmp_path / "broker"
    with small_tmpfs(run_dir / "data", "1m", "wis2-full-broker-disk"):
        running = start_broker(broker_test_config(), run_dir)
        try:
            subscribe_and_leave(running)
            yield running
        finally:
            running.stop()  # before the file system goes


def _publish(broker: RunningBroker, payloads: list[bytes]) -> int:
    """Publish each as the file server (QoS 1); how many the broker acknowledged (a refusal
    would raise)."""
    acked = 0
    with Publisher(broker.connection("fileserver")) as publisher:
        for payload in payloads:
            publisher.publish(TOPIC, payload, qos=1)
            acked += 1
    return acked


def _events(phase: str, count: int, size: int) -> list[bytes]:
    return [f"{phase}-{i:04d}-".encode().ljust(size, b"x") for i in range(count)]


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _saved_then_filled(broker: RunningBroker, size: int, room: int = 0) -> tuple[list[bytes],
                                                                                 Path]:
    """`BEFORE` events of `size` bytes acknowledged and saved; then the disk filled, leaving
    `room` bytes free. The node's disk alarm sees it low."""
    data = broker.run_dir / "data"
    before = _events("before", BEFORE, size)
    assert _publish(broker, before) == BEFORE
    assert wait_for_broker_save(data / "mosquitto.db", before[-1], 10.0) is not None
    kept = data / "room"
    kept.write_bytes(b"\0" * room)
    filler = fill(data)
    kept.unlink()
    assert free_bytes(data) == room
    watch = DiskWatch([data], 10.0)
    watch.check()
    assert watch.low_paths == [str(data)]
    return before, filler


def _log(broker: RunningBroker) -> str:
    return broker.log_path.read_text(errors="replace")


def test_mosquitto_acknowledges_what_it_cannot_save_and_a_crash_loses_it(
        broker: RunningBroker) -> None:
    db = broker.run_dir / "data" / "mosquitto.db"
    before, filler = _saved_then_filled(broker, size=500)  # a database of 2 pages
    saved = db.read_bytes()
    full = _events("full", WHILE_FULL, 500)
    assert _publish(broker, full) == WHILE_FULL  # every one acknowledged
    _wait_for(lambda: SAVE_ERROR in _log(broker), "a failed save in mosquitto's log")
    assert broker.running and db.read_bytes() == saved  # the last good database stays
    broker.kill()
    filler.unlink()
    broker.start(30)
    got, session = come_back(broker, BEFORE + WHILE_FULL, timeout=5)
    assert session
    assert sorted(got) == before, f"{len(got)} came back"  # all {WHILE_FULL} `full-` lost


def test_a_clean_stop_while_the_disk_is_full_loses_them_too(broker: RunningBroker) -> None:
    """A stop (SIGTERM) saves everything, except on a full disk: its final save fails too."""
    before, filler = _saved_then_filled(broker, size=500)
    assert _publish(broker, _events("full", WHILE_FULL, 500)) == WHILE_FULL
    broker.stop()
    assert "terminating" in _log(broker)
    filler.unlink()
    broker.start(30)
    got, session = come_back(broker, BEFORE + WHILE_FULL, timeout=5)
    assert session
    assert sorted(got) == before, f"{len(got)} came back"


def test_a_save_with_no_room_at_all_empties_the_database(broker: RunningBroker) -> None:
    db = broker.run_dir / "data" / "mosquitto.db"
    _, filler = _saved_then_filled(broker, size=20)  # a database of less than a page
    assert _publish(broker, _events("full", 1, 20)) == 1
    _wait_for(lambda: db.stat().st_size == 0, "the empty file renamed over the database")
    broker.kill()
    filler.unlink()
    broker.start(30)
    assert "Persistence file is empty" in _log(broker)
    got, session = come_back(broker, BEFORE + 1, timeout=3)
    assert (got, session) == ([], False)  # the BEFORE events and the session gone too


def test_a_save_cut_short_leaves_a_database_mosquitto_cannot_open(broker: RunningBroker) -> None:
    db = broker.run_dir / "data" / "mosquitto.db"
    _, filler = _saved_then_filled(broker, size=500, room=PAGE)  # 2 pages, room for 1
    assert _publish(broker, _events("full", 1, 500)) == 1
    _wait_for(lambda: db.stat().st_size == PAGE, "the cut file renamed over the database")
    broker.kill()
    filler.unlink()
    with pytest.raises(ProcessFailed):
        broker.start(30)
    assert "Couldn't open database" in _log(broker)


def test_once_space_is_freed_the_next_save_holds_everything(broker: RunningBroker) -> None:
    before, filler = _saved_then_filled(broker, size=500)
    full = _events("full", WHILE_FULL, 500)
    assert _publish(broker, full) == WHILE_FULL
    filler.unlink()
    after = _events("after", 1, 500)  # the next change: mosquitto saves its whole database
    assert _publish(broker, after) == 1
    assert wait_for_broker_save(broker.run_dir / "data" / "mosquitto.db", after[0], 10.0)
    broker.kill()
    broker.start(30)
    sent = before + full + after
    got, _ = come_back(broker, len(sent), timeout=20)
    assert sorted(got) == sorted(sent), f"{len(got)} of {len(sent)}\n{broker.tail(20)}"
