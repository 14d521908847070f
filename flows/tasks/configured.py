"""The publishing tasks configured with the runtime settings: result storage, retries.

`configured_tasks(settings)` is what a flow run calls once: the build and publish tasks get their
cache policy and the node's result storage (`caching`; no transaction locks: the pipeline's
data_id claim serializes them), the network tasks get the retry settings.
"""

from __future__ import annotations

from dataclasses import dataclass

from prefect import Task
from prefect.tasks import exponential_backoff

from chain.settings import ChainSettings

from .build import build_notifications_task
from .caching import BUILD_CACHE, PUBLISH_CACHE, result_storage
from .publish import publish_notification_task
from .verify import verify_data_task


@dataclass(frozen=True)
class ConfiguredTasks:
    build: Task
    verify: Task
    publish: Task


def configured_tasks(settings: ChainSettings) -> ConfiguredTasks:
    """The cached and retried tasks with this run's settings (storage, retries, delays)."""
    storage = result_storage(settings)
    retries = {
        "retries": settings.publish_retries,
        "retry_delay_seconds": exponential_backoff(backoff_factor=settings.retry_base_delay),
        "retry_jitter_factor": settings.retry_jitter_factor,
    }
    build = build_notifications_task.with_options(
        cache_policy=BUILD_CACHE,
        result_storage=storage,
        persist_result=True,
    )
    publish = publish_notification_task.with_options(
        cache_policy=PUBLISH_CACHE,
        result_storage=storage,
        persist_result=True,
        **retries,
    )
    verify = verify_data_task.with_options(**retries)
    return ConfiguredTasks(build=build, verify=verify, publish=publish)
