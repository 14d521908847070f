"""The cache store of the batch tasks (flows/tasks/cache_store.py) reads and writes exactly what a
cached task's transaction does (same keys, same records; no locks: the claim serializes)."""

from __future__ import annotations

import json
from pathlib import Path

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
