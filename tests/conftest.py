"""Shared test set-up. Fixtures live in tests/fixtures/ and are loaded as plugins here.

tests/unit/ needs no service; everything under tests/integration/ (a real broker, Prefect server,
workers, listener, demo, bench) gets the `integration` marker here, so `pytest -m "not
integration"` (or `pytest tests/unit`) runs the unit tests alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = [
    "tests.fixtures.paths",
    "tests.fixtures.prefect_api",
    "tests.fixtures.broker",
    "tests.fixtures.services",
]

INTEGRATION_DIR = Path(__file__).resolve().parent / "integration"
# The longest files first: `make test` hands whole files to its pytest processes in collection
# order, and a long file handed out last would run alone at the end.
LONGEST_FIRST = ("test_compose_node.py", "test_service_outages.py", "test_worker_hosts.py",
                 "test_bench.py",
                 "test_worker_crash.py", "test_server_crash.py", "test_listener_replicas.py",
                 "test_listener.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION_DIR in item.path.resolve().parents:
            item.add_marker(pytest.mark.integration)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order kept inside


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Figures a test reports (`user_properties` named "compose figures": the compose fault
    scenarios), printed at the end of the run, whatever the test's outcome."""
    lines = [value for reports in terminalreporter.stats.values() for report in reports
             for name, value in getattr(report, "user_properties", ())
             if name == "compose figures" and getattr(report, "when", "call") == "call"]
    if lines:
        terminalreporter.section("compose figures")
        for line in lines:
            terminalreporter.write_line(line)
