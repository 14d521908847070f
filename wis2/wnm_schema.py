"""The WNM schema, loaded once, and pywis-pubsub's executable test suite (ETS) run with it.

The schema file comes with the WIS2 bundles (`wis2-chain bundles install`, pywis-pubsub's
cache). `wnm_validator` checks it with its formats (the chain's "schema" check, `validation`);
`run_ets` runs the ETS, whose own schema test would read, parse and build the schema again
for every message.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from jsonschema import Draft202012Validator

__all__ = ["run_ets", "schema_errors", "wnm_schema", "wnm_validator"]


@lru_cache
def wnm_schema() -> dict[str, Any]:
    from pywis_pubsub.schema import MESSAGE_SCHEMA

    if not MESSAGE_SCHEMA.exists():
        raise RuntimeError(
            f"WNM schema missing at {MESSAGE_SCHEMA}: run `wis2-chain bundles install`"
        )
    return json.loads(MESSAGE_SCHEMA.read_text(encoding="utf-8"))


@lru_cache
def wnm_validator() -> Draft202012Validator:
    """The schema with its formats checked (date-time, uri...): the chain's "schema" check."""
    return Draft202012Validator(wnm_schema(), format_checker=Draft202012Validator.FORMAT_CHECKER)


@lru_cache
def _ets_validator() -> Draft202012Validator:
    """The schema as the ETS's validation test applies it: formats not checked."""
    return Draft202012Validator(wnm_schema())


def schema_errors(validator: Draft202012Validator, document: Any) -> list[str]:
    """Each schema error as `<JSON path>: <message>`; a failed oneOf/anyOf lists its branches'
    errors so the message names the missing or wrong field."""
    messages = []
    for error in validator.iter_errors(document):
        message = f"{error.json_path}: {error.message}"
        if error.context:
            details = dict.fromkeys(f"{sub.json_path}: {sub.message}" for sub in error.context)
            message += " (" + "; ".join(list(details)[:8]) + ")"
        messages.append(message)
    return messages


@lru_cache
def _ets_suite() -> type:
    """pywis-pubsub's ETS, its schema test answered from the schema loaded once.

    The ETS's own test reads the schema file, parses it and builds a validator for every
    message, then validates again what the "schema" check has just validated: most of a valid
    notification's validation time. Here it validates with the same schema, formats unchecked as
    there, only when the "schema" check found errors: checking formats only adds errors (the
    WNM schema has no `not` around a `format`), so a message valid with them is valid without.
    """
    from pywis_pubsub.ets import WNMTestSuite, gen_test_id

    class SchemaOnceTestSuite(WNMTestSuite):
        def __init__(self, data: dict[str, Any], schema_valid: bool) -> None:
            super().__init__(data)
            self.schema_valid = schema_valid

        def test_requirement_validation(self) -> dict[str, Any]:
            status: dict[str, Any] = {"id": gen_test_id("validation"), "code": "PASSED"}
            errors = [] if self.schema_valid else [
                f"{error.json_path}: {error.message}"
                for error in _ets_validator().iter_errors(self.message)]
            if errors:
                status.update(code="FAILED", message=f"{len(errors)} error(s)", errors=errors)
            return status

    return SchemaOnceTestSuite


def run_ets(document: Mapping[str, Any], *, schema_valid: bool) -> dict[str, Any]:
    """The ETS report of `document` (pywis-pubsub's form: `{"ets-report": {"tests": [...]}}`);
    raises ValueError when the document fails the schema (the ETS stops there).
    `schema_valid`: the "schema" check (formats checked) found no error."""
    return _ets_suite()(dict(document), schema_valid).run_tests(fail_on_schema_validation=True)
