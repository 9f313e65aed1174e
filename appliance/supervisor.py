"""The supervisor: the one root nursery of the appliance.

Start-up, in dependency order: storage (opened and migrated), then every service of
:func:`appliance.services.assembly.service_specs` with ``await nursery.start(...)``, each
reporting ready through ``task_status``. READY=1 goes to systemd once all have, after
the process's start-up heap is frozen (:mod:`appliance.services.heap`: Python's full
collections no longer scan it).

A service that crashes after it started is restarted with exponential backoff
(:class:`~appliance.protocol.restart.RestartPolicy`). One that stopped because the process
ran out of file descriptors (EMFILE, ENFILE: the load's doing, not a bug) is restarted
after a doubling pause too, without counting as a crash. Too many crashes in a window mark it
failed on the board (homepage, /readyz) and leave it down, unless it is a core service:
then the process ends with :data:`EXIT_FATAL` and systemd restarts the whole box. A
service that fails to *start* stops start-up (a port that cannot be bound is the usual
case): the error goes to the caller.

Stop (SIGTERM or SIGINT): ``runtime.stopping`` is set and STOPPING=1 sent; graceful
services (the listeners, the dispatcher) finish in-flight work on their own, the others
are cancelled at once; whatever is still running after ``shutdown_deadline_s`` is
cancelled. A second signal cancels everything immediately. Then the database closes.

Exceptions: :class:`FatalServiceError` (a core service cannot recover). Start-up errors
(``BindError``, ``StorageError``...) pass through unchanged.
"""

from __future__ import annotations

import errno
import logging
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import trio

from appliance.config import Config, to_toml_dict
from appliance.protocol.restart import RestartPolicy
from appliance.services import heap
from appliance.services.assembly import service_specs
from appliance.services.board import ServiceState, ServiceStatus
from appliance.services.firmware import prepare_storage
from appliance.services.keyring import KeyRing, load_box_key
from appliance.services.loop_lag import STALL_S, TICK_S, LoopLag, hand_back_the_gil, watch_loop
from appliance.services.runtime import Runtime
from appliance.services.spec import ServiceSpec
from appliance.services.state import BoundPorts
from appliance.services.systemd import Notifier, watchdog_interval_s
from appliance.storage import DATABASE_FILE, Database
from appliance.storage.db import SLOW_COMMIT_S
from appliance.storage.logring import LogRing
from appliance.storage.meta import appliance_id
from appliance.storage.owner import load_credential
from appliance.storage.running import publish, withdraw

__all__ = ["EXIT_FATAL", "FatalServiceError", "ServiceSpec", "open_runtime", "out_of_descriptors", "run",
           "supervise_all"]

log = logging.getLogger(__name__)

EXIT_FATAL: Final = 1


class FatalServiceError(Exception):
    """A core service crashed and cannot be restarted; the process must end non-zero."""


class _Supervisor:
    def __init__(self, runtime: Runtime, notifier: Notifier, *, publish: bool = False,
                 settle_heap: bool = False, watch_loop: bool = False) -> None:
        self.runtime = runtime
        self.notifier = notifier
        self.publish = publish
        self.settle_heap = settle_heap
        self.watch_loop = watch_loop
        self._supervisor_config = runtime.config.supervisor
        self._live = 0
        self._all_done = trio.Event()

    async def supervise(self, spec: ServiceSpec, *, task_status: trio.TaskStatus[None]) -> None:
        """Run one service, restarting it per policy; started() once its first start is ready."""
        status = self.runtime.board.add(spec.name, core=spec.core)
        if not spec.enabled:
            status.state = ServiceState.DISABLED
            task_status.started()
            return
        self._live += 1
        try:
            await self._supervise(spec, status, task_status)
        finally:
            self._live -= 1
            if self._live == 0 and self.runtime.stopping.is_set():
                self._all_done.set()

    async def _supervise(self, spec: ServiceSpec, status: ServiceStatus, task_status: trio.TaskStatus[None]) -> None:
        cfg = self._supervisor_config
        policy = RestartPolicy(initial_s=cfg.restart_initial_s, max_s=cfg.restart_max_s,
                               max_crashes=cfg.max_crashes, window_s=cfg.crash_window_s)
        first = True
        starved, starved_at = 0, -cfg.crash_window_s  # restarts for want of descriptors, and the last one
        while True:
            error: BaseException | None = None
            try:
                async with trio.open_nursery() as nursery:
                    if not spec.graceful:
                        nursery.start_soon(self._cancel_on_stop, nursery.cancel_scope)
                    await nursery.start(_run_service, spec, self.runtime)
                    status.state = ServiceState.RUNNING
                    if first:
                        first = False
                        task_status.started()
            except Exception as exc:  # any crash of a service is the supervisor's to handle
                if first:
                    raise  # failed to start: start-up fails, the caller reports it
                error = exc
            if self.runtime.stopping.is_set():
                status.state = ServiceState.STOPPED
                return
            if error is None:
                error = RuntimeError("returned without being asked to stop")
            if out_of_descriptors(error):
                # The process ran out of file descriptors: the load's doing (a crowd of LAN
                # connections, docs/hardening.md), not a bug of this service. Restart it after
                # a doubling pause, without using its crash budget, and log one line, no traceback.
                now = trio.current_time()
                starved = starved + 1 if now - starved_at < cfg.crash_window_s else 1
                starved_at = now
                restart_in_s = min(cfg.restart_max_s, _STARVED_MAX_S, cfg.restart_initial_s * 2 ** min(starved - 1, 16))
                status.last_error = _describe(error)
                log.warning("service %s stopped for want of file descriptors (%s); restarting in %g s", spec.name,
                            status.last_error, restart_in_s)
                self.runtime.metrics.inc("service_descriptor_restarts", service=spec.name)
            else:
                status.crashes += 1
                status.last_error = _describe(error)
                log.error("service %s crashed: %s", spec.name, status.last_error, exc_info=error)
                self.runtime.metrics.inc("service_crashes", service=spec.name)
                decision = policy.on_crash(trio.current_time())
                if decision.restart_in_s is None:
                    status.state = ServiceState.FAILED
                    log.error("service %s failed: %d crashes within %g s; left down", spec.name,
                              decision.crashes_in_window, policy.window_s)
                    if spec.core:
                        raise FatalServiceError(f"core service {spec.name} failed: {status.last_error}") from error
                    return
                restart_in_s = decision.restart_in_s
            status.state = ServiceState.RESTARTING
            with trio.move_on_after(restart_in_s):
                await self.runtime.stopping.wait()
            if self.runtime.stopping.is_set():
                status.state = ServiceState.STOPPED
                return
            status.state = ServiceState.STARTING

    async def _cancel_on_stop(self, scope: trio.CancelScope) -> None:
        await self.runtime.stopping.wait()
        scope.cancel()

    async def watch_signals(self, root: trio.CancelScope, *, task_status: trio.TaskStatus[None]) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for signum in signals:
                if self.runtime.stopping.is_set():
                    log.warning("second %s: stopping now", signal.Signals(signum).name)
                    root.cancel()
                    return
                log.info("%s received: stopping", signal.Signals(signum).name)
                self.runtime.stopping.set()

    async def watchdog(self, interval_s: float) -> None:
        """WATCHDOG=1 every interval while no core service is down: a wedged loop or a dead
        core service stops the pings and systemd restarts the box."""
        while True:
            core_down = [s for s in self.runtime.board.all()
                         if s.core and s.state not in (ServiceState.RUNNING, ServiceState.DISABLED)]
            if not core_down:
                self.notifier.notify("WATCHDOG=1")
            await trio.sleep(interval_s)

    async def run(self, specs: Sequence[ServiceSpec], *, task_status: trio.TaskStatus[Runtime]) -> None:
        runtime = self.runtime
        deadline = runtime.config.supervisor.shutdown_deadline_s
        published: Path | None = None
        unwatch: Callable[[], None] | None = None
        if self.watch_loop:
            hand_back_the_gil()  # from the start: services start threads of their own
        try:
            async with trio.open_nursery() as root:
                await root.start(self.watch_signals, root.cancel_scope)
                for spec in specs:
                    await root.start(self.supervise, spec)
                    if runtime.stopping.is_set():
                        break
                if not runtime.stopping.is_set():
                    if self.settle_heap:
                        # Before anyone hears "ready": the collection stops the loop (50-400 ms
                        # measured here), which a client that came on the news would wait out.
                        frozen = heap.settle()
                        log.debug("start-up heap frozen: %d objects no collection scans again", frozen)
                    log.info("ready: %s", ", ".join(f"{k}={v}" for k, v in runtime.ports.items()))
                    if self.publish:
                        published = await trio.to_thread.run_sync(_publish, runtime)
                    if self.watch_loop:
                        unwatch = self._watch(root)
                    self.notifier.notify("READY=1\nSTATUS=serving")
                    runtime.ready.set()
                    task_status.started(runtime)
                    interval = watchdog_interval_s()
                    if interval is not None:
                        root.start_soon(self.watchdog, interval)
                await runtime.stopping.wait()
                self.notifier.notify("STOPPING=1\nSTATUS=stopping")
                if self._live:
                    with trio.move_on_after(deadline):
                        await self._all_done.wait()
                if self._live:
                    log.warning("stop deadline of %g s passed; cancelling what is left", deadline)
                root.cancel_scope.cancel()
        finally:
            if published is not None:
                withdraw(published)
            if unwatch is not None:
                unwatch()
        log.info("stopped")

    def _watch(self, nursery: trio.Nursery) -> Callable[[], None]:
        """The loop's stalls and the collector's pauses as gauges, from now on (the start-up
        is not counted: only the box serving); returns what stops the collector's count."""
        lag, collector, m = LoopLag(), heap.GcWatch(), self.runtime.metrics
        m.gauge("loop_stalls", f"wake-ups of a {TICK_S:g} s timer on the event loop {STALL_S:g} s late or later "
                "since ready: every task waited that long", lambda: float(lag.stalls))
        m.gauge("loop_longest_stall_seconds", "the latest such a timer woke since ready",
                lambda: round(lag.longest_s, 4))
        m.gauge("gc_collections", "collections of Python's cyclic GC since ready, by generation",
                lambda: [({"generation": str(g)}, float(n)) for g, n in enumerate(collector.collections)])
        m.gauge("gc_longest_pause_seconds",
                "the longest collection since ready, by generation (no task runs meanwhile)",
                lambda: [({"generation": str(g)}, round(s, 4)) for g, s in enumerate(collector.longest_s)])
        nursery.start_soon(watch_loop, lag)
        return collector.install()


def _publish(runtime: Runtime) -> Path | None:
    """Tell the tools on this machine where this box listens (``appliance health`` and
    friends find it with no options). A box that cannot write the file still runs."""
    config = runtime.config
    try:
        return publish(appliance_id=runtime.appliance_id, bind=config.lan.bind, ports=runtime.ports,
                       state_dir=config.storage.dir, config=to_toml_dict(config))
    except OSError as exc:
        log.warning("the tools will not find this box by themselves: cannot write its port file: %s", exc)
        return None


async def _run_service(spec: ServiceSpec, runtime: Runtime, *, task_status: trio.TaskStatus[None]) -> None:
    async def wrapped(*, task_status: trio.TaskStatus[Any]) -> None:
        await spec.run(runtime, task_status=task_status)

    async with trio.open_nursery() as nursery:
        await nursery.start(wrapped)
        task_status.started()


_NO_DESCRIPTORS: Final = frozenset({errno.EMFILE, errno.ENFILE})
# A service stopped for want of descriptors is tried again at least this often: once the
# crowd has gone, it is back within seconds (docs/hardening.md).
_STARVED_MAX_S: Final = 10.0


def out_of_descriptors(exc: BaseException) -> bool:
    """Whether ``exc`` (a group: every exception in it) comes of the process or the system
    running out of file descriptors, directly or as the cause of the exception raised."""
    if isinstance(exc, BaseExceptionGroup):
        return all(out_of_descriptors(e) for e in exc.exceptions)
    seen: BaseException | None = exc
    for _ in range(8):  # a short chain of translations (raise X from OSError) at most
        if seen is None:
            return False
        if isinstance(seen, OSError) and seen.errno in _NO_DESCRIPTORS:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        return _describe(exc.exceptions[0])
    return f"{type(exc).__name__}: {exc}"


async def open_runtime(config: Config, *, port_offset: int = 0, log_ring: LogRing | None = None) -> Runtime:
    """Open storage (creating and migrating it) and build the runtime every service shares."""
    state_dir = Path(config.storage.dir)
    if config.update.enabled:
        # Before anything opens the database: a new slot on trial snapshots it; the old slot
        # back after a failed trial restores it (docs/updates.md).
        await trio.to_thread.run_sync(prepare_storage, config)
    db = await Database.open(state_dir / DATABASE_FILE)
    try:
        box_id = await db.write(appliance_id)
        admin = await trio.to_thread.run_sync(load_credential, state_dir, config.admin.token)
        box_key = await trio.to_thread.run_sync(load_box_key, state_dir)
    except BaseException:
        db.close()
        raise
    ports = config.lan.ports.with_offset(port_offset)
    runtime = Runtime(config=config, db=db, appliance_id=box_id, admin=admin, ports=BoundPorts(ports),
                      keys=KeyRing(box_key, declared={d.id: d.key for d in config.devices}), log_ring=log_ring)
    log.info("signed device requests: the %s check (%s)", runtime.keys.check.name, runtime.keys.check_why)
    _core_metrics(runtime)
    return runtime


def _core_metrics(runtime: Runtime) -> None:
    m = runtime.metrics
    m.gauge("uptime_seconds", "seconds since the appliance process started", runtime.uptime_s)
    m.gauge("service_up", "1 while the supervised service is running, else 0",
            lambda: [({"service": s.name}, 1.0 if s.state is ServiceState.RUNNING else 0.0)
                     for s in runtime.board.all()])
    m.describe_counter("service_crashes", "crashes of a supervised service since start")
    db = runtime.db
    m.gauge("storage_writes", "database writes since start", lambda: float(db.writes))
    m.gauge("storage_commits", "database commits since start: writes that arrive together share one (group commit)",
            lambda: float(db.groups))
    m.gauge("storage_durable_commits", "database commits since start that waited for the disk (an fsync each); "
            "the others hold what the box repairs by itself after a power cut (the device channel's records)",
            lambda: float(db.durable_groups))
    m.gauge("storage_slow_commits", f"database commits since start that took {SLOW_COMMIT_S:g} s or longer "
            "(the COMMIT alone: the disk's write and sync); every write behind one waited as long",
            lambda: float(db.slow_commits))
    m.gauge("storage_longest_commit_seconds", "the longest database commit since start (the COMMIT alone)",
            lambda: round(db.longest_commit_s, 4))
    m.gauge("storage_checkpoints", "WAL checkpoints since start made beside the writer (storage.checkpoints), "
            "so that no commit waits for one", lambda: float(db.checkpoints))
    m.gauge("storage_checkpoints_holding_writer", "of them, those that held the writer for their last pages: "
            "writes so steady that the WAL reached its bound", lambda: float(db.checkpoints_holding_writer))


async def supervise_all(
    runtime: Runtime,
    specs: Sequence[ServiceSpec],
    *,
    notifier: Notifier | None = None,
    publish: bool = False,
    settle_heap: bool = False,
    watch_loop: bool = False,
    task_status: trio.TaskStatus[Runtime] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``specs`` under one supervisor until stopped. started() hands back the runtime.
    With ``publish``, the bound ports are published for the tools (:mod:`appliance.storage.running`)
    while it runs; with ``settle_heap``, the start-up heap is frozen once all services are
    ready (:func:`appliance.services.heap.settle`); with ``watch_loop``, worker threads hand
    the GIL back to the loop within 1 ms from the start, and the loop's stalls and the
    collector's pauses are gauges from READY on (:mod:`appliance.services.loop_lag`): all
    three for the process's own box, not a test's."""
    await _Supervisor(runtime, notifier or Notifier(), publish=publish, settle_heap=settle_heap,
                      watch_loop=watch_loop).run(specs, task_status=task_status)


async def run(
    config: Config,
    *,
    port_offset: int = 0,
    log_ring: LogRing | None = None,
    task_status: trio.TaskStatus[Runtime] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The whole appliance: open storage, run every service, stop cleanly. ``trio.run`` this.
    ``log_ring``: the log ring the caller opened (it closes it); None: the logs.ring service
    opens one."""
    runtime = await open_runtime(config, port_offset=port_offset, log_ring=log_ring)
    try:
        await supervise_all(runtime, service_specs(runtime), notifier=Notifier(), publish=True, settle_heap=True,
                            watch_loop=True, task_status=task_status)
    finally:
        runtime.db.close()
