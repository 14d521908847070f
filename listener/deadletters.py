"""The dead-letter store: one JSON file per rejected message, for an operator to see, fix, replay.

A record keeps the payload (as text when it is UTF-8, else base64), the topic, when it was received,
the reason (a short code) with a readable message, and the field errors. Its id is derived from
the topic and payload, so a message redelivered by the broker updates its record (`count`) instead
of adding a second one. Records are written atomically (temporary file, fsync, rename) before the
message is acknowledged.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from chain.files import exclusive_lock, write_atomically
from wis2.errors import FieldError

log = logging.getLogger(__name__)

Reason = Literal[
    "too_large", "unmapped_topic", "not_utf8", "not_json", "invalid_event", "api_rejected",
    "internal_error",
]
REASONS: tuple[str, ...] = Reason.__args__  # type: ignore[attr-defined]
_ID = re.compile(r"^[0-9a-f]{16}$")


def utcnow() -> datetime:
    return datetime.now(UTC)


def deadletter_id(topic: str, payload: bytes) -> str:
    return hashlib.sha256(topic.encode() + b"\x00" + payload).hexdigest()[:16]


def _stored_payload(payload: bytes) -> tuple[str | None, str | None]:
    """(`payload`, `payload_base64`) of a record: the text when it is UTF-8, else base64."""
    try:
        return payload.decode("utf-8"), None
    except UnicodeDecodeError:
        return None, base64.b64encode(payload).decode("ascii")


class Replay(BaseModel):
    at: datetime
    topic: str


class DeadLetter(BaseModel):
    id: str
    topic: str
    reason: Reason
    message: str
    errors: list[FieldError] = Field(default_factory=list)
    received: datetime
    last_received: datetime
    count: int = 1
    size: int
    payload: str | None = Field(default=None, description="The payload, when it is UTF-8 text")
    payload_base64: str | None = Field(default=None, description="The payload otherwise")
    replays: list[Replay] = Field(default_factory=list)

    @property
    def status(self) -> Literal["open", "replayed"]:
        if self.replays and self.replays[-1].at >= self.last_received:
            return "replayed"
        return "open"

    def payload_bytes(self) -> bytes:
        if self.payload is not None:
            return self.payload.encode("utf-8")
        return base64.b64decode(self.payload_base64 or "")

    @classmethod
    def new(
        cls, topic: str, payload: bytes, reason: Reason, message: str,
        errors: list[FieldError] | None = None, received: datetime | None = None,
    ) -> DeadLetter:
        received = received or utcnow()
        text, b64 = _stored_payload(payload)
        return cls(
            id=deadletter_id(topic, payload), topic=topic, reason=reason, message=message,
            errors=errors or [], received=received, last_received=received, size=len(payload),
            payload=text, payload_base64=b64,
        )


class DeadLetterStore:
    """A directory of `<id>.json` dead letters."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)

    def path(self, letter_id: str) -> Path:
        if not _ID.match(letter_id):
            raise KeyError(f"{letter_id!r} is not a dead-letter id (16 hex digits)")
        return self.dir / f"{letter_id}.json"

    def _write(self, letter: DeadLetter) -> Path:
        target = self.path(letter.id)
        write_atomically(target, letter.model_dump_json(indent=2))
        return target

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        """Serialise read-modify-write of records (listener and CLI may update one at once)."""
        return exclusive_lock(self.dir / ".lock")

    def add(self, letter: DeadLetter) -> DeadLetter:
        """Store `letter`; the same topic+payload again updates the existing record."""
        with self._locked():
            try:
                existing = self.get(letter.id)
            except (KeyError, ValueError):
                existing = None
            if existing is not None:
                existing.count += 1
                existing.last_received = max(existing.last_received, letter.received)
                existing.reason, existing.message, existing.errors = (
                    letter.reason, letter.message, letter.errors,
                )
                letter = existing
            self._write(letter)
        return letter

    def get(self, letter_id: str) -> DeadLetter:
        path = self.path(letter_id)
        if not path.is_file():
            raise KeyError(f"no dead letter {letter_id} in {self.dir}")
        try:
            return DeadLetter.model_validate_json(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ValueError(f"{path} is not a readable dead letter: {exc}") from None

    def list(self, include_replayed: bool = False) -> list[DeadLetter]:
        letters = []
        if not self.dir.is_dir():
            return letters
        for path in self.dir.glob("*.json"):
            if not _ID.match(path.stem):
                continue
            try:
                letter = self.get(path.stem)
            except (KeyError, ValueError) as exc:
                log.warning("skipping %s: %s", path, exc)
                continue
            if include_replayed or letter.status == "open":
                letters.append(letter)
        return sorted(letters, key=lambda x: x.last_received)

    def mark_replayed(self, letter_id: str, topic: str) -> Replay:
        """Record a replay (call it just BEFORE publishing: a copy coming back later reopens it)."""
        replay = Replay(at=utcnow(), topic=topic)
        with self._locked():
            letter = self.get(letter_id)
            letter.replays.append(replay)
            self._write(letter)
        return replay

    def unmark_replayed(self, letter_id: str, replay: Replay) -> None:
        """Forget a replay whose publication failed."""
        with self._locked():
            letter = self.get(letter_id)
            letter.replays = [r for r in letter.replays if r != replay]
            self._write(letter)

    def remove_older_than(self, max_age_seconds: float,
                          now: datetime | None = None) -> list[DeadLetter]:
        """Delete the records last received more than `max_age_seconds` ago (open or
        replayed: a message the broker delivers again makes a new record); returns them. Each
        removal is logged with its id, topic and reason."""
        cutoff = (now or utcnow()).timestamp() - max_age_seconds
        removed = []
        with self._locked():
            for letter in self.list(include_replayed=True):
                if letter.last_received.timestamp() >= cutoff:
                    continue
                self.path(letter.id).unlink(missing_ok=True)
                removed.append(letter)
                log.info("dead letter removed by retention", extra={
                    "id": letter.id, "topic": letter.topic, "reason": letter.reason,
                    "last_received": letter.last_received.isoformat(),
                    "status": letter.status})
        return removed

    def set_payload(self, letter_id: str, payload: bytes) -> DeadLetter:
        """Replace the payload to replay (the record keeps its id)."""
        with self._locked():
            letter = self.get(letter_id)
            letter.payload, letter.payload_base64 = _stored_payload(payload)
            letter.size = len(payload)
            self._write(letter)
        return letter


def dump_json(value: object) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)
