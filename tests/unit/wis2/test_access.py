"""Access-controlled data: the link `security` object and the headers a credential becomes."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from pydantic import SecretStr

from wis2.access import credential_headers, security_problems

TOKEN = SecretStr("s3cr3t-t0ken")


@pytest.mark.parametrize(
    ("scheme", "headers"),
    [
        ({"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
         {"Authorization": "Bearer s3cr3t-t0ken"}),
        ({"type": "http", "scheme": "Basic"},
         {"Authorization": "Basic " + base64.b64encode(b"s3cr3t-t0ken").decode()}),
        ({"type": "apiKey", "name": "X-API-Key", "in": "header"}, {"X-API-Key": "s3cr3t-t0ken"}),
        ({"type": "apiKey", "name": "session", "in": "cookie"},
         {"Cookie": "session=s3cr3t-t0ken"}),
        ({"type": "oauth2", "flows": {"clientCredentials": {
            "tokenUrl": "https://auth.example.org/token", "scopes": {}}}},
         {"Authorization": "Bearer s3cr3t-t0ken"}),
        ({"type": "openIdConnect", "openIdConnectUrl": "https://auth.example.org/.well-known"},
         {"Authorization": "Bearer s3cr3t-t0ken"}),
    ],
    ids=["bearer", "basic", "apikey-header", "apikey-cookie", "oauth2", "oidc"],
)
def test_each_scheme_presents_the_credential(scheme: dict[str, Any],
                                             headers: dict[str, str]) -> None:
    assert security_problems({"s": scheme}) == []
    assert credential_headers({"s": scheme}, TOKEN) == headers


def test_a_query_api_key_is_never_used_and_the_error_holds_no_secret() -> None:
    security = {"key": {"type": "apiKey", "name": "token", "in": "query"}}
    with pytest.raises(ValueError, match="no security scheme") as err:
        credential_headers(security, TOKEN)
    assert "s3cr3t" not in str(err.value)
    # a usable scheme after it is taken
    security["bearer"] = {"type": "http", "scheme": "bearer"}
    assert credential_headers(security, TOKEN) == {"Authorization": "Bearer s3cr3t-t0ken"}


@pytest.mark.parametrize(
    ("security", "words"),
    [
        ({}, "names no scheme"),
        ({"bad name": {"type": "http", "scheme": "bearer"}}, "scheme name"),
        ({"s": {"type": "kerberos"}}, "'kerberos' is not one of"),
        ({"s": {"type": "http"}}, "needs scheme"),
        ({"s": {"type": "apiKey", "name": "k", "in": "body"}}, "'body' is not header"),
        ({"s": {"type": "http", "scheme": "basic", "bearerFormat": "JWT"}}, "only for the bearer"),
        ({"s": "bearer"}, "a scheme is an object"),
    ],
)
def test_bad_security_objects_are_named(security: dict[str, Any], words: str) -> None:
    problems = security_problems(security)
    assert problems and words in "; ".join(problems)
