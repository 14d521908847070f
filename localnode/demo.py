"""`make demo`: start the node on loopback, publish the demo metadata record and the sample Argo
event, print the notification, the flow run and the Prefect UI address, run until Ctrl-C.

The Prefect server runs on a PostgreSQL cluster of the node's own (`localnode/postgres.py`);
`python -m localnode.demo run --sqlite` (`make demo DEMO_ARGS=--sqlite`, or
`WIS2_DEMO_DATABASE=sqlite`) puts it on SQLite instead.
`--scaled` (`make demo DEMO_ARGS=--scaled`) starts the scaled node of `localnode/scaled.py`
instead: 2 workers, 2 listener replicas on `$share`, PostgreSQL and Redis of its own;
`--split-server` also splits the Prefect server into its API and services processes.

`python -m localnode.demo send EVENT.json [--topic T]` (`make demo-event EVENT=...`) sends
another event to the running demo node as its file server."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from chain.mqtt import MqttError, publish_once
from localnode.node import LocalNode, NodeSettings, NodeState, PortTaken
from localnode.postgres import PostgresUnavailable
from localnode.scaled import ScaledNode, Topology

log = logging.getLogger("demo")


def run(settings: NodeSettings, scaled: Topology | None = None) -> int:
    node = LocalNode(settings) if scaled is None else ScaledNode(settings, scaled)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        state = node.start()
        if node.postgres is not None:
            print(f"Prefect server database: PostgreSQL on 127.0.0.1:{node.postgres.port} "
                  "(`make demo DEMO_ARGS=--sqlite`: SQLite)", flush=True)
        print(f"node running: broker mqtt://{state.host}:{state.broker_port}, "
              f"Prefect UI {state.ui_url}, data {state.files_url}", flush=True)
        print("publishing the demo WCMP2 record (metadata before data)...", flush=True)
        node.publish_metadata(settings.metadata_record)
        print(f"sending {settings.event} on {settings.event_topic}...", flush=True)
        received = node.send_and_wait(settings.event, settings.event_topic, settings.timeout)
        print(f"\nWIS2 notification received on {received['topic']}:")
        print(json.dumps(received["message"], indent=2))
        print(f"\nflow run:   {node.latest_flow_run_url()}")
        print(f"Prefect UI: {state.ui_url} (login: the prefect_auth_string of "
              f"{settings.run_dir / 'node.json'})")
        print(f"logs:       {settings.run_dir / 'logs'}")
        if settings.observability:
            print(f"metrics:    http://{state.host}:{settings.metrics_port}/metrics (listener), "
                  f":{settings.worker_metrics_port}/metrics (worker), "
                  f":{settings.delivery_metrics_port}/metrics (delivery monitor); "
                  "delivery: wis2-chain delivery status")
        print("another event: make demo-event EVENT=path/to/event.json")
        print("Ctrl-C stops every process of the demo.", flush=True)
        while not stop.wait(60):  # until SIGTERM or Ctrl-C; the logs rotate meanwhile
            node.rotate_logs()
            node.keep_database_running()
        return 0
    except KeyboardInterrupt:
        return 0
    except (PortTaken, PostgresUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        print(f"error: the demo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        print("\nstopping the demo node...", flush=True)
        node.stop()


def send(settings: NodeSettings, event: Path, topic: str) -> int:
    state_file = settings.run_dir / "node.json"
    if not state_file.exists():
        print(f"error: no running demo node ({state_file} missing): run `make demo` first",
              file=sys.stderr)
        return 2
    state = NodeState.load(state_file)
    node = LocalNode(settings)
    try:
        publish_once(state.connection("fileserver"), topic, node.event_payload(event))
    except (MqttError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"sent {event} on {topic}; watch the runs at {state.ui_url}")
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m localnode.demo")
    sub = parser.add_subparsers(dest="command")
    run_parser = sub.add_parser("run", help="start the demo node (default)")
    database = run_parser.add_mutually_exclusive_group()
    database.add_argument("--postgres", dest="database", action="store_const", const="postgres",
                          help="the Prefect server on a PostgreSQL cluster of its own (default)")
    database.add_argument("--sqlite", dest="database", action="store_const", const="sqlite",
                          help="the Prefect server on SQLite (slower under load)")
    run_parser.add_argument("--scaled", action="store_true",
                            help="2 workers, 2 listener replicas, PostgreSQL and Redis")
    run_parser.add_argument("--split-server", action="store_true",
                            help="with --scaled: the Prefect API and services in two processes")
    send_parser = sub.add_parser("send", help="send an event to the running demo node")
    send_parser.add_argument("event", type=Path)
    send_parser.add_argument("--topic", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    settings = NodeSettings()
    if args.command == "send":
        sys.exit(send(settings, args.event, args.topic or settings.event_topic))
    if getattr(args, "database", None):
        settings = settings.model_copy(update={"database": args.database})
    if "observability" not in settings.model_fields_set:  # on for the demo unless set
        settings = settings.model_copy(update={"observability": True})
    scaled = (Topology(separate_services=args.split_server)
              if getattr(args, "scaled", False) else None)
    sys.exit(run(settings, scaled=scaled))


if __name__ == "__main__":
    main()
