"""The generated references (docsgen/): every setting has a description, and what the code
defines (settings models, commands, dataset fields, metrics) is what the pages list."""

from __future__ import annotations

import ast
import re

import pytest

from docsgen.discover import REPO, SHIPPED, TOOLING, metrics, settings_models
from docsgen.render import cli_page, dataset_page, metrics_page, setting_rows, settings_page

METRIC_CLASSES = {"Counter", "Gauge", "Histogram", "Summary", "Info", "Enum"}


def test_every_setting_has_a_description() -> None:
    missing = [f"{row.model}.{row.field} ({row.env})"
               for model in settings_models() for row in setting_rows(model)
               if not (row.description or "").strip()]
    assert missing == [], "settings without Field(description=...):\n" + "\n".join(missing)


def test_every_settings_model_of_the_sources_is_found() -> None:
    """The import walk finds each `class X(BaseSettings...)` written in the packages."""
    written = {
        node.name
        for package in (*SHIPPED, *TOOLING) for path in (REPO / package).rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.ClassDef)
        and any(getattr(base, "id", getattr(base, "attr", "")) == "BaseSettings"
                for base in node.bases)
    }
    assert written <= {model.__name__ for model in settings_models()}
    assert {"ChainSettings", "ListenerSettings", "BrokerConfig"} <= written


def test_settings_page_names_env_vars_with_prefix_and_nested_fields() -> None:
    page = settings_page()
    for env in ("WIS2_VERIFY_DATA", "WIS2_MQTT_HOST", "WIS2_MQTT_PASSWORD", "WIS2_LISTENER_ROUTES",
                "WIS2_BROKER_CERTFILE", "WIS2_RECOVERY_INTERVAL", "WIS2_DEMO_PREFECT_PORT"):
        assert f"| `{env}` |" in page, env
    assert "**no description**" not in page
    assert str(REPO) not in page  # paths shown relative to the clone, ~ for HOME


def test_cli_page_lists_every_command_and_option() -> None:
    import typer.main

    from cli.main import app

    page = cli_page()
    root = typer.main.get_command(app)
    for name, command in root.commands.items():
        subcommands = getattr(command, "commands", {name: command})
        for sub, leaf in subcommands.items():
            title = name if sub == name else f"{name} {sub}"
            assert f"## `wis2-chain {title}`" in page
            for param in leaf.params:
                if param.param_type_name == "option" and param.name != "help":
                    assert f"`{param.opts[0]}`" in page, (title, param.opts)


def test_dataset_page_has_every_field_of_the_schema() -> None:
    from wis2.dataset import DatasetDescription

    page = dataset_page()
    for name, field in DatasetDescription.model_fields.items():
        assert f"| `{name}` |" in page
        assert field.description, f"DatasetDescription.{name} has no description"


def _metric_names_in_sources() -> set[str]:
    """Names given as literal strings to prometheus_client's metric classes anywhere in the
    sources: what the registries must hold."""
    names = set()
    for package in (*SHIPPED, *TOOLING):
        for path in (REPO / package).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            if "prometheus_client" not in text:
                continue
            for node in ast.walk(ast.parse(text)):
                if (isinstance(node, ast.Call) and getattr(node.func, "id", None) in METRIC_CLASSES
                        and node.args and isinstance(node.args[0], ast.Constant)
                        and isinstance(node.args[0].value, str)):
                    names.add(node.args[0].value)
    return names


def test_every_metric_of_the_sources_is_in_the_reference() -> None:
    written = _metric_names_in_sources()
    assert "wis2_listener_events_received" in written
    found = {metric.name for metric in metrics()}
    assert written <= found, f"metrics not found in any registry: {sorted(written - found)}"
    page = metrics_page()
    for name in written:
        assert re.search(rf"`{name}(_total|_bucket)?`", page), name


@pytest.mark.parametrize("metric", metrics(), ids=lambda m: m.name)
def test_every_metric_says_what_it_counts(metric) -> None:
    assert metric.documentation.strip()
