"""Listener settings: defaults, environment, routes and the values refused."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from listener.settings import Route
from tests.unit.listener.helpers import settings


def test_defaults_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings()
    assert s.subscriptions == ["diffusion/files/#"]
    assert s.routes == [Route(topic_filter="diffusion/files/#",
                              deployment="publish-notification/default", dataset="argo")]
    assert s.session_expiry == 3 * 24 * 3600 and s.max_payload_bytes == 1024 * 1024
    monkeypatch.setenv("WIS2_LISTENER_ROUTES", json.dumps([
        {"topic_filter": "diffusion/files/meteo/#", "deployment": "publish-notification/synop",
         "dataset": "synop"}, {"topic_filter": "diffusion/files/#"}]))
    monkeypatch.setenv("WIS2_LISTENER_SUBSCRIPTIONS", '["$share/chain/diffusion/files/#"]')
    monkeypatch.setenv("WIS2_LISTENER_BROKER_HOST", "mosquitto")
    monkeypatch.setenv("WIS2_LISTENER_PASSWORD", "s3cret")
    s = settings()
    assert s.host == "mosquitto"
    assert s.route_for("diffusion/files/meteo/synop/bufr").dataset == "synop"
    assert s.route_for("diffusion/files/coriolis/argo/bufr").deployment == (
        "publish-notification/default")
    assert s.route_for("elsewhere/x") is None
    assert "s3cret" not in repr(s) and "s3cret" not in s.connection().describe()


@pytest.mark.parametrize("bad", [
    {"WIS2_LISTENER_ROUTES": '[{"topic_filter": "a/#/b"}]'},
    {"WIS2_LISTENER_ROUTES": '[{"topic_filter": "a/#", "deployment": "no-slash"}]'},
    {"WIS2_LISTENER_SUBSCRIPTIONS": '["$share//a"]'},
    {"WIS2_LISTENER_SUBSCRIPTIONS": "[]"},
    {"WIS2_LISTENER_RETRY_MIN_DELAY": "5", "WIS2_LISTENER_RETRY_MAX_DELAY": "1"},
])
def test_bad_settings_are_refused(monkeypatch: pytest.MonkeyPatch, bad: dict[str, str]) -> None:
    for key, value in bad.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError):
        settings()


def test_shared_subscription_route() -> None:
    route = Route(topic_filter="$share/g/diffusion/files/+/argo/#")
    assert route.matches("diffusion/files/coriolis/argo/bufr")
    assert not route.matches("diffusion/files/coriolis/synop/bufr")


def test_batching_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings()
    assert (s.batch_max_size, s.batch_max_wait, s.max_in_flight) == (200, 0.2, 200)
    assert (s.batch_hold_waiting_runs, s.batch_hold_max) == (0, 5.0)
    assert (s.concurrency, s.api_concurrency) == (4, 1)
    assert s.max_in_flight >= s.batch_max_size  # batches can fill
    assert s.routes[0].batch_deployment == "publish-batch/default"
    monkeypatch.setenv("WIS2_LISTENER_BATCH_MAX_SIZE", "1")
    monkeypatch.setenv("WIS2_LISTENER_BATCH_MAX_WAIT", "0.5")
    monkeypatch.setenv("WIS2_LISTENER_ROUTES", json.dumps(
        [{"topic_filter": "diffusion/files/#", "batch_deployment": None}]))
    s = settings()
    assert (s.batch_max_size, s.batch_max_wait) == (1, 0.5)
    assert s.routes[0].batch_deployment is None
    with pytest.raises(ValidationError):
        Route(topic_filter="a/#", batch_deployment="no-slash")


def test_retire_is_off_by_default_and_read_from_the_environment(monkeypatch) -> None:
    from listener.settings import ListenerSettings

    assert ListenerSettings(_env_file=None).retire is False
    monkeypatch.setenv("WIS2_LISTENER_RETIRE", "true")
    assert ListenerSettings(_env_file=None).retire is True
