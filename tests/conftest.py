"""Shared test set-up. Fixtures live in tests/fixtures/ and are loaded as plugins here.

tests/unit/ needs no service; everything under tests/integration/ (a real broker, Prefect server,
workers, listener, demo, bench) gets the `integration` marker here, so `pytest -m "not
integration"` (or `pytest tests/unit`) runs the unit tests alone.
"""

from __future__ import annotations

import os
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


# Tests marked `heavy` (the compose fault scenarios: a burst of 200 events through containers per
# scenario, tens of minutes on the 2-core machine) would take `make test` past its 15 minutes:
# they run with WIS2_HEAVY_TESTS=1 (`make test-heavy`), and are skipped with this reason otherwise.
HEAVY_ENV = "WIS2_HEAVY_TESTS"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    heavy = os.environ.get(HEAVY_ENV, "") not in ("", "0", "false")
    skip_heavy = pytest.mark.skip(
        reason=f"heavy test: set {HEAVY_ENV}=1 (make test-heavy) to run it")
    for item in items:
        if INTEGRATION_DIR in item.path.resolve().parents:
            item.add_marker(pytest.mark.integration)
        if not heavy and item.get_closest_marker("heavy"):
            item.add_marker(skip_heavy)
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
