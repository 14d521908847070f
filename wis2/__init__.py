"""The WIS2 core: pure models and functions, no Prefect and no MQTT.

- `errors`: structured field-level errors for bad input.
- `cloudevent`: the incoming CloudEvent 1.0 envelope and its STAC 1.1 item (`parse_event`).
- `multihash`: STAC `file:checksum` hex multihash -> WNM integrity (base64).
- `dataset`: the description of a published dataset (centre, policy, topic, data_id rule...).
- `notification`: the outgoing WIS2 Notification Message model.
- `mapping`: STAC item -> one notification per data asset.
- `validation`: strict WNM validation report; `wcmp2`: discovery metadata validation.
- `topics`: WIS2 Topic Hierarchy checks; `bundles`: validator reference bundles.
"""
