"""`wis2-chain doctor` and the commands that need the Prefect API, with nothing running: each
says what it tried and how to start a node, with no traceback; `backfill --dry-run` needs no
server at all. (Against a running node: tests/integration/test_demo.py.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from chain.processes import free_port
from cli.doctor import _certificate_check, _disk_check, _served_certificate_check
from tests.fixtures.paths import DATA, REPO

WIS2_CHAIN = str(Path(sys.executable).with_name("wis2-chain"))


@pytest.fixture
def nothing_running(tmp_path: Path) -> dict[str, str]:
    """An environment whose broker and Prefect API are free ports: nothing listens there."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "WIS2_"))}
    env.update(PREFECT_HOME=str(tmp_path / ".prefect"),
               WIS2_MQTT_PORT=str(free_port()), WIS2_MQTT_PASSWORD="secret",
               WIS2_RESULTS_DIR=str(tmp_path / "results"),
               PREFECT_API_URL=f"http://127.0.0.1:{free_port()}/api")
    if os.environ.get("WIS2_BUNDLE_DIR"):
        env["WIS2_BUNDLE_DIR"] = os.environ["WIS2_BUNDLE_DIR"]
    return env


def run(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([WIS2_CHAIN, *argv], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=120, check=False)


def test_doctor_with_nothing_running_says_what_to_start(nothing_running, tmp_path) -> None:
    done = run(["doctor"], nothing_running, tmp_path)
    assert done.returncode == 1
    assert "Traceback" not in done.stdout + done.stderr
    lines = {line.split()[1]: line for line in done.stdout.splitlines()[:-1]
             if line.split()[1] in ("broker", "prefect-api", "worker")}
    port, url = nothing_running["WIS2_MQTT_PORT"], nothing_running["PREFECT_API_URL"]
    assert lines["broker"].startswith("FAIL")
    assert f"nothing listens on 127.0.0.1:{port}" in lines["broker"]
    assert "fix: start the broker" in lines["broker"]
    assert lines["prefect-api"].startswith("FAIL") and f"no Prefect API at {url}" in \
        lines["prefect-api"] and "make demo" in lines["prefect-api"]
    assert lines["worker"].startswith("SKIP")
    assert "OK    dataset argo" in done.stdout  # what needs no service is still checked
    assert done.stdout.splitlines()[-1].endswith("warnings")


def test_doctor_without_prefect_api_url(nothing_running, tmp_path) -> None:
    del nothing_running["PREFECT_API_URL"]
    done = run(["doctor"], nothing_running, tmp_path)
    assert done.returncode == 1
    assert "PREFECT_API_URL is not set" in done.stdout and "Traceback" not in done.stderr


@pytest.mark.parametrize("argv", [["blocks", "register"], ["recover"], ["backfill", "DIR"],
                                  ["backfill", "DIR", "--local"]],
                         ids=["blocks", "recover", "backfill", "backfill-local"])
def test_commands_needing_the_api_name_the_url_and_how_to_start_a_node(
        nothing_running, tmp_path, argv) -> None:
    (tmp_path / "DIR").mkdir()
    done = run(argv, nothing_running, tmp_path)
    assert done.returncode == 1
    assert f"no Prefect API at {nothing_running['PREFECT_API_URL']}" in done.stderr
    assert "fix: start a node: `make demo`" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def test_backfill_dry_run_needs_no_server(nothing_running, tmp_path) -> None:
    """No PREFECT_API_URL at all: Prefect would start a temporary server for a flow run; the dry
    run builds and validates here instead, and names the bad entry."""
    del nothing_running["PREFECT_API_URL"]
    archive = tmp_path / "archive"
    archive.mkdir()
    shutil.copy(DATA / "demo-event.json", archive / "good.json")
    (archive / "bad.json").write_text('{"specversion": "1.0"}')
    done = run(["backfill", str(archive), "--dry-run"], nothing_running, tmp_path)
    output = done.stdout + done.stderr
    assert "Traceback" not in output and "temporary" not in output.lower()
    assert done.returncode == 1  # one entry is bad
    assert "bad.json" in done.stderr and "$.id: Field required" in done.stderr
    assert "2/2 entries" in done.stdout and "1 failed, 1 would be published" in done.stdout
    assert not (tmp_path / ".prefect").exists() or not any((tmp_path / ".prefect").rglob("*.db"))

    (archive / "bad.json").unlink()
    done = run(["backfill", str(archive), "--dry-run"], nothing_running, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "done: 1/1 entries" in done.stdout and "1 would be published" in done.stdout


def _certificate(tmp_path: Path, not_after: datetime) -> Path:
    """A self-signed certificate for 127.0.0.1 (its key beside it, `.key`)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "broker.example")])
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(not_after - timedelta(days=400)).not_valid_after(not_after)
                   .add_extension(x509.SubjectAlternativeName(
                       [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
                   .sign(key, hashes.SHA256()))
    path = tmp_path / f"cert-{not_after:%Y%m%d}.pem"
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return path


def test_certificate_expiry(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    ok = _certificate_check("WIS2_BROKER_CERTFILE",
                            _certificate(tmp_path, now + timedelta(days=90)), now)
    soon = _certificate_check("WIS2_BROKER_CERTFILE",
                              _certificate(tmp_path, now + timedelta(days=10)), now)
    gone = _certificate_check("WIS2_BROKER_CERTFILE",
                              _certificate(tmp_path, now - timedelta(days=1)), now)
    missing = _certificate_check("WIS2_BROKER_CERTFILE", tmp_path / "none.pem", now)
    assert ok.status == "OK" and "CN=broker.example valid until" in ok.message
    assert soon.status == "WARN" and "expires in 10 days" in soon.message
    assert gone.status == "FAIL" and "expired on" in gone.message and "renew it" in gone.fix
    assert missing.status == "FAIL" and "WIS2_BROKER_CERTFILE" in missing.message


def test_certificate_served_by_the_broker_port(tmp_path: Path) -> None:
    """The TLS port's certificate, verified with the CA the clients are given: its expiry;
    a certificate the clients would not trust is a failed handshake, named."""
    import socket
    import ssl
    import threading

    from chain.mqtt import MqttConnection

    now = datetime.now(UTC)
    cert = _certificate(tmp_path, now + timedelta(days=20))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, cert.with_suffix(".key"))
    listening = socket.create_server(("127.0.0.1", 0))
    port = listening.getsockname()[1]

    def serve(handshakes: int) -> None:
        for _ in range(handshakes):
            conn, _ = listening.accept()
            try:
                with server.wrap_socket(conn, server_side=True):
                    pass
            except (OSError, ssl.SSLError):
                conn.close()

    thread = threading.Thread(target=serve, args=(2,), daemon=True)
    thread.start()
    try:
        trusted = _served_certificate_check(
            MqttConnection(port=port, tls=True, ca_certs=str(cert)), now)
        untrusted = _served_certificate_check(MqttConnection(port=port, tls=True), now)
    finally:
        thread.join(timeout=30)
        listening.close()
    assert trusted.status == "WARN" and "expires in 20 days" in trusted.message, trusted
    assert untrusted.status == "FAIL" and "TLS handshake" in untrusted.message
    assert "WIS2_MQTT_CA_CERTS" in untrusted.fix


def test_doctor_checks_the_certificates_the_settings_name(nothing_running, tmp_path) -> None:
    expired = _certificate(tmp_path, datetime.now(UTC) - timedelta(days=2))
    nothing_running["WIS2_MQTT_CA_CERTS"] = str(expired)
    done = run(["doctor"], nothing_running, tmp_path)
    line = next(line for line in done.stdout.splitlines() if f"tls {expired.name}" in line)
    assert line.startswith("FAIL") and "expired on" in line


def test_disk_check_on_a_directory_not_created_yet(tmp_path: Path) -> None:
    check = _disk_check("WIS2_RESULTS_DIR", tmp_path / "not" / "yet")
    assert check.status in ("OK", "WARN", "FAIL") and "GiB free of" in check.message


def test_the_doctor_is_in_the_readme_tour() -> None:
    assert "wis2-chain doctor" in (REPO / "README.md").read_text(encoding="utf-8")
