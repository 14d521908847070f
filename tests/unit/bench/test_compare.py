"""bench/compare.py: the profiles of one run side by side; bench/options.py: the scaled
profile's options; bench/faults_scaled.py: its scenario needs two listener replicas."""

from __future__ import annotations

from bench.compare import side_by_side
from bench.options import parse_args


def _profile(drain: float, lost: int, topology: dict | None = None) -> dict:
    result = {"startup_seconds": 30.0, "steady": {"latency": {"p50": 0.8, "p90": 1.2}, "lost": 0},
              "burst": {"drain_seconds": drain, "throughput_eps": 1000 / drain, "lost": 0,
                        "duplicate_messages": 0},
              "faults": {"worker-sigkill-mid-burst": {
                  "received": 200 - lost, "events_sent": 200, "lost": lost,
                  "duplicate_data_ids": 0, "recovery_seconds": 12.5, "error": None}}}
    if topology:
        result["topology"] = topology
    return result


def test_profiles_side_by_side() -> None:
    topology = {"workers": 2, "listeners": 2, "share_group": "wis2", "redis_messaging": True,
                "separate_services": True}
    lines = side_by_side({"postgres": _profile(43.0, 0), "scaled": _profile(30.0, 1, topology),
                          "sqlite": {"skipped": "not installed"}})
    text = "\n".join(lines)
    assert "| figure | `postgres` | `scaled` |" in text  # the skipped profile has no column
    assert "| topology | 1 worker, 1 listener | 2 workers, 2 listeners, split server |" in text
    assert "| burst time to drain s | 43.0 | 30.0 |" in text
    assert ("| fault `worker-sigkill-mid-burst` | 200/200, lost 0, dup. 0, recovery 12.5 s | "
            "199/200, lost 1, dup. 0, recovery 12.5 s |") in text
    assert "| intake events/s (listeners alone) | - | - |" in text


def test_one_profile_has_nothing_to_compare() -> None:
    assert side_by_side({"postgres": _profile(43.0, 0)}) == []


def test_scaled_profile_options() -> None:
    opts = parse_args(["--profile", "scaled", "--split-server", "--scaled-workers", "3"])
    assert (opts.profile, opts.split_server, opts.scaled_workers, opts.scaled_listeners) == (
        "scaled", True, 3, 2)
    assert parse_args([]).split_server is False


def test_the_replica_scenario_is_registered_and_needs_two_replicas() -> None:
    from bench import faults

    assert faults.REPLICAS_NEEDED["listener-replica-sigkill-mid-burst"] == 2
    assert "listener-replica-sigkill-mid-burst" in faults.SCENARIOS


def _usage(name: str, cpu: float, rss: float) -> dict:
    return {"name": name, "pid": 1, "cpu_seconds": cpu, "peak_rss_mb": rss, "peak_processes": 1}


def _measured(p99: float, server_cpu: float, requests: float | None) -> dict:
    result = _profile(43.0, 0)
    result["steady"]["latency"]["p99"] = p99
    result["burst"]["events_sent"] = 500
    result["burst_processes"] = [_usage("prefect-server", server_cpu, 410.5),
                                 _usage("worker", 6.0, 250.0), _usage("postgres", 9.0, 99.0)]
    if requests is not None:
        result["steady_requests"] = {"per_flow_run": requests}
        result["burst_requests"] = {"per_flow_run": requests / 2}
    return result


def test_per_process_and_request_rows_side_by_side() -> None:
    base, nowake = _measured(1.4, 12.0, 40.0), _measured(2.9, 10.0, 31.5)
    base["variant"] = {"name": "base", "assignments": [],
                       "described": "the node as deployed"}
    nowake["variant"] = {"name": "nowake", "assignments": ["WIS2_WORKER_WAKEUP=false"],
                         "described": "`WIS2_WORKER_WAKEUP=false`"}
    text = "\n".join(side_by_side({"postgres[base]": base, "postgres[nowake]": nowake}))
    assert "| figure | `postgres[base]` | `postgres[nowake]` |" in text
    assert "- `postgres[nowake]`: `WIS2_WORKER_WAKEUP=false`" in text
    assert "- `postgres[base]`: the node as deployed" in text
    assert "| steady p99 s | 1.4 | 2.9 |" in text
    assert "| server CPU s per 1,000 burst events | 24.0 | 20.0 |" in text  # 12 s / 500 events
    assert "| worker CPU s per 1,000 burst events | 12.0 | 12.0 |" in text
    assert "| burst peak RSS MB server | 410.5 | 410.5 |" in text
    assert "| burst peak RSS MB worker | 250.0 | 250.0 |" in text
    assert "| steady API requests per flow run | 40.0 | 31.5 |" in text
    assert "| burst API requests per flow run | 20.0 | 15.75 |" in text


def test_groups_of_processes_and_rows_not_measured() -> None:
    scaled = _measured(1.0, 3.0, None)
    scaled["burst_processes"] = [
        _usage("prefect-server", 3.0, 300.0), _usage("prefect-services", 2.0, 350.0),
        _usage("worker-1", 4.0, 200.0), _usage("worker-2", 5.0, 240.0)]
    plain = _measured(1.0, 3.0, None)
    del plain["burst_processes"]
    text = "\n".join(side_by_side({"scaled": scaled, "sqlite": plain}))
    assert "Variants" not in text
    # the server's two processes and the workers summed; the largest one's peak
    assert "| server CPU s per 1,000 burst events | 10.0 | - |" in text
    assert "| worker CPU s per 1,000 burst events | 18.0 | - |" in text
    assert "| burst peak RSS MB server | 350.0 | - |" in text
    assert "| burst peak RSS MB worker | 240.0 | - |" in text
    assert "API requests" not in text  # no --count-requests: no rows
