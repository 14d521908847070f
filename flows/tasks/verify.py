"""Task: download each announced file and check its length and integrity (optional).

The download is bounded: only `http`/`https` URLs are fetched; the body is streamed and hashed
chunk by chunk (constant memory, whatever the file size); it stops as soon as more bytes arrive
than the announced `links[].length` (or than `WIS2_VERIFY_MAX_BYTES` when no length is
announced), and a file announced larger than `WIS2_VERIFY_MAX_BYTES` is not downloaded at all.
A download still running after `WIS2_VERIFY_MAX_SECONDS` is abandoned (a slow server: retried).

Network errors and HTTP errors are retried (exponential backoff); a file whose bytes do not
match the announced length or checksum, or a refused URL, fails at once (`DataMismatch`, not
retried).
"""

from __future__ import annotations

import base64
import hmac
import logging
import time
from urllib.parse import urlsplit

import httpx
from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.logging import get_run_logger
from prefect.states import State

from chain.metrics import FLOW_METRICS
from wis2.multihash import new_hasher
from wis2.notification import Link, Notification

ALLOWED_SCHEMES = ("http", "https")
DEFAULT_MAX_BYTES = 2 * 1024**3
DEFAULT_MAX_SECONDS = 900.0


class DataMismatch(ValueError):
    """The downloaded file does not match the notification (length or integrity), or its URL
    may not be downloaded."""

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


def data_link(notification: Notification) -> Link:
    """The link whose data the notification announces (canonical or update)."""
    return next(link for link in notification.links if link.rel in ("canonical", "update"))


def _path(link: Link, field: str) -> str:
    return f"$.links[?(@.rel=='{link.rel}')].{field}"


def _check_scheme(link: Link, url: str) -> None:
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        where = "" if url == link.href else f" (redirected to {url})"
        raise DataMismatch(
            f"links[rel={link.rel}].href: {link.href}{where}: only http and https URLs are "
            f"downloaded for verification, not {scheme or 'a relative URL'}",
            path=_path(link, "href"),
        )


def _too_long(link: Link, got: str) -> DataMismatch:
    return DataMismatch(
        f"links[rel={link.rel}].length: announced {link.length} bytes, {link.href} has {got}",
        path=_path(link, "length"),
    )


def download_and_check(
    client: httpx.Client, notification: Notification, max_bytes: int = DEFAULT_MAX_BYTES,
    max_seconds: float = DEFAULT_MAX_SECONDS,
) -> int:
    """Stream the announced file, check its length and integrity; return its size in bytes.

    Memory stays constant (what each network read returns is hashed and dropped). Raises
    `DataMismatch` naming the field; `httpx.HTTPError` for network and HTTP errors and
    `TimeoutError` past `max_seconds` (both worth a retry).
    """
    deadline = time.monotonic() + max_seconds
    link = data_link(notification)
    _check_scheme(link, link.href)
    if link.length is not None and link.length > max_bytes:
        raise DataMismatch(
            f"links[rel={link.rel}].length: {link.href} is announced with {link.length} bytes, "
            f"more than this node verifies (WIS2_VERIFY_MAX_BYTES={max_bytes})",
            path=_path(link, "length"),
        )
    limit = link.length if link.length is not None else max_bytes
    integrity = notification.properties.integrity
    hasher = new_hasher(integrity.method) if integrity is not None else None
    size = 0
    try:
        with client.stream("GET", link.href, headers={"Accept-Encoding": "identity"}) as response:
            _check_scheme(link, str(response.url))
            response.raise_for_status()
            declared = response.headers.get("content-length", "")
            if (declared.isdigit() and int(declared) > limit
                    and "content-encoding" not in response.headers):
                if link.length is None:
                    raise DataMismatch(
                        f"links[rel={link.rel}].href: {link.href} has {declared} bytes, more "
                        f"than this node verifies (WIS2_VERIFY_MAX_BYTES={max_bytes})",
                        path=_path(link, "href"),
                    )
                raise _too_long(link, f"{declared} (Content-Length)")
            for chunk in response.iter_bytes():  # as the reads return: no buffering
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{link.href}: download not finished after {max_seconds:g} s "
                        f"({size} bytes read; WIS2_VERIFY_MAX_SECONDS)")
                size += len(chunk)
                if size > limit:
                    if link.length is None:
                        raise DataMismatch(
                            f"links[rel={link.rel}].href: {link.href} is longer than this node "
                            f"verifies (WIS2_VERIFY_MAX_BYTES={max_bytes}); download stopped",
                            path=_path(link, "href"),
                        )
                    raise _too_long(link, f"more (download stopped after {size} bytes)")
                if hasher is not None:
                    hasher.update(chunk)
    except httpx.UnsupportedProtocol as exc:  # e.g. a redirect to another scheme
        raise DataMismatch(
            f"links[rel={link.rel}].href: {link.href}: {exc}", path=_path(link, "href")
        ) from None
    if link.length is not None and size != link.length:
        raise _too_long(link, str(size))
    if integrity is not None and hasher is not None:
        actual = base64.b64encode(hasher.digest()).decode("ascii")
        if not hmac.compare_digest(actual, integrity.value):
            raise DataMismatch(
                f"properties.integrity.value: {integrity.method} of {link.href} is {actual}, "
                f"the event announced {integrity.value}",
                path="$.properties.integrity.value",
            )
    return size


def verify_notifications(
    notifications: list[Notification],
    timeout: float = 30.0,
    max_bytes: int = DEFAULT_MAX_BYTES,
    logger: logging.Logger | logging.LoggerAdapter | None = None,
    max_seconds: float = DEFAULT_MAX_SECONDS,
) -> list[str]:
    """Download and check the data of each notification (deletions are skipped)."""
    checked: list[str] = []
    with httpx.Client(timeout=timeout, follow_redirects=True) as client:
        for note in notifications:
            if note.rel not in ("canonical", "update"):
                continue
            started = time.monotonic()
            size = download_and_check(client, note, max_bytes, max_seconds)
            FLOW_METRICS.download(size, time.monotonic() - started)
            href = data_link(note).href
            if logger is not None:
                logger.info("verified %s (%d bytes)", href, size)
            checked.append(href)
    return checked


@task(
    name="verify-data",
    cache_policy=NO_CACHE,
    retries=3,
    retry_delay_seconds=2,
    retry_condition_fn=_not_a_mismatch,
)
def verify_data_task(
    notifications: list[Notification], timeout: float = 30.0,
    max_bytes: int = DEFAULT_MAX_BYTES, max_seconds: float = DEFAULT_MAX_SECONDS,
) -> list[str]:
    """Download and check the data of each notification (deletions are skipped)."""
    return verify_notifications(notifications, timeout, max_bytes, get_run_logger(),
                                max_seconds)
