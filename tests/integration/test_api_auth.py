"""The Prefect API of a node is locked: the local node (`make demo`, the bench) starts its Prefect
server with a generated "user:password" (Prefect's basic authentication). Unauthenticated or
wrongly authenticated requests get 401 -- in particular the request that used to return the
broker block's password -- while the worker, the listener and the CLI authenticate, so an event
is still published end to end. A listener whose credentials are refused keeps its events (no dead
letter)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from chain.mqtt import publish_once
from chain.processes import ManagedProcess, free_port
from localnode.node import LocalNode, NodeSettings
from localnode.prefect_server import prefect_cli
from tests.fixtures.node import running_node
from tests.fixtures.paths import DATA, REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SECRETS_REQUEST = ("POST", "/block_documents/filter", {"include_secrets": True})


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNode]:
    with running_node(tmp_path_factory.mktemp("auth-node")) as node:
        yield node


@pytest.fixture(scope="module")
def published(node: LocalNode) -> dict:
    """The demo event, through the node's listener and worker (both authenticated)."""
    return node.send_and_wait(DATA / "demo-event.json", node.settings.event_topic,
                              node.settings.timeout)


def api(node: LocalNode, method: str, path: str, body: dict | None = None,
        auth: tuple[str, str] | None = None) -> httpx.Response:
    return httpx.request(method, f"{node.state.prefect_api_url}{path}", json=body, auth=auth,
                         timeout=30)


def credentials(node: LocalNode) -> tuple[str, str]:
    user, _, password = node.state.prefect_auth_string.get_secret_value().partition(":")
    return user, password


def test_the_block_secrets_request_needs_authentication(node: LocalNode) -> None:
    method, path, body = SECRETS_REQUEST
    assert api(node, method, path, body).status_code == 401
    user, password = credentials(node)
    assert api(node, method, path, body, auth=(user, password + "x")).status_code == 401
    assert api(node, method, path, body, auth=("", "")).status_code == 401
    # with the auth string, the secret is there: the lock is what protects it
    response = api(node, method, path, body, auth=(user, password))
    assert response.status_code == 200
    publisher = node.passwords["publisher"].get_secret_value()
    assert publisher in response.text


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/deployments/filter", {}),
        ("POST", "/flow_runs/filter", {}),
        ("POST", "/logs/filter", {}),
        ("POST", "/artifacts/filter", {}),
        ("POST", "/work_pools/filter", {}),
        ("GET", "/admin/settings", None),
        ("POST", "/flow_runs/", {"flow_id": "00000000-0000-0000-0000-000000000000"}),
    ],
)
def test_other_requests_need_authentication(node: LocalNode, method: str, path: str,
                                            body: dict | None) -> None:
    assert api(node, method, path, body).status_code == 401
    assert api(node, method, path, body, auth=credentials(node)).status_code != 401


def test_only_the_health_probe_answers_without_authentication(node: LocalNode) -> None:
    assert api(node, "GET", "/health").status_code == 200
    assert api(node, "GET", "/version").status_code == 401


def test_the_ui_asks_for_a_login(node: LocalNode) -> None:
    settings = httpx.get(f"{node.state.ui_url}/ui-settings", timeout=30).json()
    assert settings["auth"] == "BASIC"


def test_worker_and_listener_authenticate_end_to_end(node: LocalNode, published: dict) -> None:
    assert published["message"]["properties"]["data_id"].endswith("D6990001_001.csv")
    # the run ends (Completed) just after the notification is published
    deadline = time.monotonic() + 60
    while True:
        response = api(node, "POST", "/flow_runs/filter",
                       {"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}},
                       auth=credentials(node))
        assert response.status_code == 200
        if "D6990001_001.csv" in [run["name"] for run in response.json()]:
            break
        assert time.monotonic() < deadline, response.json()
        time.sleep(0.5)


def test_the_warm_worker_subscribes_to_the_event_stream_with_the_auth_string(
        node: LocalNode, published: dict) -> None:
    """The stream that wakes the worker (worker/wakeup.py) authenticates in its own message."""
    log = node.run_dir / "logs" / "worker.log"
    text = log.read_text(errors="replace")
    assert "event stream connected" in text, text[-4000:]
    assert "event stream unavailable" not in text, text[-4000:]


def test_the_cli_authenticates_with_the_node_environment(node: LocalNode) -> None:
    env = node.child_env()
    assert env["PREFECT_API_AUTH_STRING"] == node.state.prefect_auth_string.get_secret_value()
    done = subprocess.run([prefect_cli(), "deployment", "ls"], env=env, capture_output=True,
                          text=True, timeout=120, cwd=REPO, check=False)
    assert done.returncode == 0, done.stderr
    assert "publish-notification/default" in done.stdout
    del env["PREFECT_API_AUTH_STRING"]
    done = subprocess.run([prefect_cli(), "deployment", "ls"], env=env, capture_output=True,
                          text=True, timeout=120, cwd=REPO, check=False)
    assert done.returncode != 0
    assert "401" in done.stdout + done.stderr


def test_node_state_keeps_the_auth_string_private(node: LocalNode) -> None:
    state_file = node.run_dir / "node.json"
    assert state_file.stat().st_mode & 0o777 == 0o600
    assert node.state.prefect_auth_string.get_secret_value() in state_file.read_text()


def _metric(url: str, name: str) -> float:
    text = httpx.get(url, timeout=10).text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(name) and not line.startswith("#")]
    return sum(values)


def test_a_listener_whose_credentials_are_refused_keeps_its_events(
    node: LocalNode, published: dict, tmp_path: Path
) -> None:
    """Wrong PREFECT_API_AUTH_STRING: the API answers 401; the listener retries and keeps the
    event unacknowledged instead of dead-lettering it as refused."""
    metrics_port = free_port()
    env = node.listener_env()
    env.update(PREFECT_API_AUTH_STRING="admin:wrong",
               WIS2_LISTENER_CLIENT_ID="wis2-chain-wrong-auth",
               WIS2_LISTENER_METRICS_PORT=str(metrics_port),
               WIS2_LISTENER_DEADLETTER_DIR=str(tmp_path / "deadletters"),
               WIS2_LISTENER_RETRY_MAX_DELAY="2")
    listener = ManagedProcess("wrong-auth-listener", [sys.executable, "-m", "listener"],
                              tmp_path / "listener.log", env=env, cwd=REPO,
                              ready=lambda: _healthz(metrics_port))
    listener.start(90)
    metrics = f"http://127.0.0.1:{metrics_port}/metrics"
    log = tmp_path / "listener.log"
    try:
        # a new session: the event must be sent once the broker acknowledged the subscription
        deadline = time.monotonic() + 60
        while "msg=subscribed" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        publish_once(node.state.connection("fileserver"), node.settings.event_topic,
                     node.event_payload(DATA / "demo-event.json"))
        deadline = time.monotonic() + 60
        while _metric(metrics, "wis2_listener_api_errors_total") < 2:
            assert time.monotonic() < deadline, (tmp_path / "listener.log").read_text()[-3000:]
            time.sleep(0.5)
        assert _metric(metrics, "wis2_listener_in_flight") >= 1
        assert _metric(metrics, "wis2_listener_rejected_total") == 0
        assert _metric(metrics, "wis2_listener_runs_created_total") == 0
        assert not list((tmp_path / "deadletters").glob("*.json"))
        assert "PREFECT_API_AUTH_STRING" in (tmp_path / "listener.log").read_text()
    finally:
        listener.stop()


def _healthz(port: int) -> bool:
    try:
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
        return True
    except httpx.HTTPError:
        return False


def test_the_node_reads_runs_through_an_authenticated_client(node: LocalNode,
                                                              published: dict) -> None:
    """What `make demo` prints (the latest run's URL) is read with the node's credentials."""
    assert node.latest_flow_run_url() is not None
    from prefect.client.orchestration import get_client
    from prefect.settings import temporary_settings

    async def count() -> int:
        async with get_client() as client:
            return len(await client.read_flow_runs(limit=5))

    with temporary_settings(updates=node.state.prefect_settings()):
        assert asyncio.run(count()) >= 1


def test_a_process_worker_passes_the_auth_string_to_its_flow_runs(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Prefect's `process` worker starts each flow run in a child process: that process
    authenticates too (the worker hands its settings down), so the event is published."""
    settings = NodeSettings(
        _env_file=None, run_dir=tmp_path_factory.mktemp("auth-process-node"),
        broker_port=free_port(), broker_ws_port=free_port(), prefect_port=free_port(),
        files_port=free_port(), metrics_port=free_port(), timeout=180, worker_type="process",
        worker_limit=2,
    )
    node = LocalNode(settings)
    try:
        node.start()
        received = node.send_and_wait(DATA / "demo-event.json", settings.event_topic,
                                      settings.timeout)
        assert received["message"]["properties"]["data_id"].endswith("D6990001_001.csv")
    finally:
        node.stop()
