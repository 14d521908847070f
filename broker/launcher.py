"""The node's MQTT broker: render a Mosquitto 2 configuration and run it.

`BrokerConfig` (env prefix `WIS2_BROKER_`, `.env`) says where to listen and the accounts'
passwords; `render_config` writes `mosquitto.conf`, `acl` and `passwd` (hashed with
`mosquitto_passwd -b`) into a run directory; `start_broker` runs mosquitto on it as a child
process (`RunningBroker`); `main` is the `wis2-broker` command that renders and then replaces
itself with mosquitto in the foreground (for systemd or a container).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from chain.mqtt import MqttConnection
from chain.processes import ManagedProcess, port_is_open

from .config import LOOPBACK_FOR, BrokerConfig, BrokerError, Role, Transport
from .render import find_executable, render_config

log = logging.getLogger(__name__)

__all__ = ["BrokerConfig", "BrokerError", "RunningBroker", "main", "render_config",
           "start_broker"]


class RunningBroker:
    """A mosquitto child process running `mosquitto -c <run_dir>/mosquitto.conf`."""

    def __init__(self, config: BrokerConfig, run_dir: Path) -> None:
        self.config = config
        self.run_dir = Path(run_dir).absolute()
        self.conf_path = self.run_dir / "mosquitto.conf"
        self.host = LOOPBACK_FOR.get(config.host, config.host)
        self.port = config.mqtt_port
        self.ws_port = config.ws_port
        self.tls_port: int | None = config.tls_port if config.tls_enabled else None
        self.wss_port: int | None = config.wss_port if config.tls_enabled else None
        self.centre_id = config.centre_id
        self.log_path = self.run_dir / "mosquitto.log"
        self.users = config.users
        self.process = ManagedProcess(
            "mosquitto",
            [find_executable(config.mosquitto_bin), "-c", str(self.conf_path)],
            log_path=self.log_path,
            ready=self._ready,
        )

    def _ready(self) -> bool:
        ports = [self.port, self.ws_port, self.tls_port, self.wss_port]
        return all(port_is_open(self.host, p) for p in ports if p is not None)

    @property
    def running(self) -> bool:
        return self.process.running

    def connection(
        self, role: Role, transport: Transport = "tcp", *, tls: bool = False
    ) -> MqttConnection:
        """How a client of `role` reaches this broker (tls=True: the MQTTS/WSS listener)."""
        user = self.users.role(role)
        if tls:
            port = self.tls_port if transport == "tcp" else self.wss_port
            if port is None:
                raise BrokerError("this broker has no TLS listener (no certfile/keyfile)")
        else:
            port = self.port if transport == "tcp" else self.ws_port
        return MqttConnection(
            host=self.host,
            port=port,
            transport=transport,
            tls=tls,
            ca_certs=str(self.config.cafile) if tls and self.config.cafile else None,
            username=user.username,
            password=user.password,
            client_id_prefix=f"test-{role}",
        )

    def start(self, timeout: float = 30.0) -> None:
        self.process.start(timeout)

    def stop(self) -> None:
        """SIGTERM: mosquitto saves its persistence database and exits."""
        self.process.stop()

    def restart(self, timeout: float = 30.0) -> None:
        self.stop()
        self.start(timeout)

    def reload(self) -> None:
        """SIGHUP: mosquitto rereads its password file and ACL (after `render_config`)."""
        if self.process.proc is None or not self.running:
            raise BrokerError("mosquitto is not running")
        os.kill(self.process.proc.pid, signal.SIGHUP)

    def kill(self) -> None:
        """SIGKILL: a crash; what was not autosaved is lost."""
        self.process.kill()

    def tail(self, lines: int = 60) -> str:
        return self.process.tail(lines)

    def __repr__(self) -> str:
        return f"RunningBroker({self.host}:{self.port}, ws {self.ws_port}, run_dir {self.run_dir})"


def start_broker(config: BrokerConfig, run_dir: Path, timeout: float = 30.0) -> RunningBroker:
    """Render the configuration, start mosquitto and return once its ports accept connections."""
    render_config(config, run_dir)
    broker = RunningBroker(config, run_dir)
    broker.start(timeout)
    return broker


def main(argv: list[str] | None = None) -> None:
    """`wis2-broker [--run-dir DIR] [--render-only]`: render, then exec mosquitto (foreground)."""
    parser = argparse.ArgumentParser(
        prog="wis2-broker",
        description="Render the WIS2 node's Mosquitto configuration from WIS2_BROKER_* settings "
        "(environment or .env) and run mosquitto in the foreground.",
    )
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="where to write mosquitto.conf, acl, passwd and data/ "
                        "(default: WIS2_BROKER_RUN_DIR or run/broker)")
    parser.add_argument("--render-only", action="store_true",
                        help="write the files and exit without starting mosquitto")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        config = BrokerConfig()
        run_dir = args.run_dir or config.run_dir
        conf = render_config(config, run_dir)
        if args.render_only:
            print(conf)
            return
        mosquitto = find_executable(config.mosquitto_bin)
    except (BrokerError, OSError, ValueError) as exc:
        log.error("%s", exc)
        sys.exit(2)
    if os.geteuid() == 0 and not config.run_as:
        log.warning("running mosquitto as root: set WIS2_BROKER_RUN_AS to drop privileges")
    log.info("exec %s -c %s", mosquitto, conf)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(mosquitto, [mosquitto, "-c", str(conf)])  # noqa: S606 - replaces this process


if __name__ == "__main__":
    main()
