"""When a worker creates a run at once and when it collects a batch (listener/processing.py):
an idle listener never makes an event wait; a burst queued, or a stream of events taken less
than `batch_max_wait` apart, is grouped."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from listener.batching import BatchPolicy
from listener.processing import Processor
from listener.stopping import StopSignal
from tests.fixtures.paths import DATA
from tests.unit.listener.helpers import inbound, settings

TOPIC = "diffusion/files/coriolis/argo/csv"
EVENT = (DATA / "demo-event.json").read_bytes()


def processor(batch_max_wait: float, batch_max_size: int = 50,
              created_ids: list[list[int]] | None = None) -> tuple[Processor, list[int]]:
    created: list[int] = []

    async def create(members: list[Any]) -> None:
        created.append(len(members))
        if created_ids is not None:
            created_ids.append([m.item.mid for m in members])

    config = settings(batch_max_wait=batch_max_wait, batch_max_size=batch_max_size)
    proc = Processor(
        settings=config, queue=asyncio.Queue(), session=SimpleNamespace(),
        api=SimpleNamespace(ok=_set_event()), rejecter=SimpleNamespace(),
        batches=BatchPolicy(config.batch_max_size), runs=SimpleNamespace(create=create),
        metrics=SimpleNamespace(events_received=SimpleNamespace(inc=lambda: None)),
        stop=StopSignal())
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
