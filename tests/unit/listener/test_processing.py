"""When a worker creates a run at once and when it collects a batch (listener/processing.py):
an idle listener never makes an event wait; a burst queued, or a stream of events taken less
than `batch_max_wait` apart, is grouped."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from listener.batching import Backlog, BatchPolicy
from listener.processing import Processor
from listener.stopping import StopSignal
from tests.fixtures.paths import DATA
from tests.unit.listener.helpers import inbound, settings

TOPIC = "diffusion/files/coriolis/argo/csv"
EVENT = (DATA / "demo-event.json").read_bytes()


def processor(batch_max_wait: float, batch_max_size: int = 50,
              created_ids: list[list[int]] | None = None, waiting: int | None = None,
              batch_hold_max: float = 30.0, hold_waiting_runs: int = 0,
              ) -> tuple[Processor, list[int]]:
    """`waiting`: the listener's runs the API says wait Scheduled (None: no backlog check)."""
    created: list[int] = []

    async def create(members: list[Any]) -> None:
        created.append(len(members))
        if created_ids is not None:
            created_ids.append([m.item.mid for m in members])

    config = settings(batch_max_wait=batch_max_wait, batch_max_size=batch_max_size,
                      batch_hold_max=batch_hold_max, batch_hold_waiting_runs=hold_waiting_runs)

    async def count() -> int:
        assert waiting is not None
        return waiting
    proc = Processor(
        settings=config, queue=asyncio.Queue(), session=SimpleNamespace(),
        api=SimpleNamespace(ok=_set_event()), rejecter=SimpleNamespace(),
        batches=BatchPolicy(config.batch_max_size), runs=SimpleNamespace(create=create),
        metrics=SimpleNamespace(events_received=SimpleNamespace(inc=lambda: None)),
        stop=StopSignal(),
        backlog=None if waiting is None else Backlog(config.batch_hold_waiting_runs, count))
    return proc, created


def _set_event() -> asyncio.Event:
    event = asyncio.Event()
    event.set()
    return event


async def handle(proc: Processor, item: Any) -> None:
    """What a worker does with `item` once it has its turn: take it (and a batch), create."""
    await proc.create(await proc.take(item))


def message(n: int) -> Any:
    item = inbound(n)
    item.topic, item.payload = TOPIC, EVENT
    return item


def test_an_event_after_a_quiet_spell_gets_its_run_at_once() -> None:
    async def scenario() -> list[int]:
        proc, created = processor(batch_max_wait=0.2)
        await handle(proc, message(1))
        proc.last_taken -= 1.0  # a quiet second
        await handle(proc, message(2))
        return created

    assert asyncio.run(scenario()) == [1, 1]


def test_an_event_of_a_stream_waits_for_the_next_ones() -> None:
    async def scenario() -> list[int]:
        # a batch is full at 3 (it ends then, not at its 30 s limit: no timing involved)
        proc, created = processor(batch_max_wait=30, batch_max_size=3)
        await handle(proc, message(1))  # idle: alone
        # the next one, taken right after: a stream; two more come while it waits
        later = asyncio.get_running_loop().call_later
        later(0.05, proc.queue.put_nowait, message(3))
        later(0.10, proc.queue.put_nowait, message(4))
        await handle(proc, message(2))
        return created

    assert asyncio.run(scenario()) == [1, 3]


def test_one_worker_collects_a_stream_at_a_time() -> None:
    """Two workers on a stream: the second takes nothing while the first collects, so a stream
    makes full batches one after the other, not smaller ones side by side."""

    async def scenario() -> list[list[int]]:
        ids: list[list[int]] = []
        proc, _ = processor(batch_max_wait=30, batch_max_size=3, created_ids=ids)
        proc.last_taken = float("inf")  # a stream already: every worker collects
        workers = [asyncio.create_task(proc.worker()) for _ in range(2)]
        later = asyncio.get_running_loop().call_later
        for n in range(1, 7):  # one at a time, as a stream comes (each batch ends full)
            later(0.01 * n, proc.queue.put_nowait, message(n))
        later(0.1, proc.queue.put_nowait, None)
        later(0.1, proc.queue.put_nowait, None)
        await asyncio.wait_for(asyncio.gather(*workers), 30)
        return ids

    assert asyncio.run(scenario()) == [[1, 2, 3], [4, 5, 6]]


def test_a_batch_is_held_until_full_while_the_chain_is_behind() -> None:
    """Eight runs wait Scheduled (the threshold set): the batch is not cut at batch_max_wait
    but filled; with fewer waiting it goes as it is."""

    async def scenario(waiting: int) -> list[int]:
        proc, created = processor(batch_max_wait=0, batch_max_size=3, waiting=waiting,
                                  hold_waiting_runs=8)
        proc.queue.put_nowait(message(2))  # a burst: one queued behind the first
        asyncio.get_running_loop().call_later(0.05, proc.queue.put_nowait, message(3))
        await handle(proc, message(1))
        return created

    assert asyncio.run(scenario(waiting=8)) == [3]
    assert asyncio.run(scenario(waiting=7)) == [2]


def test_a_held_batch_goes_at_batch_hold_max() -> None:
    async def scenario() -> list[int]:
        proc, created = processor(batch_max_wait=0, batch_max_size=3, waiting=100,
                                  batch_hold_max=0.05, hold_waiting_runs=8)
        proc.queue.put_nowait(message(2))
        await handle(proc, message(1))  # nothing more comes: it goes with two
        return created

    assert asyncio.run(scenario()) == [2]


def test_the_backlog_count_is_kept_a_moment_and_a_failed_count_holds_nothing() -> None:
    now = [0.0]
    answers: list[int | Exception] = [9, 3, RuntimeError("API down")]
    asked: list[int] = []

    async def count() -> int:
        asked.append(1)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def scenario() -> list[bool]:
        backlog = Backlog(8, count, recheck=0.5, clock=lambda: now[0])
        seen = [await backlog.behind(), await backlog.behind()]  # one count: 9
        now[0] = 0.5
        seen.append(await backlog.behind())  # 3
        now[0] = 1.0
        seen.append(await backlog.behind())  # failed: not behind
        seen.append(await Backlog(0, count).behind())  # threshold 0: never asks
        return seen

    assert asyncio.run(scenario()) == [True, True, False, False, False]
    assert len(asked) == 3
