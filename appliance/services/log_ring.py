"""The ``logs.ring`` service: the log ring's owner inside a running box.

``appliance run`` opens the ring before anything logs and hands it to the runtime; a box
started another way (tests, the demo) gets its ring opened here, and closed when the
service stops. Either way this service keeps the ring's redaction up to date: the set of
known secrets (``appliance.storage.known_secrets``) is read again at start and whenever
the pairing changes (a new token, new Service Bus keys, a new intake key).

Tests and measurements only: ``[logs.testing] flood_per_s`` logs that many synthetic records
per second, in ticks of :data:`FLOOD_TICK_S`, from the event loop (as a busy service would).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Final

import trio

from appliance.protocol.redact import Redactor
from appliance.services.runtime import Runtime
from appliance.storage.known_secrets import SecretContext, known_secrets
from appliance.storage.logring import LogRing, RingHandler

__all__ = ["FLOOD_TICK_S", "attach_ring", "current_redactor", "detach_ring", "ring_directory", "run_log_ring"]

log = logging.getLogger(__name__)

FLOOD_TICK_S: Final = 0.01


def ring_directory(state_dir: str | Path) -> Path:
    return Path(state_dir) / "logs"


def current_redactor(runtime: Runtime) -> Redactor:
    """A redactor for every secret the running box knows now."""
    ctx = SecretContext(config=runtime.config, admin_token=runtime.admin_token, store=runtime.store)
    return Redactor(known_secrets(ctx))


def attach_ring(ring: LogRing) -> RingHandler:
    """Send every record of the root logger to ``ring`` too."""
    handler = RingHandler(ring)
    logging.getLogger().addHandler(handler)
    return handler


def detach_ring(handler: RingHandler) -> None:
    logging.getLogger().removeHandler(handler)


async def _flood(per_s: float, records: int, after_s: float) -> None:
    await trio.sleep(after_s)
    flood = logging.getLogger("appliance.flood")
    per_tick = per_s * FLOOD_TICK_S
    owed = 0.0
    n = 0
    while not records or n < records:
        owed += per_tick
        while owed >= 1 and (not records or n < records):
            owed -= 1
            n += 1
            flood.warning("synthetic record %d: order web-%06d sent to the kitchen screen, 2 lines", n, n % 1_000_000)
        await trio.sleep(FLOOD_TICK_S)


async def run_log_ring(runtime: Runtime, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    cfg = runtime.config.logs
    owned: tuple[LogRing, RingHandler] | None = None
    if runtime.log_ring is None:
        ring = await trio.to_thread.run_sync(lambda: LogRing.open(
            ring_directory(runtime.config.storage.dir), ring_bytes=cfg.ring_bytes,
            flush_interval_s=cfg.flush_interval_s))
        owned = (ring, attach_ring(ring))
        runtime.log_ring = ring
    ring = runtime.log_ring
    try:
        async with trio.open_nursery() as nursery:
            ring.set_redactor(current_redactor(runtime))
            seams = cfg.testing
            if seams.flood_per_s > 0:
                nursery.start_soon(_flood, seams.flood_per_s, seams.flood_records, seams.flood_after_s)
            task_status.started()
            seen = runtime.pairing_changes.version
            while True:
                seen = await runtime.pairing_changes.wait(seen)
                ring.set_redactor(current_redactor(runtime))
    finally:
        if owned is not None:
            detach_ring(owned[1])
            runtime.log_ring = None
            with trio.move_on_after(5, shield=True):
                await trio.to_thread.run_sync(owned[0].close)
