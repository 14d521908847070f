"""The node's MQTT broker: render a Mosquitto 2 configuration and run it.

`BrokerConfig` (env prefix `WIS2_BROKER_`, `.env`) says where to listen and the accounts'
passwords; `render_config` writes `mosquitto.conf`, `acl` and `passwd` (hashed with
`mosquitto_passwd -b`) into a run directory; `start_broker` runs mosquitto on it as a child
process (`RunningBroker`); `main` is the `wis2-broker` command that renders and then replaces
itself with mosquitto in the foreground (for systemd or a container).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
from importlib import resources
from pathlib import Path
from string import Template
from typing import Literal, get_args

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from chain.files import atomic_path, write_atomically
from chain.mqtt import MqttConnection
from chain.processes import ManagedProcess, port_is_open
from wis2.topics import CENTRE_ID_PATTERN

log = logging.getLogger(__name__)

Role = Literal["fileserver", "listener", "publisher", "monitor", "everyone"]
ROLES: tuple[Role, ...] = get_args(Role)
Transport = Literal["tcp", "websockets"]

_USERNAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
_CENTRE_ID = re.compile(CENTRE_ID_PATTERN)
_EXPIRY = re.compile(r"^[1-9][0-9]*[hdwmy]$")
_LOOPBACK_FOR = {"0.0.0.0": "127.0.0.1", "::": "::1"}  # how local clients reach "any"


class BrokerUser(BaseModel):
    """One broker account. No password: the account is not created and cannot log in."""

    username: str
    password: SecretStr | None = None


class BrokerUsers(BaseModel):
    """The five accounts of the node broker, one per role (see broker/templates/acl.tmpl)."""

    fileserver: BrokerUser
    listener: BrokerUser
    publisher: BrokerUser
    monitor: BrokerUser
    everyone: BrokerUser

    def role(self, role: Role) -> BrokerUser:
        return getattr(self, role)


class BrokerConfig(BaseSettings):
    """Configuration of the node broker: `WIS2_BROKER_*` environment variables or `.env`."""

    model_config = SettingsConfigDict(env_prefix="WIS2_BROKER_", env_file=".env", extra="ignore")

    host: str = Field(
        default="127.0.0.1",
        description="Address every listener binds to; 0.0.0.0 to accept outside connections",
    )
    mqtt_port: int = Field(default=1883, ge=1, le=65535, description="Plain MQTT listener")
    ws_port: int = Field(default=8081, ge=1, le=65535, description="MQTT over websockets")
    tls_port: int = Field(default=8883, ge=1, le=65535, description="MQTTS (with cert+key)")
    wss_port: int = Field(default=8084, ge=1, le=65535, description="Secure websockets (cert+key)")
    certfile: Path | None = Field(
        default=None, description="PEM server certificate followed by its intermediate CAs"
    )
    keyfile: Path | None = Field(default=None, description="PEM private key of certfile")
    cafile: Path | None = Field(
        default=None,
        description="CA that signed certfile, given to local clients to verify the broker "
        "(not used by mosquitto itself)",
    )
    centre_id: str = Field(default="fr-ifremer-argo", description="WIS2 centre-id of the node")
    persistent_session_expiry: str = Field(
        default="3d", description="Drop persistent sessions unused this long (h, d, w, m, y)"
    )
    max_queued_messages: int = Field(default=2000, ge=0, description="Per client (WIS2 Guide)")
    max_packet_size: int = Field(
        default=16 * 1024 * 1024, ge=20, le=268435455,
        description="Largest MQTT packet accepted; bigger ones are refused by the broker",
    )
    autosave_on_changes: bool = Field(
        default=True,
        description="true: save the persistence database after every `autosave_interval` "
        "changes (queued messages, subscriptions, retained messages); false: every "
        "`autosave_interval` seconds",
    )
    autosave_interval: int = Field(
        default=1, ge=0,
        description="Changes (autosave_on_changes true) or seconds (false) between saves of "
        "the persistence database; 1 change: a message the broker acknowledged survives a "
        "broker crash; 0: save only on a clean stop",
    )
    run_dir: Path = Field(default=Path("run/broker"), description="Generated files and state")
    run_as: str | None = Field(
        default=None,
        description="User mosquitto switches to when started as root (default: current user)",
    )
    mosquitto_bin: str = Field(default="mosquitto", description="mosquitto executable")
    mosquitto_passwd_bin: str = Field(default="mosquitto_passwd", description="its passwd tool")

    fileserver_username: str = "fileserver"
    listener_username: str = "listener"
    publisher_username: str = "publisher"
    monitor_username: str = "monitor"
    everyone_username: str = "everyone"
    fileserver_password: SecretStr | None = None
    listener_password: SecretStr | None = None
    publisher_password: SecretStr | None = None
    monitor_password: SecretStr | None = None
    everyone_password: SecretStr | None = SecretStr("everyone")

    @field_validator("centre_id")
    @classmethod
    def _check_centre_id(cls, value: str) -> str:
        if not _CENTRE_ID.match(value):
            raise ValueError(
                f"centre_id {value!r} is not a WIS2 centre-id "
                "(lower-case letters and digits in dash-separated parts, e.g. fr-ifremer-argo)"
            )
        return value

    @field_validator("host")
    @classmethod
    def _check_host(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(
                f"host {value!r} must be an IP address (mosquitto's websockets listeners cannot "
                "bind to a host name): 127.0.0.1, 0.0.0.0, ::1, ..."
            ) from None
        return value

    @field_validator("persistent_session_expiry")
    @classmethod
    def _check_expiry(cls, value: str) -> str:
        if not _EXPIRY.match(value):
            raise ValueError(
                f"persistent_session_expiry {value!r} must be a number and a unit h, d, w, m "
                "or y, e.g. 3d"
            )
        return value

    @field_validator(
        "fileserver_username", "listener_username", "publisher_username", "monitor_username",
        "everyone_username",
    )
    @classmethod
    def _check_username(cls, value: str) -> str:
        if not _USERNAME.match(value):
            raise ValueError(
                f"username {value!r} may only hold letters, digits, '_', '.', '@', '-' (1-64)"
            )
        return value

    @field_validator(
        "fileserver_password", "listener_password", "publisher_password", "monitor_password",
        "everyone_password", mode="after",
    )
    @classmethod
    def _check_password(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or value.get_secret_value() == "":
            return None
        if any(ch in value.get_secret_value() for ch in "\r\n\0"):
            raise ValueError("password must not contain line breaks or NUL")
        return value

    @model_validator(mode="after")
    def _check_tls_and_ports(self) -> BrokerConfig:
        if (self.certfile is None) != (self.keyfile is None):
            missing = "keyfile" if self.keyfile is None else "certfile"
            raise ValueError(f"TLS needs both certfile and keyfile: {missing} is not set")
        ports = {"mqtt_port": self.mqtt_port, "ws_port": self.ws_port}
        if self.tls_enabled:
            ports.update(tls_port=self.tls_port, wss_port=self.wss_port)
        seen: dict[int, str] = {}
        for name, port in ports.items():
            if port in seen:
                raise ValueError(f"{name} and {seen[port]} are both {port}")
            seen[port] = name
        names = [getattr(self, f"{role}_username") for role in ROLES]
        if len(set(names)) != len(names):
            raise ValueError(f"the five role usernames must differ, got {names}")
        return self

    @property
    def tls_enabled(self) -> bool:
        return self.certfile is not None and self.keyfile is not None

    @property
    def users(self) -> BrokerUsers:
        return BrokerUsers(
            **{
                role: BrokerUser(
                    username=getattr(self, f"{role}_username"),
                    password=getattr(self, f"{role}_password"),
                )
                for role in ROLES
            }
        )


class BrokerError(RuntimeError):
    """The broker configuration cannot be rendered or the broker cannot run."""


def _template(name: str) -> Template:
    return Template(resources.files("broker").joinpath("templates", name).read_text())


def _executable(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/usr/local/sbin")
    if found is None:
        raise BrokerError(
            f"{name!r} not found: install Debian's mosquitto package (make mosquitto)"
        )
    return found


def _current_user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _render_passwd(config: BrokerConfig, path: Path) -> None:
    """Build the password file afresh with `mosquitto_passwd -b`, then swap it in.

    Rerunning gives the same users with the current passwords; a role without a password is
    left out (and cannot log in).
    """
    tool = _executable(config.mosquitto_passwd_bin)
    with atomic_path(path) as tmp:
        for role in ROLES:
            user = config.users.role(role)
            if user.password is None:
                log.warning(
                    "broker account %r (%s) has no password (WIS2_BROKER_%s_PASSWORD): "
                    "not created, it cannot log in", user.username, role, role.upper(),
                )
                continue
            result = subprocess.run(
                [tool, "-b", tmp, user.username, user.password.get_secret_value()],
                capture_output=True, text=True, check=False, timeout=60,
            )
            if result.returncode != 0:
                # never echo the command line: it holds the password
                raise BrokerError(
                    f"mosquitto_passwd failed for user {user.username!r}: "
                    f"{(result.stderr or result.stdout).strip()}"
                )


def _socket_domain_line(host: str) -> str:
    return f"socket_domain ipv{ipaddress.ip_address(host).version}"


def _hand_over(run_dir: Path, run_as: str | None) -> None:
    """Started as root with another `run_as` user: mosquitto reads and writes as that user."""
    if os.geteuid() != 0 or not run_as or run_as == "root":
        return
    try:
        account = pwd.getpwnam(run_as)
    except KeyError as exc:
        raise BrokerError(f"run_as user {run_as!r} does not exist") from exc
    for path in [run_dir, *run_dir.rglob("*")]:
        os.chown(path, account.pw_uid, account.pw_gid)


def render_config(config: BrokerConfig, run_dir: Path) -> Path:
    """Write mosquitto.conf, acl and passwd into `run_dir` and return the mosquitto.conf path."""
    run_dir = Path(run_dir).absolute()
    persistence_dir = run_dir / "data"
    persistence_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(run_dir, 0o700)
    conf_path = run_dir / "mosquitto.conf"
    acl_path, passwd_path = run_dir / "acl", run_dir / "passwd"

    users = config.users
    write_atomically(
        acl_path,
        _template("acl.tmpl").substitute(
            centre_id=config.centre_id, **{role: users.role(role).username for role in ROLES}
        ),
    )
    _render_passwd(config, passwd_path)

    values = {
        "centre_id": config.centre_id,
        "passwd_path": passwd_path,
        "acl_path": acl_path,
        "run_as": config.run_as or _current_user(),
        "persistence_dir": persistence_dir,
        "autosave_interval": config.autosave_interval,
        "autosave_on_changes": "true" if config.autosave_on_changes else "false",
        "max_queued_messages": config.max_queued_messages,
        "max_packet_size": config.max_packet_size,
        "persistent_session_expiry": config.persistent_session_expiry,
        "host": config.host,
        "mqtt_port": config.mqtt_port,
        "ws_port": config.ws_port,
        "socket_domain_line": _socket_domain_line(config.host),
    }
    text = _template("mosquitto.conf.tmpl").substitute(values)
    if config.tls_enabled:
        for name in ("certfile", "keyfile", "cafile"):
            file = getattr(config, name)
            if file is not None and not Path(file).is_file():
                raise BrokerError(f"{name} {file} does not exist")
        text += _template("tls-listeners.conf.tmpl").substitute(
            host=config.host,
            tls_port=config.tls_port,
            wss_port=config.wss_port,
            certfile=Path(config.certfile).absolute(),  # type: ignore[arg-type]
            keyfile=Path(config.keyfile).absolute(),  # type: ignore[arg-type]
            socket_domain_line=_socket_domain_line(config.host),
        )
    else:
        log.info("no WIS2_BROKER_CERTFILE/KEYFILE: MQTTS and WSS listeners are off")
    write_atomically(conf_path, text)
    _hand_over(run_dir, config.run_as)
    log.info("broker configuration rendered in %s", run_dir)
    return conf_path


class RunningBroker:
    """A mosquitto child process running `mosquitto -c <run_dir>/mosquitto.conf`."""

    def __init__(self, config: BrokerConfig, run_dir: Path) -> None:
        self.config = config
        self.run_dir = Path(run_dir).absolute()
        self.conf_path = self.run_dir / "mosquitto.conf"
        self.host = _LOOPBACK_FOR.get(config.host, config.host)
        self.port = config.mqtt_port
        self.ws_port = config.ws_port
        self.tls_port: int | None = config.tls_port if config.tls_enabled else None
        self.wss_port: int | None = config.wss_port if config.tls_enabled else None
        self.centre_id = config.centre_id
        self.log_path = self.run_dir / "mosquitto.log"
        self.users = config.users
        self.process = ManagedProcess(
            "mosquitto",
            [_executable(config.mosquitto_bin), "-c", str(self.conf_path)],
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
        mosquitto = _executable(config.mosquitto_bin)
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
