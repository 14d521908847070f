"""Structured errors for bad input: every problem names its JSON path and says what is wrong."""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import BaseModel, ValidationError


class FieldError(BaseModel):
    """One problem in one field. `path` is a JSON path such as `$.data.assets['a.nc'].href`."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class InvalidInput(ValueError):
    """Input that cannot be turned into a model; carries every field error found."""

    def __init__(self, errors: Iterable[FieldError], what: str = "input") -> None:
        self.errors: list[FieldError] = list(errors)
        self.what = what
        super().__init__(self.summary())

    def summary(self) -> str:
        lines = "; ".join(str(e) for e in self.errors) or "unknown error"
        return f"invalid {self.what}: {lines}"

    def as_dicts(self) -> list[dict[str, str]]:
        return [e.model_dump() for e in self.errors]


def json_path(loc: Iterable[int | str]) -> str:
    """Render a pydantic error location as a JSON path."""
    path = "$"
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part.isidentifier():
            path += f".{part}"
        else:
            path += f"[{part!r}]"
    return path


def field_errors_from(exc: ValidationError, prefix: Iterable[int | str] = ()) -> list[FieldError]:
    """Convert a pydantic ValidationError into FieldErrors with JSON paths."""
    prefix = tuple(prefix)
    return [
        FieldError(
            path=json_path(prefix + tuple(err["loc"])),
            message=err["msg"].removeprefix("Value error, "),
        )
        for err in exc.errors(include_url=False)
    ]
