"""The node broker's settings (`broker/config.py`): from the environment, bad values name the
field."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from broker.config import BrokerConfig
from tests.fixtures.broker import broker_test_config

CENTRE = "fr-ifremer-argo"


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
