"""The cache store of the batch tasks (flows/tasks/cache_store.py) reads and writes exactly what a
cached task's transaction does (same keys, same records; no locks: the claim serializes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prefect.filesystems import LocalFileSystem
from prefect.results import ResultStore
from prefect.transactions import transaction

from flows.tasks.batch import receipt
from flows.tasks.cache_store import MISSING, CacheStore
from tests.unit.flows.tasks.test_batch import ARGO, notification


def store(tmp_path: Path) -> ResultStore:
    return ResultStore(result_storage=LocalFileSystem(basepath=str(tmp_path / "results")))


def test_the_cache_store_and_a_task_transaction_read_each_other(tmp_path: Path) -> None:
    note = notification()
    cache = CacheStore(store=store(tmp_path))
    assert cache.lookup("wnm-build-a") is MISSING and not cache.has("wnm-build-a")
    cache.save("wnm-build-a", [note])
    # what a cached task run finds (its transaction, a store of its own)
    with transaction(key="wnm-build-a", store=store(tmp_path)) as txn:
        assert txn.is_committed()
        assert txn.read().result == [note]
    # what a task run writes on commit, the cache store reads
    with transaction(key="wnm-published-b", store=store(tmp_path)) as txn:
        txn.stage(receipt(note, ARGO.topic, 7))
    assert CacheStore(store=store(tmp_path)).lookup("wnm-published-b") == txn._staged_value
    record = json.loads((tmp_path / "results" / "wnm-build-a").read_text())
    assert record["metadata"]["storage_key"].endswith("wnm-build-a")


def test_the_results_directory_forms_prefects_paths_without_the_file_system(
    tmp_path: Path,
) -> None:
    """`ResultsDirectory` (the results directory without a realpath per access) resolves keys
    to Prefect's own paths, refuses what leaves the directory as Prefect does, and its records
    and Prefect's `LocalFileSystem`'s are one cache."""
    from flows.tasks.cache_store import ResultsDirectory

    base = tmp_path / "results"
    base.mkdir()
    ours = ResultsDirectory(basepath=str(base))
    prefects = LocalFileSystem(basepath=str(base))
    for key in ("wnm-build-a", "claims/x", str(base / "wnm-published-b"), "a/../b", "", None):
        assert ours._resolve_path(key) == prefects._resolve_path(key)
    for outside in ("../elsewhere", "/etc/passwd", "a/../../b"):
        with pytest.raises(ValueError, match="outside of the base path"):
            prefects._resolve_path(outside)
        with pytest.raises(ValueError, match="outside of the base path"):
            ours._resolve_path(outside)
    note = notification()
    CacheStore(store=ResultStore(result_storage=ours)).save("wnm-build-c", [note])
    assert CacheStore(store=store(tmp_path)).lookup("wnm-build-c") == [note]
    CacheStore(store=store(tmp_path)).save("wnm-build-d", [note])
    assert CacheStore(store=ResultStore(result_storage=ours)).lookup("wnm-build-d") == [note]
