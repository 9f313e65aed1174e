"""The ``logs.shipping`` service: the log ring, shipped to the log intake.

Where to: ``[logs] url`` and ``api_key`` if set, else pairing's ``logs`` service; neither
(or ``[logs] ship = false``): off. Through the box's WAN client (``[wan] proxy``, the CA
bundle, TLS verified). What (:mod:`appliance.protocol.logship`): batches of at most
``batch_records`` / ``batch_bytes``, gzip, each record once: the cursor (the last seq
the intake took) is saved durably after each taken batch, and the intake keeps a record
id ``(ring, seq)`` once, so a batch sent again after a crash between the answer and the
save is harmless. Batches go out no faster than ``uplink_share`` of ``uplink_bytes_per_s``.

Failures: 429/503 wait ``Retry-After`` (never less); 5xx and transport errors back off
(``backoff_initial_s`` doubling to ``backoff_max_s``, jittered); 401/403 retry at the
slowest pace (pairing again may bring a new key); 413 halves the batch; another 4xx skips
the batch and counts it. While the intake is away the ring keeps the newest records and
the gap is reported as ``dropped`` in the next batch.

Reading the ring, encoding and compressing run in worker threads: the event loop only
moves bytes. The shipper logs only when its state changes, not per batch.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Final

import httpx
import trio

from appliance.config import Config
from appliance.protocol.backoff import Backoff
from appliance.protocol.health import Check, Status
from appliance.protocol.logship import Outcome, Pacer, ShippingPhase, classify, encode_batch, retry_after_s
from appliance.protocol.text import Text
from appliance.services.log_ring import current_redactor
from appliance.services.runtime import Runtime
from appliance.services.wan import Route, WanConfigError, client_for, close_client, route
from appliance.storage.logring import RingReader, load_cursor, save_cursor

__all__ = ["intake_route", "intake_target", "run_log_shipping"]

log = logging.getLogger(__name__)

# The intake answers small JSON; more than this is not an answer we read.
MAX_ANSWER_BYTES: Final = 64 * 1024
# Retrying for longer than this turns the health check to a warning.
WARN_AFTER_FAILURES: Final = 10


def intake_target(runtime: Runtime) -> tuple[str, str] | None:
    """``(url, api_key)`` of the log intake, or None (shipping is off)."""
    cfg = runtime.config.logs
    if not cfg.ship:
        return None
    if cfg.url and cfg.api_key:
        return cfg.url, cfg.api_key
    store = runtime.store
    service = store.service("logs") if store is not None and not store.needs_repair else None
    if service is None:
        return None
    url, key = service.get("url"), service.get("api_key")
    if isinstance(url, str) and url.startswith("https://") and isinstance(key, str) and key:
        return url, key
    return None


def intake_route(config: Config, url: str) -> Route:
    """The WAN route to the log intake: ``[wan]``'s proxy and NO_PROXY, ``[logs] ca_file``
    (else ``[cloud] ca_file``) added to the system's roots."""
    return route(url, config.wan, ca_file=config.logs.ca_file or config.cloud.ca_file)


def _checks(runtime: Runtime) -> list[Check]:
    status = runtime.log_shipping
    ring = runtime.log_ring
    data = {"shipping": status.as_dict(), "ring": ring.stats().as_dict() if ring else None}
    checks = []
    if ring is None:
        checks.append(Check(name="logs.ring", status=Status.WARN, message=Text("the log ring is not open"),
                            fix=Text("check the state directory's free space and permissions"), data=data))
    elif (stats := ring.stats()).write_errors:
        checks.append(Check(name="logs.ring", status=Status.WARN,
                            message=Text("the log ring cannot write: {error}", error=stats.last_error),
                            fix=Text("check the state directory's free space and the SD card"), data=data))
    else:
        checks.append(Check(name="logs.ring", status=Status.OK,
                            message=Text("log ring: {segments} segment(s), {bytes} bytes", segments=stats.segments,
                                         bytes=stats.disk_bytes), data=data))
    if status.phase is ShippingPhase.REFUSED or status.failures >= WARN_AFTER_FAILURES:
        checks.append(Check(name="logs.shipping", status=Status.WARN,
                            message=Text("logs cannot be shipped to {url}: {error}", url=status.url,
                                         error=status.last_error),
                            fix=Text("check the internet link and the pairing; the ring keeps the newest records "
                                     "meanwhile"), data=data))
    else:
        checks.append(Check(name="logs.shipping", status=Status.OK, message=Text("log shipping: {phase}",
                                                                                 phase=str(status.phase)),
                            data=data))
    return checks


async def run_log_shipping(runtime: Runtime, *,
                           task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    async def checks() -> list[Check]:
        return _checks(runtime)

    runtime.health.add("logs", checks)
    task_status.started()
    await _Shipper(runtime).run()


class _Shipper:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.cfg = runtime.config.logs
        self.status = runtime.log_shipping
        self.backoff = Backoff(self.cfg.backoff_initial_s, self.cfg.backoff_max_s)
        self.pacer = Pacer(self.cfg.uplink_bytes_per_s * self.cfg.uplink_share)
        self.max_records = self.cfg.batch_records
        self.client: httpx.AsyncClient | None = None
        self.client_url = ""

    async def run(self) -> None:
        ring = self.runtime.log_ring
        while ring is None:  # the logs.ring service opens it; it starts before us
            await trio.sleep(0.1)
            ring = self.runtime.log_ring
        reader = RingReader(ring.directory)
        self.status.cursor, self.status.dropped_total = await trio.to_thread.run_sync(load_cursor, ring.directory)
        try:
            while True:
                await self._step(reader, ring.ring_id)
        finally:
            if self.client is not None:
                await close_client(self.client)

    async def _idle(self, phase: ShippingPhase, delay_s: float, *, wake_on_pairing: bool = True) -> None:
        """Wait ``delay_s``, or less if the pairing changes (a new intake, a new key)."""
        self.status.phase = phase
        seen = self.runtime.pairing_changes.version
        with trio.move_on_after(delay_s):
            if not wake_on_pairing:
                await trio.sleep_forever()
            await self.runtime.pairing_changes.wait(seen)

    async def _step(self, reader: RingReader, ring_id: str) -> None:
        runtime, cfg, status = self.runtime, self.cfg, self.status
        target = intake_target(runtime)
        if target is None:
            if status.phase is not ShippingPhase.OFF:
                log.info("log shipping is off (no log intake in the pairing or in [logs])")
            status.url = ""
            await self._idle(ShippingPhase.OFF, cfg.interval_s)
            return
        url, key = target
        if self.client is None or self.client_url != url:
            if self.client is not None:
                await close_client(self.client)
                self.client = None
            try:
                self.client = client_for(intake_route(runtime.config, url), connect_timeout_s=cfg.connect_timeout_s,
                                         read_timeout_s=cfg.read_timeout_s)
            except WanConfigError as exc:
                self._failed(str(exc))
                await self._idle(ShippingPhase.RETRYING, cfg.backoff_max_s)
                return
            self.client_url, status.url = url, url
            log.info("shipping logs to %s", url)
        batch = await trio.to_thread.run_sync(partial(reader.read_after, status.cursor, max_records=self.max_records,
                                                      max_bytes=cfg.batch_bytes))
        if not batch.lines:
            await self._idle(ShippingPhase.IDLE, cfg.interval_s)
            return
        dropped = max(0, batch.first - status.cursor - 1)
        body = await trio.to_thread.run_sync(partial(
            encode_batch, batch.lines, appliance_id=runtime.appliance_id, ring=ring_id, dropped=dropped,
            redactor=current_redactor(runtime)))
        await trio.sleep(self.pacer.delay(trio.current_time()))
        status.phase = ShippingPhase.SENDING
        assert self.client is not None
        try:
            with trio.fail_after(cfg.connect_timeout_s + 2 * cfg.read_timeout_s):
                answer = await self.client.post(url, content=body, headers={
                    "X-Api-Key": key, "Content-Type": "application/json", "Content-Encoding": "gzip"})
        except (httpx.HTTPError, trio.TooSlowError) as exc:
            self._failed(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            await self._idle(ShippingPhase.RETRYING, self.backoff.next_delay())
            return
        self.pacer.sent(len(body), trio.current_time())
        outcome = classify(answer.status_code)
        if outcome is Outcome.TAKEN or outcome is Outcome.REJECTED:
            if outcome is Outcome.REJECTED:
                status.rejected += len(batch.lines)
                log.warning("the log intake refused a batch of %d records for good (%d: %s); skipped",
                            len(batch.lines), answer.status_code, answer.text[:200])
            await trio.to_thread.run_sync(save_cursor, reader.directory, batch.last, status.dropped_total + dropped)
            status.cursor = batch.last
            status.dropped_total += dropped
            if outcome is Outcome.TAKEN:
                status.shipped += len(batch.lines)
                status.batches += 1
                status.bytes_sent += len(body)
            if status.failures:
                log.info("log shipping to %s works again", url)
            status.failures, status.last_error = 0, ""
            self.backoff.reset()
            self.max_records = cfg.batch_records
            return
        self._failed(f"the intake answered {answer.status_code}")
        if outcome is Outcome.WAIT:
            told = retry_after_s(answer.headers)
            # Never sooner than the intake said (429/503 carry Retry-After).
            await self._idle(ShippingPhase.RETRYING, told if told is not None else self.backoff.next_delay(),
                             wake_on_pairing=False)
        elif outcome is Outcome.REFUSED:
            await self._idle(ShippingPhase.REFUSED, cfg.backoff_max_s)
        elif outcome is Outcome.TOO_LARGE:
            self.max_records = max(1, len(batch.lines) // 2)
        else:
            await self._idle(ShippingPhase.RETRYING, self.backoff.next_delay())

    def _failed(self, error: str) -> None:
        status = self.status
        if status.failures == 0:
            log.warning("cannot ship logs to %s: %s; the ring keeps them meanwhile", status.url or "the intake", error)
        status.failures += 1
        status.last_error = error
