"""Distinct benchmark events built from `data/demo-event.json`.

Every event gets a new CloudEvent id, a new STAC item id, a new file name in its asset href and a
new sha2-256 multihash checksum: by default of random bytes (the measured phases run with
`verify_data` off, nothing is downloaded); with `real_files=True`, of the file's content as the
benchmark's file server generates it from the name (`file_content`, `bench/gated_files.py`), so
flows that verify the data download bytes that match. The expected `data_id` of each event is
computed with the chain's own mapping, so the notifications received can be matched to the events
sent.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from wis2.cloudevent import parse_event
from wis2.dataset import DatasetDescription
from wis2.mapping import data_assets, data_id_for

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "data" / "demo-event.json"
BENCH_FILE = re.compile(r"[A-Za-z0-9]+_[a-z0-9-]+_[0-9]{5}\.csv")  # <tag>_<phase>_<n>.csv


def file_content(file_name: str) -> bytes:
    """The bytes of a benchmark file, generated from its name (served by bench/gated_files.py)."""
    return f"benchmark file {file_name}\n".encode() * 8


@dataclass(frozen=True)
class BenchEvent:
    """One event to publish: its payload and the data_id its notification must carry."""

    name: str
    payload: bytes
    data_id: str


class EventFactory:
    """Makes distinct events: ``<tag>_<phase>_<n>.csv`` files in the template's directory."""

    def __init__(
        self, dataset: DatasetDescription, tag: str, template: Path = TEMPLATE,
        files_url: str | None = None, real_files: bool = False,
    ) -> None:
        self.dataset = dataset
        self.tag = tag
        self.real_files = real_files
        self.template: dict[str, Any] = json.loads(template.read_text(encoding="utf-8"))
        assets = self.template["data"]["assets"]
        if len(assets) != 1:
            raise ValueError(f"{template}: the template event must have exactly one asset")
        self.asset_key = next(iter(assets))
        href: str = assets[self.asset_key]["href"]
        self.base_href = href.rsplit("/", 1)[0]
        if files_url is not None:  # the node's file server, when its port is not the demo's
            path = self.base_href.split("://", 1)[1].split("/", 1)[1]
            self.base_href = f"{files_url.rstrip('/')}/{path}"

    def make(self, phase: str, n: int) -> BenchEvent:
        name = f"{self.tag}_{phase}_{n:05d}"
        file_name = f"{name}.csv"
        event = copy.deepcopy(self.template)
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        event["id"] = f"bench-{name}-{os.urandom(4).hex()}"
        event["time"] = now
        item = event["data"]
        item["id"] = name
        asset = item["assets"].pop(self.asset_key)
        asset["href"] = f"{self.base_href}/{file_name}"
        asset["title"] = f"Benchmark file {file_name}"
        asset["created"] = now
        if self.real_files:
            content = file_content(file_name)
            asset["file:size"] = len(content)
            digest = hashlib.sha256(content).hexdigest()
        else:
            digest = hashlib.sha256(os.urandom(32)).hexdigest()
        asset["file:checksum"] = "1220" + digest
        item["assets"] = {file_name: asset}
        payload = json.dumps(event, separators=(",", ":")).encode("utf-8")
        parsed = parse_event(payload)
        ((key, parsed_asset),) = data_assets(parsed.data, self.dataset)
        data_id = data_id_for(self.dataset, parsed.data, key, parsed_asset)
        return BenchEvent(name=name, payload=payload, data_id=data_id)

    def batch(self, phase: str, count: int) -> list[BenchEvent]:
        return [self.make(phase, n) for n in range(count)]
