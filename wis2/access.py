"""Access-controlled data: the WNM link ``security`` object and the HTTP headers a credential
becomes when this node downloads such data itself (the verification step).

``security`` (WNM 1.3, links): named OpenAPI-style security schemes, e.g.
``{"bearer": {"type": "http", "scheme": "bearer", "description": "get a token at ..."}}``.
Types: ``http`` (``scheme`` bearer, basic, ...), ``apiKey`` (``name``, ``in`` header, query or
cookie), ``oauth2`` (``flows``) and ``openIdConnect`` (``openIdConnectUrl``); a scheme may also be
a ``{"$ref": ...}`` reference.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from typing import Any

from pydantic import SecretStr

SCHEME_NAME = re.compile(r"^[a-zA-Z0-9.\-_]+$")
REQUIRED_FIELDS = {
    "http": ("scheme",),
    "apiKey": ("name", "in"),
    "oauth2": ("flows",),
    "openIdConnect": ("openIdConnectUrl",),
}


def security_problems(security: Mapping[str, Any]) -> list[str]:
    """What makes `security` not a WNM link security object (empty when it is one)."""
    problems = []
    if not security:
        problems.append("security names no scheme")
    for name, scheme in security.items():
        where = f"security[{name!r}]"
        if not SCHEME_NAME.fullmatch(name):
            problems.append(f"{where}: a scheme name has only letters, digits, '.', '-', '_'")
        if not isinstance(scheme, Mapping):
            problems.append(f"{where}: a scheme is an object")
            continue
        if "$ref" in scheme:
            continue
        kind = scheme.get("type")
        if kind not in REQUIRED_FIELDS:
            problems.append(f"{where}.type: {kind!r} is not one of {', '.join(REQUIRED_FIELDS)}")
            continue
        missing = [f for f in REQUIRED_FIELDS[kind] if f not in scheme]
        if missing:
            problems.append(f"{where}: a {kind} scheme needs {', '.join(missing)}")
        if kind == "apiKey" and scheme.get("in") not in ("header", "query", "cookie"):
            problems.append(f"{where}.in: {scheme.get('in')!r} is not header, query or cookie")
        if kind == "http" and "bearerFormat" in scheme and scheme.get("scheme") != "bearer":
            problems.append(f"{where}.bearerFormat: only for the bearer scheme")
    return problems


def credential_headers(security: Mapping[str, Any], credential: SecretStr) -> dict[str, str]:
    """The request headers that present `credential` as the first usable scheme of `security`:
    http bearer (and oauth2 / openIdConnect: the credential is an access token) ->
    ``Authorization: Bearer``; http basic -> ``Authorization: Basic`` (credential
    ``user:password``); apiKey in a header or a cookie -> that header or cookie. An apiKey in the
    query is not used (the secret would be in the URL, hence in logs). ValueError when no scheme
    is usable; the message never contains the credential."""
    secret = credential.get_secret_value()
    for scheme in security.values():
        if not isinstance(scheme, Mapping):
            continue
        kind = scheme.get("type")
        http_scheme = str(scheme.get("scheme", "")).lower()
        if kind in ("oauth2", "openIdConnect") or (kind == "http" and http_scheme == "bearer"):
            return {"Authorization": f"Bearer {secret}"}
        if kind == "http" and http_scheme == "basic":
            token = base64.b64encode(secret.encode("utf-8")).decode("ascii")
            return {"Authorization": f"Basic {token}"}
        if kind == "apiKey" and scheme.get("in") == "header":
            return {str(scheme["name"]): secret}
        if kind == "apiKey" and scheme.get("in") == "cookie":
            return {"Cookie": f"{scheme['name']}={secret}"}
    kinds = ", ".join(f"{n}: {s.get('type')}" for n, s in security.items()
                      if isinstance(s, Mapping))
    raise ValueError(f"no security scheme this node can present a credential with ({kinds}); "
                     "usable: http bearer/basic, apiKey in a header or cookie, oauth2, "
                     "openIdConnect")
