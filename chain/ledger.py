"""A small publication ledger: what this node last published for each key (a WNM `data_id`).

The flows consult it to choose the link relation of a new notification:

- nothing recorded (or the last publication was a deletion): ``canonical``;
- recorded with a different checksum: ``update``;
- recorded with the same checksum: a redelivery (the cached notification is reused).

It is one JSON file (``{key: entry}``), read and written under an exclusive file lock
(``<file>.lock``, `fcntl.flock`) and replaced atomically (temporary file + `os.replace`), so
concurrent flow runs on one worker host never lose or corrupt an entry. Keys and extra fields
are free-form: the metadata flow records WCMP2 record identifiers the same way.
"""

from __future__ import annotations

import json
import logging
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from chain.files import exclusive_lock, write_atomically

log = logging.getLogger(__name__)

LEDGER_FILE = "publication-ledger.json"


class LedgerEntry(BaseModel):
    """The last publication recorded for one key."""

    model_config = ConfigDict(extra="allow")

    checksum: str | None = Field(
        default=None, description="Checksum of the published data, e.g. 'sha512:<base64>'"
    )
    notification_id: str = Field(description="`id` of the last notification published")
    rel: str = Field(description="Link relation of that notification: canonical/update/deletion")
    pubtime: str | None = None
    recorded_at: str = Field(
        default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds")
    )


class Ledger:
    """A publication ledger stored in one JSON file (created on first write)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")

    @classmethod
    def in_dir(cls, directory: Path | str) -> Ledger:
        """The ledger of a results directory."""
        return cls(Path(directory) / LEDGER_FILE)

    def _locked(self) -> AbstractContextManager[None]:
        return exclusive_lock(self.lock_path)

    def _read(self) -> dict[str, Any]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        try:
            data = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"publication ledger {self.path} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"publication ledger {self.path} must hold a JSON object")
        return data

    def _write(self, data: dict[str, Any]) -> None:
        write_atomically(self.path, json.dumps(data, indent=1, sort_keys=True))

    def get(self, key: str) -> LedgerEntry | None:
        """The entry recorded for `key`, or None."""
        with self._locked():
            raw = self._read().get(key)
        return None if raw is None else LedgerEntry.model_validate(raw)

    def all(self) -> dict[str, LedgerEntry]:
        with self._locked():
            data = self._read()
        return {key: LedgerEntry.model_validate(value) for key, value in data.items()}

    def record(
        self,
        key: str,
        *,
        notification_id: str,
        rel: str,
        checksum: str | None = None,
        pubtime: str | None = None,
        **extra: Any,
    ) -> LedgerEntry:
        """Record (replace) the last publication for `key`; returns the stored entry."""
        entry = LedgerEntry(
            checksum=checksum, notification_id=notification_id, rel=rel, pubtime=pubtime, **extra
        )
        with self._locked():
            data = self._read()
            data[key] = entry.model_dump(mode="json")
            self._write(data)
        log.debug("ledger %s: %s -> %s (%s)", self.path, key, notification_id, rel)
        return entry

    def forget(self, key: str) -> bool:
        """Remove `key`; True when it was there."""
        with self._locked():
            data = self._read()
            found = data.pop(key, None) is not None
            if found:
                self._write(data)
        return found
