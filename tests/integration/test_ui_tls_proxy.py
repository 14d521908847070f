"""The TLS proxy of compose.yml (`deploy/prefect-ui-tls.conf`) run for real with Debian's nginx in
front of a real Prefect server that asks for an auth string: HTTPS only, the block secrets request
refused without the auth string, and the UI served through it where a browser logs in."""

from __future__ import annotations

import datetime as dt
import ipaddress
import shutil
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from chain.processes import ManagedProcess, free_port, port_is_open
from localnode.prefect_server import PrefectServer
from tests.fixtures.paths import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CONF = REPO / "deploy" / "prefect-ui-tls.conf"
AUTH = "admin:proxy-test-S3cret"
SCREENSHOT_DIR = REPO / "run" / "test-output"


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1/localhost and its key (fullchain.pem, privkey.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    chain, private = directory / "fullchain.pem", directory / "privkey.pem"
    chain.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    return chain, private


class Proxy:
    def __init__(self, url: str, cafile: Path) -> None:
        self.url = url
        self.verify = ssl.create_default_context(cafile=str(cafile))


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists()
                                      else None)
    if nginx is None:
        pytest.fail("nginx is not installed (make test installs Debian's nginx-light)")
    tmp = tmp_path_factory.mktemp("ui-proxy")
    chain, _ = self_signed(tmp / "tls")
    proxy_port = free_port()
    public = f"https://127.0.0.1:{proxy_port}"
    server = PrefectServer(tmp / "prefect", ui=True, auth_string=SecretStr(AUTH),
                           extra_env={"PREFECT_UI_API_URL": f"{public}/api"})
    server.start(timeout=180)
    # compose.yml's names, replaced by this machine's: the server's address, the TLS directory,
    # the port (nginx binds loopback only here)
    site = (CONF.read_text()
            .replace("prefect-server:4200", f"127.0.0.1:{server.port}")
            .replace("/tls/", f"{tmp / 'tls'}/")
            .replace("listen 4443 ssl", f"listen 127.0.0.1:{proxy_port} ssl"))
    assert f"127.0.0.1:{proxy_port} ssl" in site and str(server.port) in site
    (tmp / "site.conf").write_text(site)
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp / "temp" / sub).mkdir(parents=True)
    (tmp / "nginx.conf").write_text(f"""
daemon off;
user root;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log info;
events {{}}
http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/temp/body;
    proxy_temp_path {tmp}/temp/proxy;
    fastcgi_temp_path {tmp}/temp/fastcgi;
    uwsgi_temp_path {tmp}/temp/uwsgi;
    scgi_temp_path {tmp}/temp/scgi;
    include {tmp}/site.conf;
}}
""")
    process = ManagedProcess("nginx", [nginx, "-c", str(tmp / "nginx.conf"), "-p", str(tmp)],
                             log_path=tmp / "nginx.out",
                             ready=lambda: port_is_open("127.0.0.1", proxy_port))
    try:
        process.start(30)
        yield Proxy(public, chain)
    finally:
        process.stop()
        server.stop()


def test_the_api_through_the_proxy_asks_for_the_auth_string(proxy: Proxy) -> None:
    body = {"include_secrets": True}
    url = f"{proxy.url}/api/block_documents/filter"
    assert httpx.post(url, json=body, verify=proxy.verify, timeout=30).status_code == 401
    user, _, password = AUTH.partition(":")
    answer = httpx.post(url, json=body, auth=(user, password), verify=proxy.verify, timeout=30)
    assert answer.status_code == 200
    assert httpx.get(f"{proxy.url}/api/health", verify=proxy.verify, timeout=30).status_code == 200


def test_the_proxy_speaks_only_tls(proxy: Proxy) -> None:
    plain = proxy.url.replace("https://", "http://")
    response = httpx.get(f"{plain}/api/health", timeout=30)
    assert response.status_code == 400  # nginx: "The plain HTTP request was sent to HTTPS port"


def test_the_ui_is_served_and_points_the_browser_at_the_https_api(proxy: Proxy) -> None:
    settings = httpx.get(f"{proxy.url}/ui-settings", verify=proxy.verify, timeout=30).json()
    assert settings["auth"] == "BASIC"
    assert settings["api_url"] == f"{proxy.url}/api"


def test_a_browser_logs_in_through_the_proxy(proxy: Proxy) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Debian's chromium is not installed (make test installs it)")
    from playwright.sync_api import sync_playwright

    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update"],
        )
        context = browser.new_context(ignore_https_errors=True,
                                      viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        try:
            page.goto(f"{proxy.url}/work-pools", wait_until="networkidle")
            login = page.get_by_placeholder("admin:pass")
            login.wait_for(timeout=60_000)
            login.fill(AUTH)
            page.get_by_role("button", name="Login").click()
            page.wait_for_url("**/work-pools**", timeout=60_000)
            page.get_by_text("Work Pools").first.wait_for(timeout=60_000)
            page.screenshot(path=str(SCREENSHOT_DIR / "prefect-ui-via-tls-proxy.png"))
        finally:
            browser.close()
