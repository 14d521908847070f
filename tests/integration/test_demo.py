"""The orchestration of `make demo`, run in the background: the sample event's notification must
reach a real pywis-pubsub `subscribe` process (a simulated Global Broker) that validates it, and the
Prefect UI must show the completed flow run named after the sample file with its notification
artifact (headless Chromium through Playwright; the documentation's screenshots, docs/img/, are
taken here so they are never stale); `wis2-chain doctor` checks the running node."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chain.processes import ManagedProcess
from localnode.node import LocalNode
from tests.fixtures.node import running_node
from tests.fixtures.paths import DATA, REPO
from tests.fixtures.wis2_global import Prometheus

pytestmark = pytest.mark.slow

SAMPLE_FILE = "D6990001_001.csv"
SCREENSHOT_DIR = REPO / "run" / "test-output"
DOCS_IMG = REPO / "docs" / "img"  # committed: the documentation shows them


@pytest.fixture(scope="module")
def demo_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNode]:
    # as `make demo` runs it: the worker's /metrics and the delivery monitor too
    with running_node(tmp_path_factory.mktemp("demo-node"), observability=True) as node:
        yield node


@pytest.fixture(scope="module")
def global_broker(demo_node: LocalNode, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """pywis-pubsub's own `subscribe`, as `everyone`, validating each message."""
    workdir = tmp_path_factory.mktemp("global-broker")
    output = workdir / "received.jsonl"
    env = dict(os.environ)
    env.update(
        WIS2_GB_SIM_BROKER=f"mqtt://everyone:everyone@127.0.0.1:{demo_node.settings.broker_port}",
        WIS2_GB_SIM_OUTPUT=str(output),
        PYTHONPATH=str(REPO),
    )
    subscriber = ManagedProcess(
        "pywis-pubsub-subscribe",
        [str(Path(sys.executable).with_name("pywis-pubsub")), "subscribe",
         "--config", str(REPO / "broker" / "global-broker-sim.yml"), "--verbosity", "INFO"],
        log_path=workdir / "subscribe.log", env=env,
    )
    subscriber.start()
    time.sleep(3)  # let it connect and subscribe before the event is sent
    try:
        yield output
    finally:
        subscriber.stop()


@pytest.fixture(scope="module")
def published(demo_node: LocalNode, global_broker: Path) -> dict:
    demo_node.publish_metadata(demo_node.settings.metadata_record)
    return demo_node.send_and_wait(DATA / "demo-event.json", demo_node.settings.event_topic,
                                   demo_node.settings.timeout)


def test_the_demo_node_runs_prefect_on_a_postgresql_cluster_of_its_own(demo_node: LocalNode):
    """The default node is the fast one: PostgreSQL started by the node itself (zero set-up
    commands), the listener creating runs concurrently as compose.yml does."""
    assert demo_node.postgres is not None and demo_node.postgres.running
    assert demo_node.database_url.startswith("postgresql+asyncpg://")
    assert f":{demo_node.postgres.port}/" in demo_node.database_url
    assert demo_node.listener_env()["WIS2_LISTENER_API_CONCURRENCY"] == \
        LocalNode.POSTGRES_LISTENER_API_CONCURRENCY


def test_sample_event_reaches_a_validating_global_broker(published: dict, global_broker: Path):
    assert published["message"]["properties"]["data_id"].endswith(SAMPLE_FILE)
    deadline = time.monotonic() + 60
    records: list[dict] = []
    while time.monotonic() < deadline:
        if global_broker.exists():
            records = [json.loads(line) for line in global_broker.read_text().splitlines()]
            if any("/data/" in r["topic"] for r in records):
                break
        time.sleep(0.5)
    data = [r for r in records if "/data/" in r["topic"]]
    assert len(data) == 1, records
    assert data[0]["valid"], data[0]["summary"]
    assert data[0]["message"]["id"] == published["message"]["id"]
    assert any(r["topic"].endswith("/metadata") and r["valid"] for r in records), records


def test_prefect_ui_shows_the_run_and_its_notification(published: dict, demo_node: LocalNode):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Debian's chromium is not installed (make test installs it)")
    from playwright.sync_api import sync_playwright

    run_url = demo_node.latest_flow_run_url()
    assert run_url, "no flow run found"
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            # The API asks for the node's auth string: the UI shows its login form first.
            page.goto(f"{demo_node.state.ui_url}/runs", wait_until="networkidle")
            login = page.get_by_placeholder("admin:pass")
            login.wait_for(timeout=60_000)
            page.screenshot(path=str(SCREENSHOT_DIR / "prefect-login.png"), full_page=True)
            login.fill(demo_node.state.prefect_auth_string.get_secret_value())
            page.get_by_role("button", name="Login").click()
            page.wait_for_url("**/runs**", timeout=60_000)
            page.get_by_text(SAMPLE_FILE).first.wait_for(timeout=60_000)
            page.screenshot(path=str(SCREENSHOT_DIR / "prefect-runs.png"), full_page=True)
            page.goto(run_url, wait_until="networkidle")
            page.get_by_text("Completed").first.wait_for(timeout=60_000)
            page.get_by_text("Artifacts", exact=True).first.click()
            page.get_by_text("wnm-", exact=False).first.wait_for(timeout=60_000)
            page.screenshot(path=str(SCREENSHOT_DIR / "prefect-run-artifacts.png"), full_page=True)
            page.screenshot(path=str(DOCS_IMG / "prefect-run-artifacts.png"))
            _custom_run_form_with_a_pasted_event(page, demo_node)
        finally:
            page.screenshot(path=str(SCREENSHOT_DIR / "prefect-last-page.png"), full_page=True)
            browser.close()
    assert (SCREENSHOT_DIR / "prefect-run-artifacts.png").stat().st_size > 10_000
    assert (DOCS_IMG / "prefect-custom-run.png").stat().st_size > 10_000


def _custom_run_form_with_a_pasted_event(page, demo_node: LocalNode) -> None:
    """The deployment's custom-run form, its parameters switched to JSON and the demo event
    pasted in (what an operator does to replay an event by hand); not submitted."""
    import httpx

    api = demo_node.state.prefect_api_url
    auth = demo_node.state.prefect_auth_string.get_secret_value()
    deployment = httpx.get(f"{api}/deployments/name/publish-notification/default",
                           auth=tuple(auth.split(":", 1)), timeout=30).json()
    page.goto(f"{demo_node.state.ui_url}/deployments/deployment/{deployment['id']}/run",
              wait_until="networkidle")
    page.get_by_text("Parameters", exact=True).first.wait_for(timeout=60_000)
    page.locator("button.p-button--outline.h-10.w-10").first.click()  # the Parameters menu
    page.get_by_text("Use JSON input").click()
    editor = page.locator("textarea.p-code-input__textarea").first
    editor.wait_for(timeout=60_000)
    editor.click()
    page.keyboard.press("Control+A")
    event = json.loads(demo_node.event_payload(DATA / "demo-event.json"))
    page.keyboard.insert_text(json.dumps({"event": event, "dataset": "argo"}, indent=2))
    page.get_by_text('"specversion"').first.wait_for(timeout=60_000)
    page.screenshot(path=str(DOCS_IMG / "prefect-custom-run.png"))


def test_doctor_checks_the_running_node(demo_node: LocalNode, published: dict) -> None:
    """`wis2-chain doctor` with the node's settings: every check passes; a wrong password of
    one account is the one failed line, naming the account and the fix."""
    env = {**demo_node.child_env(), **demo_node.listener_env(),
           "WIS2_BROKER_FILESERVER_PASSWORD":
           demo_node.passwords["fileserver"].get_secret_value()}
    doctor = [str(Path(sys.executable).with_name("wis2-chain")), "doctor"]
    done = subprocess.run(doctor, env=env, capture_output=True, text=True, cwd=REPO,
                          timeout=180, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    for name in ("broker", "broker-account publisher", "broker-account listener",
                 "broker-account fileserver", "broker-account everyone", "prefect-api",
                 "prefect-auth", "work-pool", "worker", "deployments", "blocks", "bundles",
                 "dataset argo", "disk WIS2_RESULTS_DIR"):
        assert any(line.startswith("OK") and f" {name} " in line for line in lines), \
            (name, done.stdout)
    assert "0 failed" in lines[-1]

    env["WIS2_BROKER_FILESERVER_PASSWORD"] = "not-the-password"
    done = subprocess.run(doctor, env=env, capture_output=True, text=True, cwd=REPO,
                          timeout=180, check=False)
    assert done.returncode == 1
    failed = [line for line in done.stdout.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 1, done.stdout
    assert "broker-account fileserver" in failed[0] and "Not authorized" in failed[0]
    assert "fix: check the password of fileserver" in failed[0]


def test_demo_event_command_reaches_the_running_node(demo_node: LocalNode, published: dict):
    """`make demo-event` uses the node's state file to send as the file server."""
    done = subprocess.run(
        [sys.executable, "-m", "localnode.demo", "send", str(DATA / "demo-event.json")],
        env={**os.environ, "WIS2_DEMO_RUN_DIR": str(demo_node.run_dir),
             "WIS2_DEMO_FILES_PORT": str(demo_node.settings.files_port)},
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "sent" in done.stdout


def test_backfill_command_runs_the_deployment_with_a_worker(
    demo_node: LocalNode, published: dict, tmp_path: Path
) -> None:
    """`wis2-chain backfill DIR` on the demo node: a backfill/default run taken by the node's
    worker; the sample file (already published, here announced by another event) is not
    announced again; the command follows the run to its end."""
    archive = tmp_path / "archive"
    archive.mkdir()
    event = json.loads(demo_node.event_payload(DATA / "demo-event.json"))
    event["id"] = "backfill-of-the-sample"
    (archive / "sample.json").write_text(json.dumps(event))
    done = subprocess.run(
        [str(Path(sys.executable).with_name("wis2-chain")), "backfill", str(archive),
         "--timeout", "180"],
        env=demo_node.child_env(), capture_output=True, text=True, cwd=tmp_path, timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "of backfill/default created" in done.stdout
    assert "done: 1/1 entries: 0 published, 1 already published" in done.stdout


def test_the_demo_counts_and_watches_what_it_publishes(published: dict, demo_node: LocalNode,
                                                       tmp_path: Path) -> None:
    """The worker's flow metrics, scraped by a real Prometheus and asked the dashboard's query
    (the demo's metadata notification and its sample event's, both of dataset argo);
    the delivery monitor's record of the notification (no Global Broker to watch in the demo:
    it stays pending), shown by `wis2-chain delivery status`."""
    settings = demo_node.settings
    dashboard = json.loads((REPO / "deploy" / "grafana" / "wis2-chain-dashboard.json")
                           .read_text(encoding="utf-8"))
    query = next(p["targets"][0]["expr"] for p in dashboard["panels"]
                 if p["title"] == "Notifications published")
    query = query.replace("$centre_id", settings.centre_id).replace("$dataset", ".*")
    prometheus = Prometheus(tmp_path / "prometheus", [
        f"{settings.host}:{settings.worker_metrics_port}",
        f"{settings.host}:{settings.delivery_metrics_port}"]).start()
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not prometheus.query(query):
            time.sleep(0.5)
        assert {s["metric"]["dataset"]: float(s["value"][1])
                for s in prometheus.query(query)} == {"argo": 2.0}
    finally:
        prometheus.stop()
    data_id = published["message"]["properties"]["data_id"]
    env = {**demo_node.child_env(), "PATH": os.environ["PATH"]}
    deadline = time.monotonic() + 60
    while True:
        done = subprocess.run([str(Path(sys.executable).with_name("wis2-chain")), "delivery",
                               "status", data_id], capture_output=True, text=True, env=env,
                              timeout=120, check=False)
        if done.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert done.returncode == 0, done.stderr
    assert f"{published['message']['id']}  pending" in done.stdout
