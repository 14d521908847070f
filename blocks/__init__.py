"""Prefect blocks of the chain: `MqttBroker` (a broker connection) and `Wis2Dataset` (a dataset
description), and `register` to create their documents."""
