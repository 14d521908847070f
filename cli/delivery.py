"""`wis2-chain delivery status [DATA_ID]`: what the delivery monitor knows (the delivery records,
`chain.delivery_store`, where the chain's settings put the publication ledger)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer

from chain.delivery_store import (
    DeliveryStore,
    delivery_reports,
    now_utc,
    records_location,
)
from chain.ledger import ledger_location
from chain.mqtt import MqttError, publish_once
from chain.settings import ChainSettings
from wis2.delivery import report_markdown

delivery_app = typer.Typer(help="Did WIS2 get it? Delivery to the Global Brokers, Caches and "
                           "Catalogue", no_args_is_help=True)


def _store() -> DeliveryStore:
    return DeliveryStore(records_location(ledger_location(ChainSettings())))


@delivery_app.command("status")
def status(
    data_id: Annotated[str | None, typer.Argument(help="a data_id: each of its notifications "
                                                  "with its relays, cache copies and reports")
                       ] = None,
    hours: Annotated[float, typer.Option(help="without DATA_ID: the last HOURS hours")] = 24.0,
) -> None:
    """Each dataset's delivery over the last hours, or everything known about one data_id."""
    store = _store()
    if data_id is None:
        since = datetime.now(UTC) - timedelta(hours=hours)
        reports = delivery_reports(store, since.isoformat(timespec="milliseconds"))
        if not reports:
            typer.echo(f"no notification recorded in the last {hours:g} h ({store.location})")
        for report in reports:
            typer.echo(report_markdown(report, f"last {hours:g} h"))
        return
    records = store.by_data_id(data_id)
    if not records:
        typer.echo(f"no notification of {data_id!r} recorded ({store.location})", err=True)
        raise typer.Exit(1)
    events = store.events([r.notification_id for r in records])
    for record in records:
        typer.echo(f"{record.notification_id}  {record.state}  cache: {record.cache_state}  "
                   f"pubtime {record.pubtime}  published {record.published_at}  "
                   f"redeliveries {record.redeliveries}"
                   + (f"  undelivered {record.undelivered_at}" if record.undelivered_at else ""))
        typer.echo(f"  topic {record.topic}")
        for event in (e for e in events if e.notification_id == record.notification_id):
            delay = f" after {event.delay_s:.3f} s" if event.delay_s is not None else ""
            typer.echo(f"  {event.kind:<7} {event.source}  {event.seen_at}{delay}")


@delivery_app.command("resend")
def resend(
    data_id: Annotated[str, typer.Argument(help="the data_id of undelivered notification(s)")],
) -> None:
    """Publish the undelivered notification(s) of DATA_ID again, exactly as recorded (same id,
    same pubtime), on the node's broker (WIS2_MQTT_*, the publisher account); the delivery
    monitor watches them again."""
    store = _store()
    records = [r for r in store.by_data_id(data_id) if r.state != "relayed"]
    if not records:
        typer.echo(f"no undelivered or pending notification of {data_id!r} ({store.location})",
                   err=True)
        raise typer.Exit(1)
    connection = ChainSettings().mqtt.connection()
    for record in records:
        try:
            publish_once(connection, record.topic, record.payload.encode("utf-8"))
        except MqttError as exc:
            typer.echo(f"error: {record.notification_id}: {exc}", err=True)
            raise typer.Exit(1) from None
        store.watch_again(record.notification_id, now_utc())
        typer.echo(f"sent again {record.notification_id} ({record.pubtime}) on {record.topic}")
