"""`prefect server start` on SQLite, with every write transaction taking SQLite's write lock as
it begins (`BEGIN IMMEDIATE`).

Prefect 3.9 begins most of its write transactions `DEFERRED` (`IMMEDIATE` only where it locks
rows "for update"): such a transaction reads, then writes. In WAL mode, when another connection
wrote in between, SQLite cannot wait for the lock (the snapshot the transaction read is stale)
and fails at once with `database is locked`, which the API answers 503; Prefect's clients try
again 2 s later. On a node where the event persister, the task-run recorder, logs, states and
run creations write all the time, that was most requests of a run: the worker's labels
(`PATCH /flow_runs/{id}/labels`) and the listener's run creations (bench/RESULTS.md: a steady
event at 1 per second took 5.6 s at the median, 35 s at p99).

`IMMEDIATE` takes the write lock at `BEGIN`, waiting for it up to Prefect's busy timeout (60 s)
instead of failing: the writers queue for the one lock SQLite has anyway, and the readers
(WAL, no `BEGIN`) are not held. Run as `python -m localnode.sqlite_server server start ...`
(the arguments of the `prefect` command; localnode.prefect_server does it for SQLite).
"""

from __future__ import annotations

import sys
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from typing import Any


def immediate_write_transactions() -> None:
    """Make Prefect's SQLite configuration begin every transaction it begins IMMEDIATE."""
    from prefect.server.database import configurations

    @asynccontextmanager
    async def begin_transaction(self: Any, session: Any, with_for_update: bool = False,
                                ) -> AsyncGenerator[Any, None]:
        token = configurations.SQLITE_BEGIN_MODE.set("IMMEDIATE")
        try:
            async with session.begin() as transaction:
                yield transaction
        finally:
            configurations.SQLITE_BEGIN_MODE.reset(token)

    configurations.AioSqliteConfiguration.begin_transaction = begin_transaction  # type: ignore


def main() -> None:
    immediate_write_transactions()
    from prefect.cli import app

    sys.argv[0] = "prefect"
    sys.exit(app())


if __name__ == "__main__":
    main()
