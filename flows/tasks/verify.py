"""Task: download each announced file and check its length and integrity (optional).

Network errors and HTTP errors are retried (exponential backoff); a file whose bytes do not
match the announced length or checksum fails at once (`DataMismatch`, not retried).
"""

from __future__ import annotations

import base64
import hmac

import httpx
from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.logging import get_run_logger
from prefect.states import State

from wis2.multihash import digest
from wis2.notification import Notification


class DataMismatch(ValueError):
    """The downloaded file does not match the notification (length or integrity)."""

    def __init__(self, message: str, path: str = "$") -> None:
        super().__init__(message)
        self.path = path  # the notification field that does not match


def _not_a_mismatch(task: Task, task_run: TaskRun, state: State) -> bool:
    """Retry condition: retry everything but a content mismatch."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # unreadable result: retry
        return True
    return not isinstance(exc, DataMismatch)


def check_data(notification: Notification, content: bytes) -> None:
    """Raise `DataMismatch` naming the property that does not match the downloaded bytes."""
    link = next(link for link in notification.links if link.rel in ("canonical", "update"))
    if link.length is not None and link.length != len(content):
        raise DataMismatch(
            f"links[rel={link.rel}].length: announced {link.length} bytes, "
            f"{link.href} has {len(content)}",
            path=f"$.links[?(@.rel=='{link.rel}')].length",
        )
    integrity = notification.properties.integrity
    if integrity is not None:
        actual = base64.b64encode(_digest_bytes(content, integrity.method)).decode("ascii")
        if not hmac.compare_digest(actual, integrity.value):
            raise DataMismatch(
                f"properties.integrity.value: {integrity.method} of {link.href} is {actual}, "
                f"the event announced {integrity.value}",
                path="$.properties.integrity.value",
            )


def _digest_bytes(content: bytes, method: str) -> bytes:
    value = digest(content, method)
    return value if isinstance(value, bytes) else bytes.fromhex(value)


@task(
    name="verify-data",
    cache_policy=NO_CACHE,
    retries=3,
    retry_delay_seconds=2,
    retry_condition_fn=_not_a_mismatch,
)
def verify_data_task(notifications: list[Notification], timeout: float = 30.0) -> list[str]:
    """Download and check the data of each notification (deletions are skipped)."""
    logger = get_run_logger()
    checked: list[str] = []
    with httpx.Client(timeout=timeout, follow_redirects=True) as client:
        for note in notifications:
            if note.rel not in ("canonical", "update"):
                continue
            href = next(lk.href for lk in note.links if lk.rel in ("canonical", "update"))
            response = client.get(href)
            response.raise_for_status()
            check_data(note, response.content)
            logger.info("verified %s (%d bytes)", href, len(response.content))
            checked.append(href)
    return checked
