"""Strict WNM validation: the specification's schema and ETS, plus the checks pywis-pubsub 0.12
leaves out (base64 integrity of the right length, one canonical/update/deletion link, UTC
timestamps, message and content size, data_id form, topic).

Profiles: "publish" (default) is what the chain enforces before publishing anything; "spec" is
conformance for third-party messages, where the integrity encoding and the data_id order are
reported as warnings (several WNM specification examples carry placeholder or hex digests)."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel

from wis2.multihash import DIGEST_LENGTHS
from wis2.notification import MAX_INLINE_CONTENT_CHARS, MAX_MESSAGE_BYTES, decode_content
from wis2.relations import LINK_RELATIONS
from wis2.stations import wsi_problem
from wis2.topics import centre_id_of_topic, publication_topic_problem
from wis2.wnm_schema import run_ets, schema_errors, wnm_validator

log = logging.getLogger(__name__)

Profile = Literal["publish", "spec"]
Severity = Literal["error", "warning"]
RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")
_HEX = re.compile(r"^[0-9a-fA-F]+$")


class CheckResult(BaseModel):
    id: str
    passed: bool
    severity: Severity = "error"
    message: str = ""

    @property
    def result(self) -> str:
        if self.passed:
            return "PASSED"
        return "FAILED" if self.severity == "error" else "WARNING"


class ValidationFailed(ValueError):
    def __init__(self, report: ValidationReport) -> None:
        self.report = report
        super().__init__(report.summary())


class ValidationReport(BaseModel):
    subject: str
    kind: Literal["wnm", "wcmp2"]
    checks: list[CheckResult] = []

    @property
    def failures(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.passed and c.severity == "error"]

    @property
    def warnings(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.passed and c.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.failures

    def add(self, id: str, passed: bool, message: str = "", severity: Severity = "error") -> None:
        self.checks.append(CheckResult(id=id, passed=passed, severity=severity, message=message))

    def add_kpi(self, evaluate: Callable[[], Mapping[str, Any]]) -> None:
        """Run a KPI evaluation (it needs the network): a warning row, never a failure."""
        try:
            summary = evaluate().get("summary", {})
            self.add("kpi", True, f"KPI score {summary.get('percentage', '?')}%",
                     severity="warning")
        except Exception as exc:  # KPI needs the network; it never blocks publication
            self.add("kpi", False, f"KPI not evaluated: {exc}", severity="warning")

    @classmethod
    def start(
        cls, document: Mapping[str, Any] | str | bytes, kind: Literal["wnm", "wcmp2"]
    ) -> tuple[ValidationReport, dict[str, Any] | None]:
        """A report for `document`, and the document as a dict; None (with a failed `json`
        check in the report) when it is not a JSON object."""
        parsed, problem = load_json_document(document)
        is_object = isinstance(parsed, Mapping)
        report = cls(subject=str(parsed.get("id", "?")) if is_object else "?", kind=kind)
        if problem or not is_object:
            report.add("json", False, problem or f"a {kind.upper()} document is a JSON object")
            return report, None
        return report, dict(parsed)

    def rows(self) -> list[dict[str, str]]:
        return [{"check": c.id, "result": c.result, "message": c.message} for c in self.checks]

    def summary_row(self) -> dict[str, str]:
        """One row for the whole report: the result, how many checks ran, and the failed and
        warning checks with their messages (a batch's table: one row per notification)."""
        failed = self.failures
        return {
            "result": "FAILED" if failed else "PASSED",
            "checks": (f"{len(failed)} of {len(self.checks)} failed" if failed
                       else f"{len(self.checks)} passed"),
            "details": "; ".join(f"{c.id} {c.result}: {c.message}"
                                 for c in [*failed, *self.warnings]),
        }

    def summary(self) -> str:
        if self.ok:
            head = f"{self.kind} {self.subject}: valid ({len(self.checks)} checks"
            return head + (f", {len(self.warnings)} warnings)" if self.warnings else ")")
        details = "; ".join(f"{c.id}: {c.message}" for c in self.failures)
        return f"{self.kind} {self.subject}: {len(self.failures)} failed check(s): {details}"

    def raise_for_failures(self) -> ValidationReport:
        if not self.ok:
            raise ValidationFailed(self)
        return self


def load_json_document(document: Mapping[str, Any] | str | bytes) -> tuple[Any, str | None]:
    """(parsed JSON, None) or (None, reason it is not JSON)."""
    if isinstance(document, Mapping):
        return dict(document), None
    try:
        text = document.decode("utf-8") if isinstance(document, bytes | bytearray) else document
        return json.loads(text), None
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 text (byte {exc.start})"
    except json.JSONDecodeError as exc:
        return None, f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"


def _check_integrity(
    report: ValidationReport, props: Mapping[str, Any], severity: Severity, deleting: bool
) -> None:
    integrity = props.get("integrity")
    if integrity is None:
        # Integrity is optional in WNM; this node always announces it, except for deletions.
        report.add("integrity-encoding", severity == "warning" or deleting,
                   "no integrity given", severity=severity)
        return
    if not isinstance(integrity, Mapping):
        report.add("integrity-encoding", False, "integrity is not an object")
        return
    method, value = integrity.get("method"), integrity.get("value")
    expected = DIGEST_LENGTHS.get(method) if isinstance(method, str) else None
    if expected is None:
        report.add("integrity-encoding", False, f"integrity.method {method!r} is not a WNM method")
        return
    if not isinstance(value, str):
        report.add("integrity-encoding", False, "integrity.value is not a string")
        return
    if _HEX.fullmatch(value) and len(value) == 2 * expected:
        report.add("integrity-encoding", False, severity=severity,
                   message="integrity.value looks like hex; "
                   f"WNM requires the base64 {method} digest")
        return
    try:
        digest = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        report.add("integrity-encoding", False, severity=severity,
                   message="integrity.value is not valid base64")
        return
    if len(digest) != expected:
        report.add("integrity-encoding", False, severity=severity,
                   message=f"integrity.value decodes to {len(digest)} bytes; "
                   f"a {method} digest is {expected} bytes")
        return
    report.add("integrity-encoding", True, f"base64 {method} digest")


def _check_times(report: ValidationReport, props: Mapping[str, Any]) -> None:
    problems = []
    for name in ("pubtime", "datetime", "start_datetime", "end_datetime"):
        value = props.get(name)
        if value is not None and (not isinstance(value, str) or not RFC3339_UTC.fullmatch(value)):
            problems.append(f"properties.{name} {value!r} is not RFC 3339 UTC with 'Z'")
    if props.get("pubtime") is None:
        problems.append("properties.pubtime is missing")
    report.add("timestamps-utc", not problems, "; ".join(problems) or "UTC 'Z' timestamps")

    has_dt = props.get("datetime") is not None
    has_start = props.get("start_datetime") is not None
    has_end = props.get("end_datetime") is not None
    if has_dt and (has_start or has_end):
        report.add("temporal-form", False, "give datetime or start_datetime+end_datetime, not both")
    elif not has_dt and not (has_start and has_end):
        report.add("temporal-form", False,
                   "missing time: datetime, or both start_datetime and end_datetime")
    else:
        report.add("temporal-form", True, "one temporal form")


def _check_links(report: ValidationReport, links: Any) -> None:
    if not isinstance(links, list):
        report.add("single-link-relation", False, "links is not a list")
        return
    rels = [link.get("rel") for link in links if isinstance(link, Mapping)]
    found = [rel for rel in rels if rel in LINK_RELATIONS]
    if len(found) == 1:
        report.add("single-link-relation", True, f"one {found[0]} link")
    else:
        report.add("single-link-relation", False,
                   "exactly one of canonical/update/deletion links required, "
                   f"found {found or 'none'}")


def _check_content(
    report: ValidationReport, props: Mapping[str, Any], severity: Severity
) -> None:
    content = props.get("content")
    if content is None:
        return
    if not isinstance(content, Mapping) or not isinstance(content.get("value"), str):
        report.add("content-size", False, "properties.content.value missing")
        return
    value, encoding = content["value"], content.get("encoding")
    if len(value) > MAX_INLINE_CONTENT_CHARS:
        report.add("content-size", False, f"properties.content.value is {len(value)} characters; "
                   f"at most {MAX_INLINE_CONTENT_CHARS} may be inlined")
        return
    try:
        size = len(decode_content(value, encoding))
    except (binascii.Error, ValueError, OSError, EOFError):
        report.add("content-size", False, f"properties.content.value is not {encoding}")
        return
    if content.get("size") != size:
        report.add("content-size", False, severity=severity,
                   message=f"properties.content.size {content.get('size')} != decoded size {size}")
        return
    report.add("content-size", True, f"{len(value)} characters inline")


def _check_data_id(report: ValidationReport, data_id: Any, severity: Severity) -> None:
    if not isinstance(data_id, str) or not data_id:
        report.add("data-id", False, "properties.data_id missing")
        return
    if data_id.startswith("origin/") or data_id.startswith("cache/"):
        report.add("data-id", False, f"data_id {data_id!r} must not start with a channel")
        return
    tokens = data_id.split("/")
    if tokens[0] == "wis2" and len(tokens) > 3 and tokens[2] not in ("data", "metadata"):
        policy_first = tokens[2] in ("core", "recommended") and tokens[3] in ("data", "metadata")
        hint = (f"uses '{tokens[2]}/{tokens[3]}' order; the WIS2 Topic Hierarchy puts "
                f"'{tokens[3]}' before the data policy") if policy_first else \
            f"level 3 {tokens[2]!r} should be 'data' or 'metadata' (topic hierarchy order)"
        report.add("data-id", False, f"data_id {data_id!r} {hint}", severity=severity)
        return
    report.add("data-id", True, data_id)


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not RFC3339_UTC.fullmatch(value):
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _check_wnm13(report: ValidationReport, props: Mapping[str, Any], rel: str | None,
                 profile: Profile, previous_pubtime: str | None) -> None:
    """WNM 1.3 semantics: `global-cache` only from a Global Cache, a valid WIGOS station
    identifier, an update later than what it updates."""
    if "global-cache" in props:
        if profile == "publish":
            report.add("global-cache", False, "properties.global-cache is set only by a Global "
                       "Cache republishing a notification; a WIS2 node never publishes it")
        else:
            report.add("global-cache", True,
                       f"republished by Global Cache {props['global-cache']!r}")
    if "wigos_station_identifier" in props:
        problem = wsi_problem(props["wigos_station_identifier"])
        report.add("wigos-station-identifier", problem is None,
                   f"properties.wigos_station_identifier: {problem}" if problem
                   else str(props["wigos_station_identifier"]))
    if previous_pubtime is not None and rel == "update":
        new, old = _parse_time(props.get("pubtime")), _parse_time(previous_pubtime)
        later = new is not None and old is not None and new > old
        report.add("update-pubtime", later,
                   f"pubtime {props.get('pubtime')} is later than {previous_pubtime}, the "
                   "pubtime of the notification it updates" if later else
                   f"an update must carry a pubtime later than the one of the notification it "
                   f"updates: {props.get('pubtime')!r} is not later than {previous_pubtime!r}")


def validate_notification(
    message: Mapping[str, Any] | str | bytes,
    *,
    topic: str | None = None,
    profile: Profile = "publish",
    kpi: bool = False,
    previous_pubtime: str | None = None,
) -> ValidationReport:
    """Validate a WNM; never raises on bad input (it becomes a failed check).

    `previous_pubtime`: the pubtime of the last notification published for this data_id (the
    publication ledger's): an update must be later."""
    report, document = ValidationReport.start(message, "wnm")
    if document is None:
        return report
    strict: Severity = "error" if profile == "publish" else "warning"

    errors = schema_errors(wnm_validator(), document)
    report.add("schema", not errors, "; ".join(errors) or "valid against the WNM schema")
    _run_ets(report, document, schema_valid=not errors)

    props = document.get("properties")
    props = props if isinstance(props, Mapping) else {}
    links = document.get("links")
    deleting = isinstance(links, list) and any(
        isinstance(link, Mapping) and link.get("rel") == "deletion" for link in links
    )
    _check_integrity(report, props, strict, deleting)
    _check_links(report, document.get("links"))
    _check_times(report, props)
    _check_content(report, props, strict)
    _check_data_id(report, props.get("data_id"), strict)
    announcing = [link.get("rel") for link in links if isinstance(link, Mapping)
                  and link.get("rel") in LINK_RELATIONS] if isinstance(links, list) else []
    _check_wnm13(report, props, announcing[0] if len(announcing) == 1 else None, profile,
                 previous_pubtime)
    size = len(json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    report.add("size", size <= MAX_MESSAGE_BYTES,
               f"{size} bytes (at most {MAX_MESSAGE_BYTES})")
    if topic is not None:
        problem = publication_topic_problem(topic)
        if problem is None and topic.split("/")[4:5] == ["data"]:
            centre = centre_id_of_topic(topic)
            metadata_id = props.get("metadata_id")
            data_id = props.get("data_id")
            if isinstance(metadata_id, str) and centre and f":{centre}:" not in metadata_id:
                problem = f"metadata_id {metadata_id!r} is not a record of centre {centre!r}"
            elif (isinstance(data_id, str) and data_id.startswith("wis2/")
                  and data_id.split("/")[1:2] != [centre]):
                problem = f"data_id {data_id!r} is not under wis2/{centre}/ of topic {topic!r}"
        if (problem is None and props.get("content") is not None
                and topic.split("/")[4:6] == ["data", "recommended"]):
            problem = "recommended data is never inlined: properties.content must be absent"
        report.add("topic", problem is None, problem or f"publishable on {topic}")
    if kpi:
        from pywis_pubsub.kpi import WNMKeyPerformanceIndicators

        report.add_kpi(lambda: WNMKeyPerformanceIndicators(document).evaluate())
    return report


def _run_ets(report: ValidationReport, document: Mapping[str, Any], *,
             schema_valid: bool) -> None:
    try:
        results = run_ets(document, schema_valid=schema_valid)
    except ValueError as exc:
        log.debug("WNM ETS stopped: %s", exc)
        report.add("ets", False, "ETS not run: the message fails the WNM schema (see 'schema')")
        return
    except Exception as exc:  # the ETS must never crash the caller
        report.add("ets", False, f"ETS could not run on this message: {exc!r}")
        return
    for test in results["ets-report"]["tests"]:
        name = "ets:" + test["id"].rsplit("/", 1)[-1]
        report.add(name, test["code"] != "FAILED", test.get("message", test["code"]))
