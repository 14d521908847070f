"""The benchmark's generated events: distinct files, each matching the notification it yields."""

from __future__ import annotations

import hashlib

from bench.events import EventFactory, FileMix, file_chunks, file_sha256, file_size
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


def test_a_file_mix_spreads_its_sizes_and_names_them_in_the_files():
    mix = FileMix("20000:795,500000:200,20000000:5")
    assert sorted(mix.sizes.count(size) for size in (20000, 500000, 20000000)) == [5, 200, 795]
    assert [n for n in range(1000) if mix.size_of(n) == 20000000] == [100, 300, 500, 700, 900]
    factory = EventFactory(load_dataset("argo"), "BENCHTEST", files_url="http://127.0.0.1:9",
                           real_files=True, mix=FileMix("30:1,70000:1"))
    events = factory.batch("burst", 2)
    sizes = [a.file_size for e in events for a in parse_event(e.payload).data.assets.values()]
    assert sizes == [30, 70000]
    assert events[1].data_id.endswith("/BENCHTEST_burst_00001_70000.csv")


def test_generated_files_have_their_size_and_announced_checksum():
    for name in ("T_burst_00001_20000.csv", "T_burst_00002_7.csv", "T_burst_00003.csv",
                 "T_b-x_00004_200000.csv"):
        chunks = list(file_chunks(name))
        body = b"".join(chunks)
        assert len(body) == file_size(name)
        assert max(len(c) for c in chunks) <= 64 * 1024
        assert hashlib.sha256(body).digest() == file_sha256(name)
    assert file_sha256("T_burst_00001_20000.csv") != file_sha256("T_burst_00002_20000.csv")
