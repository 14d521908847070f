"""The node broker's settings: where it listens, its accounts and their passwords, TLS.

`BrokerConfig` reads `WIS2_BROKER_*` (environment and `.env`); a bad value names its field.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from wis2.topics import CENTRE_ID_PATTERN

log = logging.getLogger(__name__)

Role = Literal["fileserver", "listener", "publisher", "monitor", "everyone"]
ROLES: tuple[Role, ...] = get_args(Role)
Transport = Literal["tcp", "websockets"]

_USERNAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
_CENTRE_ID = re.compile(CENTRE_ID_PATTERN)
_EXPIRY = re.compile(r"^[1-9][0-9]*[hdwmy]$")
LOOPBACK_FOR = {"0.0.0.0": "127.0.0.1", "::": "::1"}  # how local clients reach "any"


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


def _username(role: str, who: str) -> Any:
    return Field(default=role, description=f"Account of {who}")


def _password(role: str, default: SecretStr | None = None,
              unset: str = "unset: the account is not created and cannot log in") -> Any:
    return Field(default=default, description=f"Password of the {role} account ({unset})")


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

    # The five accounts (see broker/templates/acl.tmpl): a role without a password is not created.
    fileserver_username: str = _username(
        "fileserver", "the data centre's file server (writes diffusion/files/#)")
    listener_username: str = _username("listener", "the MQTT listener (reads diffusion/files/#)")
    publisher_username: str = _username(
        "publisher", "the flows (read/write origin/a/wis2/<centre-id>/#)")
    monitor_username: str = _username("monitor", "monitoring (reads $SYS/#)")
    everyone_username: str = _username(
        "everyone", "the Global Brokers and the public (reads origin/a/wis2/#)")
    fileserver_password: SecretStr | None = _password("fileserver")
    listener_password: SecretStr | None = _password("listener")
    publisher_password: SecretStr | None = _password("publisher")
    monitor_password: SecretStr | None = _password("monitor")
    everyone_password: SecretStr | None = _password(
        "everyone", SecretStr("everyone"), "WIS2's public one by default")

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


