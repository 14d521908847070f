"""The broker launcher without a running broker: the rendered mosquitto.conf, acl and passwd
(hashed by the `mosquitto_passwd` tool, no mosquitto started), the settings and their errors,
and the `wis2-broker` command refusing bad settings.

The running broker, as its clients see it: tests/integration/test_broker.py.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from broker.launcher import BrokerConfig, BrokerError, render_config
from tests.fixtures.broker import broker_test_config

CENTRE = "fr-ifremer-argo"


def test_rendered_files_follow_the_settings(tmp_path: Path) -> None:
    config = broker_test_config(persistent_session_expiry="5d", max_queued_messages=1500)
    conf = render_config(config, tmp_path)
    text = conf.read_text()
    for line in (
        "per_listener_settings false", "allow_anonymous false", "persistence true",
        f"persistence_location {tmp_path}/data/", "max_queued_messages 1500",
        "persistent_client_expiration 5d", f"listener {config.mqtt_port} 127.0.0.1",
        f"listener {config.ws_port} 127.0.0.1", "protocol websockets",
        f"password_file {tmp_path}/passwd", f"acl_file {tmp_path}/acl",
    ):
        assert line in text.splitlines(), line
    assert "certfile" not in text  # no TLS listener without cert and key
    acl = (tmp_path / "acl").read_text()
    assert f"topic readwrite origin/a/wis2/{CENTRE}/#" in acl
    assert "topic read $SYS/#" in acl
    for path in (conf, tmp_path / "acl", tmp_path / "passwd"):
        assert path.stat().st_mode & 0o077 == 0, f"{path} readable by others"


def test_password_file_has_hashes_only_and_rerender_updates_it(tmp_path: Path) -> None:
    config = broker_test_config()
    render_config(config, tmp_path)
    passwd = (tmp_path / "passwd").read_text()
    users = [line.split(":", 1)[0] for line in passwd.splitlines()]
    assert users == ["fileserver", "listener", "publisher", "monitor", "everyone"]
    assert config.publisher_password is not None
    assert config.publisher_password.get_secret_value() not in passwd
    assert all(line.split(":", 1)[1].startswith("$7$") for line in passwd.splitlines())

    rotated = config.model_copy(update={"publisher_password": SecretStr("new-secret")})
    render_config(rotated, tmp_path)
    again = (tmp_path / "passwd").read_text()
    assert [line.split(":", 1)[0] for line in again.splitlines()] == users
    assert again != passwd


def test_missing_password_leaves_the_account_out_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = broker_test_config(monitor_password=None)
    with caplog.at_level(logging.WARNING, logger="broker.launcher"):
        render_config(config, tmp_path)
    assert "monitor" not in [
        line.split(":", 1)[0] for line in (tmp_path / "passwd").read_text().splitlines()
    ]
    assert "WIS2_BROKER_MONITOR_PASSWORD" in caplog.text


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WIS2_BROKER_PUBLISHER_PASSWORD", "from-env")
    monkeypatch.setenv("WIS2_BROKER_CENTRE_ID", "de-dwd")
    monkeypatch.setenv("WIS2_BROKER_MQTT_PORT", "11883")
    config = BrokerConfig(_env_file=None)  # type: ignore[call-arg]
    assert config.publisher_password is not None
    assert config.publisher_password.get_secret_value() == "from-env"
    assert (config.centre_id, config.mqtt_port) == ("de-dwd", 11883)
    assert config.users.everyone.password is not None
    assert config.users.everyone.password.get_secret_value() == "everyone"
    assert config.users.fileserver.password is None
    assert "from-env" not in repr(config)


@pytest.mark.parametrize(
    ("values", "field_name"),
    [
        ({"centre_id": "fr/ifremer#"}, "centre_id"),
        ({"persistent_session_expiry": "3 days"}, "persistent_session_expiry"),
        ({"publisher_username": "pub lisher"}, "publisher_username"),
        ({"certfile": "/tmp/cert.pem"}, "keyfile"),
        ({"ws_port": 1883, "mqtt_port": 1883}, "ws_port"),
        ({"host": "broker.example.org"}, "host"),
    ],
)
def test_bad_settings_name_the_field(values: dict, field_name: str) -> None:
    with pytest.raises(ValidationError) as info:
        broker_test_config(**values)
    assert field_name in str(info.value)


def test_missing_certificate_file_is_a_clear_error(tmp_path: Path) -> None:
    config = broker_test_config(certfile=tmp_path / "nope.pem", keyfile=tmp_path / "nope.key")
    with pytest.raises(BrokerError, match=r"certfile .*nope\.pem does not exist"):
        render_config(config, tmp_path / "broker")


def test_bad_settings_stop_the_command_with_a_clear_message(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WIS2_BROKER_")}
    env["WIS2_BROKER_CENTRE_ID"] = "Not A Centre"
    result = subprocess.run(
        [str(Path(sys.executable).with_name("wis2-broker")), "--run-dir", str(tmp_path)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 2
    assert "centre_id" in result.stderr
    assert "Traceback" not in result.stderr
