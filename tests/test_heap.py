"""The start-up heap is frozen once the box is up (appliance.services.heap): Python's full
collections no longer scan it, and what is made later is still collected. And the gauges
that show stalls on a running box: the loop's late timer, the collector's pauses.

Each test unfreezes in its teardown, so the rest of the test process is not affected.
"""

from __future__ import annotations

import gc
import sys
import weakref
from collections.abc import Iterator
from functools import partial

import pytest
import trio
import trio.testing

from appliance.services import heap
from appliance.services.loop_lag import STALL_S, SWITCH_INTERVAL_S, TICK_S, LoopLag, watch_loop
from appliance.services.runtime import Runtime
from appliance.services.spec import ServiceSpec
from appliance.supervisor import open_runtime, supervise_all
from tests.conftest import ConfigFactory


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


class _Node:
    """A cycle-capable object (an instance with a __dict__ is tracked by the collector)."""

    def __init__(self) -> None:
        self.other: _Node | None = None


def _cycle() -> tuple[_Node, _Node]:
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    return a, b


def test_settle_freezes_what_lives_and_later_garbage_is_still_collected(unfrozen: None) -> None:
    old = _Node()
    frozen = heap.settle()
    assert frozen > 1000  # the modules' objects at least
    # Only another freeze adds to the permanent generation; a frozen object freed by its
    # reference count leaves it, and a thread left by an earlier test (the full suite) may
    # free some between the settle and this line.
    assert frozen >= gc.get_freeze_count() > frozen // 2
    # Nothing a full collection walks is older than the settle: the old object is not in
    # any generation (gc.get_objects() lists the generations, not the permanent one).
    assert not any(o is old for o in gc.get_objects())

    a, b = _cycle()
    gone = weakref.ref(a)
    del a, b
    assert gone() is not None  # a cycle: reference counting alone does not free it
    gc.collect()
    assert gone() is None


def test_a_frozen_object_freed_by_its_reference_count_is_freed(unfrozen: None) -> None:
    kept = [_Node()]
    heap.settle()
    gone = weakref.ref(kept[0])
    kept.clear()
    assert gone() is None


async def test_the_process_supervisor_freezes_at_ready_tests_do_not(make_config: ConfigFactory,
                                                                    unfrozen: None) -> None:
    async def steady(runtime: Runtime, *, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        await trio.sleep_forever()

    for settle_heap in (False, True):
        gc.unfreeze()
        runtime = await open_runtime(make_config())
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(partial(supervise_all, runtime, [ServiceSpec(name="steady", run=steady)],
                                            settle_heap=settle_heap))
                assert runtime.ready.is_set()
                if settle_heap:
                    assert gc.get_freeze_count() > 1000
                    assert not any(o is runtime for o in gc.get_objects())  # the runtime is in the frozen heap
                else:
                    assert gc.get_freeze_count() == 0
                runtime.stopping.set()
        finally:
            runtime.db.close()


# --- what shows stalls on a running box: the loop's timer and the collector's pauses ------


def test_gc_watch_counts_collections_by_generation_until_removed() -> None:
    watch = heap.GcWatch()
    remove = watch.install()
    try:
        gc.collect()
        assert watch.collections[2] >= 1 and watch.longest_s[2] > 0.0
        gc.collect(0)
        assert watch.collections[0] >= 1
    finally:
        remove()
    counted = list(watch.collections)
    gc.collect()
    assert watch.collections == counted


async def test_the_loop_watch_counts_a_late_timer_as_a_stall() -> None:
    clock = trio.testing.MockClock()  # moves only when told: the "stall" is the jump below
    lag = LoopLag()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_loop, lag)
            await trio.testing.wait_all_tasks_blocked()
            clock.jump(TICK_S)  # on time
            await trio.testing.wait_all_tasks_blocked()
            assert (lag.stalls, lag.longest_s) == (0, 0.0)
            clock.jump(TICK_S + STALL_S / 2)  # late, not a stall
            await trio.testing.wait_all_tasks_blocked()
            assert lag.stalls == 0 and lag.longest_s == pytest.approx(STALL_S / 2)
            clock.jump(TICK_S + 0.4)  # the loop held 0.4 s past the tick
            await trio.testing.wait_all_tasks_blocked()
            assert lag.stalls == 1 and lag.longest_s == pytest.approx(0.4)
            nursery.cancel_scope.cancel()

    # A run of its own, on the manual clock (pytest-trio's run has its own clock).
    await trio.to_thread.run_sync(partial(trio.run, main, clock=clock))


async def test_the_process_supervisor_shows_stalls_on_metrics(make_config: ConfigFactory, unfrozen: None) -> None:
    async def steady(runtime: Runtime, *, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        await trio.sleep_forever()

    callbacks, interval = len(gc.callbacks), sys.getswitchinterval()
    assert interval == 0.005  # CPython's default, as the tests run
    runtime = await open_runtime(make_config())
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(supervise_all, runtime, [ServiceSpec(name="steady", run=steady)],
                                        watch_loop=True))
            assert len(gc.callbacks) == callbacks + 1
            assert sys.getswitchinterval() == SWITCH_INTERVAL_S
            gc.collect()
            text = runtime.metrics.render()
            for name in ("loop_stalls", "loop_longest_stall_seconds"):
                assert f"\nappliance_{name} " in text
            assert 'appliance_gc_collections{generation="2"} ' in text
            assert 'appliance_gc_collections{generation="2"} 0' not in text  # the collection above
            assert 'appliance_gc_longest_pause_seconds{generation="2"} ' in text
            runtime.stopping.set()
        assert len(gc.callbacks) == callbacks  # removed at stop
    finally:
        runtime.db.close()
        sys.setswitchinterval(interval)
