"""The profiles of one benchmark run side by side (e.g. `postgres` and `scaled`): one row per
figure, one column per profile measured."""

from __future__ import annotations

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


ROWS: list[tuple[str, tuple[str, ...]]] = [
    ("node start-up s", ("startup_seconds",)),
    ("intake events/s (listeners alone)", ("intake", "intake_eps")),
    ("steady p50 s", ("steady", "latency", "p50")),
    ("steady p90 s", ("steady", "latency", "p90")),
    ("steady missing", ("steady", "lost")),
    ("burst time to drain s", ("burst", "drain_seconds")),
    ("burst chain events/s", ("burst", "throughput_eps")),
    ("burst missing", ("burst", "lost")),
    ("burst dup. notifications", ("burst", "duplicate_messages")),
    ("backfill notifications/s held", ("backfill", "achieved_rate")),
    ("backfill missing", ("backfill", "lost")),
]


def side_by_side(profiles: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown lines of the table, or nothing when fewer than two profiles were measured."""
    measured = {name: r for name, r in profiles.items()
                if not r.get("error") and not (r.get("skipped") and not r.get("floor"))}
    if len(measured) < 2:
        return []
    names = list(measured)
    rows = [[label] + [_get(measured[n], *path) for n in names] for label, path in ROWS]
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
    lines = ["## Profiles side by side", "",
             "| figure | " + " | ".join(f"`{n}`" for n in names) + " |",
             "|" + "---|" * (len(names) + 1),
             "| topology | " + " | ".join(topology) + " |"]
    lines += ["| " + " | ".join("-" if c is None else str(c) for c in row) + " |"
              for row in rows]
    return [*lines, ""]
