"""Task: download each announced file and check its length and integrity (optional).

The download is bounded: only `http`/`https` URLs are fetched; the body is streamed and hashed
chunk by chunk (constant memory, whatever the file size); it stops as soon as more bytes arrive
than the announced `links[].length` (or than `WIS2_VERIFY_MAX_BYTES` when no length is
announced), and a file announced larger than `WIS2_VERIFY_MAX_BYTES` is not downloaded at all.
A download still running after `WIS2_VERIFY_MAX_SECONDS` is abandoned (a slow server: retried).
A run's files are downloaded concurrently, at most `WIS2_VERIFY_CONCURRENCY` at a time (threads
sharing one client whose pool holds as many connections): memory stays a few network reads per
download, whatever the sizes.

A file carried inline (`properties.content`, small core data) is not downloaded again: the build
fetched it from its link and checked it against the event; its inline content is checked against
the link's length and the integrity instead (`check_inline_content`).

Network errors and HTTP errors are retried (exponential backoff); a file whose bytes do not
match the announced length or checksum, or a refused URL, fails at once (`DataMismatch`, not
retried).

Access-controlled data (a link carrying the WNM ``security`` object): the download presents the
dataset's credential, read from its Prefect `Secret` block (`credential_block`) inside the task
run, kept as a `SecretStr` and put only in the request headers (`wis2.access`): never logged,
never a task parameter, never in an artifact. A protected link without a credential fails at once.
"""

from __future__ import annotations

import base64
import hmac
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
from prefect import Task, task
from prefect.blocks.system import Secret
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.logging import get_run_logger
from prefect.states import State
from pydantic import SecretStr

from chain.metrics import FLOW_METRICS
from wis2.access import credential_headers
from wis2.multihash import new_hasher
from wis2.notification import Integrity, Link, Notification

ALLOWED_SCHEMES = ("http", "https")
T = TypeVar("T")
R = TypeVar("R")
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


def load_credential(block: str) -> SecretStr:
    """The credential stored in the Prefect `Secret` block named `block`."""
    value = Secret.load(block).get()
    return SecretStr(value if isinstance(value, str) else str(value))


def _auth_headers(link: Link, credential: SecretStr | None) -> dict[str, str]:
    security = (link.model_extra or {}).get("security")
    if not security:
        return {}
    if credential is None:
        raise DataMismatch(
            f"links[rel={link.rel}].security: {link.href} is access-controlled and the dataset "
            "names no credential_block (a Prefect Secret block) to download it with",
            path=_path(link, "security"))
    try:
        return credential_headers(security, credential)
    except ValueError as exc:
        raise DataMismatch(f"links[rel={link.rel}].security: {exc}",
                           path=_path(link, "security")) from None


def download_and_check(
    client: httpx.Client, notification: Notification, max_bytes: int = DEFAULT_MAX_BYTES,
    max_seconds: float = DEFAULT_MAX_SECONDS, credential: SecretStr | None = None,
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
    headers = {"Accept-Encoding": "identity", **_auth_headers(link, credential)}
    limit = link.length if link.length is not None else max_bytes
    integrity = notification.properties.integrity
    hasher = new_hasher(integrity.method) if integrity is not None else None
    size = 0
    try:
        with client.stream("GET", link.href, headers=headers) as response:
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
        _check_digest(integrity, hasher, link.href)
    return size


def _check_digest(integrity: Integrity, hasher: Any, what: str) -> None:
    """Raise `DataMismatch` unless `hasher` (fed with the data of `what`) gives `integrity`."""
    actual = base64.b64encode(hasher.digest()).decode("ascii")
    if not hmac.compare_digest(actual, integrity.value):
        raise DataMismatch(
            f"properties.integrity.value: {integrity.method} of {what} is {actual}, the event "
            f"announced {integrity.value}",
            path="$.properties.integrity.value",
        )


def check_inline_content(notification: Notification) -> int | None:
    """The size of the data a notification carries inline, checked against its link's length
    and its integrity like a download; None without inline content. The build fetched that
    data from the link and checked it against the event (`flows.tasks.build.small_contents`):
    the file is not downloaded a second time. Raises `DataMismatch` naming the field."""
    content = notification.properties.content
    if content is None:
        return None
    link = data_link(notification)
    try:
        data = content.data()
    except (ValueError, OSError, EOFError) as exc:  # binascii.Error is a ValueError
        raise DataMismatch(f"properties.content.value: not {content.encoding}: {exc}",
                           path="$.properties.content.value") from None
    if link.length is not None and len(data) != link.length:
        raise _too_long(link, f"{len(data)} (its inline content)")
    integrity = notification.properties.integrity
    if integrity is not None:
        hasher = new_hasher(integrity.method)
        hasher.update(data)
        _check_digest(integrity, hasher, f"the inline content of {link.href}")
    return len(data)


def fetch_small_file(client: httpx.Client, href: str, size: int) -> bytes | None:
    """The bytes of a small file announced with `size` bytes (to inline them), None when the URL
    is not http(s) or the server sends more or fewer bytes; `httpx.HTTPError` on network or
    HTTP errors. At most `size` + 1 bytes are read."""
    if urlsplit(href).scheme.lower() not in ALLOWED_SCHEMES:
        return None
    data = b""
    with client.stream("GET", href, headers={"Accept-Encoding": "identity"}) as response:
        response.raise_for_status()
        for chunk in response.iter_bytes():
            data += chunk
            if len(data) > size:
                return None
    return data if len(data) == size else None


def verification_client(timeout: float, concurrency: int = 1) -> httpx.Client:
    """The client of a run's downloads: its pool holds at most `concurrency` connections."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return httpx.Client(timeout=timeout, follow_redirects=True, limits=limits)


def _outcome(future: Future[R]) -> R | Exception:
    error = future.exception()
    return error if isinstance(error, Exception) else future.result()


def each_concurrently(items: Sequence[T], call: Callable[[T], R],
                      concurrency: int) -> list[R | Exception]:
    """`call(item)` for each item, at most `concurrency` at the same time (threads); per item, in
    order, its value or the exception it raised."""
    if concurrency <= 1 or len(items) <= 1:
        out: list[R | Exception] = []
        for item in items:
            try:
                out.append(call(item))
            except Exception as exc:
                out.append(exc)
        return out
    with ThreadPoolExecutor(max_workers=min(concurrency, len(items)),
                            thread_name_prefix="verify") as pool:
        futures = [pool.submit(call, item) for item in items]
        return [_outcome(future) for future in futures]


def verify_notifications(
    notifications: list[Notification],
    timeout: float = 30.0,
    max_bytes: int = DEFAULT_MAX_BYTES,
    logger: logging.Logger | logging.LoggerAdapter | None = None,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    credential: SecretStr | None = None,
    concurrency: int = 1,
    client: httpx.Client | None = None,
) -> list[str]:
    """Download and check the data of each notification (deletions are skipped), at most
    `concurrency` at the same time, with `client` (shared, e.g. by a batch's threads) or a
    client of its own; raises the first failure (in the notifications' order). `credential`
    for links with a `security` object (httpx drops the Authorization header on a redirect to
    another host)."""
    data = [note for note in notifications if note.rel in ("canonical", "update")]
    with (nullcontext(client) if client is not None
          else verification_client(timeout, concurrency)) as http:

        def check(note: Notification) -> str:
            href = data_link(note).href
            if (size := check_inline_content(note)) is not None:
                if logger is not None:
                    logger.info("verified %s (%d bytes, its inline content)", href, size)
                return href
            started = time.monotonic()
            size = download_and_check(http, note, max_bytes, max_seconds, credential)
            FLOW_METRICS.download(size, time.monotonic() - started)
            if logger is not None:
                logger.info("verified %s (%d bytes)", href, size)
            return href

        results = each_concurrently(data, check, concurrency)
    checked: list[str] = []
    for result in results:
        if isinstance(result, Exception):
            raise result
        checked.append(result)
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
    credential_block: str | None = None, concurrency: int = 1,
) -> list[str]:
    """Download and check the data of each notification (deletions are skipped), at most
    `concurrency` at the same time, with the credential of the Prefect Secret block
    `credential_block` for access-controlled links."""
    credential = load_credential(credential_block) if credential_block else None
    return verify_notifications(notifications, timeout, max_bytes, get_run_logger(),
                                max_seconds, credential, concurrency)
