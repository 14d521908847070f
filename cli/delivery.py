"""`wis2-chain delivery status [DATA_ID]`: what the delivery monitor knows (the delivery records,
`chain.delivery_store`, where the chain's settings put the publication ledger)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer

from chain.delivery_store import DeliveryStore, delivery_reports, records_location
from chain.ledger import ledger_location
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
