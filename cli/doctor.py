"""`wis2-chain doctor`: check a node from the outside, with the settings of the host it runs on,
one line per check and the fix of each one that fails: the broker and each account this host
knows, the Prefect API and its auth, the work pool and a live worker, the deployments and
blocks, the validator bundles, the dataset descriptions, the TLS certificates, the free disk."""

from __future__ import annotations

import shutil
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

import typer

from chain.deployments import ALL as DEPLOYMENTS
from chain.mqtt import MqttConnection, MqttError, connect
from chain.settings import ChainSettings
from cli.api import START_A_NODE, api_settings, auth_problem, client, reachability_problem

Status = Literal["OK", "WARN", "FAIL", "SKIP"]
CERT_WARN_DAYS = 30
DISK_FAIL_BYTES = 1024**3
DISK_WARN_FRACTION = 0.10
BROKER_FIX = ("start the broker (`make demo`, `wis2-broker`, `docker compose up -d mosquitto`), "
              "or set WIS2_MQTT_HOST / WIS2_MQTT_PORT to where it listens")


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    message: str
    fix: str = ""

    def line(self, width: int) -> str:
        fix = f" -> fix: {self.fix}" if self.fix and self.status in ("FAIL", "WARN") else ""
        return f"{self.status:<5} {self.name:<{width}}  {self.message}{fix}"


def _broker_checks(settings: ChainSettings) -> Iterator[Check]:
    """The broker's port, then an MQTT login with every account whose password is known here."""
    from broker.config import ROLES, BrokerConfig
    from listener.settings import ListenerSettings

    base = settings.mqtt.connection()
    where = f"{base.host}:{base.port}"
    try:
        socket.create_connection((base.host, base.port), timeout=5).close()
    except OSError as exc:
        yield Check("broker", "FAIL", f"nothing listens on {where}: {exc}", BROKER_FIX)
        return
    yield Check("broker", "OK", f"{where} reachable")
    accounts: dict[str, MqttConnection] = {}
    if base.username and base.password:
        accounts[base.username] = base
    try:
        listener = ListenerSettings().connection()
        if listener.username and listener.password and listener.username not in accounts:
            accounts[listener.username] = base.model_copy(
                update={"username": listener.username, "password": listener.password})
    except ValueError:  # invalid listener settings: the listener's own problem, not checked here
        pass
    try:
        broker = BrokerConfig()
        for role in ROLES:
            user = broker.users.role(role)
            if user.password and user.username not in accounts:
                accounts[user.username] = base.model_copy(
                    update={"username": user.username, "password": user.password})
    except ValueError:
        pass
    if not accounts:
        yield Check("broker-account", "WARN", "no account password known on this host",
                    "set WIS2_MQTT_PASSWORD (publisher) or WIS2_BROKER_<ROLE>_PASSWORD")
    for name, conn in accounts.items():
        try:
            connect(conn, client_id=f"wis2-doctor-{name}", timeout=10).disconnect()
        except MqttError as exc:
            yield Check(f"broker-account {name}", "FAIL", str(exc),
                        f"check the password of {name} (WIS2_BROKER_{name.upper()}_PASSWORD "
                        "on the broker's host, the same in the client's settings), then "
                        "`make broker-config` or restart the broker")
            continue
        yield Check(f"broker-account {name}", "OK", f"{name} logged in")


def _api_checks(settings: ChainSettings, pool: str) -> Iterator[Check]:
    url, auth = api_settings()
    problem = reachability_problem(url, auth)
    if problem is not None:
        yield Check("prefect-api", "FAIL", problem.problem, problem.fix)
        for name in ("prefect-auth", "work-pool", "worker", "deployments", "blocks"):
            yield Check(name, "SKIP", "needs the Prefect API")
        return
    assert url is not None
    yield Check("prefect-api", "OK", f"{url} answers")
    problem = auth_problem(url, auth)
    if problem is not None:
        yield Check("prefect-auth", "FAIL", problem.problem, problem.fix)
        for name in ("work-pool", "worker", "deployments", "blocks"):
            yield Check(name, "SKIP", "needs the Prefect API's auth")
        return
    yield Check("prefect-auth", "OK", "authenticated" if auth else "the API asks for no auth")
    with client(url, auth) as http:
        yield from _pool_checks(http, pool)
        missing = [name for name in DEPLOYMENTS
                   if http.get(f"deployments/name/{name}").status_code != 200]
        yield (Check("deployments", "FAIL", f"missing: {', '.join(missing)}",
                     "deploy them: `prefect --no-prompt deploy --all` in the project directory")
               if missing else Check("deployments", "OK", f"{len(DEPLOYMENTS)} deployments"))
        yield _blocks_check(http, settings)


def _pool_checks(http, pool: str) -> Iterator[Check]:
    response = http.get(f"work_pools/{pool}")
    if response.status_code == 404:
        yield Check("work-pool", "FAIL", f"no work pool {pool!r}",
                    f"`prefect work-pool create {pool} --type wis2-warm`")
        yield Check("worker", "SKIP", "needs the work pool")
        return
    response.raise_for_status()
    if response.json().get("is_paused"):
        yield Check("work-pool", "FAIL", f"{pool} is paused: no run starts",
                    f"`prefect work-pool resume {pool}`")
    else:
        yield Check("work-pool", "OK", f"{pool} ({response.json().get('type')})")
    workers = http.post(f"work_pools/{pool}/workers/filter", json={}).json()
    online = [w for w in workers if w.get("status") == "ONLINE"]
    if online:
        names = ", ".join(sorted(w["name"] for w in online))
        yield Check("worker", "OK", f"{len(online)} live: {names}")
    else:
        seen = max((w.get("last_heartbeat_time") or "" for w in workers), default="")
        yield Check("worker", "FAIL", f"no live worker in {pool}"
                    + (f" (last heartbeat {seen})" if seen else " (none ever seen)"),
                    f"start one: `prefect worker start --pool {pool} --type wis2-warm` (see "
                    "Operating a node > Work pools and workers)")


def _blocks_check(http, settings: ChainSettings) -> Check:
    from wis2.dataset import DEFAULT_DATASETS_DIR

    wanted = [f"mqtt-broker/{settings.broker_block}"] + [
        f"wis2-dataset/{path.stem}"
        for path in sorted((settings.datasets_dir or DEFAULT_DATASETS_DIR).glob("*.json"))]
    missing = [slug for slug in wanted if http.get(
        "block_types/slug/{}/block_documents/name/{}".format(*slug.split("/"))).status_code
        != 200]
    if missing:
        return Check("blocks", "FAIL", f"missing: {', '.join(missing)}",
                     "`wis2-chain blocks register` (with the WIS2_MQTT_* of the publisher)")
    return Check("blocks", "OK", f"{len(wanted)} blocks")


def _bundles_check() -> Check:
    from wis2.bundles import bundle_status

    missing = [name for name, ok in bundle_status().items() if not ok]
    if missing:
        return Check("bundles", "FAIL", f"missing: {', '.join(missing)}",
                     "`wis2-chain bundles install --from <dir>` (or `make bundles`)")
    return Check("bundles", "OK", "pywis-pubsub, pywcmp and pywis-topics installed")


def _dataset_checks(settings: ChainSettings) -> Iterator[Check]:
    from pydantic import ValidationError

    from wis2.dataset import load_dataset

    paths = sorted(settings.datasets_dir.glob("*.json"))
    if not paths:
        yield Check("datasets", "FAIL", f"no dataset description in {settings.datasets_dir}",
                    "set WIS2_DATASETS_DIR, or add <name>.json (Publishing a new dataset)")
    for path in paths:
        try:
            dataset = load_dataset(path)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(map(str, first["loc"])) or "(the whole file)"
            yield Check(f"dataset {path.stem}", "FAIL",
                        f"{path}: {exc.error_count()} error(s), first: {where}: {first['msg']}",
                        "fix the file (Reference > Dataset description), then "
                        "`wis2-chain blocks register`")
        except (OSError, ValueError) as exc:
            yield Check(f"dataset {path.stem}", "FAIL", f"{path}: {exc}", "fix the file")
        else:
            yield Check(f"dataset {path.stem}", "OK", f"valid, topic {dataset.topic}")


def certificate_files(settings: ChainSettings) -> list[tuple[str, Path]]:
    """The certificate files the settings of this host name, with the setting naming each."""
    from broker.config import BrokerConfig
    from listener.settings import ListenerSettings

    found: list[tuple[str, Path]] = []
    sources: list[tuple[str, Callable[[], object | None]]] = [
        ("WIS2_BROKER_CERTFILE", lambda: BrokerConfig().certfile),
        ("WIS2_BROKER_CAFILE", lambda: BrokerConfig().cafile),
        ("WIS2_MQTT_CA_CERTS", lambda: settings.mqtt.ca_certs),
        ("WIS2_LISTENER_CA_CERTS", lambda: ListenerSettings().ca_certs),
    ]
    for name, value in sources:
        try:
            path = value()
        except ValueError:
            continue
        if path and (name, Path(str(path))) not in found:
            found.append((name, Path(str(path))))
    return found


def _certificate_check(setting: str, path: Path, now: datetime) -> Check:
    from cryptography import x509

    try:
        certificates = x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as exc:
        return Check(f"tls {path.name}", "FAIL",
                     f"{setting}={path}: cannot read a PEM certificate: {exc}",
                     f"point {setting} at the PEM file")
    return _expiry_check(f"tls {path.name}", certificates, now, str(path))


def _served_certificate_check(conn: MqttConnection, now: datetime) -> Check:
    """The certificate the broker's TLS port serves, verified as the chain's clients verify it
    (WIS2_MQTT_CA_CERTS, else the system's CAs)."""
    import ssl

    from cryptography import x509

    name = f"tls {conn.host}:{conn.port}"
    context = ssl.create_default_context(cafile=conn.ca_certs)
    if conn.tls_insecure:
        context.check_hostname = False
    try:
        with socket.create_connection((conn.host, conn.port), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname=conn.host) as tls:
            der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError) as exc:
        return Check(name, "FAIL", f"TLS handshake with the broker failed: {exc}",
                     "check WIS2_MQTT_CA_CERTS (the CA of WIS2_BROKER_CERTFILE) and that the "
                     "certificate names the host clients connect to")
    assert der is not None
    return _expiry_check(name, [x509.load_der_x509_certificate(der)], now,
                         "WIS2_BROKER_CERTFILE")


def _expiry_check(name: str, certificates: list, now: datetime, where: str) -> Check:
    first = min(certificates, key=lambda c: c.not_valid_after_utc)
    days = (first.not_valid_after_utc - now).total_seconds() / 86400
    subject = first.subject.rfc4514_string()
    if days < 0:
        return Check(name, "FAIL", f"{subject} expired on {first.not_valid_after_utc:%Y-%m-%d}",
                     f"renew it, replace {where}, restart what reads it (broker: restart it)")
    if days < CERT_WARN_DAYS:
        return Check(name, "WARN", f"{subject} expires in {days:.0f} days "
                     f"({first.not_valid_after_utc:%Y-%m-%d})", f"renew it before then ({where})")
    return Check(name, "OK", f"{subject} valid until {first.not_valid_after_utc:%Y-%m-%d} "
                 f"({days:.0f} days)")


def disk_directories(settings: ChainSettings) -> list[tuple[str, Path]]:
    from listener.settings import ListenerSettings

    found = [("WIS2_RESULTS_DIR", settings.results_dir)]
    try:
        found.append(("WIS2_LISTENER_DEADLETTER_DIR", ListenerSettings().deadletter_dir))
    except ValueError:
        pass
    return found


def _disk_check(setting: str, directory: Path) -> Check:
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    usage = shutil.disk_usage(existing)
    free = f"{usage.free / 1024**3:.1f} GiB free of {usage.total / 1024**3:.1f} GiB"
    fix = (f"free space on the file system of {directory} ({setting}), or move it: the "
           "ledger, cached results and dead letters stop being written when it is full")
    if usage.free < DISK_FAIL_BYTES:
        return Check(f"disk {setting}", "FAIL", f"{directory}: {free}", fix)
    if usage.free < DISK_WARN_FRACTION * usage.total:
        return Check(f"disk {setting}", "WARN", f"{directory}: {free}", fix)
    return Check(f"disk {setting}", "OK", f"{directory}: {free}")


def run_checks(pool: str) -> list[Check]:
    """Every check, in order; a check that raises is a FAIL naming the exception."""
    try:
        settings = ChainSettings()
    except ValueError as exc:
        return [Check("settings", "FAIL", f"invalid WIS2_* settings: {exc}",
                      "fix .env or the environment (Reference > Settings)")]
    now = datetime.now(UTC)
    groups: list[tuple[str, Callable[[], Iterator[Check] | list[Check]]]] = [
        ("broker", lambda: _broker_checks(settings)),
        ("prefect-api", lambda: _api_checks(settings, pool)),
        ("bundles", lambda: [_bundles_check()]),
        ("datasets", lambda: _dataset_checks(settings)),
        ("tls", lambda: [_certificate_check(s, p, now) for s, p in certificate_files(settings)]
         + ([_served_certificate_check(settings.mqtt.connection(), now)]
            if settings.mqtt.tls else [])),
        ("disk", lambda: [_disk_check(s, d) for s, d in disk_directories(settings)]),
    ]
    checks: list[Check] = []
    for name, group in groups:
        try:
            checks.extend(group())
        except Exception as exc:  # one broken check must not hide the others
            checks.append(Check(name, "FAIL", f"{type(exc).__name__}: {exc}", START_A_NODE
                                if name == "prefect-api" else "see the message"))
    return checks


def doctor_command(
    pool: Annotated[str, typer.Option(help="work pool the node's workers serve")] = "wis2-pool",
) -> None:
    """Check a node from the outside (this host's settings): one line per check, with the fix of
    each one that fails; exit status 1 when one failed."""
    checks = run_checks(pool)
    width = max(len(c.name) for c in checks)
    for check in checks:
        typer.echo(check.line(width))
    failed = [c for c in checks if c.status == "FAIL"]
    warned = [c for c in checks if c.status == "WARN"]
    typer.echo(f"{len(checks)} checks: {len(failed)} failed, {len(warned)} warnings")
    if failed:
        raise typer.Exit(1)
