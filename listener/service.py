"""The listener: MQTT messages in, Prefect flow runs out, each message acknowledged only once safe.

`Listener` wires the parts and runs them until SIGTERM/SIGINT:
- `session`: the MQTT session on paho's network thread (persistent session, QoS 1, manual
  acknowledgement, Receive Maximum `max_in_flight`); messages go to an asyncio queue.
- `processing`: `concurrency` workers check each message (`messages`; bad ones go to the
  dead-letter store, `rejecting`) and group bursts (`batching`).
- `creation`: one run per event or one batch run, created through the Prefect API (`runs`)
  with back-off while it is unavailable (`backoff`), then the messages acknowledged.
- `observability`: logs, /metrics and /healthz.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from typing import Any

from chain.diskspace import DiskSettings, DiskWatch
from listener.backoff import ApiBackoff
from listener.batching import Backlog, BatchPolicy
from listener.creation import RunCreation
from listener.deadletters import DeadLetterStore
from listener.messages import Inbound
from listener.observability import HealthServer, Metrics
from listener.processing import Processor
from listener.rejecting import Rejecter
from listener.runs import RunCreator
from listener.session import InFlight, MqttSession
from listener.settings import ListenerSettings
from listener.stopping import StopSignal

log = logging.getLogger("listener")


class Listener:
    def __init__(self, settings: ListenerSettings) -> None:
        self.settings = settings
        self.store = DeadLetterStore(settings.deadletter_dir)
        self.stop = StopSignal()
        self.in_flight = InFlight()
        self.metrics = Metrics(oldest_unacked=self.in_flight.oldest_age,
                               in_flight=self.in_flight.count)
        self.session = MqttSession(settings, self.metrics, self.in_flight, self.stop)
        self.api = ApiBackoff(settings, self.metrics, self.stop, self.session.abandon)
        self.batches = BatchPolicy(settings.batch_max_size,
                                   runs_per_call=settings.batch_runs_per_call)
        self.rejecter = Rejecter(self.store, self.metrics, self.session)
        self.queue: asyncio.Queue[Inbound | None] = asyncio.Queue()
        self.http: HealthServer | None = None
        disk = DiskSettings()
        self.disk = DiskWatch(disk.paths_with(settings.deadletter_dir), disk.min_free_percent)

    def health(self) -> dict[str, Any]:
        """The /healthz document."""
        if self.stop.requested:
            status = "stopping"
        elif not self.session.connected:
            status = "disconnected"
        elif self.disk.low_paths:
            status = "disk_low"
        else:
            status = "ok"
        return {"status": status, "broker_connected": self.session.connected,
                "api": self.api.status, "in_flight": self.in_flight.count(),
                "oldest_unacked_age_seconds": self.in_flight.oldest_age(),
                "disk_low": self.disk.low_paths}

    def housekeeping(self) -> None:
        """Free disk space (metrics, health, a log line when low) and dead-letter retention."""
        self.metrics.set_disk(self.disk.check())
        expired = self.store.remove_older_than(self.settings.deadletter_retention_days * 86400)
        if expired:
            self.metrics.deadletters_expired.inc(len(expired))

    async def _housekeeping_loop(self) -> None:
        while not self.stop.requested:
            try:
                await asyncio.to_thread(self.housekeeping)
            except Exception:  # retried next time; never stops the listener
                log.exception("housekeeping failed")
            await self.stop.sleep(self.settings.housekeeping_seconds)

    def request_stop(self, why: str = "signal") -> None:
        if self.stop.requested:
            return
        log.info("stopping: finishing in-flight flow-run creations", extra={"why": why})
        self.stop.set()
        self.api.ok.set()
        for _ in range(self.settings.concurrency):
            self.queue.put_nowait(None)

    def _log_start(self) -> None:
        s = self.settings
        log.info("starting", extra={
            "broker": s.connection().describe(), "client_id": s.client_id,
            "subscriptions": ",".join(s.subscriptions), "routes": json.dumps(
                [r.model_dump() for r in s.routes]), "max_in_flight": s.max_in_flight,
            "concurrency": s.concurrency, "deadletter_dir": str(s.deadletter_dir),
            "batch_max_size": s.batch_max_size, "batch_max_wait": s.batch_max_wait,
            "api_concurrency": s.api_concurrency, "batch_runs_per_call": s.batch_runs_per_call,
            "batch_hold_waiting_runs": s.batch_hold_waiting_runs,
            "batch_hold_max": s.batch_hold_max})
        if 1 < s.batch_max_size and s.max_in_flight < s.batch_max_size:
            log.warning("max_in_flight (MQTT Receive Maximum) is below batch_max_size: "
                        "batches cannot fill during bursts", extra={
                            "max_in_flight": s.max_in_flight, "batch_max_size": s.batch_max_size})

    async def run(self) -> int:
        s = self.settings
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig.name)
        if s.metrics_port:
            self.http = HealthServer(s.metrics_host, s.metrics_port, self.metrics,
                                     self.health).start()
            log.info("serving /metrics and /healthz",
                     extra={"url": f"http://{s.metrics_host}:{self.http.port}/metrics"})
        self._log_start()
        try:
            async with RunCreator(timeout=s.api_timeout) as creator:
                runs = RunCreation(creator, self.api, self.session, self.rejecter, self.batches,
                                   self.metrics)
                backlog = Backlog(s.batch_hold_waiting_runs, creator.waiting_runs)
                self.metrics.runs_waiting.set_function(lambda: backlog.waiting)
                self.metrics.batch_held_events.set_function(lambda: backlog.held)
                processor = Processor(
                    settings=s, queue=self.queue, session=self.session, api=self.api,
                    rejecter=self.rejecter, batches=self.batches, runs=runs,
                    metrics=self.metrics, stop=self.stop, backlog=backlog)
                self.session.start(
                    lambda item: loop.call_soon_threadsafe(self.queue.put_nowait, item))
                workers = [asyncio.create_task(processor.worker())
                           for _ in range(s.concurrency)]
                housekeeping = asyncio.create_task(self._housekeeping_loop())
                await self.stop.wait()
                housekeeping.cancel()
                _done, pending = await asyncio.wait(workers, timeout=s.shutdown_timeout or None)
                for task in pending:
                    task.cancel()
                if pending:
                    log.warning("in-flight creations cut short by the shutdown timeout; their "
                                "messages stay unacknowledged", extra={"tasks": len(pending)})
                    await asyncio.gather(*pending, return_exceptions=True)
        finally:
            self.session.shutdown()
            if self.http is not None:
                self.http.stop()
        log.info("stopped")
        return 0
