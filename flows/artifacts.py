"""Prefect artifacts of the publishing flows: what was published, how it was checked, what failed.

Keys are lowercase-dashes and derived from the handled file (`artifact_key`), so the UI's
Artifacts page keeps the history of each file. Nothing here ever contains a password: only the
notification, the topic, the validation report, the data link and the event as received.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)

from chain.deployments import PUBLISH_NOTIFICATION
from wis2.errors import FieldError
from wis2.notification import Notification

MAX_KEY = 80


def artifact_key(*parts: str) -> str:
    """A valid artifact key (lowercase letters, digits, dashes) from free text."""
    text = "-".join(p for p in parts if p)
    key = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return key[:MAX_KEY].rstrip("-") or "wis2"


def _json_block(value: Any) -> str:
    return "```json\n" + json.dumps(value, indent=2, ensure_ascii=False, default=str) + "\n```"


def notification_artifact(
    topic: str, notifications: Sequence[Notification], *, key: str, published: Sequence[bool]
) -> None:
    """Markdown: the topic and each notification's JSON exactly as published."""
    lines = [f"# WIS2 notification(s) on `{topic}`", ""]
    for note, fresh in zip(notifications, published, strict=True):
        status = "published" if fresh else "already published earlier (cached, not sent again)"
        lines += [
            f"## `{note.properties.data_id}`",
            f"- id: `{note.id}`",
            f"- rel: `{note.rel}`",
            f"- status: {status}",
            "",
            _json_block(note.to_dict()),
            "",
        ]
    create_markdown_artifact(
        markdown="\n".join(lines), key=key, description=f"WIS2 notification(s) on {topic}"
    )


def validation_table_artifact(rows: Sequence[dict[str, Any]], *, key: str, ok: bool) -> None:
    """Table: one row per validation check."""
    table = [{k: ("" if v is None else str(v)) for k, v in row.items()} for row in rows]
    create_table_artifact(
        table=table or [{"check": "none", "status": "no checks ran"}],
        key=key,
        description="Validation of the notification(s): " + ("passed" if ok else "FAILED"),
    )


def data_link_artifacts(notifications: Iterable[Notification], *, key: str) -> None:
    """Link: the announced data file (canonical or update link) of each notification."""
    for note in notifications:
        for link in note.links:
            if link.rel in ("canonical", "update", "deletion"):
                create_link_artifact(
                    link=link.href,
                    link_text=link.href.rsplit("/", 1)[-1] or link.href,
                    key=key,
                    description=f"Data of {note.properties.data_id} (rel={link.rel})",
                )
                break


def failure_artifact(
    *,
    key: str,
    error: BaseException | str,
    received: Any,
    field_errors: Sequence[FieldError] = (),
    title: str = "Publication failed",
    received_title: str = "Event as received",
    replay: Sequence[str] | None = None,
) -> None:
    """Markdown: what failed, the field errors, how to replay and the exact input to fix.

    `received`: the input as the run got it (an event; a metadata run's parameters); `replay`:
    how to run it again (default: a custom run of `publish-notification` with the event)."""
    kind = type(error).__name__ if isinstance(error, BaseException) else "Error"
    lines = [f"# {title}", "", f"**{kind}**: {error}", ""]
    if field_errors:
        lines += _field_table(field_errors)
    lines += [f"## {received_title}", "", *(replay or event_replay_lines()), "",
              _json_block(received)]
    create_markdown_artifact(
        markdown="\n".join(lines), key=key, description=f"Failed: {error}"[:500]
    )


def event_replay_lines(deployment: str = PUBLISH_NOTIFICATION) -> list[str]:
    """How to replay one event with the single-event deployment."""
    return [
        "Fix it and start a custom run of the "
        f"`{deployment}` deployment with this JSON as the `event` parameter "
        f"(Prefect UI: Deployments > {deployment.split('/')[0]} > Run > Custom run), "
        "or with the CLI:",
        "",
        "```sh",
        f"prefect deployment run '{deployment}' "
        "--params \"$(jq -n --argjson e \"$(cat event.json)\" '{event:$e}')\"",
        "```",
    ]


def _field_table(field_errors: Sequence[FieldError]) -> list[str]:
    lines = ["| field | problem |", "|---|---|"]
    lines += [f"| `{e.path}` | {e.message.replace('|', '/')} |" for e in field_errors]
    return [*lines, ""]


def batch_table_artifact(rows: Sequence[dict[str, Any]], *, key: str, description: str) -> None:
    """Table: one row per event (and notification) of a batch run."""
    table = [{k: ("" if v is None else str(v)) for k, v in row.items()} for row in rows]
    create_table_artifact(table=table or [{"event": "none"}], key=key, description=description)


def batch_failure_artifact(
    *,
    key: str,
    failures: Sequence[dict[str, Any]],
    total: int,
    deployment: str = PUBLISH_NOTIFICATION,
) -> None:
    """Markdown: each failed event of a batch (error, bad fields, exact JSON to replay).

    `failures`: dicts with `label`, `event_id`, `error` (exception or text), `field_errors`
    and `event` (the JSON as received).
    """
    lines = [
        f"# {len(failures)} of {total} event(s) of this batch failed",
        "",
        "The other events of the batch were published. Replay each failed event on its own, "
        "after fixing it:",
        "",
        *event_replay_lines(deployment),
        "",
    ]
    for failure in failures:
        error = failure["error"]
        kind = type(error).__name__ if isinstance(error, BaseException) else "Error"
        lines += [f"## `{failure['label']}` (event `{failure['event_id']}`)", "",
                  f"**{kind}**: {error}", ""]
        if failure.get("field_errors"):
            lines += _field_table(failure["field_errors"])
        lines += ["Event as received:", "", _json_block(failure["event"]), ""]
    first = failures[0]["label"] if failures else ""
    create_markdown_artifact(
        markdown="\n".join(lines), key=key,
        description=f"Failed: {len(failures)} event(s) of {total}, first {first}"[:500],
    )
