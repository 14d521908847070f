"""Distinct benchmark events built from `data/demo-event.json`.

Every event gets a new CloudEvent id, a new STAC item id, a new file name in its asset href and a
new sha2-256 multihash checksum: by default of random bytes (nothing is downloaded); with
`real_files=True`, of the file's content as the benchmark's file server generates it from the name
(`file_content`, `file_chunks`, `bench/gated_files.py`), so flows that verify the data download
bytes that match. With a `FileMix` (`--file-mix`), the files have the mix's sizes (e.g. 20 kB BUFR,
500 kB NetCDF, a few 20 MB files), each size in the file's name (`<tag>_<phase>_<n>_<bytes>.csv`):
the file server generates the bytes from the name alone. The expected `data_id` of each event is
computed with the chain's own mapping, so the notifications received can be matched to the events
sent.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from wis2.cloudevent import parse_event
from wis2.dataset import DatasetDescription
from wis2.mapping import data_assets, data_id_for

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "data" / "demo-event.json"
# <tag>_<phase>_<n>.csv, or <tag>_<phase>_<n>_<bytes>.csv: a file of that size
BENCH_FILE = re.compile(r"[A-Za-z0-9]+_[a-z0-9-]+_[0-9]{5}(?:_(?P<size>[0-9]+))?\.csv")
CHUNK = 64 * 1024
_FILLER = bytes(range(256)) * (CHUNK // 256)


def file_content(file_name: str) -> bytes:
    """The bytes of a small benchmark file (no size in its name), generated from its name."""
    return f"benchmark file {file_name}\n".encode() * 8


def file_size(file_name: str) -> int:
    """The length of the benchmark file `file_name` (`BENCH_FILE`)."""
    match = BENCH_FILE.fullmatch(file_name)
    if match is None:
        raise ValueError(f"{file_name}: not a benchmark file name")
    if match["size"] is None:
        return len(file_content(file_name))
    return int(match["size"])


def _sized_tail(file_name: str) -> bytes:
    return f"\nbenchmark file {file_name}\n".encode()


def file_chunks(file_name: str) -> Iterator[bytes]:
    """The bytes of the benchmark file `file_name`, in chunks of at most 64 kB: a small file's
    `file_content`; a sized one, a fixed filler then a tail naming the file (distinct files,
    generated in constant memory)."""
    if BENCH_FILE.fullmatch(file_name)["size"] is None:  # type: ignore[index]
        yield file_content(file_name)
        return
    tail = _sized_tail(file_name)
    left = max(0, file_size(file_name) - len(tail))
    while left > 0:
        yield _FILLER[:min(left, CHUNK)]
        left -= CHUNK
    yield tail[-file_size(file_name):]


@functools.lru_cache(maxsize=64)
def _filler_hash(length: int) -> hashlib._Hash:
    hasher = hashlib.sha256()
    left = length
    while left > 0:
        hasher.update(_FILLER[:min(left, CHUNK)])
        left -= CHUNK
    return hasher


def file_sha256(file_name: str) -> bytes:
    """The sha256 digest of the benchmark file `file_name` (the filler's hash computed once per
    size)."""
    if BENCH_FILE.fullmatch(file_name)["size"] is None:  # type: ignore[index]
        return hashlib.sha256(file_content(file_name)).digest()
    tail = _sized_tail(file_name)
    size = file_size(file_name)
    hasher = _filler_hash(max(0, size - len(tail))).copy()
    hasher.update(tail[-size:] if size else b"")
    return hasher.digest()


class FileMix:
    """Sizes of the benchmark's files: `"20000:795,500000:200,20000000:5"` is, out of each 1,000
    files in order, 795 of 20 kB, 200 of 500 kB and 5 of 20 MB, each size spread evenly."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        classes: list[tuple[int, int]] = []
        for item in spec.split(","):
            size, _, count = item.strip().partition(":")
            if not size.isdigit() or not count.strip().isdigit() or int(count) < 1:
                raise ValueError(f"file mix {spec!r}: expected BYTES:COUNT,..., got {item!r}")
            classes.append((int(size), int(count)))
        total = sum(count for _, count in classes)
        spread = sorted(((i + 0.5) * total / count, k, size)
                        for k, (size, count) in enumerate(classes) for i in range(count))
        self.sizes = [size for _, _, size in spread]

    def __str__(self) -> str:
        return self.spec

    def size_of(self, n: int) -> int:
        return self.sizes[n % len(self.sizes)]


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
        files_url: str | None = None, real_files: bool = False, mix: FileMix | None = None,
    ) -> None:
        self.dataset = dataset
        self.tag = tag
        self.real_files = real_files
        self.mix = mix  # sizes of the real files (None: small files)
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
        size = self.mix.size_of(n) if self.real_files and self.mix is not None else None
        file_name = f"{name}.csv" if size is None else f"{name}_{size}.csv"
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
            asset["file:size"] = file_size(file_name)
            digest = file_sha256(file_name).hex()
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
