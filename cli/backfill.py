"""`wis2-chain backfill SOURCE`: start a backfill run and show its progress in the terminal.

`--dry-run` builds and validates every event in this process, without Prefect (no node needed).
Otherwise it checks the Prefect API first (cli/api.py). By default it creates a run of the
`backfill/default` deployment (a worker runs it; SOURCE is made absolute: the worker must be able
to read it) and follows the run's progress artifact until the run ends. `--local` runs the flow
in this process instead (still tracked by the Prefect API).
Exit status: 0 when every entry was published or already published, 1 otherwise.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any
from uuid import UUID

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from chain.deployments import BACKFILL
from cli.api import require_api

POLL_SECONDS = 1.0


def _bar() -> Progress:
    return Progress(TextColumn("backfill"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                    TimeElapsedColumn(), TextColumn("{task.description}"))


def _dry_run(parameters: dict[str, Any]) -> tuple[bool, str]:
    """Build and validate every event here, without Prefect: no API, no flow run."""
    from flows.backfill import BackfillCounts, dry_run_archive

    with _bar() as bar:
        task = bar.add_task("reading the source", total=100.0)

        def observe(counts: BackfillCounts) -> None:
            bar.update(task, completed=counts.percent, description=counts.summary())

        counts = dry_run_archive(parameters["source"], parameters["dataset"],
                                 parameters["operation"], observe)
    for failure in counts.failures:
        event = f" (event {failure['event_id']})" if failure["event_id"] else ""
        typer.echo(f"  {failure['position']}{event}: {failure['reason']}", err=True)
    return counts.failed == 0, counts.summary()


def _run_local(parameters: dict[str, Any]) -> tuple[bool, str]:
    from flows.backfill import PROGRESS_OBSERVERS, BackfillCounts, backfill

    with _bar() as bar:
        task = bar.add_task("reading the source", total=100.0)

        def observe(counts: BackfillCounts) -> None:
            bar.update(task, completed=counts.percent, description=counts.summary())

        PROGRESS_OBSERVERS.append(observe)
        try:
            state = backfill(**parameters, return_state=True)
        finally:
            PROGRESS_OBSERVERS.remove(observe)
    return state.is_completed(), state.message or state.name or ""


def _progress_of(client: Any, flow_run_id: UUID) -> tuple[float | None, str]:
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterType,
        FlowRunFilter,
        FlowRunFilterId,
    )

    artifacts = client.read_artifacts(
        artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["progress"])),
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
    )
    if not artifacts:
        return None, ""
    latest = artifacts[-1]
    return float(latest.data or 0.0), latest.description or ""


def _run_deployment(parameters: dict[str, Any], timeout: float) -> tuple[bool, str]:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    flow_run = run_deployment(BACKFILL, parameters=parameters, timeout=0)
    typer.echo(f"backfill run {flow_run.id} of {BACKFILL} created; waiting for a worker")
    deadline = time.monotonic() + timeout if timeout else None
    with _bar() as bar, get_client(sync_client=True) as client:
        task = bar.add_task("scheduled", total=100.0)
        while True:
            run = client.read_flow_run(flow_run.id)
            progress, description = _progress_of(client, flow_run.id)
            bar.update(task, completed=progress or 0.0,
                       description=description or (run.state.name if run.state else ""))
            if run.state is not None and run.state.is_final():
                if run.state.is_completed():
                    bar.update(task, completed=100.0)
                return run.state.is_completed(), run.state.message or run.state.name
            if deadline is not None and time.monotonic() > deadline:
                return False, f"still {run.state.name if run.state else 'unknown'} after " \
                              f"{timeout:.0f} s (the run goes on: see the Prefect UI)"
            time.sleep(POLL_SECONDS)


def backfill_command(
    source: Annotated[Path, typer.Argument(
        help="directory of CloudEvent JSON files, JSON-lines file, STAC ItemCollection or "
        "catalog")],
    dataset: Annotated[str | None, typer.Option(help="dataset name")] = None,
    operation: Annotated[str | None, typer.Option(
        help="create, update or delete: overrides each event's operation")] = None,
    rate: Annotated[float | None, typer.Option(
        help="most notifications per second (default WIS2_BACKFILL_RATE)")] = None,
    batch_size: Annotated[int | None, typer.Option(help="events per publish-batch run")] = None,
    dry_run: Annotated[bool, typer.Option(
        help="build and validate only, here, with no node needed")] = False,
    local: Annotated[bool, typer.Option(help="run the flow in this process")] = False,
    timeout: Annotated[float, typer.Option(
        help="seconds to follow a deployment run (0: until it ends)")] = 0,
) -> None:
    """Announce a whole archive (through publish-batch runs), with a progress bar."""
    if operation not in (None, "create", "update", "delete"):
        typer.echo(f"error: --operation {operation!r}: create, update or delete", err=True)
        raise typer.Exit(2)
    if not source.exists():
        typer.echo(f"error: {source}: no such file or directory", err=True)
        raise typer.Exit(2)
    parameters = {"source": str(source.resolve()), "dataset": dataset, "operation": operation,
                  "rate": rate, "batch_size": batch_size, "dry_run": dry_run}
    if dry_run:  # nothing is published: no node needed
        try:
            ok, message = _dry_run(parameters)
        except (OSError, ValueError) as exc:  # unreadable source, unknown dataset...
            typer.echo(f"error: dry run not done: {type(exc).__name__}: {exc}", err=True)
            raise typer.Exit(2) from None
    else:
        require_api("backfill")
        try:
            ok, message = (_run_local(parameters) if local
                           else _run_deployment(parameters, timeout))
        except Exception as exc:  # no such deployment, the API gone meanwhile...
            from prefect.exceptions import ObjectNotFound

            typer.echo(f"error: backfill not started: {type(exc).__name__}: {exc}", err=True)
            if isinstance(exc, ObjectNotFound):
                typer.echo(f"  fix: the deployment {BACKFILL} is missing: deploy the flows "
                           "(`prefect --no-prompt deploy --all` in the project directory)",
                           err=True)
            raise typer.Exit(1) from None
    typer.echo(("done: " if ok else "FAILED: ") + message)
    if not ok:
        raise typer.Exit(1)

