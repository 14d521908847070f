"""The benchmark's generated events: distinct files, each matching the notification it yields."""

from __future__ import annotations

from bench.events import EventFactory
from wis2.cloudevent import parse_event
from wis2.dataset import load_dataset
from wis2.mapping import build_notifications


def test_events_are_distinct_and_match_their_notifications():
    dataset = load_dataset("argo")
    factory = EventFactory(dataset, "BENCHTEST", files_url="http://127.0.0.1:9999")
    events = factory.batch("steady", 3)
    parsed = [parse_event(e.payload) for e in events]
    assert len({p.id for p in parsed}) == 3
    assert len({e.data_id for e in events}) == 3
    checksums = {a.file_checksum for p in parsed for a in p.data.assets.values()}
    assert len(checksums) == 3
    for event, p in zip(events, parsed, strict=True):
        (note,) = build_notifications(p, dataset)
        assert note.properties.data_id == event.data_id
        assert event.data_id.endswith(f"/{event.name}.csv")
        assert note.links[0].href.startswith("http://127.0.0.1:9999/argo/")
        assert note.properties.integrity is not None
        assert note.properties.integrity.method == "sha256"
