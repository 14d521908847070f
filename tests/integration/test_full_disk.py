"""A full disk loses nothing: the results and the ledger on a 16 MB tmpfs this test mounts (root
needed), filled to the last byte in the middle of a burst.

The burst's runs are held inside their verify step (the node's gated file server holds every
download: `bench/gated_files.py`), after their build results were written; the disk is filled,
then the downloads are let through. While it is full, the runs wait (a log line naming the disk;
none Failed), the listener's /metrics and /healthz say the disk is low; once the filler is
deleted, every event of the burst is published with exactly one notification id (a repeat of
that id is tolerable: a receipt the full disk could not cache is sent again).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest

from bench.collect import Collector
from bench.events import EventFactory
from bench.node import BenchNode
from chain.mqtt import Publisher
from localnode.node import LocalNode
from tests.fixtures.disks import fill
from tests.fixtures.node import running_node, wait_subscribed
from tests.fixtures.waiting import wait_for
from wis2.dataset import load_dataset

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]  # a node on a busy machine

TOPIC = "diffusion/files/coriolis/argo/csv"
BURST = 12


class SmallDiskNode(BenchNode):
    """The local node; runs need 1 MB free (not 64), the listener checks the disks every
    second (not every minute)."""

    def child_env(self) -> dict[str, str]:
        return {**super().child_env(), "WIS2_DISK_RESERVE_MB": "1",
                "WIS2_LISTENER_HOUSEKEEPING_SECONDS": "1"}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNode]:
    if os.geteuid() != 0:
        pytest.skip("mounting the test's tmpfs needs root")
    with running_node(tmp_path_factory.mktemp("full-disk-node"), timeout=240,
                      node_class=SmallDiskNode) as node:
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


def health(node: LocalNode) -> tuple[int, dict]:
    response = httpx.get(f"http://{node.settings.host}:{node.settings.metrics_port}/healthz",
                         timeout=10)
    return response.status_code, response.json()


def gate(node: LocalNode) -> dict:
    return httpx.get(f"{node.files_url}/_gate", timeout=10).json()


def test_a_full_disk_holds_the_events_and_loses_none(node: BenchNode) -> None:
    results = node.run_dir / "results"
    factory = EventFactory(load_dataset("argo"), "fulldisk", files_url=node.files_url,
                           real_files=True)
    burst = factory.batch("burst", BURST)
    with Collector(node.state.connection("everyone"), node.settings.centre_id) as origin, \
            Publisher(node.state.connection("fileserver")) as fileserver:
        node.gate_file.touch()  # every download waits
        for event in burst:
            fileserver.publish(TOPIC, event.payload, qos=1)
        wait_for(lambda: gate(node)["held"] >= 1, 240, "a run to be held in its verify step")
        assert list(results.glob("wnm-build-*")), "built before the disk fills"

        filler = fill(results)
        node.gate_file.unlink()
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
        assert not failed_runs(node)

        filler.unlink()
        assert origin.wait_for([e.data_id for e in burst], time.monotonic() + 300), (
            f"{origin.received(e.data_id for e in burst)} of {BURST} published after freeing")
        wait_for(lambda: health(node)[0] == 200, 60, "the health check to pass again")
        wait_for(lambda: all_runs_done(node), 240, "every run to end")
    for event in burst:
        _, ids = origin.copies(event.data_id)
        assert ids == 1, f"{event.name}: {ids} notification ids"
    assert not failed_runs(node)


def flow_runs(node: LocalNode) -> list[dict]:
    auth = tuple(node.state.prefect_auth_string.get_secret_value().split(":", 1))
    return httpx.post(f"{node.state.prefect_api_url}/flow_runs/filter", json={"limit": 200},
                      auth=auth, timeout=60).json()


def failed_runs(node: LocalNode) -> list[str]:
    return [r["name"] for r in flow_runs(node) if r["state_type"] in ("FAILED", "CRASHED")]


def all_runs_done(node: LocalNode) -> bool:
    """No run pending or running (the daily metadata deployment's future runs stay Scheduled)."""
    return not [r for r in flow_runs(node) if r["state_type"] in ("PENDING", "RUNNING")]
