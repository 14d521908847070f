"""The rendered mosquitto.conf, acl and passwd (`broker/render.py`; hashed by the
`mosquitto_passwd` tool, no mosquitto started).

The running broker, as its clients see it: tests/integration/test_broker.py."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from pydantic import SecretStr

from broker.config import BrokerError
from broker.render import render_config
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



def test_missing_certificate_file_is_a_clear_error(tmp_path: Path) -> None:
    config = broker_test_config(certfile=tmp_path / "nope.pem", keyfile=tmp_path / "nope.key")
    with pytest.raises(BrokerError, match=r"certfile .*nope\.pem does not exist"):
        render_config(config, tmp_path / "broker")
