"""The soak's compressed retention (bench/soak.py): every vacuum acts within the run, and
Prefect accepts the settings."""

from __future__ import annotations

import pytest

from bench.soak import slope_per_10k, soak_env


def test_every_retention_is_compressed_and_accepted_by_prefect(monkeypatch) -> None:
    from prefect.settings import Settings

    server, chain, listener = soak_env(3601)
    for name, value in server.items():
        monkeypatch.setenv(name, value)
    vacuum = Settings().server.services.db_vacuum
    assert vacuum.retention_period.total_seconds() == 3601
    assert vacuum.loop_seconds == 60
    # orphaned logs and stale artifact collections: several times within a retention period
    assert vacuum.orphan_cleanup_loop_seconds <= 3601 / 4
    assert Settings().server.events.retention_period.total_seconds() == 3601
    assert float(chain["WIS2_RESULTS_RETENTION_DAYS"]) * 86400 == pytest.approx(3601, abs=1)
    assert float(listener["DEADLETTER_RETENTION_DAYS"]) * 86400 == pytest.approx(3601, abs=1)


def test_slope_per_10k_events() -> None:
    assert slope_per_10k([0, 10000, 20000], [100, 105, 110]) == pytest.approx(5)
    assert slope_per_10k([0, 1], [1, 2]) is None  # too few points
