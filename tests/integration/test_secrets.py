"""Secrets stay where they belong. On a local node (authenticated Prefect API) that published the
metadata record and an event, failed a run on a bad checksum and dead-lettered a malformed
message, no broker password and not the Prefect auth string appear in: the flow runs (parameters,
states), their logs, artifacts, events, the deployments, work pools, variables, the block
documents read without `include_secrets`, the dead letters, the task results, or any log file of
the node. The files that must hold a secret are private (modes checked)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from chain.mqtt import publish_once
from localnode.node import LocalNode
from tests.fixtures.node import running_node
from tests.fixtures.paths import DATA
from tests.fixtures.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BAD_FILE = "D6990001_001.csv"
# Files whose job is to hold a secret: the node's state (0600), the Prefect server's database
# (block documents, its encryption key) in the 0700 run directory.
SECRET_HOLDERS = {"node.json", "prefect.db", "prefect.db-wal", "prefect.db-shm"}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNode]:
    with running_node(tmp_path_factory.mktemp("secrets-node")) as node:
        yield node


def secrets_of(node: LocalNode) -> dict[str, str]:
    found = {f"broker password of {role}": pw.get_secret_value()
             for role, pw in node.passwords.items() if role != "everyone"}
    auth = node.state.prefect_auth_string.get_secret_value()
    found["Prefect auth string"] = auth
    found["Prefect auth password"] = auth.partition(":")[2]
    return found


def api_dump(node: LocalNode, path: str, body: dict | None = None) -> list:
    """Every object a filter endpoint returns (paged), read with the node's credentials."""
    auth = tuple(node.state.prefect_auth_string.get_secret_value().split(":", 1))
    items: list = []
    if path == "/events/filter":  # paged by next_page links, not offsets
        response = httpx.post(f"{node.state.prefect_api_url}{path}",
                              json={"limit": 50, "filter": {"occurred": {
                                  "since": "2000-01-01T00:00:00Z"}}},
                              auth=auth, timeout=60)
        while True:
            response.raise_for_status()
            page = response.json()
            items.extend(page["events"])
            if not page.get("next_page"):
                return items
            response = httpx.get(page["next_page"], auth=auth, timeout=60)
    offset = 0
    while True:
        page_body = {**(body or {}), "limit": 200, "offset": offset}
        response = httpx.post(f"{node.state.prefect_api_url}{path}", json=page_body, auth=auth,
                              timeout=60)
        response.raise_for_status()
        page = response.json()
        items.extend(page)
        if len(page) < 200:
            return items
        offset += len(page)


@pytest.fixture(scope="module")
def exercised(node: LocalNode) -> LocalNode:
    """Metadata, one good event, one event whose file does not match (a Failed run with its
    failure artifact), one malformed message (a dead letter)."""
    node.publish_metadata(node.settings.metadata_record)
    node.send_and_wait(DATA / "demo-event.json", node.settings.event_topic, node.settings.timeout)

    bad = json.loads(node.event_payload(DATA / "demo-event.json"))
    bad["id"] = "demo-wrong-checksum"
    asset = bad["data"]["assets"][BAD_FILE]
    asset["file:checksum"] = "1220" + "00" * 32  # a valid sha256 multihash of other bytes
    fileserver = node.state.connection("fileserver")
    publish_once(fileserver, node.settings.event_topic, json.dumps(bad).encode())
    publish_once(fileserver, node.settings.event_topic, b"{not json")

    def failed_run() -> bool:
        runs = api_dump(node, "/flow_runs/filter",
                        {"flow_runs": {"state": {"type": {"any_": ["FAILED"]}}}})
        return any(run["name"] == BAD_FILE for run in runs)

    wait_for(failed_run, 180, "the run of the mismatching event to fail")
    wait_for(lambda: list((node.run_dir / "deadletters").glob("*.json")), 60, "a dead letter")
    return node


def test_the_exercise_produced_what_is_searched(exercised: LocalNode) -> None:
    artifacts = api_dump(exercised, "/artifacts/filter")
    keys = {a.get("key") for a in artifacts}
    assert any(k and k.startswith("failed-") for k in keys), keys
    assert any(k and k.startswith("wnm-") for k in keys), keys
    assert api_dump(exercised, "/logs/filter")
    assert api_dump(exercised, "/events/filter")
    # what is searched for is really there, where it belongs
    state = (exercised.run_dir / "node.json").read_text()
    assert all(value in state for value in secrets_of(exercised).values())


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/flow_runs/filter", None),  # parameters, state messages, job variables
        ("/task_runs/filter", None),
        ("/logs/filter", None),
        ("/artifacts/filter", None),
        ("/deployments/filter", None),
        ("/work_pools/filter", None),
        ("/variables/filter", None),
        ("/block_documents/filter", {"include_secrets": False}),
        ("/events/filter", None),
    ],
)
def test_no_secret_in_the_prefect_api(exercised: LocalNode, path: str, body: dict | None) -> None:
    text = json.dumps(api_dump(exercised, path, body))
    leaked = [name for name, value in secrets_of(exercised).items() if value in text]
    assert leaked == [], f"{path} shows {leaked}"


def test_no_secret_in_the_node_files(exercised: LocalNode) -> None:
    """Logs of every process, dead letters, task results, the served files, broker files."""
    secrets = secrets_of(exercised)
    searched = 0
    leaks: list[str] = []
    for path in exercised.run_dir.rglob("*"):
        if not path.is_file() or path.name in SECRET_HOLDERS:
            continue
        content = path.read_bytes()
        searched += 1
        leaks.extend(f"{path.relative_to(exercised.run_dir)}: {name}"
                     for name, value in secrets.items() if value.encode() in content)
    assert leaks == []
    logs = list((exercised.run_dir / "logs").glob("*.log"))
    assert {p.stem for p in logs} >= {"worker", "listener"}
    assert searched > len(logs)


def test_files_holding_secrets_are_private(exercised: LocalNode) -> None:
    run_dir = exercised.run_dir
    assert run_dir.stat().st_mode & 0o077 == 0, oct(run_dir.stat().st_mode)
    assert (run_dir / "node.json").stat().st_mode & 0o777 == 0o600
    passwd = [p for p in (run_dir / "broker").rglob("passwd*") if p.is_file()]
    assert passwd
    for path in passwd:
        assert path.stat().st_mode & 0o077 == 0, f"{path}: {oct(path.stat().st_mode)}"


def test_logs_need_authentication(exercised: LocalNode) -> None:
    response = httpx.post(f"{exercised.state.prefect_api_url}/logs/filter", json={}, timeout=30)
    assert response.status_code == 401
