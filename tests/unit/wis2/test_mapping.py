"""Event -> WIS2 Notification Messages: one per data asset, with the right data_id, link,
integrity, times and (optionally) inline content."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from itertools import count
from typing import Any
from uuid import UUID

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fixtures.paths import BUFR_EVENT, DATA, NETCDF_EVENT
from wis2.cloudevent import parse_event
from wis2.dataset import DatasetDescription, load_dataset
from wis2.errors import InvalidInput
from wis2.mapping import (
    build_notifications,
    data_assets,
    data_id_for,
    data_ids_of,
    media_type_for,
)
from wis2.multihash import integrity_of, multihash_of
from wis2.notification import WNM_CONFORMANCE
from wis2.relations import RELATION_OF_OPERATION
from wis2.validation import validate_notification

PUBTIME = datetime(2025, 3, 28, 14, 31, 5, tzinfo=UTC)
BUFR_KEY = "IOPX01_LFVX_251403.BU"


@pytest.fixture(scope="module")
def argo() -> DatasetDescription:
    return load_dataset("argo")


@pytest.fixture(scope="module")
def synop() -> DatasetDescription:
    return load_dataset("synop")


def ids() -> Any:
    counter = count(1)
    return lambda: UUID(int=next(counter))


def bufr() -> dict[str, Any]:
    return json.loads(BUFR_EVENT.read_text())


def test_rel_for_operation() -> None:
    expected = {"create": "canonical", "update": "update", "delete": "deletion"}
    assert expected == RELATION_OF_OPERATION


def test_bufr_reference_event(argo: DatasetDescription) -> None:
    (message,) = build_notifications(
        parse_event(BUFR_EVENT.read_bytes()), argo, pubtime=PUBTIME, new_id=ids())
    assert message.to_dict() == {
        "id": "00000000-0000-0000-0000-000000000001",
        "conformsTo": [WNM_CONFORMANCE],
        "type": "Feature",
        "geometry": {"type": "Point", "coordinates": [21.059306666666668, -36.29987333333333]},
        "properties": {
            "data_id": "wis2/fr-ifremer-argo/data/core/bufr/202503/IOPX01_LFVX_251403.BU",
            "metadata_id": "urn:wmo:md:fr-ifremer-argo:cor:msg:argo",
            "pubtime": "2025-03-28T14:31:05Z",
            "datetime": "2024-11-09T21:08:00Z",
            "integrity": {"method": "sha3-256",
                          "value": "8roCSwmGq459PsJ1UFxZBw1FP0dk5IrZ6q2VWb92uQY="},
        },
        "links": [{
            "href": "https://data-argo.ifremer.fr/etc/bufr/202503/IOPX01_LFVX_251403.BU",
            "rel": "canonical",
            "type": "application/bufr",
            "length": 940,
        }],
    }


def test_netcdf_reference_event(argo: DatasetDescription) -> None:
    (message,) = build_notifications(parse_event(NETCDF_EVENT.read_bytes()), argo)
    props = message.properties
    assert props.data_id == (
        "wis2/fr-ifremer-argo/data/core/dac/coriolis/7901113/profiles/R7901113_022.nc")
    assert props.datetime == "2024-11-09T21:08:00Z"
    assert props.start_datetime is None and props.end_datetime is None
    assert props.integrity is not None and props.integrity.method == "sha3-256"
    assert props.pubtime.endswith("Z")
    assert abs(datetime.fromisoformat(props.pubtime) - datetime.now(UTC)).total_seconds() < 60
    (link,) = message.links
    assert (link.rel, link.type, link.length) == ("canonical", "application/x-netcdf", 25620)
    assert UUID(message.id).version == 5  # derived from the event (notification_id)


@pytest.mark.parametrize("path", [BUFR_EVENT, NETCDF_EVENT], ids=lambda p: p.stem)
@pytest.mark.parametrize("operation", ["create", "update", "delete"])
def test_reference_notifications_pass_strict_validation(
    path, operation: str, argo: DatasetDescription
) -> None:
    for message in build_notifications(parse_event(path.read_bytes()), argo, operation=operation):
        report = validate_notification(message.to_dict(), topic=argo.topic)
        assert report.ok, report.summary()
        assert len(message.to_json().encode()) <= 8192


def test_one_notification_per_data_asset(argo: DatasetDescription) -> None:
    raw = bufr()
    first = raw["data"]["assets"][BUFR_KEY]
    raw["data"]["assets"]["IOPX01_LFVX_251404.BU"] = first | {
        "href": "https://data-argo.ifremer.fr/etc/bufr/202503/IOPX01_LFVX_251404.BU",
        "file:size": 941, "file:checksum": multihash_of(b"second", "sha256"),
    }
    raw["data"]["assets"]["quicklook"] = {
        "href": "https://data-argo.ifremer.fr/etc/png/quicklook.png", "roles": ["thumbnail"]}
    event = parse_event(raw)
    assert [key for key, _ in data_assets(event.data, argo)] == [
        BUFR_KEY, "IOPX01_LFVX_251404.BU"]
    messages = build_notifications(event, argo, pubtime=PUBTIME)
    assert [m.properties.data_id.rsplit("/", 1)[-1] for m in messages] == [
        "IOPX01_LFVX_251403.BU", "IOPX01_LFVX_251404.BU"]
    assert len({m.id for m in messages}) == 2
    assert messages[1].links[0].length == 941
    assert messages[1].properties.integrity == integrity_of(b"second", "sha256")
    for message in messages:
        assert validate_notification(message.to_dict(), topic=argo.topic).ok


def test_assets_without_roles_are_all_data(argo: DatasetDescription) -> None:
    raw = bufr()
    raw["data"]["assets"][BUFR_KEY].pop("roles")
    raw["data"]["assets"]["b.nc"] = {"href": "https://data-argo.ifremer.fr/dac/b.nc"}
    assert len(build_notifications(parse_event(raw), argo)) == 2


def test_no_data_asset_is_an_error_naming_the_assets(argo: DatasetDescription) -> None:
    raw = bufr()
    raw["data"]["assets"][BUFR_KEY]["roles"] = ["metadata"]
    with pytest.raises(InvalidInput) as info:
        build_notifications(parse_event(raw), argo)
    (error,) = info.value.errors
    assert error.path == "$.data.assets" and "data" in error.message


@pytest.mark.parametrize(
    ("event_type", "explicit", "argument", "rel"),
    [
        ("fr.ifremer.file.diffusion", None, None, "canonical"),
        ("org.example.file.updated", None, None, "update"),
        ("org.example.file.deleted", None, None, "deletion"),
        ("fr.ifremer.file.diffusion", "update", None, "update"),
        ("fr.ifremer.file.diffusion", "delete", None, "deletion"),
        ("org.example.file.deleted", None, "create", "canonical"),
        ("fr.ifremer.file.diffusion", "create", "update", "update"),
    ],
)
def test_rel_follows_the_operation(
    event_type: str, explicit: str | None, argument: str | None, rel: str,
    argo: DatasetDescription,
) -> None:
    raw = bufr() | {"type": event_type}
    if explicit:
        raw["operation"] = explicit
    (message,) = build_notifications(parse_event(raw), argo, operation=argument)
    assert [link.rel for link in message.links] == [rel]
    assert message.rel == rel


def test_deletion_without_checksum(argo: DatasetDescription) -> None:
    raw = bufr() | {"type": "org.example.file.deleted"}
    raw["data"]["assets"][BUFR_KEY].pop("file:checksum")
    raw["data"]["assets"][BUFR_KEY].pop("file:size")
    (message,) = build_notifications(parse_event(raw), argo)
    assert message.properties.integrity is None
    assert message.links[0].length is None
    assert "integrity" not in message.to_dict()["properties"]
    assert validate_notification(message.to_dict(), topic=argo.topic).ok


def test_creation_without_checksum_is_built_and_left_to_validation(
    argo: DatasetDescription,
) -> None:
    raw = bufr()
    raw["data"]["assets"][BUFR_KEY].pop("file:checksum")
    (message,) = build_notifications(parse_event(raw), argo)
    assert message.properties.integrity is None


def test_time_interval_is_copied_without_datetime(argo: DatasetDescription) -> None:
    raw = bufr()
    raw["data"]["properties"].update(
        datetime=None, start_datetime="2024-11-09T23:00:00+02:00",
        end_datetime="2024-11-10T01:30:00.250+02:00")
    (message,) = build_notifications(parse_event(raw), argo)
    props = message.to_dict()["properties"]
    assert "datetime" not in props
    assert props["start_datetime"] == "2024-11-09T21:00:00Z"
    assert props["end_datetime"] == "2024-11-09T23:30:00.250000Z"
    assert validate_notification(message.to_dict(), topic=argo.topic).ok


def test_both_time_forms_in_the_item_give_the_interval_only(argo: DatasetDescription) -> None:
    raw = bufr()
    raw["data"]["properties"].update(
        start_datetime="2024-11-09T21:00:00Z", end_datetime="2024-11-09T22:00:00Z")
    props = build_notifications(parse_event(raw), argo)[0].to_dict()["properties"]
    assert "datetime" not in props and props["start_datetime"] == "2024-11-09T21:00:00Z"


def test_polygon_and_null_geometry(argo: DatasetDescription) -> None:
    raw = bufr()
    ring = [[-10.0, 40.0], [5.0, 40.0], [5.0, 50.0], [-10.0, 40.0]]
    raw["data"]["geometry"] = {"type": "Polygon", "coordinates": [ring]}
    (message,) = build_notifications(parse_event(raw), argo)
    assert message.to_dict()["geometry"] == {"type": "Polygon", "coordinates": [ring]}
    assert validate_notification(message.to_dict(), topic=argo.topic).ok
    raw["data"]["geometry"] = None
    (message,) = build_notifications(parse_event(raw), argo)
    assert message.to_dict()["geometry"] is None
    assert validate_notification(message.to_dict(), topic=argo.topic).ok


def test_media_type(argo: DatasetDescription) -> None:
    raw = bufr()
    asset = raw["data"]["assets"][BUFR_KEY]
    asset.pop("type")
    event = parse_event(raw)
    assert media_type_for(argo, event.data.assets[BUFR_KEY]) == "application/bufr"
    asset["href"] = "https://data-argo.ifremer.fr/etc/x/file.NC"
    assert media_type_for(argo, parse_event(raw).data.assets[BUFR_KEY]) == "application/x-netcdf"
    asset["href"] = "https://data-argo.ifremer.fr/etc/x/file.zzz"
    assert media_type_for(argo, parse_event(raw).data.assets[BUFR_KEY]) == (
        "application/octet-stream")


def test_data_id_templates(argo: DatasetDescription) -> None:
    event = parse_event(bufr())
    asset = event.data.assets[BUFR_KEY]
    assert data_id_for(argo, event.data, BUFR_KEY, asset) == (
        "wis2/fr-ifremer-argo/data/core/bufr/202503/IOPX01_LFVX_251403.BU")
    other = argo.model_copy(update={
        "data_id_template": "{centre_id}/{topic_path}/{item_id}/{asset_key}",
        "href_strip_prefixes": []})
    assert data_id_for(other, event.data, BUFR_KEY, asset) == (
        "fr-ifremer-argo/data/core/ocean/surface-based-observations/drifting-ocean-profilers/"
        "IOPX01_LFVX_251403/IOPX01_LFVX_251403.BU")
    unstripped = argo.model_copy(update={"href_strip_prefixes": []})
    assert data_id_for(unstripped, event.data, BUFR_KEY, asset).endswith(
        "core/etc/bufr/202503/IOPX01_LFVX_251403.BU")
    raw = bufr()
    raw["data"]["assets"][BUFR_KEY]["href"] = "https://h.example/origin/a/x.BU"
    odd = argo.model_copy(update={"data_id_template": "{href_path}"})
    event = parse_event(raw)
    data_id = data_id_for(odd, event.data, BUFR_KEY, event.data.assets[BUFR_KEY])
    assert not data_id.startswith("origin/")


@pytest.mark.parametrize("template", ["wis2/{centre}/{href_path}", "{0}", "{href_path.x}", "{"])
def test_bad_data_id_template_is_named(template: str, argo: DatasetDescription) -> None:
    event = parse_event(bufr())
    broken = argo.model_copy(update={"data_id_template": template})
    with pytest.raises(ValueError, match="data_id_template") as info:
        data_id_for(broken, event.data, BUFR_KEY, event.data.assets[BUFR_KEY])
    assert "href_path" in str(info.value) and "'argo'" in str(info.value)


def test_same_event_gives_the_same_notification_id(argo: DatasetDescription) -> None:
    """Built again (another host, after a crash): the same id, a UUID (version 5); another
    operation, another file version or another event gives another id."""
    event = parse_event(bufr())
    one, two = (build_notifications(event, argo)[0] for _ in range(2))
    assert one.properties.data_id == two.properties.data_id
    assert one.id == two.id and UUID(one.id).version == 5
    update = build_notifications(event, argo, operation="update")[0]
    changed = bufr()
    next(iter(changed["data"]["assets"].values()))["file:checksum"] = "1220" + "ab" * 32
    other = bufr()
    other["id"] = "another-event"
    ids = {one.id, update.id, build_notifications(parse_event(changed), argo)[0].id,
           build_notifications(parse_event(other), argo)[0].id}
    assert len(ids) == 4


# ---- a second, non-Argo dataset: data/datasets/synop.json, no code change -------------------

SYNOP_FILE = b"BUFR\x00\x00\x90\x04" + bytes(range(32)) + b"7777"


def synop_event(content: bytes = SYNOP_FILE, **changes: Any) -> dict[str, Any]:
    href = "https://data.meteofrance.example/wis2/synop/20250328/A_ISMD01LFPW281200.bufr4"
    return {
        "specversion": "1.0", "id": "7f9c3c1e-synop-07149-20250328T1200", "source":
        "/meteofrance/observations", "type": "fr.meteofrance.obs.created",
        "time": "2025-03-28T12:05:12Z",
        "data": {
            "type": "Feature", "stac_version": "1.1.0", "id": "0-20000-0-07149-20250328T1200",
            "geometry": {"type": "Point", "coordinates": [2.3844, 48.7167, 89.0]},
            "properties": {"datetime": "2025-03-28T12:00:00Z", "wigos_station_identifier":
                           "0-20000-0-07149"},
            "links": [],
            "assets": {"bufr": {
                "href": href, "roles": ["data"], "file:size": len(content),
                "file:checksum": multihash_of(content, "sha256"),
            }},
        },
    } | changes


def test_second_dataset_needs_no_code(synop: DatasetDescription) -> None:
    (message,) = build_notifications(
        parse_event(synop_event()), synop, contents={"bufr": SYNOP_FILE}, pubtime=PUBTIME)
    data = message.to_dict()
    props = data["properties"]
    assert props["data_id"] == (
        "wis2/fr-meteofrance/data/core/weather/surface-based-observations/synop/"
        "A_ISMD01LFPW281200.bufr4")
    assert props["metadata_id"] == synop.metadata_id
    assert data["links"][0]["type"] == "application/bufr"
    assert data["geometry"]["coordinates"] == [2.3844, 48.7167, 89.0]
    assert props["content"] == {"encoding": "base64", "size": len(SYNOP_FILE),
                                "value": base64.b64encode(SYNOP_FILE).decode()}
    assert props["integrity"] == integrity_of(SYNOP_FILE, "sha256").model_dump()
    report = validate_notification(data, topic=synop.topic)
    assert report.ok, report.summary()


def test_inline_content_encodings_and_limits(
    synop: DatasetDescription, argo: DatasetDescription
) -> None:
    text = "TTAA 28121 07149 Trappes (Météo-France)\n".encode()
    (message,) = build_notifications(parse_event(synop_event(text)), synop,
                                     contents={"bufr": text})
    content = message.properties.content
    assert content is not None
    assert (content.encoding, content.value, content.size) == ("utf-8", text.decode(), len(text))
    assert validate_notification(message.to_dict(), topic=synop.topic).ok

    # base64 of 3072 bytes is exactly 4096 characters: inlined; one byte more: not inlined
    edge = bytes([0xFF]) * 3072
    (message,) = build_notifications(parse_event(synop_event(edge)), synop,
                                     contents={"bufr": edge})
    assert message.properties.content is not None
    assert len(message.properties.content.value) == 4096
    bigger = edge + b"\xff"
    (message,) = build_notifications(parse_event(synop_event(bigger)), synop,
                                     contents={"bufr": bigger})
    assert message.properties.content is None

    # no bytes given, a dataset that does not inline, or a deletion: no content
    (message,) = build_notifications(parse_event(synop_event()), synop)
    assert message.properties.content is None
    (message,) = build_notifications(parse_event(synop_event()), synop, operation="delete",
                                     contents={"bufr": SYNOP_FILE})
    assert message.properties.content is None
    (message,) = build_notifications(parse_event(BUFR_EVENT.read_bytes()), argo,
                                     contents={BUFR_KEY: b"small"})
    assert message.properties.content is None


# ---- whatever valid event comes in: notifications, or InvalidInput naming the assets ---------

_text = st.text(min_size=1, max_size=12)
_asset = st.fixed_dictionaries(
    {"href": st.sampled_from(["https://h.example/a/b.BU", "ftp://h.example/x%20y.nc",
                              "https://h.example/é/ü.bufr4", "https://h.example/"])},
    optional={
        "roles": st.lists(st.sampled_from(["data", "metadata", "thumbnail"]), max_size=2),
        "type": _text, "title": _text, "file:size": st.integers(0, 10**12),
        "file:checksum": st.builds(multihash_of, st.binary(max_size=8),
                                   st.sampled_from(["sha256", "sha512", "sha3-384"])),
    },
)
_times = st.one_of(
    st.just({"datetime": "2024-11-09T21:08:00+05:30"}),
    st.just({"start_datetime": "2024-11-09T00:00:00Z", "end_datetime": "2024-11-10T00:00:00Z"}),
)


@settings(max_examples=200, deadline=None)
@given(
    assets=st.dictionaries(_text, _asset, min_size=1, max_size=4),
    times=_times,
    operation=st.sampled_from([None, "create", "update", "delete"]),
    inline=st.booleans(),
    content=st.binary(max_size=5000),
)
def test_any_valid_event_builds_or_is_refused_by_field(
    assets: dict[str, Any], times: dict[str, str], operation: str | None, inline: bool,
    content: bytes,
) -> None:
    dataset = load_dataset("synop").model_copy(update={"inline_content": inline})
    raw = synop_event()
    raw["data"]["assets"] = assets
    raw["data"]["properties"] = times
    if operation:
        raw["operation"] = operation
    event = parse_event(raw)
    try:
        messages = build_notifications(event, dataset, contents=dict.fromkeys(assets, content))
    except InvalidInput as exc:
        assert [e.path for e in exc.errors] == ["$.data.assets"]
        return
    assert 1 <= len(messages) <= len(assets)
    for message in messages:
        data = message.to_dict()
        json.dumps(data)
        assert ("datetime" in data["properties"]) != ("start_datetime" in data["properties"])
        assert message.rel == RELATION_OF_OPERATION[event.operation]
        content_value = data["properties"].get("content", {}).get("value", "")
        assert len(content_value) <= 4096
        assert bool(content_value) <= (inline and event.operation != "delete")
        validate_notification(data, topic=dataset.topic)  # never raises


@pytest.mark.parametrize("path", [BUFR_EVENT, NETCDF_EVENT])
def test_the_data_ids_are_known_before_the_build(path: Any, argo: DatasetDescription) -> None:
    """What an event claims before building (flows.pipeline) is what its notifications announce."""
    event = parse_event(path.read_text())
    built = build_notifications(event, argo, pubtime=PUBTIME)
    assert data_ids_of(event, argo) == [n.properties.data_id for n in built]


# ---- WNM 1.3 features: cache, WIGOS station, access control, content encodings ---------------

ARPEGE_EVENT = DATA / "events" / "arpege-event.json"
SYNOP_SAMPLE = DATA / "events" / "synop-event.json"


def _one(event: dict[str, Any], dataset: DatasetDescription, **kwargs: Any) -> dict[str, Any]:
    (message,) = build_notifications(parse_event(event), dataset, pubtime=PUBTIME, **kwargs)
    return message.to_dict()


def test_cache_is_omitted_when_true_and_false_from_the_dataset(argo: DatasetDescription) -> None:
    assert "cache" not in _one(bufr(), argo)["properties"]
    no_cache = argo.model_copy(update={"cache": False})
    message = _one(bufr(), no_cache)
    assert message["properties"]["cache"] is False
    assert validate_notification(message, topic=argo.topic).ok


@pytest.mark.parametrize(
    ("where", "value", "dataset_cache", "expected"),
    [
        ("event", False, True, False),
        ("event", "false", True, False),
        ("event", "TRUE", False, None),
        ("stac", False, True, False),
        ("stac", True, False, None),
    ],
)
def test_an_event_overrides_the_dataset_cache(argo: DatasetDescription, where: str, value: Any,
                                              dataset_cache: bool, expected: Any) -> None:
    event = bufr()
    if where == "event":
        event["cache"] = value  # a CloudEvent extension attribute
    else:
        event["data"]["properties"]["cache"] = value
    props = _one(event, argo.model_copy(update={"cache": dataset_cache}))["properties"]
    assert props.get("cache") == expected


@pytest.mark.parametrize(("where", "path"), [("event", "$.cache"),
                                             ("stac", "$.data.properties.cache")])
def test_a_cache_that_is_not_a_boolean_is_named(argo: DatasetDescription, where: str,
                                                path: str) -> None:
    event = bufr()
    (event if where == "event" else event["data"]["properties"])["cache"] = "maybe"
    with pytest.raises(InvalidInput) as err:
        build_notifications(parse_event(event), argo)
    assert [(e.path, e.message) for e in err.value.errors] == [
        (path, "'maybe' is not a boolean (true or false)")]


def test_the_cache_survives_the_stored_notification(argo: DatasetDescription) -> None:
    """What the build cache and a redelivery keep: the model, dumped and read back."""
    (note,) = build_notifications(parse_event(bufr()), argo.model_copy(update={"cache": False}))
    again = type(note).model_validate_json(note.model_dump_json(by_alias=True))
    assert again.properties.cache is False
    assert again.to_json() == note.to_json() and '"cache":false' in note.to_json()


def test_a_station_identifier_becomes_a_property_and_a_via_link(
    synop: DatasetDescription,
) -> None:
    message = _one(json.loads(SYNOP_SAMPLE.read_text(encoding="utf-8")), synop)
    assert message["properties"]["wigos_station_identifier"] == "0-20000-0-07149"
    assert [link["rel"] for link in message["links"]] == ["canonical", "via"]
    assert message["links"][1] == {
        "href": "https://oscar.wmo.int/surface/#/search/station/stationReportDetails/"
                "0-20000-0-07149", "rel": "via", "type": "text/html"}
    report = validate_notification(message, topic=synop.topic)
    assert report.ok, report.summary()


def test_a_bad_station_identifier_is_refused_with_its_path(synop: DatasetDescription) -> None:
    event = synop_event()
    event["data"]["properties"]["wigos_station_identifier"] = "06447"
    with pytest.raises(InvalidInput) as err:
        build_notifications(parse_event(event), synop)
    (error,) = err.value.errors
    assert error.path == "$.data.properties.wigos_station_identifier"
    assert "'06447' is not a WIGOS station identifier" in error.message


def test_the_station_property_is_configurable(synop: DatasetDescription) -> None:
    event = synop_event()
    props = event["data"]["properties"]
    props["wsi"] = props.pop("wigos_station_identifier")
    assert "wigos_station_identifier" not in _one(event, synop)["properties"]
    custom = synop.model_copy(update={"wigos_station_property": "wsi"})
    assert _one(event, custom)["properties"]["wigos_station_identifier"] == "0-20000-0-07149"
    props["wsi"] = "not-a-wsi"
    with pytest.raises(InvalidInput, match=r"\$\.data\.properties\.wsi"):
        build_notifications(parse_event(event), custom)


def test_the_third_dataset_from_configuration_alone() -> None:
    """ARPEGE GRIB2: recommended, access-controlled, not cached, a time range, never inlined."""
    arpege = load_dataset("arpege")
    event = json.loads(ARPEGE_EVENT.read_text(encoding="utf-8"))
    message = _one(event, arpege, contents={next(iter(event["data"]["assets"])): b"GRIB7777"})
    props = message["properties"]
    assert props["cache"] is False
    assert (props["start_datetime"], props["end_datetime"]) == ("2026-12-05T00:00:00Z",
                                                                "2026-12-06T00:00:00Z")
    assert "datetime" not in props and "content" not in props
    (link,) = message["links"]
    assert link["rel"] == "canonical" and link["type"] == "application/x-grib2"
    assert link["security"] == arpege.security
    assert props["data_id"].startswith("wis2/fr-meteofrance/data/recommended/weather/prediction/")
    report = validate_notification(message, topic=arpege.topic)
    assert report.ok, report.summary()
    # a deletion link carries no security object: there is nothing to download
    deletion = _one(event, arpege, operation="delete")
    assert "security" not in deletion["links"][0]


@pytest.mark.parametrize("encoding", ["utf-8", "base64", "gzip"])
def test_each_content_encoding_is_decodable_and_checked(synop: DatasetDescription,
                                                        encoding: str) -> None:
    import gzip

    data = ("SYNOP 07149 " * 30).encode()
    dataset = synop.model_copy(update={"content_encoding": encoding})
    message = _one(synop_event(data), dataset, contents={"bufr": data})
    content = message["properties"]["content"]
    assert content["encoding"] == encoding and content["size"] == len(data)
    decoded = {"utf-8": lambda v: v.encode(), "base64": base64.b64decode,
               "gzip": lambda v: gzip.decompress(base64.b64decode(v))}[encoding](content["value"])
    assert decoded == data
    report = validate_notification(message, topic=synop.topic)
    assert report.ok, report.summary()


def test_the_size_rule_is_on_the_encoded_value(synop: DatasetDescription) -> None:
    import os

    noise = os.urandom(3500)  # does not compress: gzip+base64 is over 4096 characters
    for encoding in ("base64", "gzip"):
        dataset = synop.model_copy(update={"content_encoding": encoding})
        assert "content" not in _one(synop_event(noise), dataset,
                                     contents={"bufr": noise})["properties"]
    text = b"0" * 4000  # 4000 characters of utf-8 fit; gzip makes them a few dozen
    for encoding in ("utf-8", "gzip"):
        dataset = synop.model_copy(update={"content_encoding": encoding})
        content = _one(synop_event(text), dataset, contents={"bufr": text})["properties"][
            "content"]
        assert len(content["value"]) <= 4096
    # utf-8 asked for binary data: not inlined (it is not text)
    dataset = synop.model_copy(update={"content_encoding": "utf-8"})
    assert "content" not in _one(synop_event(), dataset,
                                 contents={"bufr": SYNOP_FILE})["properties"]
