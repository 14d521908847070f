"""Prefect tasks of the publishing flows, one small module per step.

`caching` holds the cache policies and result storage shared by the tasks; `configured`
(`configured_tasks`) returns the tasks with the runtime settings applied (results directory,
retries, delays).
"""

from __future__ import annotations

from .build import build_metadata_notification_task, build_notifications_task
from .configured import ConfiguredTasks, configured_tasks
from .dataset import load_dataset_task
from .publish import BrokerReceipt, load_broker_connection, publish_notification_task
from .record import record_publication_task
from .validate import validate_notifications_task
from .verify import DataMismatch, verify_data_task

__all__ = [
    "BrokerReceipt",
    "ConfiguredTasks",
    "DataMismatch",
    "build_metadata_notification_task",
    "build_notifications_task",
    "configured_tasks",
    "load_broker_connection",
    "load_dataset_task",
    "publish_notification_task",
    "record_publication_task",
    "validate_notifications_task",
    "verify_data_task",
]
