"""`wis2-listener` / `python -m listener`: run the listener, or manage its dead letters.

    wis2-listener                         run (same as `wis2-listener run`)
    wis2-listener deadletters list [--pending] [--json]
    wis2-listener deadletters show ID [--payload]
    wis2-listener deadletters replay ID [--topic T] [--payload-file F] [--force]
    wis2-listener deadletters replay --all [--force]
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from listener.deadletters import DeadLetter, DeadLetterNotFound, DeadLetterStore
from listener.logs import configure_logging
from listener.settings import ListenerSettings

log = logging.getLogger("listener")

app = typer.Typer(help="WIS2 chain MQTT listener: file-diffusion events -> Prefect flow runs",
                  add_completion=False)
dead_app = typer.Typer(help="Events the listener refused: list, show, replay",
                       no_args_is_help=True)
app.add_typer(dead_app, name="deadletters")


def _settings() -> ListenerSettings:
    try:
        return ListenerSettings()
    except ValidationError as exc:
        typer.echo("error: invalid listener settings (WIS2_LISTENER_*):", err=True)
        for err in exc.errors(include_url=False):
            name = "WIS2_LISTENER_" + "_".join(str(p) for p in err["loc"][:1]).upper()
            rest = "".join(f"[{p}]" for p in err["loc"][1:])
            typer.echo(f"  {name}{rest}: {err['msg']}", err=True)
        raise typer.Exit(2) from None


def run_listener(settings: ListenerSettings) -> int:
    """Run the listener in this process until SIGTERM/SIGINT."""
    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    from listener.service import Listener

    configure_logging(settings.log_format, settings.log_level)
    if not PREFECT_API_URL.value():
        log.error("PREFECT_API_URL is not set: the listener needs the node's Prefect server "
                  "(e.g. PREFECT_API_URL=http://127.0.0.1:4200/api)")
        return 2
    # The listener retries (with its own backoff, metrics and logs), not the client underneath.
    with temporary_settings(updates={PREFECT_CLIENT_MAX_RETRIES: 0}):
        return asyncio.run(Listener(settings).run())


@app.callback(invoke_without_command=True)
def main_callback(ctx: typer.Context) -> None:
    if ctx.invoked_subcommand is None:
        raise typer.Exit(run_listener(_settings()))


@app.command()
def run() -> None:
    """Run the listener (until SIGTERM or Ctrl-C)."""
    raise typer.Exit(run_listener(_settings()))


def _store(settings: ListenerSettings) -> DeadLetterStore:
    return DeadLetterStore(settings.deadletter_dir, settings.max_payload_bytes)


def _get(store: DeadLetterStore, letter_id: str) -> DeadLetter:
    try:
        return store.get(letter_id)
    except DeadLetterNotFound as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


@dead_app.command("list")
def list_letters(
    pending: Annotated[bool, typer.Option(help="only those never replayed")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
) -> None:
    """List the dead letters, oldest first."""
    settings = _settings()
    letters = [x for x in _store(settings).list() if not (pending and x.replayed)]
    if as_json:
        for letter in letters:
            typer.echo(json.dumps({
                "id": letter.id, "received": letter.received, "topic": letter.topic,
                "reason": letter.reason, "message": letter.message,
                "times_received": letter.times_received, "replays": len(letter.replays),
            }))
        return
    if not letters:
        typer.echo(f"no dead letters in {settings.deadletter_dir}")
        return
    typer.echo(f"{'ID':20}  {'RECEIVED':24}  {'REASON':15}  {'REPLAYED':8}  TOPIC / PROBLEM")
    for x in letters:
        replayed = str(len(x.replays)) if x.replays else "-"
        typer.echo(f"{x.id:20}  {x.received:24}  {x.reason:15}  {replayed:8}  {x.topic}")
        typer.echo(f"{'':74}{x.message[:200]}")


@dead_app.command("show")
def show(
    letter_id: Annotated[str, typer.Argument(metavar="ID")],
    payload: Annotated[bool, typer.Option(help="print only the payload (to edit and replay)")]
    = False,
) -> None:
    """Show one dead letter: reason, field errors, payload."""
    letter = _get(_store(_settings()), letter_id)
    if payload:
        sys.stdout.buffer.write(letter.payload_bytes())
        sys.stdout.flush()
        return
    typer.echo(json.dumps(letter.model_dump(mode="json"), indent=2, ensure_ascii=False))
    typer.echo(f"\nfile: {_store(_settings()).path(letter.id)}", err=True)


def _replay_one(
    settings: ListenerSettings, store: DeadLetterStore, letter: DeadLetter,
    topic: str | None, payload: bytes | None, force: bool,
) -> bool:
    from flows.mqtt import MqttError, publish_once
    from listener.service import Rejected, check_event

    target = topic or letter.topic
    data = payload if payload is not None else letter.payload_bytes()
    if letter.truncated and payload is None:
        typer.echo(f"{letter.id}: the stored payload is truncated ({letter.size} bytes "
                   "received); give the full one with --payload-file", err=True)
        return False
    try:
        check_event(target, data, settings)
    except Rejected as exc:
        if not force:
            typer.echo(f"{letter.id}: would be refused again ({exc.reason}): {exc.message}\n"
                       "  fix the payload (edit the file or --payload-file) or use --force",
                       err=True)
            return False
    try:
        publish_once(settings.replay_connection(), target, data, qos=1)
    except MqttError as exc:
        typer.echo(f"{letter.id}: replay failed: {exc}", err=True)
        return False
    store.record_replay(letter, target, data)
    typer.echo(f"{letter.id}: replayed on {target} ({len(data)} bytes)")
    return True


@dead_app.command("replay")
def replay(
    letter_id: Annotated[str | None, typer.Argument(metavar="[ID]")] = None,
    all_: Annotated[bool, typer.Option("--all", help="every dead letter never replayed")]
    = False,
    topic: Annotated[str | None, typer.Option(help="publish on this topic instead")] = None,
    payload_file: Annotated[Path | None, typer.Option(help="publish this payload instead")]
    = None,
    force: Annotated[bool, typer.Option(help="replay even if it would be refused again")]
    = False,
) -> None:
    """Publish a dead letter's (possibly edited) payload back to its topic (or --topic).

    Needs an account allowed to publish there: WIS2_LISTENER_REPLAY_USERNAME (default
    `fileserver`) and WIS2_LISTENER_REPLAY_PASSWORD.
    """
    if all_ == (letter_id is not None):
        typer.echo("error: give one dead letter ID or --all", err=True)
        raise typer.Exit(2)
    if all_ and payload_file is not None:
        typer.echo("error: --payload-file replays one dead letter, not --all", err=True)
        raise typer.Exit(2)
    settings = _settings()
    store = _store(settings)
    data = None
    if payload_file is not None:
        try:
            data = payload_file.read_bytes()
        except OSError as exc:
            typer.echo(f"error: cannot read {payload_file}: {exc.strerror}", err=True)
            raise typer.Exit(2) from None
    if all_:
        letters = [x for x in store.list() if not x.replayed]
        if not letters:
            typer.echo("nothing to replay")
            return
    else:
        assert letter_id is not None
        letters = [_get(store, letter_id)]
    failed = sum(
        not _replay_one(settings, store, letter, topic, data, force) for letter in letters)
    if failed:
        typer.echo(f"{failed} of {len(letters)} not replayed", err=True)
        raise typer.Exit(1)
