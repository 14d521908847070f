"""WCMP2 discovery metadata validation: pywcmp's ETS with schema errors surfaced, the record
identifier, and the MQTT channels its links announce (valid topics of the record's own centre)."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from wis2.topics import centre_id_of_topic, publication_topic_problem
from wis2.validation import ValidationReport

log = logging.getLogger(__name__)

IDENTIFIER = re.compile(
    r"^urn:wmo:md:(?P<centre>[a-z0-9][a-z0-9.-]*[a-z0-9]):(?P<local>[^\s:][^\s]*)$"
)


def centre_id_of_record(record_id: Any) -> str | None:
    match = IDENTIFIER.fullmatch(record_id) if isinstance(record_id, str) else None
    return match["centre"] if match else None


def _check_identifier(report: ValidationReport, record_id: Any) -> str | None:
    centre = centre_id_of_record(record_id)
    if centre is None:
        report.add("identifier", False,
                   f"identifier {record_id!r} is not urn:wmo:md:<centre-id>:<local-id>")
    else:
        report.add("identifier", True, f"identifier {record_id}")
    return centre


def _check_channels(report: ValidationReport, links: Any, centre: str | None) -> None:
    channels = [
        link["channel"] for link in links or []
        if isinstance(link, Mapping) and isinstance(link.get("channel"), str)
    ] if isinstance(links, list) else []
    problems = []
    for channel in channels:
        # A record may announce the Global Caches' copy (cache/a/wis2/...) of its topic.
        topic = "origin/" + channel.removeprefix("cache/") if channel.startswith("cache/") \
            else channel
        problem = publication_topic_problem(topic)
        if problem is None and centre is not None and centre_id_of_topic(topic) != centre:
            problem = f"channel {channel!r} is not a topic of centre {centre!r}"
        if problem:
            problems.append(problem if channel in problem else f"channel {channel!r}: {problem}")
    report.add("channels", not problems,
               "; ".join(problems) or f"{len(channels)} valid channel(s)")


def validate_wcmp2(
    record: Mapping[str, Any] | str | bytes, *, kpi: bool = False
) -> ValidationReport:
    """Validate a WCMP2 record; never raises on bad input (it becomes a failed check)."""
    from pywcmp.wcmp2.ets import WMOCoreMetadataProfileTestSuite2

    report, document = ValidationReport.start(record, "wcmp2")
    if document is None:
        return report
    centre = _check_identifier(report, document.get("id"))

    suite = WMOCoreMetadataProfileTestSuite2(document)
    schema = suite.test_requirement_validation()
    errors = schema.get("errors", [])
    report.add("schema", not errors, "; ".join(errors) or "valid against the WCMP2 schema")
    if not errors:
        try:
            ets = suite.run_tests(fail_on_schema_validation=True)
        except Exception as exc:  # the ETS must never crash the caller
            report.add("ets", False, f"ETS could not run on this record: {exc!r}")
        else:
            seen: set[str] = set()
            for test in ets["tests"]:
                name = "ets:" + test["id"].rsplit("/", 1)[-1]
                if name in seen:
                    continue
                seen.add(name)
                passed = test["code"] in ("PASSED", "SKIPPED")
                message = test.get("message", test["code"])
                if name == "ets:identifier" and not passed:
                    message = f"identifier {document.get('id')!r}: {message}"
                report.add(name, passed, message,
                           severity="warning" if test["code"] == "WARNING" else "error")
    _check_channels(report, document.get("links"), centre)
    if kpi:
        from pywcmp.wcmp2.kpi import WMOCoreMetadataProfileKeyPerformanceIndicators

        report.add_kpi(
            lambda: WMOCoreMetadataProfileKeyPerformanceIndicators(document).evaluate()
        )
    return report
