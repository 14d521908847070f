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
