"""WIGOS station identifiers: what is one, and the OSCAR/Surface link of a station."""

from __future__ import annotations

import pytest

from wis2.stations import station_link, wsi_problem


@pytest.mark.parametrize("wsi", ["0-20000-0-06447", "0-20000-0-07149", "0-840-0-KRID",
                                 "0-250-1-ABCDEFGHIJKLMNOP", "14-65534-65534-1"])
def test_wigos_identifiers(wsi: str) -> None:
    assert wsi_problem(wsi) is None


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("06447", "four hyphen-separated blocks"),
        ("0-20000-06447", "four hyphen-separated blocks"),
        ("0-20000-0-064 47", "four hyphen-separated blocks"),
        ("0-20000-0-", "four hyphen-separated blocks"),
        ("0-20000-0-ABCDEFGHIJKLMNOPQ", "four hyphen-separated blocks"),  # 17 characters
        ("15-20000-0-06447", "series 15 is not 0-14"),
        ("0-65535-0-06447", "issuer 65535 is not 0-65534"),
        ("0-20000-99999-06447", "number 99999 is not 0-65534"),
        (6447, "(a string)"),
    ],
)
def test_not_wigos_identifiers(value: object, words: str) -> None:
    problem = wsi_problem(value)
    assert problem is not None and words in problem


def test_station_link_is_the_oscar_page() -> None:
    link = station_link("0-20000-0-06447")
    assert link.model_dump(exclude_none=True) == {
        "href": "https://oscar.wmo.int/surface/#/search/station/stationReportDetails/"
                "0-20000-0-06447",
        "rel": "via", "type": "text/html"}
