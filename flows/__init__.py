"""The Prefect flows of the chain (one module per flow) and their tasks (`flows.tasks`).

The flows only orchestrate: the WIS2 logic is in `wis2`, the shared plumbing (settings, MQTT,
ledger) in `chain`.
"""

from flows import _legacy_paths  # noqa: F401  (results cached under the old module paths)
