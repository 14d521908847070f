"""MqttBroker and Wis2Dataset blocks, and `register_blocks`, against a real Prefect server."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client

from blocks.mqtt_broker import MqttBroker
from blocks.register import register_blocks
from blocks.wis2_dataset import Wis2Dataset, block_name
from chain.mqtt import connect, publish_once
from chain.settings import ChainSettings
from wis2.dataset import list_datasets, load_dataset

pytestmark = pytest.mark.timeout(120)


def _settings(**values) -> ChainSettings:
    values.setdefault("broker_block", f"broker-{uuid.uuid4().hex[:8]}")
    return ChainSettings(_env_file=None, **values)  # type: ignore[call-arg]


def test_register_blocks_saves_broker_and_every_dataset(prefect_api) -> None:
    settings = _settings(mqtt={"host": "broker.example", "port": 8883, "tls": True,
                               "username": "publisher", "password": "s3cret-pw"})
    saved = register_blocks(settings)

    assert f"mqtt-broker/{settings.broker_block}" in saved
    broker = MqttBroker.load(settings.broker_block)
    conn = broker.connection()
    assert (conn.host, conn.port, conn.tls, conn.username) == (
        "broker.example", 8883, True, "publisher")
    assert conn.password is not None and conn.password.get_secret_value() == "s3cret-pw"

    datasets = list_datasets(settings.datasets_dir)
    assert datasets, "data/datasets/ holds at least the argo dataset"
    for dataset in datasets:
        assert f"wis2-dataset/{block_name(dataset.name)}" in saved
        assert Wis2Dataset.load(block_name(dataset.name)).description() == dataset
    assert Wis2Dataset.load("argo").description() == load_dataset("argo")


def test_register_blocks_is_idempotent_and_overwrites(prefect_api) -> None:
    settings = _settings(mqtt={"port": 1883})
    register_blocks(settings)
    moved = settings.mqtt.model_copy(update={"port": 2883})
    register_blocks(settings.model_copy(update={"mqtt": moved}))
    assert MqttBroker.load(settings.broker_block).port == 2883


def test_password_is_a_secret_in_the_api(prefect_api) -> None:
    name = f"secret-{uuid.uuid4().hex[:8]}"
    MqttBroker(host="127.0.0.1", username="publisher", password="do-not-show").save(name)
    with get_client(sync_client=True) as client:
        document = client.read_block_document_by_name(
            name, block_type_slug="mqtt-broker", include_secrets=False
        )
    assert "do-not-show" not in str(document.data)
    assert "do-not-show" not in repr(MqttBroker.load(name))


def test_broker_block_connects_and_publishes(prefect_api, session_broker) -> None:
    """A block made from the broker's publisher account reaches the real broker."""
    name = f"live-{uuid.uuid4().hex[:8]}"
    MqttBroker.from_connection(session_broker.connection("publisher")).save(name)
    conn = MqttBroker.load(name).connection()

    topic = f"origin/a/wis2/{session_broker.centre_id}/data/core/test/blocks"
    received = threading.Event()
    monitor = connect(session_broker.connection("everyone"))
    subscribed = threading.Event()
    monitor.on_message = lambda client, userdata, message: received.set()
    monitor.on_subscribe = lambda *args: subscribed.set()
    try:
        monitor.subscribe(topic, qos=1)
        assert subscribed.wait(10)
        publish_once(conn, topic, b"{}")
        assert received.wait(10), "the subscriber got nothing"
    finally:
        monitor.loop_stop()
        monitor.disconnect()


def test_cli_blocks_register(prefect_api, tmp_path) -> None:
    """`wis2-chain blocks register` (what `make blocks` runs) saves the documents."""
    name = f"cli-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "WIS2_"))}
    env.update(prefect_api.client_env(), WIS2_BROKER_BLOCK=name, WIS2_MQTT_PORT="1999",
               WIS2_MQTT_PASSWORD="cli-secret", PREFECT_HOME=str(tmp_path / "home"))
    cli = str(Path(sys.executable).with_name("wis2-chain"))
    done = subprocess.run([cli, "blocks", "register"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"saved block mqtt-broker/{name}" in done.stdout
    assert "saved block wis2-dataset/argo" in done.stdout
    assert "cli-secret" not in done.stdout + done.stderr
    assert MqttBroker.load(name).port == 1999
