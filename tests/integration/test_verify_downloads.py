"""Bounded data verification: files are streamed and hashed in constant memory, a download stops
as soon as it exceeds the announced length or WIS2_VERIFY_MAX_BYTES, only http(s) is fetched, and
a dataset may restrict the URLs its events announce.

The file server generates its bytes on the fly (nothing is stored on disk) and counts what it
sent, so "stopped early" is measured on the server side."""

from __future__ import annotations

import copy
import hashlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil
import pytest
from prefect import flow

from chain.mqtt import connect
from flows.publish_notification import publish_notification
from flows.tasks.verify import DataMismatch, verify_data_task, verify_notifications
from tests.fixtures.paths import BUFR_EVENT
from wis2.cloudevent import parse_event
from wis2.dataset import DatasetDescription, load_dataset
from wis2.errors import InvalidInput
from wis2.mapping import build_notifications
from wis2.multihash import multihash_of

ASSET = "IOPX01_LFVX_251403.BU"
BLOCK = bytes(range(256)) * 4096  # 1 MiB pattern the server repeats
MiB = 1024 * 1024
GiB = 1024 * MiB


def pattern_digest(size: int) -> str:
    """sha256 multihash of the first `size` bytes of the server's endless pattern."""
    hasher = hashlib.sha256()
    left = size
    while left > 0:
        hasher.update(BLOCK[: min(left, len(BLOCK))])
        left -= len(BLOCK)
    value = hasher.digest()
    return bytes([0x12, len(value)]).hex() + value.hex()


class GeneratedFiles:
    """GET /<size>[?nolength|?slow|?redirect=URL]: `size` bytes of the pattern, generated on the
    fly (`slow`: 10 bytes every 0.2 s)."""

    def __init__(self) -> None:
        self.requests = 0
        self.sent = 0  # body bytes written to the last connection
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # no length header -> the body ends with the connection

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                with outer.lock:
                    outer.requests += 1
                    outer.sent = 0
                path, _, query = self.path.partition("?")
                if query.startswith("redirect="):
                    self.send_response(302)
                    self.send_header("Location", query.removeprefix("redirect="))
                    self.end_headers()
                    return
                size = int(path.strip("/"))
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                if query != "nolength":
                    self.send_header("Content-Length", str(size))
                self.end_headers()
                left = size
                step = 10 if query == "slow" else len(BLOCK)
                try:
                    while left > 0:
                        if query == "slow":
                            self.wfile.flush()
                            time.sleep(0.2)
                        chunk = BLOCK[: min(left, step)]
                        self.wfile.write(chunk)
                        left -= len(chunk)
                        with outer.lock:
                            outer.sent += len(chunk)
                except OSError:  # the client stopped reading and closed the connection
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def wait_idle(self, timeout: float = 10.0) -> int:
        """Bytes sent once the server's writer has given up (the client closed)."""
        deadline = time.monotonic() + timeout
        last = -1
        while time.monotonic() < deadline:
            with self.lock:
                now = self.sent
            if now == last:
                return now
            last = now
            time.sleep(0.3)
        return last


@pytest.fixture
def files() -> Iterator[GeneratedFiles]:
    server = GeneratedFiles()
    server.thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()


def event_for(href: str, size: int | None, checksum: str | None) -> dict[str, Any]:
    event = json.loads(BUFR_EVENT.read_text(encoding="utf-8"))
    event["id"] = f"verify-{uuid.uuid4().hex[:8]}"
    asset = event["data"]["assets"][ASSET]
    asset["href"] = href
    for key, value in (("file:size", size), ("file:checksum", checksum)):
        if value is None:
            asset.pop(key, None)
        else:
            asset[key] = value
    return event


def notifications(href: str, size: int | None, checksum: str | None = None):
    dataset = load_dataset("argo")
    checksum = checksum or multihash_of(b"whatever", "sha256")
    return build_notifications(parse_event(event_for(href, size, checksum)), dataset)


# ---------------------------------------------------------------------------------------------
# lengths and sizes


def test_announced_file_is_verified(files: GeneratedFiles) -> None:
    size = 3 * MiB + 17
    notes = notifications(f"{files.url}/{size}", size, pattern_digest(size))
    assert verify_notifications(notes) == [f"{files.url}/{size}"]


def test_wrong_checksum_is_a_mismatch(files: GeneratedFiles) -> None:
    notes = notifications(f"{files.url}/1000", 1000, pattern_digest(999))
    with pytest.raises(DataMismatch) as info:
        verify_notifications(notes)
    assert info.value.path == "$.properties.integrity.value"


def test_file_larger_than_announced_is_refused_without_reading_it_all(
    files: GeneratedFiles,
) -> None:
    """No Content-Length: the body is read until one chunk past the announced 1000 bytes."""
    size = 512 * MiB
    notes = notifications(f"{files.url}/{size}?nolength", 1000)
    with pytest.raises(DataMismatch) as info:
        verify_notifications(notes)
    assert info.value.path == "$.links[?(@.rel=='canonical')].length"
    assert "announced 1000 bytes" in str(info.value)
    assert "download stopped" in str(info.value)
    sent = files.wait_idle()
    assert sent < 64 * MiB, f"the server sent {sent} bytes of a {size}-byte file"


def test_content_length_above_the_announced_length_is_refused_before_the_body(
    files: GeneratedFiles,
) -> None:
    size = 512 * MiB
    notes = notifications(f"{files.url}/{size}", 1000)
    with pytest.raises(DataMismatch) as info:
        verify_notifications(notes)
    assert "Content-Length" in str(info.value)
    assert files.wait_idle() < 64 * MiB


def test_shorter_file_than_announced_is_a_mismatch(files: GeneratedFiles) -> None:
    notes = notifications(f"{files.url}/999?nolength", 1000, pattern_digest(999))
    with pytest.raises(DataMismatch, match=r"announced 1000 bytes, .* has 999"):
        verify_notifications(notes)


def test_announced_length_above_the_maximum_is_not_downloaded(files: GeneratedFiles) -> None:
    notes = notifications(f"{files.url}/{2 * MiB}", 2 * MiB)
    with pytest.raises(DataMismatch, match="WIS2_VERIFY_MAX_BYTES=1048576") as info:
        verify_notifications(notes, max_bytes=MiB)
    assert info.value.path == "$.links[?(@.rel=='canonical')].length"
    assert files.requests == 0


def test_unannounced_length_stops_at_the_maximum(files: GeneratedFiles) -> None:
    notes = notifications(f"{files.url}/{256 * MiB}?nolength", None)
    with pytest.raises(DataMismatch, match="longer than this node verifies") as info:
        verify_notifications(notes, max_bytes=2 * MiB)
    assert info.value.path == "$.links[?(@.rel=='canonical')].href"
    assert files.wait_idle() < 64 * MiB


def test_a_download_slower_than_the_maximum_time_is_abandoned(files: GeneratedFiles) -> None:
    """1000 bytes at 50 bytes/s (20 s), 1 s allowed: abandoned (TimeoutError is retried)."""
    notes = notifications(f"{files.url}/1000?slow", 1000)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="WIS2_VERIFY_MAX_SECONDS"):
        verify_notifications(notes, max_seconds=1)
    assert time.monotonic() - started < 10


def test_max_bytes_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from chain.settings import ChainSettings

    assert ChainSettings(_env_file=None).verify_max_bytes == 2 * GiB
    assert ChainSettings(_env_file=None).verify_max_seconds == 900
    monkeypatch.setenv("WIS2_VERIFY_MAX_BYTES", "1000")
    monkeypatch.setenv("WIS2_VERIFY_MAX_SECONDS", "60")
    assert ChainSettings(_env_file=None).verify_max_bytes == 1000
    assert ChainSettings(_env_file=None).verify_max_seconds == 60


def test_one_gib_file_is_verified_in_constant_memory(files: GeneratedFiles) -> None:
    """1 GiB streamed from the generating server: the verifying process's RSS stays flat
    (sampled every 20 ms during the download)."""
    size = GiB
    notes = notifications(f"{files.url}/{size}", size, pattern_digest(size))
    process = psutil.Process()
    before = process.memory_info().rss
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        checked = verify_notifications(notes, timeout=60)
    finally:
        done.set()
        sampler.join()
    assert checked == [f"{files.url}/{size}"]
    assert files.sent == size
    growth = (peak - before) / MiB
    assert growth < 50, f"RSS grew by {growth:.0f} MiB while verifying 1 GiB"


def test_downloads_run_concurrently_never_more_at_once_than_asked() -> None:
    """7 files, `concurrency=3`: the gated server holds every download until 3 are waiting
    (they run at the same time), and never sees more than 3 at once."""
    from tests.fixtures.gates import GatedFileServer

    body = b"concurrent file\n" * 64
    server = GatedFileServer(lambda name: body, allow=0)
    notes = [note for i in range(7) for note in notifications(
        f"{server.url}/file-{i}", len(body), multihash_of(body, "sha256"))]
    result: dict[str, Any] = {}

    def verify() -> None:
        try:
            result["checked"] = verify_notifications(notes, timeout=120, concurrency=3)
        except Exception as exc:  # reported by the assertion below
            result["error"] = exc

    thread = threading.Thread(target=verify, daemon=True)
    thread.start()
    try:
        server.wait_held(3, timeout=120)
    finally:
        server.release()
        thread.join(120)
        server.close()
    assert result.get("checked") == [f"{server.url}/file-{i}" for i in range(7)], result
    assert server.most_at_once == 3


# ---------------------------------------------------------------------------------------------
# URLs


def test_only_http_and_https_are_downloaded() -> None:
    notes = notifications("ftp://127.0.0.1/data/file.BU", 1000)
    with pytest.raises(DataMismatch, match="only http and https") as info:
        verify_notifications(notes)
    assert info.value.path == "$.links[?(@.rel=='canonical')].href"


def test_a_redirect_to_another_scheme_is_refused(files: GeneratedFiles) -> None:
    notes = notifications(f"{files.url}/x?redirect=ftp://127.0.0.1/file.BU", 1000)
    with pytest.raises(DataMismatch) as info:
        verify_notifications(notes)
    assert info.value.path == "$.links[?(@.rel=='canonical')].href"


def guarded(prefixes: list[str]) -> DatasetDescription:
    data = load_dataset("argo").model_dump()
    data.update(name=f"guarded-{uuid.uuid4().hex[:8]}", allowed_href_prefixes=prefixes)
    return DatasetDescription.model_validate(data)


def test_dataset_prefixes_refuse_an_href_elsewhere() -> None:
    dataset = guarded(["https://data-argo.ifremer.fr/etc/"])
    good = parse_event(event_for(f"https://data-argo.ifremer.fr/etc/bufr/{ASSET}", 10, None))
    assert build_notifications(good, dataset)
    for href in (f"https://intranet.example/{ASSET}",
                 f"https://data-argo.ifremer.fr/etcetera/{ASSET}",
                 f"https://data-argo.ifremer.fr.evil.example/etc/{ASSET}",
                 f"https://data-argo.ifremer.fr/etc/../admin/{ASSET}",
                 f"http://data-argo.ifremer.fr/etc/{ASSET}"):
        with pytest.raises(InvalidInput) as info:
            build_notifications(parse_event(event_for(href, 10, None)), dataset)
        [error] = info.value.errors
        assert error.path == f"$.data.assets['{ASSET}'].href", error
        assert href in error.message


def test_dataset_prefixes_must_be_url_directories() -> None:
    for prefix in ("https://data-argo.ifremer.fr/etc", "file:///etc/", "/etc/"):
        with pytest.raises(ValueError, match="allowed_href_prefixes"):
            guarded([prefix])


# ---------------------------------------------------------------------------------------------
# in Prefect


@pytest.mark.integration
def test_a_mismatch_is_not_retried(files: GeneratedFiles, prefect_api) -> None:
    notes = notifications(f"{files.url}/{5 * MiB}?nolength", 1000)

    @flow
    def verify(notes):
        return verify_data_task.with_options(retries=3, retry_delay_seconds=0)(notes)

    state = verify(notes, return_state=True)
    assert state.is_failed()
    assert "announced 1000 bytes" in state.message
    assert files.requests == 1


@pytest.mark.integration
def test_an_event_announcing_a_file_elsewhere_fails_before_publishing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_api, session_broker
) -> None:
    """A run of publish-notification for a dataset with allowed_href_prefixes: the event's href
    is elsewhere, the run fails naming the field, nothing reaches origin/a/wis2/#."""
    dataset = guarded(["https://data-argo.ifremer.fr/etc/"])
    datasets = tmp_path / "datasets"
    datasets.mkdir()
    (datasets / f"{dataset.name}.json").write_text(dataset.model_dump_json())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WIS2_DATASETS_DIR", str(datasets))
    monkeypatch.setenv("WIS2_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("WIS2_VERIFY_DATA", "false")
    monkeypatch.setenv("WIS2_BROKER_BLOCK", f"absent-{uuid.uuid4().hex[:8]}")
    publisher = session_broker.connection("publisher")
    monkeypatch.setenv("WIS2_MQTT_HOST", publisher.host)
    monkeypatch.setenv("WIS2_MQTT_PORT", str(publisher.port))
    monkeypatch.setenv("WIS2_MQTT_USERNAME", publisher.username)
    monkeypatch.setenv("WIS2_MQTT_PASSWORD", publisher.password.get_secret_value())

    received: list[bytes] = []
    subscriber = connect(session_broker.connection("everyone"))
    subscriber.on_message = lambda client, userdata, message: received.append(message.payload)
    subscriber.subscribe("origin/a/wis2/#", qos=1)
    try:
        event = copy.deepcopy(event_for(f"http://intranet.invalid/internal/{ASSET}", 940,
                                        multihash_of(b"x", "sha256")))
        state = publish_notification(event=event, dataset=dataset.name, return_state=True)
        assert state.is_failed()
        assert f"$.data.assets['{ASSET}'].href" in state.message
        assert "allowed_href_prefixes" in state.message
        time.sleep(1.0)
        assert received == []
    finally:
        subscriber.loop_stop()
        subscriber.disconnect()

