"""Register the chain's block types and create (or overwrite) their default documents.

`wis2-chain blocks register` and `make blocks` call `register_blocks`. Idempotent: running it
again overwrites the documents with the current settings and dataset files.
"""

from __future__ import annotations

import logging

from chain.settings import ChainSettings
from wis2.dataset import list_datasets

from .mqtt_broker import MqttBroker
from .wis2_dataset import Wis2Dataset, block_name

log = logging.getLogger(__name__)


def broker_block_from_settings(settings: ChainSettings) -> MqttBroker:
    """The MqttBroker block described by the `WIS2_MQTT_*` settings."""
    return MqttBroker.from_connection(settings.mqtt)


def register_blocks(settings: ChainSettings | None = None) -> list[str]:
    """Register MqttBroker and Wis2Dataset and save their documents; returns the slugs saved
    (``mqtt-broker/wis2-broker``, ``wis2-dataset/argo``, ...)."""
    settings = settings or ChainSettings()
    MqttBroker.register_type_and_schema()
    Wis2Dataset.register_type_and_schema()
    saved: list[str] = []

    broker = broker_block_from_settings(settings)
    broker.save(settings.broker_block, overwrite=True)
    saved.append(f"mqtt-broker/{settings.broker_block}")
    log.info("saved block mqtt-broker/%s (%s)", settings.broker_block,
             broker.connection().describe())

    for dataset in list_datasets(settings.datasets_dir):
        name = block_name(dataset.name)
        Wis2Dataset(dataset=dataset).save(name, overwrite=True)
        saved.append(f"wis2-dataset/{name}")
        log.info("saved block wis2-dataset/%s (topic %s)", name, dataset.topic)
    return saved
