"""The chain's Prefect flows and deployments by name, and the names of their runs: one place for
every process that starts, finds or describes runs (listener, flows' replay hints, local node,
bench). `prefect.yaml` declares the same deployments (a unit test checks that they agree)."""

from __future__ import annotations

DEPLOYMENT_NAME = "default"

PUBLISH_NOTIFICATION_FLOW = "publish-notification"
PUBLISH_BATCH_FLOW = "publish-batch"
PUBLISH_METADATA_FLOW = "publish-metadata"
REPUBLISH_METADATA_FLOW = "republish-metadata"
BACKFILL_FLOW = "backfill"
DELIVERY_REPORT_FLOW = "delivery-report"
DELIVERY_CHECK_FLOW = "delivery-check"

PUBLISH_NOTIFICATION = f"{PUBLISH_NOTIFICATION_FLOW}/{DEPLOYMENT_NAME}"
PUBLISH_BATCH = f"{PUBLISH_BATCH_FLOW}/{DEPLOYMENT_NAME}"
PUBLISH_METADATA = f"{PUBLISH_METADATA_FLOW}/{DEPLOYMENT_NAME}"
REPUBLISH_METADATA = f"{REPUBLISH_METADATA_FLOW}/daily"  # scheduled once a day

BACKFILL = f"{BACKFILL_FLOW}/{DEPLOYMENT_NAME}"
DELIVERY_REPORT = f"{DELIVERY_REPORT_FLOW}/daily"  # scheduled once a day
DELIVERY_CHECK = f"{DELIVERY_CHECK_FLOW}/hourly"  # scheduled every hour

ALL = (PUBLISH_NOTIFICATION, PUBLISH_BATCH, PUBLISH_METADATA, REPUBLISH_METADATA, BACKFILL,
       DELIVERY_REPORT, DELIVERY_CHECK)


def batch_run_name(events: int, first_file: str) -> str:
    """A batch run's name, ``batch-<n>-events-<first file>``: the batch flow's `flow_run_name`,
    and the listener's at creation (the worker then need not rename the run). A single-event
    run is named after its file (`CloudEvent.file_label`)."""
    return f"batch-{events}-events-{first_file}"
