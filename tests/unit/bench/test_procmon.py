"""The bench's process monitor: a tree's CPU and RSS, and the largest single process of it."""

from __future__ import annotations

import os
import subprocess
import sys

from bench.procmon import burst_cpu, tree_sample
from bench.report import _processes


def test_a_tree_sample_counts_each_process_and_names_the_largest() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        alone = tree_sample(os.getpid(), tree=False)
        _cpu, rss, count, largest = tree_sample(os.getpid())
        assert count >= 2 and alone[2] == 1
        assert 0 < largest < rss and largest >= alone[3]
    finally:
        child.kill()
        child.wait()


def test_the_report_gives_the_largest_one_process_of_each_tree() -> None:
    usage = {"name": "postgres", "pid": 1, "cpu_seconds": 2.0, "peak_rss_mb": 500.0,
             "peak_processes": 21, "peak_single_rss_mb": 140.5}
    lines = _processes({"burst_processes": [usage]})
    assert lines[2].endswith("| peak processes | largest one process MB |")
    assert lines[4] == "| postgres | 2.00 | 500.00 | 21 | 140.50 |"
    older = {k: v for k, v in usage.items() if k != "peak_single_rss_mb"}  # earlier results
    assert _processes({"burst_processes": [older]})[4].endswith("| 21 | - |")


def test_a_bursts_cpu_sums_every_process_and_gives_the_least_time_the_cores_allow() -> None:
    usages = [{"name": "worker", "cpu_seconds": 7.5},
              {"name": "prefect-server", "cpu_seconds": 9.0},
              {"name": "mosquitto", "cpu_seconds": 1.9}]
    assert burst_cpu(usages, 2000, cores=2) == {
        "cpu_seconds": 18.4, "per_1000_events": 9.2, "cores": 2, "least_drain_seconds": 9.2}
    assert burst_cpu([], 2000) is None and burst_cpu(usages, 0) is None
