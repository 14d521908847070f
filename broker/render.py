"""Render the node broker's files into a run directory: `mosquitto.conf` (from the templates),
the `acl` and the `passwd` file (hashed with `mosquitto_passwd -b`), all private to the broker."""

from __future__ import annotations

import ipaddress
import logging
import os
import pwd
import shutil
import subprocess
from importlib import resources
from pathlib import Path
from string import Template

from chain.files import atomic_path, write_atomically

from .config import ROLES, BrokerConfig, BrokerError

log = logging.getLogger(__name__)


def _template(name: str) -> Template:
    return Template(resources.files("broker").joinpath("templates", name).read_text())


def find_executable(name: str) -> str:
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
    tool = find_executable(config.mosquitto_passwd_bin)
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


