"""`wis2-listener` / `python -m listener`: run the listener, or manage its dead letters.

    wis2-listener                      # run (same as `wis2-listener run`)
    wis2-listener deadletters list [--all]
    wis2-listener deadletters show ID
    wis2-listener deadletters replay ID [--payload-file F] [--topic T]
    wis2-listener deadletters replay --all
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from pydantic import SecretStr, ValidationError

# The listener retries failed API calls itself (and keeps the messages unacknowledged meanwhile):
# the Prefect client's own retries (up to ~1 min of hidden waits) are off unless set explicitly.
os.environ.setdefault("PREFECT_CLIENT_MAX_RETRIES", "0")

from chain.mqtt import MqttError, Publisher
from listener.deadletters import DeadLetterStore, dump_json
from listener.settings import ListenerSettings

log = logging.getLogger("listener")

app = typer.Typer(add_completion=False, no_args_is_help=False,
                  help="WIS2 chain MQTT listener: file-diffusion events -> Prefect flow runs.")
dl_app = typer.Typer(add_completion=False, no_args_is_help=True,
                     help="List, show and replay rejected messages (dead letters).")
app.add_typer(dl_app, name="deadletters")


def load_settings() -> ListenerSettings:
    try:
        return ListenerSettings()
    except ValidationError as exc:
        lines = [f"  WIS2_LISTENER_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
                 for e in exc.errors(include_url=False)]
        typer.echo("invalid listener settings:\n" + "\n".join(lines), err=True)
        raise typer.Exit(2) from None


def _check_prefect_api() -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        typer.echo("PREFECT_API_URL is not set: the listener needs the Prefect server's API "
                   "(e.g. http://127.0.0.1:4200/api)", err=True)
        raise typer.Exit(2)
    return url


@app.callback(invoke_without_command=True)
def main_callback(ctx: typer.Context) -> None:
    if ctx.invoked_subcommand is None:
        run()


@app.command()
def run() -> None:
    """Run the listener until SIGTERM/SIGINT."""
    from listener.observability import configure_logging
    from listener.service import Listener

    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    api = _check_prefect_api()
    log.info("Prefect API", extra={"api_url": api})
    code = asyncio.run(Listener(settings).run())
    raise typer.Exit(code)


@dl_app.command("list")
def dl_list(
    all_: Annotated[bool, typer.Option("--all", help="Include replayed ones")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON output")] = False,
) -> None:
    """List the dead letters (open ones by default), oldest first."""
    settings = load_settings()
    letters = DeadLetterStore(settings.deadletter_dir).list(include_replayed=all_)
    if as_json:
        typer.echo(dump_json([
            {"id": x.id, "status": x.status, "reason": x.reason, "topic": x.topic,
             "received": x.last_received.isoformat(), "count": x.count, "message": x.message}
            for x in letters]))
        return
    if not letters:
        typer.echo(f"no dead letters in {settings.deadletter_dir}")
        return
    for x in letters:
        typer.echo(f"{x.id}  {x.last_received:%Y-%m-%dT%H:%M:%SZ}  {x.status:8}  "
                   f"{x.reason:15} x{x.count:<3} {x.topic}  {x.message[:120]}")


@dl_app.command("show")
def dl_show(letter_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Show one dead letter (its file, reason, field errors and payload) as JSON."""
    settings = load_settings()
    store = DeadLetterStore(settings.deadletter_dir)
    try:
        letter = store.get(letter_id)
    except (KeyError, ValueError) as exc:
        typer.echo(str(exc).strip("'\""), err=True)
        raise typer.Exit(1) from None
    data = json.loads(letter.model_dump_json())
    data["status"] = letter.status
    data["file"] = str(store.path(letter.id))
    typer.echo(dump_json(data))


@dl_app.command("replay")
def dl_replay(
    letter_id: Annotated[str | None, typer.Argument(metavar="[ID]")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Replay every open dead letter")] = False,
    topic: Annotated[str | None, typer.Option(help="Publish here instead of the original topic")]
    = None,
    payload_file: Annotated[Path | None, typer.Option(
        help="Replace the payload with this file's content first (else the record's `payload`, "
        "which may have been edited in place)")] = None,
    username: Annotated[str | None, typer.Option(
        help="Broker account allowed to publish on the topic (default "
        "WIS2_LISTENER_REPLAY_USERNAME, else WIS2_LISTENER_USERNAME)")] = None,
    password: Annotated[str | None, typer.Option(help="Its password")] = None,
) -> None:
    """Publish dead letters (possibly fixed) back to their topic for the listener to retake."""
    if (letter_id is None) == (not all_):
        typer.echo("give one dead-letter ID or --all", err=True)
        raise typer.Exit(2)
    if all_ and payload_file is not None:
        typer.echo("--payload-file replaces one dead letter's payload: give an ID", err=True)
        raise typer.Exit(2)
    settings = load_settings()
    store = DeadLetterStore(settings.deadletter_dir)
    try:
        letters = [store.get(letter_id)] if letter_id else store.list()
    except (KeyError, ValueError) as exc:
        typer.echo(str(exc).strip("'\""), err=True)
        raise typer.Exit(1) from None
    if payload_file is not None:
        letters = [store.set_payload(letters[0].id, payload_file.read_bytes())]
    conn = settings.connection(replay=True)
    if username:
        conn.username = username
    if password:
        conn.password = SecretStr(password)
    failures = 0
    try:
        with Publisher(conn) as publisher:
            for letter in letters:
                target = topic or letter.topic
                replay = store.mark_replayed(letter.id, target)
                try:
                    publisher.publish(target, letter.payload_bytes(), qos=1)
                except MqttError as exc:
                    store.unmark_replayed(letter.id, replay)
                    failures += 1
                    typer.echo(f"{letter.id}: not replayed: {exc}", err=True)
                    continue
                typer.echo(f"{letter.id}: replayed on {target}")
    except MqttError as exc:
        typer.echo(f"cannot replay: {exc}", err=True)
        raise typer.Exit(1) from None
    if not letters:
        typer.echo("nothing to replay")
    raise typer.Exit(1 if failures else 0)


def main() -> None:
    app(prog_name="wis2-listener")


if __name__ == "__main__":
    sys.exit(main())
