"""The supervisor's restart policy, failure marking, fatal exit and start-up errors; a
service stopped for want of file descriptors is restarted without counting a crash.

Time is virtual (autojump_clock): backoff delays are asserted exactly.
"""

from __future__ import annotations

import errno
import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from appliance.protocol.restart import RestartPolicy
from appliance.services.board import ServiceState, ServiceStatus
from appliance.services.http import BindError, bind_tcp
from appliance.services.runtime import Runtime
from appliance.services.spec import ServiceSpec
from appliance.supervisor import FatalServiceError, open_runtime, out_of_descriptors, supervise_all
from tests.conftest import ConfigFactory


class Crash(Exception):
    pass


def crashing(times: int, log: list[float]) -> Callable[..., Any]:
    """A service that crashes ``times`` times after starting, then runs until cancelled."""

    async def run(runtime: Runtime, *, task_status: trio.TaskStatus[None]) -> None:
        log.append(trio.current_time())
        task_status.started()
        if len(log) <= times:
            raise Crash(f"crash {len(log)}")
        await trio.sleep_forever()

    return run


async def steady(runtime: Runtime, *, task_status: trio.TaskStatus[None]) -> None:
    task_status.started()
    await trio.sleep_forever()


@pytest.fixture
async def runtime(make_config: ConfigFactory) -> AsyncIterator[Runtime]:
    rt = await open_runtime(make_config(supervisor={"restart_initial_s": 1.0, "restart_max_s": 8.0,
                                                    "max_crashes": 3, "crash_window_s": 60.0}))
    yield rt
    rt.db.close()


@asynccontextmanager
async def running_for(runtime: Runtime, spec: ServiceSpec,
                      seconds: float) -> AsyncIterator[tuple[float, ServiceStatus]]:
    """Supervise ``spec`` for ``seconds`` (virtual); the start time and its status, then stop."""
    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        await nursery.start(lambda task_status: supervise_all(runtime, [spec], task_status=task_status))
        await trio.sleep(seconds)
        status = runtime.board.get(spec.name)
        assert status is not None
        yield t0, status
        runtime.stopping.set()


def test_restart_policy_table() -> None:
    policy = RestartPolicy(initial_s=1, max_s=4, max_crashes=3, window_s=10)
    assert [policy.on_crash(t).restart_in_s for t in (0, 1, 2)] == [1, 2, 4]
    assert policy.on_crash(3).restart_in_s is None  # a 4th crash within 10 s: failed
    fresh = RestartPolicy(initial_s=1, max_s=4, max_crashes=3, window_s=10)
    assert [fresh.on_crash(t).restart_in_s for t in (0, 20, 40, 60)] == [1, 1, 1, 1]  # old crashes age out


async def test_service_that_crashes_twice_then_works(runtime: Runtime, autojump_clock: trio.testing.MockClock) -> None:
    starts: list[float] = []
    async with running_for(runtime, ServiceSpec(name="flaky", run=crashing(2, starts), core=False), 30) as (t0, status):
        assert status.state is ServiceState.RUNNING
        assert status.crashes == 2
        # Restarted after exactly 1 s, then 2 s (exponential).
        assert [s - t0 for s in starts] == [0, 1, 3]
        assert runtime.metrics.value("service_crashes", service="flaky") == 2
    assert status.state is ServiceState.STOPPED


def starving(times: int, log: list[float]) -> Callable[..., Any]:
    """A service whose work fails ``times`` times for want of file descriptors, the way a
    directory scan or a connection fails under a crowd (the error wrapped once, as a
    service's own error type would), then runs until cancelled."""

    async def run(runtime: Runtime, *, task_status: trio.TaskStatus[None]) -> None:
        log.append(trio.current_time())
        task_status.started()
        if len(log) <= times:
            try:
                raise OSError(errno.EMFILE, "Too many open files")
            except OSError as exc:
                raise Crash("scan failed") from exc
        await trio.sleep_forever()

    return run


async def test_running_out_of_descriptors_is_not_a_crash(runtime: Runtime,
                                                        autojump_clock: trio.testing.MockClock) -> None:
    # Ten times in a row (the budget is 3 crashes a minute): restarted after a doubling pause
    # capped at 10 s (8 s here), never failed, no crash counted.
    starts: list[float] = []
    spec = ServiceSpec(name="starved", run=starving(10, starts), core=True)
    async with running_for(runtime, spec, 200) as (t0, status):
        assert status.state is ServiceState.RUNNING and status.crashes == 0
        gaps = [b - a for a, b in itertools.pairwise([t0, *starts])][1:]
        assert gaps == [1, 2, 4, 8, 8, 8, 8, 8, 8, 8]  # restart_max_s is 8 here
        assert runtime.metrics.value("service_descriptor_restarts", service="starved") == 10
        assert runtime.metrics.value("service_crashes", service="starved") == 0
    assert out_of_descriptors(BaseExceptionGroup("g", [OSError(errno.ENFILE, "x"), OSError(errno.EMFILE, "y")]))
    assert not out_of_descriptors(BaseExceptionGroup("g", [OSError(errno.EMFILE, "x"), Crash("a bug")]))
    assert not out_of_descriptors(OSError(errno.ENOENT, "x"))


async def test_always_crashing_service_is_marked_failed_others_keep_serving(
    make_config: ConfigFactory,
) -> None:
    # Real sockets and real time here (autojump would skip ahead while a request is in a
    # thread); the restart delays are set to milliseconds.
    rt = await open_runtime(make_config(supervisor={"restart_initial_s": 0.001, "restart_max_s": 0.004,
                                                    "max_crashes": 3, "crash_window_s": 60.0}))
    from appliance.services.assembly import service_specs

    starts: list[float] = []
    last_start = trio.Event()

    async def doomed_run(runtime: Runtime, *, task_status: trio.TaskStatus[None]) -> None:
        starts.append(trio.current_time())
        task_status.started()
        if len(starts) == 4:  # max_crashes 3: this crash is the one that marks it failed
            last_start.set()
        raise Crash(f"crash {len(starts)}")

    specs = [*service_specs(rt), ServiceSpec(name="doomed", run=doomed_run, core=False)]
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: supervise_all(rt, specs, task_status=task_status))
            doomed = rt.board.get("doomed")
            assert doomed is not None
            with trio.fail_after(10):
                await last_start.wait()
            await trio.testing.wait_all_tasks_blocked()  # the supervisor has handled that crash
            assert doomed.state is ServiceState.FAILED
            assert len(starts) == 4  # first start + 3 restarts, then failed
            async with httpx.AsyncClient() as client:
                ready = await client.get(f"http://127.0.0.1:{rt.ports['ops']}/readyz")
                assert ready.status_code == 503
                assert any("doomed failed" in r for r in ready.json()["reasons"])
                home = await client.get(f"http://127.0.0.1:{rt.ports['admin']}/")
                assert home.status_code == 200 and "doomed" in home.text and "failed" in home.text
                status = (await client.get(f"http://127.0.0.1:{rt.ports['admin']}/api/status")).json()
                assert {s["name"]: s["state"] for s in status["services"]}["doomed"] == "failed"
            rt.stopping.set()
    finally:
        rt.db.close()


async def test_core_service_failing_for_good_ends_the_process(
    runtime: Runtime, autojump_clock: trio.testing.MockClock
) -> None:
    starts: list[float] = []
    specs = [ServiceSpec(name="steady", run=steady), ServiceSpec(name="core", run=crashing(10**6, starts), core=True)]
    fatal = pytest.RaisesExc(FatalServiceError, match="core service core failed")
    with pytest.RaisesGroup(fatal, flatten_subgroups=True):
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: supervise_all(runtime, specs, task_status=task_status))
    assert len(starts) == 4


async def test_startup_failure_propagates_and_nothing_is_left_running(runtime: Runtime) -> None:
    async def broken(runtime: Runtime, *, task_status: trio.TaskStatus[None]) -> None:
        raise Crash("cannot start")

    specs = [ServiceSpec(name="steady", run=steady), ServiceSpec(name="broken", run=broken)]
    with pytest.RaisesGroup(pytest.RaisesExc(Crash, match="cannot start"), flatten_subgroups=True):
        await supervise_all(runtime, specs)


async def test_disabled_service_is_shown_not_run(runtime: Runtime, autojump_clock: trio.testing.MockClock) -> None:
    starts: list[float] = []
    specs = [ServiceSpec(name="off", run=crashing(0, starts), enabled=False)]
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: supervise_all(runtime, specs, task_status=task_status))
        assert runtime.board.get("off").state is ServiceState.DISABLED  # type: ignore[union-attr]
        assert runtime.board.not_ready() == []
        runtime.stopping.set()
    assert starts == []


async def test_port_in_use_is_one_clear_bind_error() -> None:
    holder = bind_tcp("127.0.0.1", 0, role="holder")
    port = holder.getsockname()[1]
    try:
        with pytest.raises(BindError) as info:
            bind_tcp("127.0.0.1", port, role="api")
    finally:
        holder.close()
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message and "api service" in message and "--port-offset" in message
    assert "\n" not in message


async def test_graceful_stop_lets_an_in_flight_request_finish(make_config: ConfigFactory) -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from appliance.services.http import run_listener

    entered = trio.Event()
    release = trio.Event()

    async def slow(request: Request) -> PlainTextResponse:
        entered.set()
        await release.wait()
        return PlainTextResponse("finished")

    app = Starlette(routes=[Route("/slow", slow)])
    rt = await open_runtime(make_config())
    specs = [ServiceSpec(name="http.api", run=lambda runtime, task_status: run_listener(
        runtime, app, role="api", task_status=task_status), graceful=True)]
    answers: list[str] = []
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: supervise_all(rt, specs, task_status=task_status))

            async def request() -> None:
                async with httpx.AsyncClient() as client:
                    answers.append((await client.get(f"http://127.0.0.1:{rt.ports['api']}/slow")).text)

            nursery.start_soon(request)
            with trio.fail_after(5):
                await entered.wait()
            rt.stopping.set()  # what SIGTERM does
            await trio.testing.wait_all_tasks_blocked()  # the server has begun its graceful stop
            release.set()
    finally:
        rt.db.close()
    assert answers == ["finished"]
    assert rt.board.get("http.api").state is ServiceState.STOPPED  # type: ignore[union-attr]


async def test_metrics_are_prometheus_text(appliance: Runtime) -> None:
    async with httpx.AsyncClient() as client:
        answer = await client.get(f"http://127.0.0.1:{appliance.ports['ops']}/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    lines = answer.text.splitlines()
    assert "# TYPE appliance_service_up gauge" in lines
    assert 'appliance_service_up{service="http.ops"} 1' in lines
    assert "# TYPE appliance_service_crashes_total counter" in lines
