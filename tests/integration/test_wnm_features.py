"""What a notification can say, end to end on a node (a real Prefect server, real brokers):
cache control through a single run, a batch, a backfill and a rerun; WIGOS station identifiers;
access-controlled recommended data downloaded with a Prefect Secret block credential; inline
content encodings; the update-pubtime rule against the ledger."""

from __future__ import annotations

import base64
import gzip
import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.results import ResultRecord

from broker.launcher import RunningBroker
from chain.ledger import SqliteLedger
from flows.backfill import backfill
from flows.publish_batch import publish_batch
from flows.publish_notification import publish_notification
from tests.fixtures.broker import _start, broker_test_config
from tests.fixtures.paths import DATA
from tests.integration import test_publish_notification
from tests.integration.test_publish_batch import numbered_event
from tests.integration.test_publish_notification import (
    ARGO,
    Subscriber,
    read_artifacts,
    read_flow_run,
    sha256_multihash,
)
from wis2.dataset import load_dataset
from wis2.validation import validate_notification

pytestmark = pytest.mark.timeout(240)
chain = test_publish_notification.chain  # the fixtures, shared

SYNOP = load_dataset("synop")
ARPEGE = load_dataset("arpege")
TOKEN = "arpege-" + uuid.uuid4().hex  # the credential: must appear nowhere but in the requests


def sample(name: str) -> dict[str, Any]:
    return json.loads((DATA / "events" / f"{name}-event.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def meteo_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBroker]:
    """A node broker of centre fr-meteofrance (the publisher may only publish its own centre)."""
    broker = _start(broker_test_config(centre_id="fr-meteofrance"),
                    tmp_path_factory.mktemp("meteo-broker"))
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """The shipped datasets, copied: argo without caching, arpege with this test's Secret block."""
    directory = tmp_path / "datasets"
    directory.mkdir()
    block = f"arpege-token-{uuid.uuid4().hex[:8]}"
    for source in (DATA / "datasets").glob("*.json"):
        data = json.loads(source.read_text(encoding="utf-8"))
        if data["name"] == "argo":
            data["cache"] = False
        if data["name"] == "arpege":
            data["credential_block"] = block
        (directory / source.name).write_text(json.dumps(data), encoding="utf-8")
    monkeypatch.setenv("WIS2_DATASETS_DIR", str(directory))
    return {"dir": directory, "block": Path(block)}


class FileServer:
    """Serves `files` ({name: bytes}); with `token`, only to requests bearing it."""

    def __init__(self, files: dict[str, bytes], token: str | None = None) -> None:
        self.files, self.token = files, token
        self.authorizations: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.authorizations.append(self.headers.get("Authorization"))
                body = server.files.get(self.path.rsplit("/", 1)[-1])
                if server.token and self.headers.get("Authorization") != f"Bearer {server.token}":
                    self.send_response(401)
                    self.end_headers()
                    return
                if body is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def served(event: dict[str, Any], url: str, content: bytes) -> dict[str, Any]:
    """`event` announcing `content` at `url`/<its file name>."""
    (asset,) = event["data"]["assets"].values()
    asset["href"] = f"{url}/{asset['href'].rsplit('/', 1)[-1]}"
    asset["file:size"] = len(content)
    asset["file:checksum"] = sha256_multihash(content)
    return event


def flow_logs(flow_run_id: Any) -> str:
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(
            flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs)


# --------------------------------------------------------------------------------------------
# cache control


def test_cache_false_survives_a_run_a_batch_a_backfill_and_a_rerun(
    chain, session_broker, datasets, tmp_path: Path
) -> None:
    chain.use_broker(session_broker)
    sub = Subscriber(session_broker.connection("everyone"), ARGO.topic)
    try:
        single = publish_notification(event=numbered_event(900), return_state=True)
        assert single.is_completed(), single.message
        overridden = numbered_event(902)
        overridden["cache"] = "true"  # the event's extension attribute wins over the dataset
        batch = publish_batch(events=[numbered_event(901), overridden], dataset="argo",
                              return_state=True)
        assert batch.is_completed(), batch.message
        archive = tmp_path / "archive"
        archive.mkdir()
        (archive / "e903.json").write_text(json.dumps(numbered_event(903)), encoding="utf-8")
        state = backfill(source=str(archive), rate=0, return_state=True)
        assert state.is_completed(), state.message

        messages = {m["properties"]["data_id"].rsplit("_", 1)[-1]: m
                    for _, m in sub.wait_for(4)}
        assert {k: m["properties"].get("cache") for k, m in messages.items()} == {
            "000900.BU": False, "000901.BU": False, "000902.BU": None, "000903.BU": False}
        for message in messages.values():
            assert validate_notification(message, topic=ARGO.topic).ok

        # the same event again: the stored notification (build cache) is reused, cache kept
        again = publish_notification(event=numbered_event(900), return_state=True)
        assert again.is_completed() and again.result().ids == single.result().ids
        assert len(sub.settle()) == 4
    finally:
        sub.close()
    stored = [ResultRecord.deserialize(path.read_bytes()).result
              for path in chain.results.glob("wnm-build-*")]
    caches = [note.properties.cache for notes in stored for note in notes]
    assert caches.count(False) == 3 and caches.count(None) == 1, caches
    # the ledger says it too (what a delivery check or a redelivery reads without the message)
    entries = SqliteLedger.in_dir(chain.results).all()
    assert sorted((entry.model_extra or {}).get("cache", True) for entry in entries.values()) \
        == [False, False, False, True]


# --------------------------------------------------------------------------------------------
# station identifiers


def test_a_station_identifier_is_published_and_a_bad_one_refused_by_path(
    chain, meteo_broker, datasets
) -> None:
    chain.use_broker(meteo_broker)
    sub = Subscriber(meteo_broker.connection("everyone"), SYNOP.topic)
    try:
        state = publish_notification(event=sample("synop"), dataset="synop", return_state=True)
        assert state.is_completed(), state.message
        ((topic, message),) = sub.wait_for(1)
        assert message["properties"]["wigos_station_identifier"] == "0-20000-0-07149"
        assert message["links"][1] == {
            "href": "https://oscar.wmo.int/surface/#/search/station/stationReportDetails/"
                    "0-20000-0-07149", "rel": "via", "type": "text/html"}
        assert validate_notification(message, topic=topic).ok

        bad = sample("synop")
        bad["id"] += "-bad"
        bad["data"]["properties"]["wigos_station_identifier"] = "07149"
        failed = publish_notification(event=bad, dataset="synop", return_state=True)
        assert failed.is_failed()
        artifacts = read_artifacts(failed.state_details.flow_run_id)
        report = next(a.data for key, a in artifacts.items() if key.startswith("failed-"))
        assert "$.data.properties.wigos_station_identifier" in report
        assert "'07149' is not a WIGOS station identifier" in report
        assert len(sub.settle()) == 1
    finally:
        sub.close()


# --------------------------------------------------------------------------------------------
# access-controlled recommended data


def test_recommended_data_is_verified_with_the_secret_and_published_with_security(
    chain, meteo_broker, datasets, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WIS2_VERIFY_DATA", "true")
    chain.use_broker(meteo_broker)
    Secret(value=TOKEN).save(str(datasets["block"]), overwrite=True)
    grib = b"GRIB" + bytes(range(256)) * 8 + b"7777"
    second = grib[::-1]
    files = FileServer({"arpege__025__SP1__000H024H__2026-12-05T00:00:00Z.grib2": grib,
                        "arpege__025__SP1__025H048H.grib2": second}, token=TOKEN)
    sub = Subscriber(meteo_broker.connection("everyone"), ARPEGE.topic)
    try:
        state = publish_notification(event=served(sample("arpege"), files.url, grib),
                                     dataset="arpege", return_state=True)
        assert state.is_completed(), state.message
        assert state.result().verified is True

        other = sample("arpege")
        other["id"] += "-025h048h"
        (asset,) = other["data"]["assets"].values()
        asset["href"] = asset["href"].rsplit("/", 1)[0] + "/arpege__025__SP1__025H048H.grib2"
        batch = publish_batch(events=[served(other, files.url, second)], dataset="arpege",
                              return_state=True)
        assert batch.is_completed(), batch.message

        messages = [m for _, m in sub.wait_for(2)]
        for message in messages:
            assert validate_notification(message, topic=ARPEGE.topic).ok
            props, (link,) = message["properties"], message["links"]
            assert props["cache"] is False and "content" not in props
            assert "start_datetime" in props and "end_datetime" in props
            assert link["security"] == ARPEGE.security
        assert files.authorizations == [f"Bearer {TOKEN}"] * 2  # one download each, with it

        # the credential is in no artifact, no log, no parameter
        for run in (state, batch):
            run_id = run.state_details.flow_run_id
            assert TOKEN not in flow_logs(run_id)
            assert all(TOKEN not in str(a.data) for a in read_artifacts(run_id).values())
            assert TOKEN not in json.dumps(read_flow_run(run_id).parameters)
    finally:
        sub.close()
        files.close()


# --------------------------------------------------------------------------------------------
# content encodings


@pytest.mark.parametrize("encoding", ["utf-8", "base64", "gzip"])
def test_small_files_are_inlined_in_the_dataset_encoding(
    chain, meteo_broker, datasets, encoding: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inlined in the dataset's encoding; with verification on, the file is fetched once (by
    the build, to inline it): the verification checks the inline content."""
    monkeypatch.setenv("WIS2_VERIFY_DATA", "true")
    synop = json.loads((datasets["dir"] / "synop.json").read_text(encoding="utf-8"))
    (datasets["dir"] / "synop.json").write_text(
        json.dumps(synop | {"content_encoding": encoding}), encoding="utf-8")
    report = ("AAXX 05121 07149 11458 72305 10062 20041 30134 40183 58005 " * 20).encode()
    chain.use_broker(meteo_broker)
    files = FileServer({"WIGOS_0-20000-0-07149_20261205T120000.bufr4": report})
    sub = Subscriber(meteo_broker.connection("everyone"), SYNOP.topic)
    try:
        event = served(sample("synop"), files.url, report)
        event["id"] += f"-{encoding}"
        state = publish_notification(event=event, dataset="synop", return_state=True)
        assert state.is_completed(), state.message
        ((_, message),) = sub.wait_for(1)
    finally:
        sub.close()
        files.close()
    content = message["properties"]["content"]
    assert (content["encoding"], content["size"]) == (encoding, len(report))
    value = content["value"]
    decoded = {"utf-8": str.encode, "base64": base64.b64decode,
               "gzip": lambda v: gzip.decompress(base64.b64decode(v))}[encoding](value)
    assert decoded == report and len(value) <= 4096
    assert validate_notification(message, topic=SYNOP.topic).ok
    assert len(files.authorizations) == 1, "one GET of the file: the build's"


# --------------------------------------------------------------------------------------------
# WNM 1.3: an update is later than what it updates


def test_an_update_not_later_than_the_ledger_is_refused(chain, session_broker, datasets) -> None:
    chain.use_broker(session_broker)
    event = numbered_event(950)
    data_id = ("wis2/fr-ifremer-argo/data/core/bufr/202503/IOPX01_LFVX_000950.BU")
    # the ledger says a later publication of this file exists (another checksum): an update
    SqliteLedger.in_dir(chain.results).record(
        data_id, notification_id=str(uuid.uuid4()), rel="canonical", checksum="sha256:other",
        pubtime="2099-01-01T00:00:00Z")
    sub = Subscriber(session_broker.connection("everyone"), ARGO.topic)
    try:
        state = publish_notification(event=event, return_state=True)
        assert state.is_failed()
        message = read_flow_run(state.state_details.flow_run_id).state.message
        assert "update-pubtime" in message and "2099-01-01T00:00:00Z" in message, message
        assert sub.settle() == []
    finally:
        sub.close()
