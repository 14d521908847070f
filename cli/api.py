"""The node's Prefect API as the `wis2-chain` commands see it: which URL (PREFECT_API_URL), is
something answering there, is the auth string accepted. A command that needs the API checks it
first and says what it tried and how to start a node, instead of letting Prefect start a
temporary server of its own or print a traceback."""

from __future__ import annotations

import base64
from dataclasses import dataclass

import httpx
import typer

START_A_NODE = (
    "start a node: `make demo` (it prints the Prefect UI address; then `export "
    "PREFECT_API_URL=http://127.0.0.1:4200/api PREFECT_API_AUTH_STRING=$(jq -r "
    ".prefect_auth_string run/demo/node.json)`), or `docker compose up -d` with PREFECT_API_URL "
    "set to its https://<host>:4200/api"
)
SET_AUTH = ("set PREFECT_API_AUTH_STRING to the server's PREFECT_SERVER_API_AUTH_STRING "
            "(user:password; `make demo`: prefect_auth_string in run/demo/node.json)")
TIMEOUT = 10.0


@dataclass(frozen=True)
class ApiProblem:
    """Why the API cannot be used, and what to do about it."""

    problem: str
    fix: str


def api_settings() -> tuple[str | None, str | None]:
    """PREFECT_API_URL and PREFECT_API_AUTH_STRING as Prefect reads them (environment, .env,
    profile)."""
    from prefect.settings import get_current_settings

    api = get_current_settings().api
    auth = api.auth_string
    secret = getattr(auth, "get_secret_value", None)
    return (api.url or None), (secret() if secret else auth) or None


def client(url: str, auth: str | None) -> httpx.Client:
    """An HTTP client of the API as Prefect's would be (auth string, TLS settings)."""
    from prefect.settings import get_current_settings

    api = get_current_settings().api
    verify: bool | str = (False if api.tls_insecure_skip_verify
                          else api.ssl_cert_file or True)
    headers = {}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    return httpx.Client(base_url=url.rstrip("/") + "/", headers=headers, timeout=TIMEOUT,
                        follow_redirects=False, verify=verify)


def reachability_problem(url: str | None, auth: str | None) -> ApiProblem | None:
    """None when a Prefect API answers at `url` (GET /health, which needs no auth)."""
    if not url:
        return ApiProblem("PREFECT_API_URL is not set: no node's Prefect API to talk to",
                          START_A_NODE)
    try:
        with client(url, auth) as http:
            response = http.get("health")
    except httpx.HTTPError as exc:
        return ApiProblem(f"no Prefect API at {url}: {type(exc).__name__}: {exc}", START_A_NODE)
    if response.status_code != 200:
        return ApiProblem(f"{url}/health answered HTTP {response.status_code}: is it a Prefect "
                          "API URL (ending in /api)?", START_A_NODE)
    return None


def auth_problem(url: str, auth: str | None) -> ApiProblem | None:
    """None when an authenticated call (GET /admin/version) is accepted."""
    try:
        with client(url, auth) as http:
            response = http.get("admin/version")
    except httpx.HTTPError as exc:
        return ApiProblem(f"{url}: {type(exc).__name__}: {exc}", START_A_NODE)
    if response.status_code == 401:
        given = "the auth string given" if auth else "no PREFECT_API_AUTH_STRING"
        return ApiProblem(f"the Prefect API at {url} refused {given} (HTTP 401)", SET_AUTH)
    if response.status_code != 200:
        return ApiProblem(f"{url}/admin/version answered HTTP {response.status_code}",
                          "look at the Prefect server's log")
    return None


def require_api(what: str) -> str:
    """The API URL, once checked; otherwise say what was tried and how to fix it, and exit 1."""
    url, auth = api_settings()
    found = reachability_problem(url, auth) or auth_problem(url or "", auth)
    if found is not None:
        typer.echo(f"error: {what} needs the node's Prefect API: {found.problem}", err=True)
        typer.echo(f"  fix: {found.fix}", err=True)
        raise typer.Exit(1)
    assert url is not None
    return url
