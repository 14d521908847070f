"""A minimal stand-in for the project's MQTT listener, for `python -m bench.run --listener standin`.

It is NOT the project's listener (no dead letters, no routing, no metrics): it subscribes to the
file server's topics and creates one `publish-notification/default` flow run per message, one
after the other, retrying a failed API call 5 times. It exists so that the Prefect side of the
chain (API, worker, flow runs) can be measured when the real listener is unavailable; results
obtained with it are labelled as such.

Environment: the WIS2_LISTENER_* variables `LocalNode.listener_env()` sets.
"""

from __future__ import annotations

import http.server
import json
import logging
import os
import queue
import threading
import time

from pydantic import SecretStr

from chain.deployments import PUBLISH_NOTIFICATION
from chain.mqtt import MqttConnection, connect

log = logging.getLogger("bench.standin_listener")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from prefect.deployments import run_deployment

    port = int(os.environ["WIS2_LISTENER_METRICS_PORT"])
    health = http.server.HTTPServer(("127.0.0.1", port), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=health.serve_forever, daemon=True).start()
    inbox: queue.Queue[bytes] = queue.Queue()
    conn = MqttConnection(
        host=os.environ["WIS2_LISTENER_HOST"], port=int(os.environ["WIS2_LISTENER_PORT"]),
        username=os.environ["WIS2_LISTENER_USERNAME"],
        password=SecretStr(os.environ["WIS2_LISTENER_PASSWORD"]),
        client_id_prefix="bench-standin",
    )
    client = connect(conn)
    client.on_message = lambda c, u, message: inbox.put(message.payload)
    client.subscribe("diffusion/files/#", qos=1)
    log.info("stand-in listener subscribed to diffusion/files/#")
    while True:
        payload = inbox.get()
        try:
            event = json.loads(payload)
        except ValueError as exc:
            log.error("not JSON, dropped by the stand-in: %s", exc)
            continue
        for attempt in range(1, 6):
            try:
                run_deployment(PUBLISH_NOTIFICATION, parameters={"event": event}, timeout=0)
                break
            except Exception as exc:
                log.error("creating the flow run failed (attempt %d): %s", attempt, exc)
                time.sleep(attempt)


if __name__ == "__main__":
    main()
