"""WIGOS station identifiers (WSI) and the OSCAR/Surface page of a station.

A WSI has four hyphen-separated blocks: identifier series (0-14), issuer of identifier
(0-65534), issue number (0-65534) and local identifier (1 to 16 letters or digits), e.g.
``0-20000-0-06447``. A notification about one station's data names it in
``properties.wigos_station_identifier`` and links to its OSCAR/Surface page with ``rel=via``
(as wis2box does).
"""

from __future__ import annotations

import re

from wis2.notification import Link

WSI_PATTERN = re.compile(
    r"^(?P<series>\d{1,2})-(?P<issuer>\d{1,5})-(?P<number>\d{1,5})-(?P<local>[0-9A-Za-z]{1,16})$"
)
OSCAR_STATION_URL = "https://oscar.wmo.int/surface/#/search/station/stationReportDetails/"


def wsi_problem(value: object) -> str | None:
    """Why `value` is not a WIGOS station identifier, or None when it is one."""
    if not isinstance(value, str):
        return f"{value!r} is not a WIGOS station identifier (a string)"
    match = WSI_PATTERN.fullmatch(value)
    if match is None:
        return (f"{value!r} is not a WIGOS station identifier: four hyphen-separated blocks, "
                "series-issuer-issue number-local id, e.g. 0-20000-0-06447")
    if int(match["series"]) > 14:
        return f"{value!r}: WIGOS identifier series {match['series']} is not 0-14"
    for block in ("issuer", "number"):
        if int(match[block]) > 65534:
            return f"{value!r}: WIGOS identifier {block} {match[block]} is not 0-65534"
    return None


def station_link(wsi: str) -> Link:
    """The ``rel=via`` link to the station's OSCAR/Surface page."""
    return Link(href=OSCAR_STATION_URL + wsi, rel="via", type="text/html")
