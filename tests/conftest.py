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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION_DIR in item.path.resolve().parents:
            item.add_marker(pytest.mark.integration)
