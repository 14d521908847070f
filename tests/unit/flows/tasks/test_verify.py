"""The verification download of access-controlled data: the credential is presented as the link's
security scheme asks, a protected link without a credential fails at once, and the credential
appears in no error. Data carried inline is checked from its content, not downloaded again."""

from __future__ import annotations

import json

import httpx
import pytest
from pydantic import SecretStr

from flows.tasks.verify import (
    DataMismatch,
    check_inline_content,
    download_and_check,
    verify_notifications,
)
from tests.fixtures.paths import DATA
from wis2.cloudevent import parse_event
from wis2.dataset import load_dataset
from wis2.mapping import build_notifications, inline_content

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


# ---- inline content: checked without a second download ---------------------------------------
@pytest.mark.parametrize("encoding", ["utf-8", "base64", "gzip"])
def test_inline_content_is_checked_without_downloading(encoding: str) -> None:
    note = _note()
    note.properties.content = inline_content(CONTENT, encoding if encoding != "utf-8" else None)
    assert check_inline_content(note) == len(CONTENT)
    seen: list[str] = []
    with httpx.Client(transport=httpx.MockTransport(
            lambda request: seen.append(str(request.url)) or httpx.Response(500))) as client:
        assert verify_notifications([note], client=client) == [note.links[0].href]
    assert seen == [], "the file was downloaded although its content is inline"


def test_inline_content_that_does_not_match_the_integrity_is_a_mismatch() -> None:
    note = _note()
    note.properties.content = inline_content(CONTENT[::-1], "base64")
    with pytest.raises(DataMismatch) as err:
        check_inline_content(note)
    assert err.value.path == "$.properties.integrity.value"
    note.properties.content = inline_content(CONTENT[:-1], "base64")
    with pytest.raises(DataMismatch) as err:
        check_inline_content(note)
    assert "length" in err.value.path


def test_without_inline_content_nothing_is_checked_here() -> None:
    assert check_inline_content(_note()) is None
