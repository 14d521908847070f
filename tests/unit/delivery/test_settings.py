"""delivery.settings: Global Broker URLs (everyone by default, TLS verified) and the settings."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from delivery.settings import DeliverySettings, global_broker


def test_a_global_broker_url() -> None:
    broker = global_broker("mqtts://globalbroker.meteo.fr:8883", ca_certs="/etc/ca.pem")
    assert (broker.host, broker.port, broker.tls, broker.ca_certs, broker.tls_insecure) == (
        "globalbroker.meteo.fr", 8883, True, "/etc/ca.pem", False)
    assert broker.username == "everyone"
    assert broker.password is not None and broker.password.get_secret_value() == "everyone"
    assert broker.name == "globalbroker.meteo.fr:8883"
    plain = global_broker("mqtt://me:s%40cret@127.0.0.1:1884")
    assert (plain.tls, plain.ca_certs, plain.username, plain.port) == (False, None, "me", 1884)
    assert plain.password.get_secret_value() == "s@cret"  # type: ignore[union-attr]
    assert "s@cret" not in plain.url
    ws = global_broker("wss://gb.example.org/mqtt")
    assert (ws.transport, ws.port, ws.ws_path, ws.tls) == ("websockets", 443, "/mqtt", True)
    with pytest.raises(ValueError, match="Global Broker URL"):
        global_broker("http://gb.example.org")


def test_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WIS2_DELIVERY_CENTRE_ID", "fr-ifremer-argo")
    monkeypatch.setenv("WIS2_DELIVERY_GLOBAL_BROKERS",
                       '["mqtts://gb1.example.org:8883", "mqtts://gb2.example.org:8883"]')
    settings = DeliverySettings(_env_file=None)  # type: ignore[call-arg]
    assert [b.name for b in settings.brokers()] == ["gb1.example.org:8883",
                                                    "gb2.example.org:8883"]
    assert (settings.relay_timeout, settings.max_redeliveries) == (300.0, 3)
    monkeypatch.setenv("WIS2_DELIVERY_GLOBAL_BROKERS", '["ftp://x"]')
    with pytest.raises(ValidationError, match="global_brokers"):
        DeliverySettings(_env_file=None)  # type: ignore[call-arg]
    monkeypatch.setenv("WIS2_DELIVERY_GLOBAL_BROKERS", "[]")
    monkeypatch.setenv("WIS2_DELIVERY_CENTRE_ID", "Not A Centre")
    with pytest.raises(ValidationError, match="centre_id"):
        DeliverySettings(_env_file=None)  # type: ignore[call-arg]
    for name, field in DeliverySettings.model_fields.items():
        assert field.description, name
