"""The benchmark's results as markdown tables (from the results.json data)."""

from __future__ import annotations

from typing import Any

from bench import stages
from bench.compare import side_by_side


def _f(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _ratio(value: float | None) -> str:
    if not value:
        return "-"
    return f"{value:.2g} (1/{1 / value:.0f})" if value < 1 else f"{value:.2f}"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_f(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


def _assign(name: str, value: str | None) -> str:
    """`NAME=VALUE`, or `NAME=` (unset: the default) for None."""
    return f"`{name}={'' if value is None else value}`"


def _requests(r: dict[str, Any]) -> list[str]:
    """The top routes per flow run of the steady and burst phases (`--count-requests`)."""
    phases = [p for p in ("steady", "burst") if r.get(f"{p}_requests")]
    if not phases:
        return []
    counts = {p: r[f"{p}_requests"] for p in phases}
    routes: list[str] = []
    for p in phases:
        routes += [k for k in counts[p]["routes"] if k not in routes and k != "other"]
    routes += ["other"] if any("other" in counts[p]["routes"] for p in phases) else []

    def per_run(p: str, n: int | None) -> str:
        runs = counts[p]["flow_runs"]
        return "-" if n is None or not runs else f"{n / runs:.1f}"

    rows = [[f"`{k}`" if k != "other" else "other"]
            + [per_run(p, counts[p]["routes"].get(k)) for p in phases] for k in routes]
    rows.append(["**all**"] + [per_run(p, counts[p]["total"]) for p in phases])
    totals = "; ".join(
        f"{p}: {counts[p]['total']} requests over {_f(counts[p]['flow_runs'])} flow runs"
        f" (the bench's own {counts[p]['own_requests_subtracted']} left out)" for p in phases)
    return ["Prefect API requests per flow run of the phase (the server's access log, ids as "
            f"`{{id}}`; {totals}):", "",
            *_table(["route"] + [f"{p} per flow run" for p in phases], rows)]


def _processes(r: dict[str, Any]) -> list[str]:
    phases = [p for p in ("floor", "steady", "burst", "intake", "backfill", "faults")
              if f"{p}_processes" in r]
    if not phases:
        return []
    names: list[str] = []
    for p in phases:
        for u in r[f"{p}_processes"]:
            if u["name"] not in names:
                names.append(u["name"])
    header = ["process (tree)"] + [f"CPU s {p}" for p in phases] + [
        f"peak RSS MB {p}" for p in phases] + ["peak processes", "largest one process MB"]
    rows = []
    for name in names:
        by = {p: next((u for u in r[f"{p}_processes"] if u["name"] == name), None)
              for p in phases}
        rows.append(
            [name]
            + [by[p]["cpu_seconds"] if by[p] else None for p in phases]
            + [by[p]["peak_rss_mb"] if by[p] else None for p in phases]
            + [max((by[p]["peak_processes"] for p in phases if by[p]), default=None)]
            + [max((by[p].get("peak_single_rss_mb") or 0 for p in phases if by[p]),
                   default=None) or None]
        )
    return ["CPU seconds used during each phase and peak RSS (process and all its "
            "descendants, sampled every 0.5 s; the last column: the largest RSS one process of "
            "the tree reached in any phase):", "", *_table(header, rows)]


def _profile(name: str, r: dict[str, Any]) -> list[str]:
    out = [f"## Profile `{name}`", ""]
    if r.get("error"):
        return [*out, f"**Failed:** `{r['error']}`", ""]
    if r.get("skipped") and not r.get("floor"):
        why = r.get("startup_error") or r["skipped"]
        return [*out, f"Not measured: {why}.", ""]
    if r.get("variant"):
        out += [f"Variant `{r['variant']['name']}`: {r['variant']['described']}.", ""]
    out += [f"Listener: {r.get('listener')}.", ""]
    if r.get("chain_config"):
        c = r["chain_config"]
        batching = ("off (one run per event)" if c["batch_max_size"] <= 1
                    else f"up to {c['batch_max_size']} events per run")
        extra = "".join(", " + _assign(f"WIS2_LISTENER_{k.upper()}", v)
                        for k, v in (c.get("listener_settings") or {}).items())
        out += [f"Chain: `{c['worker']}` worker, `--limit {c['worker_limit']}`; listener "
                f"batching {batching}{extra}.", ""]
    if r.get("topology"):
        t = r["topology"]
        out += [f"Topology: {t['workers']} workers (own names, directories, results), "
                f"{t['listeners']} listener replicas on `$share/{t['share_group']}/...`; "
                "Prefect server " + ("API and background services in two processes"
                                     if t["separate_services"] else "in one process")
                + (", Redis messaging" if t["redis_messaging"] else "") + ".", ""]
    out += [f"Prefect database: {r.get('database')}; node start-up "
            f"{_f(r.get('startup_seconds'), 1)} s; work pool concurrency limit: "
            f"{r.get('pool_limit') or 'none'}.", ""]
    if r.get("broker_settings"):
        out += ["Broker settings: " + ", ".join(
            f"`WIS2_BROKER_{k.upper()}={v}`" for k, v in r["broker_settings"].items()) + ".", ""]
    if r.get("chain_env"):
        out += ["Chain processes' environment: " + ", ".join(
            _assign(k, v) for k, v in r["chain_env"].items()) + ".", ""]
    if "server_env" in r:
        base = ("the node's settings" if r.get("server_node_settings", True)
                else "Prefect's defaults (without the node's settings)")
        more = ", ".join(_assign(k, v) for k, v in r["server_env"].items())
        out += [f"Prefect server environment: {base}" + (f", then {more}" if more else "")
                + ".", ""]
    if r.get("cpu_hogs"):
        out += [f"**Background load:** {r['cpu_hogs']} busy process(es) (`--cpu-hogs`) ran "
                "through every phase, the floor included.", ""]
    if r.get("startup_error"):
        out += [f"**The node did not start completely:** `{r['startup_error']}`", ""]
    if r.get("aborted"):
        out += [f"**Aborted:** {r['aborted']}.", ""]
    if "steady" in r:
        s = r["steady"]
        lat = s["latency"]
        out += [f"### Steady: {s['rate']} event/s for {s['seconds']} s", ""]
        out += _table(
            ["events sent", "received", "missing", "dup. data_ids", "p50 s", "p90 s", "p99 s",
             "max s", "failed runs"],
            [[s["events_sent"], s["received"], s["lost"], s["duplicate_data_ids"], lat["p50"],
              lat["p90"], lat["p99"], lat["max"], r.get("steady_runs", {}).get("failed")]])
        if r.get("steady_timeline"):
            out += [*stages.markdown(r["steady_timeline"]), ""]
    if "burst" in r:
        b = r["burst"]
        runs = r.get("burst_runs", {})
        drain = _f(b["drain_seconds"], 1) if b["drained"] else \
            f"not drained in {_f(b['elapsed_seconds'], 0)}"
        out += [f"### Burst: {b['events_sent']} events at once", ""]
        out += _table(
            ["published in s", "time to drain s", "first notif. s", "received",
             "missing at the deadline", "dup. notifications", "flow runs (batch runs)",
             "failed runs", "unfinished runs", "chain events/s"],
            [[b["publish_seconds"], drain, b["first_notification_seconds"], b["received"],
              b["lost"], b["duplicate_messages"],
              f"{_f(runs.get('total'))} ({_f(runs.get('batch_runs'))})", runs.get("failed"),
              runs.get("unfinished"), b["throughput_eps"]]])
        if runs.get("by_state"):
            states = ", ".join(f"{k} {v}" for k, v in runs["by_state"].items())
            out += [f"Burst flow runs by state at the end of the wait: {states}.", ""]
        bound = r.get("burst_cpu")
        if bound:
            out += [f"The burst's CPU: {bound['cpu_seconds']} s in every process of the node and "
                    f"the bench ({bound['per_1000_events']} s per 1,000 events); on "
                    f"{bound['cores']} cores no drain can take less than "
                    f"{bound['least_drain_seconds']} s.", ""]
    if "intake" in r:
        i = r["intake"]
        took = _f(i["intake_seconds"], 2) if i["completed"] else "not completed"
        out += [f"### Listener intake alone: {i['events_sent']} events at once, work pool "
                "paused", ""]
        out += _table(
            ["published in s", "all acknowledged in s", "intake events/s", "flow runs created",
             "events per run", "dead letters"],
            [[i["publish_seconds"], took, i["intake_eps"], i["runs_created"],
              i["events_per_run"], i["rejected"]]])
    if r.get("backfill", {}).get("events_sent") is not None:
        k = r["backfill"]
        limit = f"{_f(k['rate_limit'], 0)}/s" if k["rate_limit"] else "none"
        out += [f"### Backfill: {k['events_sent']} events through `wis2-chain backfill` "
                f"(rate limit {limit}, {k['batch_size']} per batch run)", ""]
        out += _table(
            ["time s", "all announced", "notifications/s held", "received", "missing",
             "dup. data_ids", "second message ids", "exit code", "summary"],
            [[k["elapsed_seconds"], "yes" if k["drained"] else "no", k["achieved_rate"],
              k["received"], k["lost"], k["duplicate_data_ids"],
              k["distinct_message_ids_for_duplicates"], k["exit_code"], k["message"]]])
        s = r.get("steady_beside_backfill")
        if s:
            lat = s["latency"]
            within = "entirely" if r.get("steady_within_backfill") else "partly"
            out += [f"Live events beside it ({within} during the backfill): {s['rate']} "
                    f"event/s for {s['seconds']} s:", ""]
            out += _table(["events sent", "received", "missing", "p50 s", "p90 s", "p99 s",
                           "max s"],
                          [[s["events_sent"], s["received"], s["lost"], lat["p50"],
                            lat["p90"], lat["p99"], lat["max"]]])
    if r.get("faults"):
        out += ["### Faults: one process SIGKILLed, then started again", ""]
        rows = []
        for name, f in r["faults"].items():
            runs = f.get("runs") or {}
            states = ", ".join(f"{k} {v}" for k, v in (runs.get("by_state") or {}).items())
            rows.append([f"`{name}`", f["events_sent"], f["received"], f["lost"],
                         f["duplicate_data_ids"], f["down_seconds"], f["recovery_seconds"],
                         f"{f['unfinished_runs']} ({states or '-'})",
                         f.get("error") or f.get("killed")])
        out += _table(["scenario", "events", "received", "lost", "dup. data_ids",
                       "down s (kill -> back)", "recovery s (back -> last notif.)",
                       "unfinished runs (runs by state)", "what was killed / error"], rows)
    if "floor" in r:
        f = r["floor"]
        st = f["stages"]
        out += ["### In-process floor (parse -> build -> validate -> publish, one loop)", ""]
        out += _table(
            ["events", "cold 1st event ms", "events/s", "parse ms", "build ms", "validate ms",
             "publish ms", "received", "lost", "chain/floor throughput"],
            [[f["events"], f["cold_first_event_ms"], f["throughput_eps"], st["parse_ms"],
              st["build_ms"], st["validate_ms"], st["publish_ms"], f["received"], f["lost"],
              _ratio(r.get("chain_to_floor_ratio"))]])
        if f.get("errors"):
            out += ["Floor errors: " + "; ".join(f["errors"][:5]), ""]
    if "prefect_floor" in r:
        f = r["prefect_floor"]
        out += [f"### Prefect's floor: flow runs of {f['tasks_per_run']} no-op tasks, no worker "
                "(bench/prefect_floor.py)", ""]
        if f.get("error"):
            out += [f"Not measured: {f['error']}", ""]
        else:
            rs = f["run_seconds"]
            out += _table(["runs", "run p50 s", "run p90 s", "run p99 s",
                           "server CPU s per run", "engine CPU s per run (the flow's process)",
                           "idle server CPU s per s"],
                          [[f["runs"], rs["p50"], rs["p90"], rs["p99"],
                            f["server_cpu_per_run"], f.get("engine_cpu_per_run"),
                            f["idle_server_cpu_per_second"]]])
    if isinstance(r.get("chain"), str):
        out += [f"Chain: {r['chain']}", ""]
    out += _requests(r)
    out += _processes(r)
    if r.get("dead_letters"):
        out += [f"Listener dead letters: {r['dead_letters']}.", ""]
    return out


def markdown(results: dict[str, Any]) -> str:
    m = results.get("machine", {})
    lines = [
        "# wis2-chain benchmark",
        "",
        f"- date: {results.get('started')} -> {results.get('finished', '(running)')}",
        f"- command: `{results.get('command')}`",
        f"- machine: {m.get('nproc')} CPU ({m.get('cpu_model')}), {m.get('ram_gb')} GB RAM, "
        f"load average at start {m.get('load_average_at_start')}, at end "
        f"{m.get('load_average_at_end', '-')}, {m.get('os')}",
        f"- software: Python {m.get('python')}, Prefect {m.get('prefect')}, "
        f"{m.get('mosquitto')}, paho-mqtt {m.get('paho-mqtt')}, "
        f"pywis-pubsub {m.get('pywis-pubsub')}",
        f"- events: {results.get('events')}",
        "",
    ]
    lines += side_by_side(results.get("profiles", {}))
    for name, r in results.get("profiles", {}).items():
        lines += _profile(name, r)
    return "\n".join(lines) + "\n"
