"""The verification download of access-controlled data: the credential is presented as the link's
security scheme asks, a protected link without a credential fails at once, and the credential
appears in no error."""

from __future__ import annotations

import json

import httpx
import pytest
from pydantic import SecretStr

from flows.tasks.verify import DataMismatch, download_and_check
from tests.fixtures.paths import DATA
from wis2.cloudevent import parse_event
from wis2.dataset import load_dataset
from wis2.mapping import build_notifications

TOKEN = SecretStr("arpege-token-value")
CONTENT = b"GRIB" + bytes(range(256)) * 4 + b"7777"  # what data/events/arpege-event.json announces


def _note():
    event = parse_event((DATA / "events" / "arpege-event.json").read_bytes())
    (note,) = build_notifications(event, load_dataset("arpege"))
    return note


def _server(seen: list[dict[str, str]]) -> httpx.Client:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(dict(request.headers))
        if request.headers.get("authorization") != f"Bearer {TOKEN.get_secret_value()}":
            return httpx.Response(401, json={"error": "token required"})
        return httpx.Response(200, content=CONTENT)
    return httpx.Client(transport=httpx.MockTransport(handle))


def test_the_credential_is_presented_as_a_bearer_token() -> None:
    seen: list[dict[str, str]] = []
    with _server(seen) as client:
        assert download_and_check(client, _note(), credential=TOKEN) == len(CONTENT)
    assert seen[0]["authorization"] == "Bearer arpege-token-value"


def test_a_protected_link_without_credential_fails_at_once() -> None:
    seen: list[dict[str, str]] = []
    with _server(seen) as client, pytest.raises(DataMismatch) as err:
        download_and_check(client, _note())
    assert seen == [], "nothing downloaded"
    assert err.value.path == "$.links[?(@.rel=='canonical')].security"
    assert "names no credential_block" in str(err.value)


def test_a_wrong_credential_is_an_http_error_that_does_not_show_it() -> None:
    wrong = SecretStr("not-the-token")
    with _server([]) as client, pytest.raises(httpx.HTTPStatusError) as err:
        download_and_check(client, _note(), credential=wrong)
    assert "401" in str(err.value) and "not-the-token" not in str(err.value)


def test_an_open_link_sends_no_credential() -> None:
    note = _note()
    link = note.links[0]
    note.links[0] = type(link).model_validate(
        {k: v for k, v in json.loads(link.model_dump_json()).items() if k != "security"})
    seen: list[dict[str, str]] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(dict(request.headers))
        return httpx.Response(200, content=CONTENT)

    with httpx.Client(transport=httpx.MockTransport(handle)) as client:
        download_and_check(client, note, credential=TOKEN)
    assert "authorization" not in seen[0]
