"""The operator's view of delivery (the records of the delivery monitor, `delivery/`):

- `delivery-report` (deployment `daily`, every day at 00:15 UTC): one Markdown artifact per
  dataset, key ``delivery-<dataset>`` (the UI keeps each dataset's history): relayed, cached,
  undelivered, redelivered, median and worst relay delay per Global Broker, and the undelivered
  notifications listed by `data_id`.
- `delivery-check` (deployment `hourly`, every hour at minute 5): the run FAILS when the share of
  undelivered notifications published in the last `hours` passes `threshold` for any dataset,
  so that a Prefect notification on failed runs of this deployment pages someone.

Both read the records where the chain's settings put the publication ledger (`WIS2_LEDGER_URL`
on a shared node; else `WIS2_RESULTS_DIR`, which must then be the delivery monitor's).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from chain.delivery_store import DeliveryStore, delivery_reports, records_location
from chain.deployments import DELIVERY_CHECK_FLOW, DELIVERY_REPORT_FLOW
from chain.ledger import ledger_location
from chain.settings import ChainSettings
from flows.artifacts import artifact_key
from wis2.delivery import DeliveryReport, report_markdown


class UndeliveredShareExceeded(RuntimeError):
    """Too many notifications of a dataset were not relayed by any watched Global Broker."""


def _reports(hours: float) -> tuple[list[DeliveryReport], str]:
    since = datetime.now(UTC) - timedelta(hours=hours)
    store = DeliveryStore(records_location(ledger_location(ChainSettings())))
    period = f"{hours:g} h from {since.isoformat(timespec='minutes')}"
    return delivery_reports(store, since.isoformat(timespec="milliseconds")), period


@flow(name=DELIVERY_REPORT_FLOW, description="Per dataset: relayed, cached and undelivered "
      "notifications and relay delays per Global Broker (Markdown artifacts).")
def delivery_report(hours: float = 24.0) -> list[DeliveryReport]:
    """One artifact per dataset for the notifications published in the last `hours`."""
    reports, period = _reports(hours)
    logger = get_run_logger()
    for report in reports:
        create_markdown_artifact(
            markdown=report_markdown(report, period),
            key=artifact_key("delivery", report.dataset),
            description=f"Delivery of {report.dataset}: {report.undelivered} undelivered of "
            f"{report.published}")
        logger.info("%s: %d published, %d relayed, %d undelivered, %d cached", report.dataset,
                    report.published, report.relayed, report.undelivered, report.cached)
    if not reports:
        logger.info("no notification recorded by the delivery monitor in the last %g h", hours)
    return reports


@flow(name=DELIVERY_CHECK_FLOW, description="Fails when the undelivered share of the last hour "
      "passes the threshold (for Prefect notifications).")
def delivery_check(threshold: float = 0.05, hours: float = 1.0) -> dict[str, float]:
    """{dataset: undelivered share} of the last `hours`; raises when one is over `threshold`."""
    reports, period = _reports(hours)
    shares = {r.dataset: r.undelivered_share for r in reports}
    over = [r for r in reports if r.undelivered_share > threshold]
    if over:
        create_markdown_artifact(
            markdown="\n".join(report_markdown(r, period) for r in over),
            key="delivery-check-failed", description="Datasets over the undelivered threshold")
        raise UndeliveredShareExceeded("; ".join(
            f"{r.dataset}: {r.undelivered} of {r.published} undelivered "
            f"({r.undelivered_share:.1%} > {threshold:.1%}): "
            + ", ".join(r.undelivered_data_ids[:10]) for r in over))
    get_run_logger().info("undelivered shares of the last %g h: %s", hours, shares or "none")
    return shares
