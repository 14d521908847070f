"""Dataset descriptions: the WNM features a dataset can declare, and the datasets shipped."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from tests.fixtures.paths import DATA
from wis2.dataset import DatasetDescription, list_datasets, load_dataset

BEARER = {"bearer": {"type": "http", "scheme": "bearer"}}


def recommended(**changes: Any) -> dict[str, Any]:
    return json.loads((DATA / "datasets" / "arpege.json").read_text(encoding="utf-8")) | changes


def test_the_shipped_datasets_load() -> None:
    names = {d.name for d in list_datasets()}
    assert {"argo", "synop", "arpege"} <= names
    arpege = load_dataset("arpege")
    assert (arpege.data_policy, arpege.cache, arpege.inline_content) == ("recommended", False,
                                                                         False)
    assert arpege.security and arpege.credential_block == "arpege-api-token"
    argo = load_dataset("argo")
    assert (argo.cache, argo.security, argo.content_encoding) == (True, None, None)
    assert argo.wigos_station_property == "wigos_station_identifier"


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"inline_content": True}, "recommended data is never inlined"),
        ({"security": {"s": {"type": "http"}}}, "needs scheme"),
        ({"content_encoding": "zstd"}, "content_encoding"),
        ({"cache": "sometimes"}, "cache"),
    ],
)
def test_bad_recommended_dataset_is_refused(changes: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        DatasetDescription.model_validate(recommended(**changes))


@pytest.mark.parametrize("field", ["security", "credential_block"])
def test_core_data_is_never_access_controlled(field: str) -> None:
    argo = load_dataset("argo").model_dump()
    argo[field] = BEARER if field == "security" else "a-secret"
    with pytest.raises(ValidationError, match=f"{field}: only a dataset with data_policy"):
        DatasetDescription.model_validate(argo)


def test_every_field_is_described() -> None:
    schema = DatasetDescription.model_json_schema()
    undocumented = [name for name, field in schema["properties"].items()
                    if not field.get("description")]
    assert undocumented == []
