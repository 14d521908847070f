"""Module aliases for task results cached by earlier versions of the chain.

Until the 2026-11 layout the WIS2 core lived in `flows.wis2`; results persisted by then (build
results pickled as `flows.wis2.notification.Notification`) name those module paths. Registering
the old names keeps such cached results readable, so an event delivered again after an upgrade
reuses its notification instead of building a second one with a new id.
"""

from __future__ import annotations

import importlib
import sys

_MOVED = {
    "flows.wis2": "wis2",
    "flows.mqtt": "chain.mqtt",
    "flows.settings": "chain.settings",
    "flows.ledger": "chain.ledger",
}
_WIS2_MODULES = ("cloudevent", "dataset", "errors", "mapping", "multihash", "notification")

for _old, _new in {
    **_MOVED,
    **{f"flows.wis2.{name}": f"wis2.{name}" for name in _WIS2_MODULES},
}.items():
    sys.modules.setdefault(_old, importlib.import_module(_new))
