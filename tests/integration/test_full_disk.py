"""A full disk loses nothing: the results and the ledger on a 16 MB tmpfs this test mounts (root
needed), filled to the last byte between the two halves of a burst.

While it is full, the second half's runs wait (a log line naming the disk; nothing published,
nothing Failed), the listener's /metrics and /healthz say the disk is low; once the filler is
deleted, every event of the burst is published exactly once (one message, one id per data_id).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.collect import Collector
from bench.events import EventFactory
from chain.mqtt import Publisher
from localnode.node import LocalNode
from tests.fixtures.node import running_node, wait_subscribed
from wis2.dataset import load_dataset

pytestmark = pytest.mark.integration

TOPIC = "diffusion/files/coriolis/argo/csv"
HALF = 6


class SmallDiskNode(LocalNode):
    """The local node; runs need 1 MB free (not 64), the listener checks the disks every
    second (not every minute)."""

    def child_env(self) -> dict[str, str]:
        return {**super().child_env(), "WIS2_DISK_RESERVE_MB": "1",
                "WIS2_LISTENER_HOUSEKEEPING_SECONDS": "1"}


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out ({timeout}s) waiting for {what}"
        time.sleep(1)
    return value


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNode]:
    if os.geteuid() != 0:
        pytest.skip("mounting the test's tmpfs needs root")
    with running_node(tmp_path_factory.mktemp("full-disk-node"), timeout=240,
                      node_class=SmallDiskNode, verify_data=False) as node:
        results = node.run_dir / "results"
        results.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "wis2-full-disk",
                        str(results)], check=True)
        try:
            wait_subscribed(node)
            yield node
        finally:
            node.stop()  # before the file system goes
            subprocess.run(["umount", "-l", str(results)], check=False)


def fill(directory: Path) -> Path:
    """Write a file until the file system is full (ENOSPC); returns it."""
    filler = directory / "filler"
    chunk = b"\0" * 65536
    with filler.open("wb", buffering=0) as out:
        try:
            while True:
                out.write(chunk)
        except OSError as exc:
            assert exc.errno == 28, exc  # ENOSPC
    try:  # the last partial block
        with filler.open("ab", buffering=0) as out:
            while True:
                out.write(b"\0" * 512)
    except OSError:
        pass
    return filler


def health(node: LocalNode) -> tuple[int, dict]:
    response = httpx.get(f"http://{node.settings.host}:{node.settings.metrics_port}/healthz",
                         timeout=10)
    return response.status_code, response.json()


def test_a_full_disk_holds_the_events_and_loses_none(node: LocalNode) -> None:
    results = node.run_dir / "results"
    factory = EventFactory(load_dataset("argo"), "fulldisk", files_url=node.files_url)
    before, during = factory.batch("before", HALF), factory.batch("during", HALF)
    with Collector(node.state.connection("everyone"), node.settings.centre_id) as origin, \
            Publisher(node.state.connection("fileserver")) as fileserver:
        for event in before:
            fileserver.publish(TOPIC, event.payload, qos=1)
        assert origin.wait_for([e.data_id for e in before], time.monotonic() + 240)

        filler = fill(results)
        for event in during:
            fileserver.publish(TOPIC, event.payload, qos=1)
        worker_log = node.run_dir / "logs" / "worker.log"
        wait_for(lambda: f"disk full: {results}" in worker_log.read_text(errors="replace"),
                 240, "a run to wait for space, naming the disk")
        _, status = wait_for(lambda: (h := health(node))[0] == 503 and h, 60,
                             "the listener's health check to fail")
        assert status["status"] == "disk_low" and str(results) in status["disk_low"]
        metrics = httpx.get(f"http://{node.settings.host}:{node.settings.metrics_port}/metrics",
                            timeout=10).text
        assert f'wis2_listener_disk_low{{path="{results}"}} 1.0' in metrics
        listener_log = (node.run_dir / "logs" / "listener.log").read_text()
        assert "disk space low" in listener_log and str(results) in listener_log
        assert origin.received(e.data_id for e in during) == 0

        filler.unlink()
        assert origin.wait_for([e.data_id for e in during], time.monotonic() + 300), (
            f"{origin.received(e.data_id for e in during)} of {HALF} published after freeing")
        wait_for(lambda: health(node)[0] == 200, 60, "the health check to pass again")
    for event in before + during:
        assert origin.copies(event.data_id) == (1, 1), event.name
    auth = tuple(node.state.prefect_auth_string.get_secret_value().split(":", 1))
    runs = httpx.post(f"{node.state.prefect_api_url}/flow_runs/filter", json={"limit": 200},
                      auth=auth, timeout=60).json()
    assert not [r["name"] for r in runs if r["state_type"] in ("FAILED", "CRASHED")], json.dumps(
        runs, indent=1)[:2000]
