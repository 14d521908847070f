"""`prefect deploy --all` with the project's prefect.yaml, then a run picked up by a real worker.

Exactly what an operator does: create the process work pool, deploy non-interactively from the
project directory, start a worker; the deployment's parameter form describes the CloudEvent.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment

from blocks.mqtt_broker import MqttBroker
from chain.deployments import PUBLISH_NOTIFICATION
from chain.mqtt import connect
from localnode.prefect_server import prefect_cli
from tests.fixtures.paths import BUFR_EVENT, REPO
from wis2.dataset import load_dataset

pytestmark = pytest.mark.timeout(300)

POOL = "wis2-pool"


def prefect(args: list[str], env: dict[str, str], timeout: float = 120) -> str:
    done = subprocess.run(
        [prefect_cli(), *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def deployed(prefect_api, tmp_path_factory) -> dict[str, str]:
    """Pool created and `prefect --no-prompt deploy --all` run from the project directory."""
    home = tmp_path_factory.mktemp("deploy-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "WIS2_"))}
    env.update(prefect_api.client_env(), PREFECT_HOME=str(home), PWD=str(REPO))
    prefect(["work-pool", "create", POOL, "--type", "process", "--overwrite"], env)
    prefect(["--no-prompt", "deploy", "--all"], env, timeout=180)
    return env


def test_deployment_describes_the_event(deployed) -> None:
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(PUBLISH_NOTIFICATION)

    assert deployment.work_pool_name == POOL
    assert deployment.entrypoint == "flows/publish_notification.py:publish_notification"
    schema = deployment.parameter_openapi_schema
    assert set(schema["properties"]) == {"event", "dataset"}
    assert schema["required"] == ["event"]
    text = json.dumps(schema)
    for member in ("specversion", "source", "data"):
        assert f'"{member}"' in text, f"the event form lacks {member}"

    # the worker runs the code from the directory it was deployed from
    steps = deployment.pull_steps or []
    assert any("prefect.deployments.steps.set_working_directory" in step for step in steps)
    env = (deployment.job_variables or {}).get("env", {})
    assert Path(env["WIS2_PROJECT_DIR"]) == REPO


def test_batch_deployment_takes_a_list_of_events(deployed) -> None:
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("publish-batch/default")
    assert deployment.work_pool_name == POOL
    assert deployment.entrypoint == "flows/publish_batch.py:publish_batch"
    assert "listener" in (deployment.description or "")
    schema = deployment.parameter_openapi_schema
    assert set(schema["properties"]) == {"events", "dataset"}
    assert schema["properties"]["events"]["type"] == "array"
    # the flow parses each event itself: one bad event must not refuse the whole batch
    assert deployment.enforce_parameter_schema is False


def test_a_worker_runs_the_deployment(deployed, session_broker, tmp_path: Path) -> None:
    block = f"deploy-broker-{uuid.uuid4().hex[:8]}"
    MqttBroker.from_connection(session_broker.connection("publisher")).save(block)
    topic = load_dataset("argo").topic
    received: list[dict[str, Any]] = []
    got = threading.Event()
    subscribed = threading.Event()
    sub = connect(session_broker.connection("everyone"))
    sub.on_subscribe = lambda *args: subscribed.set()
    sub.on_message = lambda c, u, m: (received.append(json.loads(m.payload)), got.set())
    sub.subscribe(topic, qos=1)
    assert subscribed.wait(10)

    event = json.loads(BUFR_EVENT.read_text(encoding="utf-8"))
    event["id"] = f"deploy-{uuid.uuid4().hex[:8]}"
    flow_run = run_deployment(PUBLISH_NOTIFICATION, parameters={"event": event}, timeout=0)

    env = dict(deployed)
    env.update(
        WIS2_RESULTS_DIR=str(tmp_path / "results"),
        WIS2_VERIFY_DATA="false",
        WIS2_BROKER_BLOCK=block,
        WIS2_PUBLISH_RETRIES="1",
        WIS2_RETRY_BASE_DELAY="0.5",
    )
    worker = subprocess.Popen(
        [prefect_cli(), "worker", "start", "--pool", POOL, "--run-once"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        with get_client(sync_client=True) as client:
            while time.monotonic() < deadline:
                state = client.read_flow_run(flow_run.id).state
                if state is not None and state.is_final():
                    break
                time.sleep(1)
        worker.wait(60)
    finally:
        if worker.poll() is None:
            worker.kill()
        output = worker.communicate()[0]
        sub.loop_stop()
        sub.disconnect()

    assert state.is_completed(), f"{state.name}: {state.message}\n{output[-3000:]}"
    assert got.wait(10), "no notification received"
    assert len(received) == 1
    assert received[0]["properties"]["data_id"].endswith("IOPX01_LFVX_251403.BU")
