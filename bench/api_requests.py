"""Requests to the Prefect API during a phase (`--count-requests`), from the server's access log.

With `PREFECT_SERVER_LOGGING_LEVEL=INFO` in its environment, `prefect server start` logs every
HTTP request (uvicorn's access log) to its log file, e.g.
`12:00:01.123 | INFO    | uvicorn.access - 127.0.0.1:47460 - "GET /api/health HTTP/1.1" 200`.
`AccessLog.mark()` notes where the log ends at a phase's start; `AccessLog.since(mark)` counts the
request lines written after it, by route: method and path, ids (uuids) replaced by `{id}`, query
strings dropped (`POST /api/flow_runs/{id}/set_state`).

The bench's own reads (`bench.chain.flow_run_counts`, after each phase) are in the log too: the
caller subtracts them (`own=`), counted by the bench's Prefect client.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from pydantic import BaseModel

SERVER_ENV = {"PREFECT_SERVER_LOGGING_LEVEL": "INFO"}  # what the server needs to log them

_REQUEST = re.compile(r'"(?P<method>[A-Z]+) (?P<target>\S+) HTTP/[0-9.]+" (?P<status>\d{3})')
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                   r"[0-9a-fA-F]{12}")
TOP_ROUTES = 12  # routes kept per phase in the results (the rest summed as "other")


def route(method: str, target: str) -> str:
    """`POST /api/flow_runs/{id}/set_state` for `POST /api/flow_runs/<uuid>/set_state?x=1`."""
    path = target.split("?", 1)[0]
    return f"{method} {_UUID.sub('{id}', path)}"


def count_routes(text: str) -> Counter[str]:
    """Requests by route of the uvicorn access lines of `text` (other lines are ignored)."""
    counts: Counter[str] = Counter()
    for line in text.splitlines():
        if "uvicorn.access" not in line:
            continue
        m = _REQUEST.search(line)
        if m:
            counts[route(m["method"], m["target"])] += 1
    return counts


class RequestCounts(BaseModel):
    """The API requests of one phase."""

    total: int
    flow_runs: int | None  # of the phase (bench.chain.flow_run_counts)
    per_flow_run: float | None
    routes: dict[str, int]  # the TOP_ROUTES most requested, then "other"
    own_requests_subtracted: int = 0  # the bench's reads of the flow runs


def summarize(counts: Counter[str], flow_runs: int | None,
              own: Counter[str] | None = None) -> RequestCounts:
    """Totals of `counts` less the bench's `own` requests, per flow run of the phase."""
    own = own or Counter()
    counts = counts - own  # Counter subtraction keeps the positive counts
    total = sum(counts.values())
    top = dict(counts.most_common(TOP_ROUTES))
    if len(counts) > TOP_ROUTES:
        top["other"] = total - sum(top.values())
    return RequestCounts(
        total=total, flow_runs=flow_runs,
        per_flow_run=round(total / flow_runs, 1) if flow_runs else None,
        routes=top, own_requests_subtracted=sum(own.values()))


class AccessLog:
    """The Prefect server's log file, read by position (complete lines only)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def mark(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def since(self, mark: int) -> Counter[str]:
        try:
            with self.path.open("rb") as f:
                f.seek(mark)
                data = f.read()
        except FileNotFoundError:
            return Counter()
        complete = data[: data.rfind(b"\n") + 1]
        return count_routes(complete.decode("utf-8", errors="replace"))
