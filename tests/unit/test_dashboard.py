"""deploy/grafana/wis2-chain-dashboard.json and deploy/prometheus/prometheus.yml: every metric a
panel queries is one the chain exposes (its queries run against a real Prometheus in
tests/integration/test_delivery.py and test_demo.py), every panel filters by the dashboard's
centre_id and dataset variables where the metric has them, and every job scrapes a port the
compose services serve their metrics on."""

from __future__ import annotations

import json
import re

import yaml

from chain.metrics import DeliveryMetrics, FlowMetrics
from listener.observability import Metrics
from tests.fixtures.paths import REPO

DASHBOARD = REPO / "deploy" / "grafana" / "wis2-chain-dashboard.json"
SCRAPE = REPO / "deploy" / "prometheus" / "prometheus.yml"


def exposed() -> dict[str, set[str]]:
    """{sample name: its label names} of every metric of the chain."""
    names: dict[str, set[str]] = {}
    for registry in (FlowMetrics().registry, DeliveryMetrics().registry, Metrics().registry):
        for family in registry.collect():
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"],
                        "gauge": [""]}[family.type]
            collector = registry._names_to_collectors[family.name + suffixes[0]]
            labels = set(getattr(collector, "_labelnames", ()))
            for suffix in suffixes:
                names[family.name + suffix] = labels
    return names


def test_every_panel_queries_metrics_the_chain_exposes() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    known = exposed()
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"centre_id", "dataset", "datasource"} <= variables
    queried = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for name in re.findall(r"\b(wis2_[a-z_]+)\b", target["expr"]):
                assert name in known, f"{panel['title']}: {name} is not exposed"
                queried.add(name.removesuffix("_bucket").removesuffix("_total"))
                if {"centre_id", "dataset"} <= known[name]:
                    assert 'centre_id=~"$centre_id"' in target["expr"], panel["title"]
                    assert 'dataset=~"$dataset"' in target["expr"], panel["title"]
    for name in ("wis2_chain_notifications_published", "wis2_chain_notifications_failed",
                 "wis2_chain_notifications_skipped", "wis2_chain_validation_failures",
                 "wis2_chain_download_bytes", "wis2_chain_download_seconds",
                 "wis2_chain_event_to_puback_seconds", "wis2_chain_relayed",
                 "wis2_chain_relay_delay_seconds", "wis2_chain_cached",
                 "wis2_chain_undelivered", "wis2_chain_not_relayed"):
        assert name in queried, f"no panel shows {name}"


def test_the_scrape_configuration_names_the_compose_services() -> None:
    config = yaml.safe_load(SCRAPE.read_text(encoding="utf-8"))
    targets = {job["job_name"]: job["static_configs"][0]["targets"]
               for job in config["scrape_configs"]}
    compose = yaml.safe_load((REPO / "compose.yml").read_text(encoding="utf-8"))["services"]
    assert targets["wis2-delivery-monitor"] == ["delivery-monitor:9466"]
    assert compose["delivery-monitor"]["environment"]["WIS2_DELIVERY_METRICS_PORT"] == "9466"
    assert compose["prefect-worker"]["environment"]["WIS2_WORKER_METRICS_PORT"] == "9467"
    for target in targets["wis2-worker"] + targets["wis2-listener"]:
        assert target.split(":")[0] in compose
