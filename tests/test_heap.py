"""The start-up heap is frozen once the box is up (appliance.services.heap): Python's full
collections no longer scan it, and what is made later is still collected.

Each test unfreezes in its teardown, so the rest of the test process is not affected.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from functools import partial

import pytest
import trio

from appliance.services import heap
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
    assert frozen == gc.get_freeze_count() > 1000  # the modules' objects at least
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
