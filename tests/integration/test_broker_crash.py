"""The broker SIGKILLed while the listener is away (stopped), after it acknowledged the file
server's events (QoS 1, queued in the listener's persistent session): nothing is lost.

Mosquitto acknowledges a PUBLISH, then writes its in-memory database at the end of the same loop
iteration (the node's setting `autosave_on_changes true`, `autosave_interval 1`): the tests kill
it once its database file holds the last event (`bench.faults.wait_for_broker_save`), which
happens milliseconds after the acknowledgement. With the former setting (a save every 60 s) the
same sequence loses every event: the second test shows it.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from bench.faults import broker_sigkill_listener_away, fault_node, wait_for_broker_save
from broker.launcher import RunningBroker, start_broker
from chain.mqtt import Publisher
from tests.fixtures.broker import broker_test_config
from tests.fixtures.listener_session import come_back, subscribe_and_leave

pytestmark = [pytest.mark.integration]

TOPIC = "diffusion/files/coriolis/argo/csv"


def _acknowledged_then_killed(broker: RunningBroker, count: int) -> list[bytes]:
    subscribe_and_leave(broker)
    sent = [f"event-{i:04d}".encode() for i in range(count)]
    with Publisher(broker.connection("fileserver")) as pub:
        for payload in sent:
            pub.publish(TOPIC, payload, qos=1)  # returns once the broker acknowledged it
    wait_for_broker_save(broker.run_dir / "data" / "mosquitto.db", sent[-1], 5.0)
    broker.kill()
    broker.start(30)
    return sent


def test_acknowledged_events_survive_a_broker_sigkill(mqtt_broker: RunningBroker) -> None:
    assert "autosave_on_changes true" in mqtt_broker.conf_path.read_text()
    assert "autosave_interval 1\n" in mqtt_broker.conf_path.read_text()
    sent = _acknowledged_then_killed(mqtt_broker, 50)
    got, _ = come_back(mqtt_broker, len(sent))
    assert sorted(got) == sorted(sent), f"{len(got)} of {len(sent)}\n{mqtt_broker.tail(30)}"


def test_the_former_interval_setting_loses_them(tmp_path: Path) -> None:
    """Why the setting matters: saving on a timer (an hour here, so that no save can fall in
    between whatever the machine's speed), the broker's crash loses every queued event."""
    config = broker_test_config(autosave_on_changes=False, autosave_interval=3600)
    broker = start_broker(config, tmp_path / "broker")
    try:
        assert "autosave_on_changes false" in broker.conf_path.read_text()
        sent = _acknowledged_then_killed(broker, 20)
        assert come_back(broker, len(sent), timeout=3)[0] == []
    finally:
        broker.stop()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_whole_node_listener_away_broker_sigkill_publishes_each_event_once() -> None:
    """The node's own listener, worker and Prefect server: the N events acknowledged to the file
    server before the crash all become runs once the listener is back, and each is published
    exactly once."""
    run_dir = Path(tempfile.mkdtemp(prefix="wis2-broker-crash-"))
    with fault_node(run_dir, events=20, timeout=240, tag="BRKSQ") as ctx:
        result = broker_sigkill_listener_away(ctx)
        debug = (f"{result.model_dump_json(indent=1)}\n--- listener ---\n"
                 f"{ctx.node.process('listener').tail(40)}\n--- broker ---\n"
                 f"{ctx.node.broker.tail(40) if ctx.node.broker else ''}")
        assert result.error is None, debug
        assert result.received == 20 and result.lost == 0, debug
        assert result.duplicate_data_ids == 0, debug
        assert result.runs is not None and result.runs.events_covered == 20, debug
        assert result.unfinished_runs == 0 and result.runs.failed == 0, debug
    shutil.rmtree(run_dir, ignore_errors=True)
