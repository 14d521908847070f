"""A pywis-pubsub hook for a simulated WMO Global Broker.

`pywis-pubsub subscribe --config broker/global-broker-sim.yml` connects as `everyone`, validates
every message with the WNM ETS (`validate_message: true`) and then calls this hook, which runs the
chain's strict validation too and appends one JSON line per message to the file named by
`WIS2_GB_SIM_OUTPUT` (default: the log only)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from pywis_pubsub.hook import Hook

from wis2.validation import validate_notification

log = logging.getLogger(__name__)


class ValidatingHook(Hook):
    def execute(self, topic: str, msg_dict: dict) -> None:
        report = validate_notification(msg_dict, topic=topic)
        record = {"topic": topic, "valid": report.ok, "summary": report.summary(),
                  "message": msg_dict}
        log.info("global broker received %s on %s: %s", msg_dict.get("id"), topic,
                 report.summary())
        output = os.environ.get("WIS2_GB_SIM_OUTPUT")
        if output:
            with Path(output).open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
