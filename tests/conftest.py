"""Shared test set-up. Fixtures live in tests/fixtures/ and are loaded as plugins here."""

pytest_plugins = [
    "tests.fixtures.paths",
    "tests.fixtures.prefect_api",
    "tests.fixtures.broker",
]
