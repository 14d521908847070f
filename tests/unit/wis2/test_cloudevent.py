"""Incoming events: CloudEvent 1.0 + STAC item, and the errors bad events get."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fixtures.paths import BUFR_EVENT, NETCDF_EVENT
from wis2.cloudevent import CloudEvent, StacAsset, parse_event
from wis2.errors import InvalidInput
from wis2.notification import Integrity

BUFR_KEY = "IOPX01_LFVX_251403.BU"
ASSET = f"$.data.assets['{BUFR_KEY}']"


def bufr() -> dict[str, Any]:
    return json.loads(BUFR_EVENT.read_text())


def errors_of(raw: Any) -> list[str]:
    with pytest.raises(InvalidInput) as info:
        parse_event(raw)
    assert info.value.what == "event"
    assert info.value.errors, "InvalidInput without any field error"
    return [str(e) for e in info.value.errors]


@pytest.mark.parametrize("path", [BUFR_EVENT, NETCDF_EVENT], ids=lambda p: p.stem)
@pytest.mark.parametrize("form", ["bytes", "str", "dict"])
def test_reference_events_parse(path: Path, form: str) -> None:
    raw: Any = {"bytes": path.read_bytes(), "str": path.read_text(),
                "dict": json.loads(path.read_text())}[form]
    event = parse_event(raw)
    assert event.specversion == "1.0"
    assert event.source == "co050203"
    assert event.operation == "create"  # type fr.ifremer.file.diffusion
    assert event.data.geometry is not None and event.data.geometry.type == "Point"
    assert event.data.properties.datetime is not None
    assert event.data.properties.datetime.utcoffset() is not None
    (asset,) = event.data.assets.values()
    assert asset.file_size and asset.file_size > 0
    assert isinstance(asset.integrity, Integrity) and asset.integrity.method == "sha3-256"
    assert event.data.properties.model_extra and "platform" in event.data.properties.model_extra


def test_bufr_event_details() -> None:
    event = parse_event(BUFR_EVENT.read_bytes())
    asset = event.data.assets[BUFR_KEY]
    assert asset.href == "https://data-argo.ifremer.fr/etc/bufr/202503/IOPX01_LFVX_251403.BU"
    assert asset.file_size == 940
    assert asset.integrity == Integrity(
        method="sha3-256", value="8roCSwmGq459PsJ1UFxZBw1FP0dk5IrZ6q2VWb92uQY=")
    assert event.file_label() == BUFR_KEY
    assert event.data.geometry.coordinates == [21.059306666666668, -36.29987333333333]


@pytest.mark.parametrize("path", [BUFR_EVENT, NETCDF_EVENT], ids=lambda p: p.stem)
def test_dump_round_trips(path: Path) -> None:
    event = parse_event(path.read_bytes())
    dumped = event.model_dump(mode="json", by_alias=True)
    json.dumps(dumped)  # JSON-ready
    assert "file:checksum" in json.dumps(dumped)
    again = parse_event(dumped)
    assert again == event
    assert parse_event(json.dumps(event.to_dict())) == event
    # extension attributes and unknown STAC fields survive
    original = json.loads(path.read_text())
    assert dumped["data"]["properties"]["platform"] == original["data"]["properties"]["platform"]


def test_extension_attributes_are_kept() -> None:
    raw = bufr() | {"wmoarea": "atlantic", "operation": "update"}
    event = parse_event(raw)
    assert event.model_extra == {"wmoarea": "atlantic"}
    dumped = event.model_dump(mode="json", by_alias=True)
    assert dumped["wmoarea"] == "atlantic" and dumped["operation"] == "update"
    assert parse_event(dumped).operation == "update"


def test_json_schema_is_usable() -> None:
    schema = CloudEvent.model_json_schema()
    assert set(schema["required"]) >= {"specversion", "id", "source", "type", "data"}
    assert "operation" in schema["properties"]
    text = json.dumps(schema)
    assert "file:checksum" in text and "Polygon" in text


@pytest.mark.parametrize(
    ("event_type", "explicit", "expected"),
    [
        ("fr.ifremer.file.diffusion", None, "create"),
        ("org.example.file.created", None, "create"),
        ("org.example.file.update", None, "update"),
        ("org.example.file.Updated", None, "update"),
        ("org.example.file.modified", None, "update"),
        ("org.example.file.changed", None, "update"),
        ("org.example.file.delete", None, "delete"),
        ("org.example.file.deleted", None, "delete"),
        ("org.example.file.deletion", None, "delete"),
        ("org.example.file.removed", None, "delete"),
        ("org.example.file.deleted", "create", "create"),
        ("fr.ifremer.file.diffusion", "delete", "delete"),
        ("fr.ifremer.file.diffusion", "update", "update"),
    ],
)
def test_operation(event_type: str, explicit: str | None, expected: str) -> None:
    raw = bufr() | {"type": event_type}
    if explicit:
        raw["operation"] = explicit
    assert parse_event(raw).operation == expected


def test_identity_key() -> None:
    one = parse_event(bufr())
    assert one.identity_key() == parse_event(BUFR_EVENT.read_bytes()).identity_key()
    assert len(one.identity_key()) == 64 and int(one.identity_key(), 16) >= 0
    # a later, unrelated attribute does not change the identity of a redelivered event
    assert parse_event(bufr() | {"time": "2025-03-28T15:00:00Z"}).identity_key() == (
        one.identity_key())
    changed = bufr()
    changed["data"]["assets"][BUFR_KEY]["file:checksum"] = "1620" + "ab" * 32
    assert parse_event(changed).identity_key() != one.identity_key()
    assert parse_event(bufr() | {"id": "other"}).identity_key() != one.identity_key()
    assert parse_event(bufr() | {"source": "other"}).identity_key() != one.identity_key()
    # asset order does not matter
    two = bufr()
    extra = copy.deepcopy(two["data"]["assets"][BUFR_KEY]) | {"href": "https://h.example/b.nc"}
    two["data"]["assets"]["b.nc"] = extra
    three = bufr()
    three["data"]["assets"] = {"b.nc": extra} | three["data"]["assets"]
    assert parse_event(two).identity_key() == parse_event(three).identity_key()


def test_file_label_counts_other_data_files() -> None:
    raw = bufr()
    asset = raw["data"]["assets"][BUFR_KEY]
    raw["data"]["assets"]["second"] = asset | {"href": "https://h.example/x/second.BU"}
    raw["data"]["assets"]["thumb"] = {"href": "https://h.example/t.png", "roles": ["thumbnail"]}
    assert parse_event(raw).file_label() == f"{BUFR_KEY}+1"


def test_asset_model_by_name_and_alias() -> None:
    by_alias = StacAsset.model_validate({"href": "ftp://h.example/a.bin", "file:size": 3})
    by_name = StacAsset(href="ftp://h.example/a.bin", file_size=3)
    assert by_alias == by_name and by_name.integrity is None
    assert by_name.model_dump(by_alias=True, exclude_none=True)["file:size"] == 3


def _set(path: str, value: Any) -> dict[str, Any]:
    """The BUFR event with `value` at a dotted path (`_DEL` deletes the key, `@` is the asset)."""
    raw = bufr()
    *parents, leaf = path.split(".")
    target: Any = raw
    for key in parents:
        target = target[BUFR_KEY if key == "@" else key]
    if value is _DEL:
        del target[leaf]
    else:
        target[leaf] = value
    return raw


_DEL = object()
A = "data.assets.@"  # the BUFR asset (its key has a dot)


@pytest.mark.parametrize(
    ("raw", "path", "words"),
    [
        (b"\xff\xfe{}", "$", ["UTF-8"]),
        (b'{"id": "x",\n "source": }', "$", ["not JSON", "line 2 column"]),
        ("", "$", ["not JSON"]),
        ("[1, 2]", "$", ["JSON object", "list"]),
        ("42", "$", ["JSON object"]),
        ("null", "$", ["JSON object"]),
        ('{"n": ' + "1" * 5000 + "}", "$", ["not JSON"]),
        ("[" * 100000 + "]" * 100000, "$", ["JSON"]),
        (_set("specversion", "0.3"), "$.specversion", ["1.0"]),
        (_set("specversion", _DEL), "$.specversion", ["required"]),
        (_set("source", ""), "$.source", []),
        (_set("id", _DEL), "$.id", ["required"]),
        (_set("data", _DEL), "$.data", ["required"]),
        (_set("data", "a string"), "$.data", []),
        (_set("operation", "upsert"), "$.operation", ["create", "update", "delete"]),
        (_set("time", "yesterday"), "$.time", []),
        (_set("data.type", "FeatureCollection"), "$.data.type", ["Feature"]),
        (_set("data.stac_version", "0.9.0"), "$.data.stac_version", []),
        (_set("data.assets", {}), "$.data.assets", ["at least 1"]),
        (_set("data.assets", _DEL), "$.data.assets", ["required"]),
        (_set("data.geometry", _DEL), "$.data.geometry", ["required"]),
        (_set("data.geometry", {"type": "LineString", "coordinates": [[0, 0], [1, 1]]}),
         "$.data.geometry", ["Point", "Polygon"]),
        (_set("data.geometry", {"coordinates": [1, 2]}), "$.data.geometry", ["Point"]),
        (_set("data.geometry.coordinates", [21.0, -96.0]), "$.data.geometry.coordinates",
         ["latitude -96.0 out of range"]),
        (_set("data.geometry.coordinates", [181, 0]), "$.data.geometry.coordinates",
         ["longitude 181"]),
        (_set("data.geometry.coordinates", [1.0]), "$.data.geometry.coordinates", ["position"]),
        (_set("data.geometry.coordinates", ["a", 1]), "$.data.geometry.coordinates[0]", []),
        (_set("data.geometry", {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1]]]}),
         "$.data.geometry.coordinates", [">= 4"]),
        (_set("data.geometry", {"type": "Polygon",
                                "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 1]]]}),
         "$.data.geometry.coordinates", ["not closed"]),
        (_set("data.geometry", {"type": "Polygon",
                                "coordinates": [[[0, 0], [1, 0], [1, 91], [0, 0]]]}),
         "$.data.geometry.coordinates", ["[0][2]", "latitude 91"]),
        (_set("data.bbox", [0, -91, 1, 1]), "$.data.bbox", ["latitude -91"]),
        (_set("data.bbox", [0, 1, 2]), "$.data.bbox", ["4"]),
        (_set("data.properties.datetime", _DEL), "$.data.properties", ["no time"]),
        (_set("data.properties", {"start_datetime": "2024-11-10T00:00:00Z",
                                  "end_datetime": "2024-11-09T00:00:00Z"}),
         "$.data.properties", ["after"]),
        (_set("data.properties", {"start_datetime": "2024-11-10T00:00:00Z"}),
         "$.data.properties", ["together"]),
        (_set("data.properties.datetime", "2024-11-09T21:08:00"), "$.data.properties.datetime",
         ["timezone"]),
        (_set("data.properties.datetime", "9 Nov 2024"), "$.data.properties.datetime", []),
        (_set("data.properties.datetime", 1731186480), "$.data.properties.datetime",
         ["RFC 3339"]),
        (_set(f"{A}.href", "/etc/bufr/x.BU"), f"{ASSET}.href", ["http"]),
        (_set(f"{A}.href", "file:///etc/bufr/x.BU"), f"{ASSET}.href", ["http"]),
        (_set(f"{A}.href", "https://h.example/a b.BU"), f"{ASSET}.href", ["spaces"]),
        (_set(f"{A}.href", _DEL), f"{ASSET}.href", ["required"]),
        (_set(f"{A}.file:size", -1), f"{ASSET}['file:size']", ["0"]),
        (_set(f"{A}.file:size", "big"), f"{ASSET}['file:size']", []),
        (_set(f"{A}.file:checksum", "12zz-not-a-multihash"), f"{ASSET}['file:checksum']",
         ["not hexadecimal"]),
        (_set(f"{A}.file:checksum", "1620" + "0" * 63), f"{ASSET}['file:checksum']",
         ["odd number"]),
        (_set(f"{A}.file:checksum", "1620"), f"{ASSET}['file:checksum']", ["too short"]),
        (_set(f"{A}.file:checksum", ""), f"{ASSET}['file:checksum']", ["empty"]),
        (_set(f"{A}.file:checksum", "1230" + "00" * 48), f"{ASSET}['file:checksum']",
         ["48-byte", "32 bytes"]),
        (_set(f"{A}.file:checksum", "1114" + "00" * 20), f"{ASSET}['file:checksum']",
         ["sha1", "not allowed"]),
        (_set(f"{A}.file:checksum", "1620" + "00" * 31), f"{ASSET}['file:checksum']",
         ["31 bytes"]),
        (_set(f"{A}.file:checksum", 1234), f"{ASSET}['file:checksum']", []),
        (_set(f"{A}.roles", "data"), f"{ASSET}.roles", []),
        (_set(f"{A}.created", "not a date"), f"{ASSET}.created", []),
    ],
    ids=lambda v: v if isinstance(v, str) and v.startswith("$") else "",
)
def test_malformed_events_name_the_field(raw: Any, path: str, words: list[str]) -> None:
    errors = errors_of(raw)
    matching = [e for e in errors if e.startswith(f"{path}: ")]
    assert matching, f"no error at {path}: {errors}"
    for word in words:
        assert any(word.lower() in e.lower() for e in matching), (word, errors)


def test_every_problem_is_listed() -> None:
    raw = bufr()
    raw["specversion"] = "2.0"
    raw["data"]["geometry"]["coordinates"] = [200, 95]
    raw["data"]["properties"]["datetime"] = "2024-11-09T21:08:00"
    raw["data"]["assets"][BUFR_KEY]["file:checksum"] = "1114" + "00" * 20
    raw["data"]["assets"]["second.BU"] = {"href": "nowhere", "roles": ["data"]}
    with pytest.raises(InvalidInput) as info:
        parse_event(raw)
    paths = {e.path for e in info.value.errors}
    assert paths >= {
        "$.specversion", "$.data.geometry.coordinates", "$.data.properties.datetime",
        f"{ASSET}['file:checksum']", "$.data.assets['second.BU'].href",
    }
    geometry = next(e for e in info.value.errors if e.path == "$.data.geometry.coordinates")
    assert "longitude 200" in geometry.message and "latitude 95" in geometry.message
    assert "invalid event" in str(info.value) and "$.specversion" in str(info.value)


def test_valid_variants() -> None:
    raw = bufr()
    raw["data"]["geometry"] = None
    raw["data"]["properties"] = {"datetime": None, "start_datetime": "2024-11-09T00:00:00+02:00",
                                 "end_datetime": "2024-11-09T00:00:00+02:00"}
    raw["data"]["assets"][BUFR_KEY].pop("file:checksum")
    event = parse_event(raw)
    assert event.data.geometry is None
    assert event.data.assets[BUFR_KEY].integrity is None
    polygon = [[[0, 0], [1, 0], [1, 1, 10], [0, 0]]]
    raw["data"]["geometry"] = {"type": "Polygon", "coordinates": polygon}
    assert parse_event(raw).data.geometry.type == "Polygon"


# ---- whatever the input: a CloudEvent or InvalidInput with at least one FieldError ----------

def _parses_or_invalid(raw: Any) -> None:
    try:
        event = parse_event(raw)
    except InvalidInput as exc:
        assert exc.errors and all(e.path.startswith("$") and e.message for e in exc.errors)
    else:
        assert isinstance(event, CloudEvent)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=300))
def test_arbitrary_bytes(raw: bytes) -> None:
    _parses_or_invalid(raw)


@settings(max_examples=200, deadline=None)
@given(value=json_values)
def test_arbitrary_json_values(value: Any) -> None:
    _parses_or_invalid(value if isinstance(value, dict) else json.dumps(value))
    _parses_or_invalid(json.dumps(value))


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    found = [prefix]
    if isinstance(node, dict):
        for key, child in node.items():
            found += _paths(child, (*prefix, key))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            found += _paths(child, (*prefix, index))
    return found


_BUFR_PATHS = [p for p in _paths(bufr()) if p]
_NETCDF_PATHS = [p for p in _paths(json.loads(NETCDF_EVENT.read_text())) if p]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    which=st.sampled_from(["bufr", "netcdf"]),
    data=st.data(),
    mutations=st.integers(min_value=1, max_value=3),
)
def test_mutated_valid_events(which: str, data: st.DataObject, mutations: int) -> None:
    raw = bufr() if which == "bufr" else json.loads(NETCDF_EVENT.read_text())
    paths = _BUFR_PATHS if which == "bufr" else _NETCDF_PATHS
    for _ in range(mutations):
        path = data.draw(st.sampled_from(paths))
        parent: Any = raw
        try:
            for key in path[:-1]:
                parent = parent[key]
            parent[path[-1]]  # still there after earlier mutations?
        except (KeyError, IndexError, TypeError):
            continue
        if data.draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = data.draw(json_values)
    _parses_or_invalid(raw)
    _parses_or_invalid(json.dumps(raw).encode())
