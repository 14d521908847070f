"""Prefect's own floor: what a flow run of no-op tasks costs the node's Prefect server, with no
listener, no worker, no deployment and no work of the chain (`--prefect-floor-runs`).

A child process (`python -m bench.prefect_floor`, the node's Prefect settings) runs a flow of
`tasks` no-op tasks (as many as a single-event run of publish-notification has) with Prefect's
own engine, `runs` times one after another, after a few runs to warm up; without the flow-run
heartbeats, as the `wis2-warm` worker runs flows (worker/engine.py: with them, each run waits
up to a second at its end). Each run is what any
Prefect flow run costs: its creation, its Pending, Running and Completed states, its logs, and
three events per task run that the server records. The parent counts the server's CPU seconds
over the measured runs (and until its event queue has settled), less what the idle server spends
in as long, and the runs' wall-clock times; the child counts its own CPU seconds over the same
runs (Prefect's engine and its API client, in every thread of the process). Set against a chain
run, it says how much of the chain's cost per run is Prefect's, whatever the worker does.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence

from pydantic import BaseModel

from bench.procmon import tree_sample
from bench.stats import LatencySummary, summarize

WARM_UP_RUNS = 3
SETTLE_SECONDS = 3.0  # after the last run: the server records the runs' last events


class PrefectFloorResult(BaseModel):
    runs: int
    tasks_per_run: int
    run_seconds: LatencySummary  # wall clock of each run, in the child (its engine's whole run)
    server_cpu_seconds: float  # over the measured runs and the settling, less the idle rate's
    server_cpu_per_run: float
    engine_cpu_per_run: float = 0.0  # the flow's own process (Prefect's engine, its client)
    idle_server_cpu_per_second: float
    error: str | None = None


def _cpu(pids: Sequence[int]) -> float:
    """The CPU seconds of the processes `pids` (each alone, not its children) until now."""
    return sum(tree_sample(pid, tree=False)[0] for pid in pids)


def run_prefect_floor(env: dict[str, str], server_pids: Sequence[int], runs: int,
                      tasks: int = 5, timeout: float = 600.0) -> PrefectFloorResult:
    """`runs` flow runs of `tasks` no-op tasks against the server of `env`'s PREFECT_API_URL,
    whose processes are `server_pids` (see the module)."""
    start = _cpu(server_pids)
    time.sleep(SETTLE_SECONDS)
    idle_rate = (_cpu(server_pids) - start) / SETTLE_SECONDS
    child = subprocess.Popen(
        [sys.executable, "-m", "bench.prefect_floor", "--runs", str(runs), "--tasks", str(tasks)],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    assert child.stdin is not None and child.stdout is not None
    try:
        ready = child.stdout.readline().strip()  # after the warm-up runs
        if ready != "ready":
            raise RuntimeError(f"the floor's child did not start: {ready!r}")
        cpu_before, began = _cpu(server_pids), time.monotonic()
        child.stdin.write("go\n")
        child.stdin.flush()
        out, err = child.communicate(timeout=timeout)
        time.sleep(SETTLE_SECONDS)
        cpu = _cpu(server_pids) - cpu_before - idle_rate * (time.monotonic() - began)
        if child.returncode != 0:
            raise RuntimeError(f"exit {child.returncode}: {err.strip()[-500:]}")
        measured = json.loads(out.strip().splitlines()[-1])
        seconds, engine_cpu = measured["run_seconds"], measured["cpu_seconds"]
    except Exception as exc:
        child.kill()
        child.wait()
        return PrefectFloorResult(runs=0, tasks_per_run=tasks, run_seconds=summarize([]),
                                  server_cpu_seconds=0.0, server_cpu_per_run=0.0,
                                  idle_server_cpu_per_second=round(idle_rate, 4),
                                  error=str(exc))
    return PrefectFloorResult(
        runs=len(seconds), tasks_per_run=tasks, run_seconds=summarize(seconds),
        server_cpu_seconds=round(cpu, 2), server_cpu_per_run=round(cpu / max(1, len(seconds)), 4),
        engine_cpu_per_run=round(engine_cpu / max(1, len(seconds)), 4),
        idle_server_cpu_per_second=round(idle_rate, 4))


def _child(runs: int, tasks: int) -> None:
    from prefect import flow, task

    from worker.engine import flow_heartbeats

    flow_heartbeats(False)  # as the warm worker runs flows (else each run waits up to 1 s)

    @task
    def noop(i: int) -> int:
        return i

    @flow(name="bench-prefect-floor")
    def bare(tasks: int) -> int:
        return sum(noop(i) for i in range(tasks))

    for _ in range(WARM_UP_RUNS):
        bare(tasks)
    print("ready", flush=True)
    sys.stdin.readline()
    seconds = []
    cpu_before = time.process_time()  # every thread of the process: the engine's and its client's
    for _ in range(runs):
        began = time.perf_counter()
        bare(tasks)
        seconds.append(time.perf_counter() - began)
    cpu = time.process_time() - cpu_before
    print(json.dumps({"run_seconds": seconds, "cpu_seconds": cpu}), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, required=True)
    parser.add_argument("--tasks", type=int, default=5)
    args = parser.parse_args()
    _child(args.runs, args.tasks)
