"""`wis2-chain`: dry-run builds, validation, bundles, Prefect blocks and backfills from the command
line."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Literal

import typer

from chain.settings import ChainSettings
from cli.api import require_api
from cli.backfill import backfill_command
from cli.delivery import delivery_app
from cli.doctor import doctor_command

app = typer.Typer(help="WIS2 node publishing chain", no_args_is_help=True)
bundles_app = typer.Typer(help="WIS2 validator bundles", no_args_is_help=True)
app.add_typer(bundles_app, name="bundles")
app.command("backfill")(backfill_command)
app.command("doctor")(doctor_command)
app.add_typer(delivery_app, name="delivery")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        typer.echo(f"error: cannot read {path}: {exc.strerror}", err=True)
        raise typer.Exit(2) from None


def _served_from(raw: bytes, files_url: str, event: Path) -> bytes:
    """The event with each asset's href on `files_url` (its path after the URL's path)."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        doc = json.loads(raw)
        assets = doc["data"]["assets"].values()
        server = urlsplit(files_url)
        for asset in assets:
            href = urlsplit(asset["href"])
            asset["href"] = urlunsplit((server.scheme, server.netloc,
                                        server.path.rstrip("/") + href.path, href.query, ""))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        typer.echo(f"error: {event}: no data.assets[*].href to serve from {files_url} ({exc})",
                   err=True)
        raise typer.Exit(2) from None
    return json.dumps(doc).encode("utf-8")


@app.callback()
def main(verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="debug logging, the libraries' included")] = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not verbose:  # the validators log what the printed reports already say
        for name in ("pywis_pubsub", "pywcmp", "pywis_topics"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


@app.command()
def build(
    event: Annotated[Path, typer.Argument(help="CloudEvent JSON file")],
    dataset: Annotated[str | None, typer.Option(help="dataset name or JSON file")] = None,
) -> None:
    """Print the notification(s) an event would produce, without publishing (dry run)."""
    from wis2.cloudevent import parse_event
    from wis2.dataset import load_dataset
    from wis2.errors import InvalidInput
    from wis2.mapping import build_notifications

    settings = ChainSettings()
    try:
        parsed = parse_event(_read(event))
        description = load_dataset(dataset or settings.default_dataset, settings.datasets_dir)
        notifications = build_notifications(parsed, description)
    except InvalidInput as exc:
        typer.echo(f"{event}: invalid {exc.what}:", err=True)
        for error in exc.errors:
            typer.echo(f"  {error.path}: {error.message}", err=True)
        raise typer.Exit(1) from None
    except FileNotFoundError as exc:
        typer.echo(f"error: dataset {dataset or settings.default_dataset!r} not found "
                   f"({exc.filename}); datasets live in {settings.datasets_dir}", err=True)
        raise typer.Exit(2) from None
    except (OSError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    output = [n.to_dict() for n in notifications]
    typer.echo(json.dumps(output[0] if len(output) == 1 else output, indent=2))
    typer.echo(f"# topic: {description.topic}", err=True)


@app.command()
def validate(
    file: Annotated[Path, typer.Argument(help="a WIS2 notification or a WCMP2 record (JSON)")],
    profile: Annotated[
        str, typer.Option(help="publish: what this node enforces; spec: WNM conformance")
    ] = "publish",
    topic: Annotated[str | None, typer.Option(help="topic the message is published on")] = None,
    kpi: Annotated[bool, typer.Option(help="also run the KPI (needs the network)")] = False,
    previous_pubtime: Annotated[str | None, typer.Option(
        help="pubtime of the notification an update updates: the update must be later")] = None,
) -> None:
    """Validate a WNM or a WCMP2 record (detected from conformsTo) and print the report."""
    from wis2.validation import load_json_document, validate_notification
    from wis2.wcmp2 import validate_wcmp2

    if profile not in ("publish", "spec"):
        typer.echo("error: --profile is publish or spec", err=True)
        raise typer.Exit(2)
    raw = _read(file)
    document, _ = load_json_document(raw)
    conforms = document.get("conformsTo", []) if isinstance(document, dict) else []
    if any("/wcmp/2" in str(c) for c in conforms or []):
        report = validate_wcmp2(raw, kpi=kpi)
    else:
        chosen: Literal["publish", "spec"] = "spec" if profile == "spec" else "publish"
        report = validate_notification(raw, topic=topic, profile=chosen, kpi=kpi,
                                       previous_pubtime=previous_pubtime)
    width = max((len(c.id) for c in report.checks), default=5)
    typer.echo(f"{file}: {report.kind} {report.subject}")
    for check in report.checks:
        typer.echo(f"  {check.result:<8} {check.id:<{width}}  {check.message}")
    typer.echo(report.summary())
    if not report.ok:
        raise typer.Exit(1)


@bundles_app.command("install")
def bundles_install(
    source: Annotated[
        Path | None,
        typer.Option("--from", help="local bundle directory (default: WIS2_BUNDLE_DIR)"),
    ] = None,
    mounted: Annotated[
        Path | None,
        typer.Option("--from-if-present",
                     help="a directory mounted for the bundles (compose: WIS2_BUNDLE_DIR at "
                     "/bundles): install from it unless it is empty or absent, then download"),
    ] = None,
) -> None:
    """Install the pywis-pubsub, pywcmp and pywis-topics bundles."""
    from wis2.bundles import BundleError, install_bundles

    if mounted is not None and mounted.is_dir() and any(mounted.iterdir()):
        source = source or mounted
    source = source or ChainSettings().bundle_dir
    try:
        targets = install_bundles(source)
    except BundleError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    origin = source if source else "the online syncs"
    typer.echo(f"WIS2 bundles installed from {origin}: {', '.join(map(str, targets))}")


@bundles_app.command("status")
def bundles_status() -> None:
    """Say which bundles are installed."""
    from wis2.bundles import bundle_status

    status = bundle_status()
    for name, installed in status.items():
        typer.echo(f"{name}: {'installed' if installed else 'MISSING'}")
    if not all(status.values()):
        raise typer.Exit(1)


@app.command("send-event")
def send_event(
    event: Annotated[Path, typer.Argument(help="CloudEvent JSON file")],
    topic: Annotated[
        str, typer.Option(help="file-diffusion topic")
    ] = "diffusion/files/coriolis/argo/csv",
    check: Annotated[bool, typer.Option(help="refuse an invalid event before sending")] = True,
    files_url: Annotated[str | None, typer.Option(
        help="the file server's URL, put in each asset href in place of the event's "
        "scheme://host:port, before its path (compose's demo: http://demo-files:8765/files)",
    )] = None,
) -> None:
    """Publish an event on the node broker as a file server would (QoS 1, WIS2_MQTT_* settings)."""
    from chain.mqtt import MqttError, publish_once
    from wis2.cloudevent import parse_event
    from wis2.errors import InvalidInput

    raw = _read(event)
    if files_url is not None:
        raw = _served_from(raw, files_url, event)
    if check:
        try:
            parse_event(raw)
        except InvalidInput as exc:
            typer.echo(f"{event}: invalid {exc.what} (use --no-check to send it anyway):", err=True)
            for error in exc.errors:
                typer.echo(f"  {error.path}: {error.message}", err=True)
            raise typer.Exit(1) from None
    conn = ChainSettings().mqtt.connection()
    try:
        publish_once(conn, topic, raw, qos=1)
    except MqttError as exc:
        typer.echo(f"error: {exc}", err=True)
        typer.echo("  fix: start the node's broker (`make demo` prints its address) or set "
                   "WIS2_MQTT_HOST, WIS2_MQTT_PORT and the fileserver account's "
                   "WIS2_MQTT_USERNAME / WIS2_MQTT_PASSWORD", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"sent {event} on {topic} ({conn.describe()})")


blocks_app = typer.Typer(help="Prefect blocks of the chain", no_args_is_help=True)
app.add_typer(blocks_app, name="blocks")


@blocks_app.command("register")
def blocks_register() -> None:
    """Register MqttBroker/Wis2Dataset and save `wis2-broker` (WIS2_MQTT_*) and one Wis2Dataset
    per data/datasets/*.json (overwrites: safe to run again)."""
    from blocks.register import register_blocks

    require_api("blocks register")
    try:
        saved = register_blocks(ChainSettings())
    except Exception as exc:  # API unreachable, invalid dataset file...
        typer.echo(f"error: cannot register blocks: {exc}", err=True)
        raise typer.Exit(1) from None
    for slug in saved:
        typer.echo(f"saved block {slug}")


@app.command()
def recover(
    pool: Annotated[str, typer.Option(help="work pool whose stranded runs to reschedule")] =
    "wis2-pool",
    watch: Annotated[bool, typer.Option(help="keep looking every WIS2_RECOVERY_INTERVAL")] = False,
) -> None:
    """Reschedule the flow runs of POOL stranded by a dead worker (WIS2_RECOVERY_*; the
    wis2-warm worker does it itself: run this alongside Prefect's process worker)."""
    import asyncio

    from worker.recovery import RecoverySettings
    from worker.recovery import watch as watch_pool

    require_api("recover")
    try:
        asyncio.run(watch_pool(pool, RecoverySettings(), once=not watch))
    except KeyboardInterrupt:
        pass
    except Exception as exc:  # API unreachable on a single look
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


@app.command("ledger-import")
def ledger_import(
    source: Annotated[Path | None, typer.Option(
        "--from", help="SQLite ledger to copy (default: the one in WIS2_RESULTS_DIR)")] = None,
) -> None:
    """Copy a host's SQLite publication ledger into the PostgreSQL ledger of WIS2_LEDGER_URL
    (once, when a node moves to several worker hosts); keys already there are kept."""
    from chain.ledger import LedgerUnavailable, PostgresLedger, SqliteLedger

    settings = ChainSettings()
    if not settings.ledger_url:
        typer.echo("error: WIS2_LEDGER_URL is not set (the PostgreSQL ledger to fill)", err=True)
        raise typer.Exit(2)
    local = SqliteLedger(source) if source else SqliteLedger.in_dir(settings.results_dir)
    if not local.path.is_file():
        typer.echo(f"error: no SQLite ledger at {local.path}", err=True)
        raise typer.Exit(2)
    entries = local.all()
    try:
        added = PostgresLedger(settings.ledger_url).add_missing(entries)
    except LedgerUnavailable as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"imported {added} of {len(entries)} entries of {local.path} into "
               f"{settings.ledger_url} ({len(entries) - added} already there)")
