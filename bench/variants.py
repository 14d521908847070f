"""Variants of the node measured side by side in one run (`--variant NAME:VAR=VALUE,...`).

A variant is a name and a list of assignments; each selected profile is measured once per
variant, on a fresh node, and stored as `<profile>[<NAME>]`. An assignment goes:

- `PREFECT_SERVER_*=VALUE`, and any other variable of the node's server settings
  (`localnode.prefect_server.NODE_SERVER_SETTINGS`, e.g. `MALLOC_ARENA_MAX`), to the Prefect
  server's environment, over those settings;
- `WIS2_LISTENER_*=VALUE` to the listener (as `--listener-setting` does);
- any other `NAME=VALUE` to every chain process (worker, listener...; as `--chain-env` does).

`NAME=` (nothing after `=`) unsets NAME in that process's environment: the program's own default
(e.g. `PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED=`: Prefect's default, the late-runs service on).
The token `@server-defaults` drops the node's server settings altogether (the Prefect server with
Prefect's defaults; later `PREFECT_SERVER_*` assignments of the variant still apply).
`--variant base` (no assignments) is the node as deployed.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, Field

from localnode.prefect_server import NODE_SERVER_SETTINGS

SERVER_DEFAULTS = "@server-defaults"
SERVER_PREFIX = "PREFECT_SERVER_"
LISTENER_PREFIX = "WIS2_LISTENER_"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_VAR = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Variant(BaseModel):
    """One variant: its assignments as given, and where each goes (None: unset)."""

    name: str
    assignments: list[str] = Field(default_factory=list)
    server_defaults: bool = False  # drop NODE_SERVER_SETTINGS
    server_env: dict[str, str | None] = Field(default_factory=dict)
    listener_settings: dict[str, str | None] = Field(default_factory=dict)  # without the prefix
    chain_env: dict[str, str | None] = Field(default_factory=dict)

    def record(self) -> dict[str, object]:
        """What a measured node's result records of its variant."""
        return {"name": self.name, "assignments": list(self.assignments),
                "described": self.describe()}

    def describe(self) -> str:
        """Its assignments, for the report: "`A=1`, `B=`", or "the node as deployed"."""
        if not self.assignments:
            return "the node as deployed"
        return ", ".join(f"`{a}`" for a in self.assignments)


def parse_variant(text: str) -> Variant:
    """`NAME` or `NAME:VAR=VALUE[,VAR=VALUE...]`; ValueError naming the bad item."""
    name, _, rest = text.partition(":")
    if not _NAME.match(name):
        raise ValueError(f"variant name {name!r}: expected letters, digits, '_', '.', '-' "
                         "(NAME or NAME:VAR=VALUE[,VAR=VALUE...])")
    variant = Variant(name=name)
    for item in (rest.split(",") if rest else []):
        item = item.strip()
        if item == SERVER_DEFAULTS:
            variant.server_defaults = True
            variant.assignments.append(item)
            continue
        var, eq, value = item.partition("=")
        if not eq or not _VAR.match(var):
            raise ValueError(f"variant {name!r}: {item!r}: expected VAR=VALUE, VAR= (unset) or "
                             f"{SERVER_DEFAULTS}")
        setting: str | None = value if value else None
        if var.startswith(SERVER_PREFIX) or var in NODE_SERVER_SETTINGS:
            variant.server_env[var] = setting
        elif var.startswith(LISTENER_PREFIX) and len(var) > len(LISTENER_PREFIX):
            variant.listener_settings[var[len(LISTENER_PREFIX):]] = setting
        else:
            variant.chain_env[var] = setting
        variant.assignments.append(item)
    return variant


def parse_variants(items: list[str]) -> list[Variant]:
    """Every `--variant`, names distinct; ValueError naming the bad item."""
    variants: list[Variant] = []
    for item in items:
        try:
            variant = parse_variant(item)
        except ValueError as exc:
            raise ValueError(f"--variant {item!r}: {exc}") from None
        if any(v.name == variant.name for v in variants):
            raise ValueError(f"--variant {item!r}: the name {variant.name!r} is used twice")
        variants.append(variant)
    return variants


def result_key(profile: str, variant: Variant | None) -> str:
    """The key of a measured node in `results["profiles"]`: `postgres`, `postgres[nowake]`."""
    return profile if variant is None else f"{profile}[{variant.name}]"
