"""The profiles of one benchmark run side by side (e.g. `postgres` and `scaled`, or the variants
of one profile, `postgres[base]` and `postgres[nowake]`): one row per figure, one column per
profile measured, each variant named with its assignments above the table. The API request rows
are left out when no column has them (a run without `--count-requests`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _get(r: dict[str, Any], *path: str) -> Any:
    for key in path:
        if not isinstance(r, dict) or key not in r:
            return None
        r = r[key]
    return r


def _fault(f: dict[str, Any] | None) -> str | None:
    if not f:
        return None
    if f.get("error"):
        return "not carried out"
    return (f"{f['received']}/{f['events_sent']}, lost {f['lost']}, dup. "
            f"{f['duplicate_data_ids']}, recovery {f['recovery_seconds']} s")


def _path(*path: str) -> Callable[[dict[str, Any]], Any]:
    return lambda r: _get(r, *path)


# The process groups of the per-process figures (bench/procmon.py, `<phase>_processes` of a
# result): the Prefect server is `prefect-server` (and `prefect-services` when split), the
# worker `worker` (`worker-<i>` on the scaled node).
SERVER = ("prefect-server", "prefect-services")


def _group(r: dict[str, Any], phase: str, names: tuple[str, ...] | str) -> list[dict[str, Any]]:
    usages = r.get(f"{phase}_processes") or []
    if isinstance(names, str):  # a prefix: `worker` for worker, worker-1, worker-2...
        return [u for u in usages if u["name"] == names or u["name"].startswith(f"{names}-")]
    return [u for u in usages if u["name"] in names]


def cpu_per_1000(phase: str, names: tuple[str, ...] | str) -> Callable[[dict[str, Any]], Any]:
    """CPU seconds of the group (summed) during `phase` per 1,000 events of the phase."""
    def get(r: dict[str, Any]) -> float | None:
        usages, events = _group(r, phase, names), _get(r, phase, "events_sent")
        if not usages or not events:
            return None
        return round(sum(u["cpu_seconds"] for u in usages) * 1000 / events, 1)
    return get


def cpu_per_run(phase: str, names: tuple[str, ...] | str) -> Callable[[dict[str, Any]], Any]:
    """CPU seconds of the group (summed) during `phase` per flow run of the phase."""
    def get(r: dict[str, Any]) -> float | None:
        usages, runs = _group(r, phase, names), _get(r, f"{phase}_runs", "total")
        if not usages or not runs:
            return None
        return round(sum(u["cpu_seconds"] for u in usages) / runs, 3)
    return get


def peak_rss(phase: str, names: tuple[str, ...] | str) -> Callable[[dict[str, Any]], Any]:
    """Peak RSS MB of the group's largest process tree during `phase` (several workers: the
    largest worker's, not their sum)."""
    def get(r: dict[str, Any]) -> float | None:
        usages = _group(r, phase, names)
        return max((u["peak_rss_mb"] for u in usages), default=None)
    return get


ROWS: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
    ("node start-up s", _path("startup_seconds")),
    ("data verified (files downloaded, checked)", _path("verify_data")),
    ("intake events/s (listeners alone)", _path("intake", "intake_eps")),
    ("steady p50 s", _path("steady", "latency", "p50")),
    ("steady p90 s", _path("steady", "latency", "p90")),
    ("steady p99 s", _path("steady", "latency", "p99")),
    ("steady missing", _path("steady", "lost")),
    ("steady API requests per flow run", _path("steady_requests", "per_flow_run")),
    ("server CPU s per steady flow run", cpu_per_run("steady", SERVER)),
    ("Prefect floor: server CPU s per bare run", _path("prefect_floor", "server_cpu_per_run")),
    ("Prefect floor: engine CPU s per bare run", _path("prefect_floor", "engine_cpu_per_run")),
    ("Prefect floor: bare run p50 s", _path("prefect_floor", "run_seconds", "p50")),
    ("burst time to drain s", _path("burst", "drain_seconds")),
    ("burst chain events/s", _path("burst", "throughput_eps")),
    ("burst missing", _path("burst", "lost")),
    ("burst dup. notifications", _path("burst", "duplicate_messages")),
    ("burst API requests per flow run", _path("burst_requests", "per_flow_run")),
    ("server CPU s per 1,000 burst events", cpu_per_1000("burst", SERVER)),
    ("worker CPU s per 1,000 burst events", cpu_per_1000("burst", "worker")),
    ("every process's CPU s per 1,000 burst events", _path("burst_cpu", "per_1000_events")),
    ("least drain s the cores allow (that CPU / cores)",
     _path("burst_cpu", "least_drain_seconds")),
    ("burst peak RSS MB server", peak_rss("burst", SERVER)),
    ("burst peak RSS MB worker", peak_rss("burst", "worker")),
    ("backfill notifications/s held", _path("backfill", "achieved_rate")),
    ("backfill missing", _path("backfill", "lost")),
]
OPTIONAL_ROWS = {"steady API requests per flow run", "burst API requests per flow run"}


def side_by_side(profiles: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown lines of the table, or nothing when fewer than two profiles were measured."""
    measured = {name: r for name, r in profiles.items()
                if not r.get("error") and not (r.get("skipped") and not r.get("floor"))}
    if len(measured) < 2:
        return []
    names = list(measured)
    rows = [[label] + [get(measured[n]) for n in names] for label, get in ROWS]
    rows = [row for row in rows
            if row[0] not in OPTIONAL_ROWS or any(c is not None for c in row[1:])]
    scenarios: list[str] = []
    for r in measured.values():
        scenarios += [s for s in (r.get("faults") or {}) if s not in scenarios]
    rows += [[f"fault `{s}`"] + [_fault((measured[n].get("faults") or {}).get(s))
                                 for n in names] for s in scenarios]
    topology = []
    for n in names:
        t = measured[n].get("topology")
        topology.append(f"{t['workers']} workers, {t['listeners']} listeners"
                        + (", split server" if t.get("separate_services") else "")
                        if t else "1 worker, 1 listener")
    variants = [f"- `{n}`: " + measured[n]["variant"]["described"] for n in names
                if measured[n].get("variant")]
    lines = ["## Profiles side by side", ""]
    if variants:
        lines += ["Variants (each on a fresh node, one after the other):", "", *variants, ""]
    lines += ["| figure | " + " | ".join(f"`{n}`" for n in names) + " |",
              "|" + "---|" * (len(names) + 1),
              "| topology | " + " | ".join(topology) + " |"]
    lines += ["| " + " | ".join("-" if c is None else str(c) for c in row) + " |"
              for row in rows]
    return [*lines, ""]
