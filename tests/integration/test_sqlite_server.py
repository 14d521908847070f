"""The SQLite Prefect server (localnode/sqlite_server.py): write transactions wait for SQLite's
lock instead of failing. Requests that read then write (a run's labels, a run created from a
deployment), made side by side with other writes, all succeed: no 503 ("database is locked")
for a client to wait 2 s on."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from localnode.prefect_server import PrefectServer
from tests.fixtures.prefect_api import QUIET_SERVICES

WRITERS = 6
CALLS = 25


def test_read_then_write_requests_wait_for_the_lock_instead_of_failing(tmp_path: Path) -> None:
    server = PrefectServer(home=tmp_path / "server", extra_env=QUIET_SERVICES)
    assert "localnode.sqlite_server" in server.argv
    server.start(timeout=300)
    try:
        with httpx.Client(base_url=server.api_url, timeout=120) as client:
            flow = client.post("/flows/", json={"name": "sqlite-locks"}).json()
            deployment = client.post("/deployments/", json={
                "name": "locks", "flow_id": flow["id"]}).json()
            runs = [client.post(f"/deployments/{deployment['id']}/create_flow_run",
                                json={}).json()["id"] for _ in range(WRITERS)]
        codes: list[int] = []
        lock = threading.Lock()
        start = threading.Barrier(2 * WRITERS)

        def write(n: int) -> None:
            with httpx.Client(base_url=server.api_url, timeout=120) as client:
                start.wait()
                for i in range(CALLS):
                    try:
                        if n % 2:  # read the run, merge its labels, write them
                            code = client.patch(f"/flow_runs/{runs[n // 2]}/labels",
                                                json={f"wis2.test.{i}": str(i)}).status_code
                        else:  # read the deployment, write a run
                            code = client.post(f"/deployments/{deployment['id']}"
                                               "/create_flow_run", json={}).status_code
                    except httpx.HTTPError:  # Prefect's 503 path sometimes resets instead
                        code = -1
                    with lock:
                        codes.append(code)

        with ThreadPoolExecutor(2 * WRITERS) as pool:
            list(pool.map(write, range(2 * WRITERS)))
    finally:
        server.stop()
    failed = [code for code in codes if not 200 <= code < 300]
    assert len(codes) == 2 * WRITERS * CALLS
    assert not failed, f"{len(failed)} of {len(codes)} refused: {sorted(set(failed))}"
