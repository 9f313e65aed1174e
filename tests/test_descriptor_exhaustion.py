"""Descriptor exhaustion against the real process: ``accept`` fails with EMFILE, the box
degrades and comes back by itself, and nothing crashes (docs/hardening.md).

The process sizes its listeners' caps from its descriptor limit at start, so that the
listeners alone cannot exhaust it. To force exhaustion anyway, the test lowers the running
process's limit (``prlimit``) to 40 above what it has open, then opens connections to
every listener until the process holds its last descriptor and ``accept`` fails. While it
lasts, the connections already accepted are still answered, and the services whose work
needs a descriptor (the media shelf's scan, a health check's log ring) fail and are tried
again without counting a crash. Once the connections close, the descriptors come back at
once, every listener answers, every service runs with 0 crashes, a sale is taken, and the
process stops with exit 0.
"""

from __future__ import annotations

import http.client
import re
import resource
import socket
import time
from contextlib import suppress
from pathlib import Path

import httpx

from appliance.config import LISTENER_ROLES
from benchmarks.soak import descriptors, start_box

TOKEN = "test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HEADROOM = 40  # descriptors left to the process above what it holds at rest


def sale(n: int) -> dict[str, object]:
    return {"id": f"emfile-sale-{n}", "device_id": "pos-1", "currency": "EUR", "total_cents": 250,
            "lines": [{"sku": "SKU-1", "qty": 1, "unit_price_cents": 250}],
            "payments": [{"method": "card", "amount_cents": 250}]}


def wait_for(what: str, predicate: object, timeout_s: float) -> float:
    """Poll ``predicate`` until true; how long it took. Fails after ``timeout_s``."""
    started = time.monotonic()
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() - started < timeout_s, f"{what}: not within {timeout_s} s"
        time.sleep(0.05)
    return time.monotonic() - started


def test_running_out_of_descriptors_degrades_the_listeners_and_the_box_comes_back(tmp_path: Path) -> None:
    # A keep-alive long enough that the asking connections outlive the set-up on a slow machine.
    proc, ports, log = start_box(tmp_path, [], token=TOKEN, extra="[http]\nkeep_alive_timeout_s = 60.0\n"
                                 # The media shelf scans its folders often: work that needs descriptors.
                                 "[media]\nscan_interval_s = 0.5\n")
    crowd: list[socket.socket] = []
    asking: list[tuple[http.client.HTTPConnection, str]] = []
    try:
        with httpx.Client(timeout=5, headers=AUTH) as client:
            api = f"http://127.0.0.1:{ports['api']}"
            assert client.post(f"{api}/v1/sales", json=sale(1)).status_code in (200, 201)
        # Keep-alive connections, accepted before the crowd comes, to ask through later.
        asking += [(http.client.HTTPConnection("127.0.0.1", ports[role], timeout=10), path)
                  for role, path in (("ops", "/healthz"), ("admin", "/"), ("admin", "/api/status"), ("ops", "/health"))]
        assert {path: _ask(conn, path) for conn, path in asking} == {
            "/healthz": 200, "/": 200, "/api/status": 200, "/health": 200}
        at_rest = descriptors(proc.pid)
        limit = at_rest + HEADROOM
        resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (limit, limit))

        # Connections to every listener from four addresses, until accept fails for want of
        # descriptors (the rest wait in the listeners' backlogs).
        for n in range(7 * HEADROOM):
            sock = socket.socket()
            sock.setblocking(False)
            sock.bind((f"127.0.0.{2 + n % 4}", 0))
            with suppress(BlockingIOError):
                sock.connect(("127.0.0.1", ports[LISTENER_ROLES[n % len(LISTENER_ROLES)]]))
            crowd.append(sock)
        wait_for("the process at its descriptor limit", lambda: descriptors(proc.pid) >= limit, 10)
        wait_for("accept failing", lambda: "out of descriptors (Too many open files)" in log.read_text(), 10)

        # Exhausted: connections accepted before are still served, requests whose work needs
        # descriptors included (a forced run of every health check: loopback probes, files).
        answers = {path: _ask(conn, path) for conn, path in asking}
        assert all(status in (200, 503) for status in answers.values()), answers
        print("answers while exhausted:", answers)
        time.sleep(4)  # long enough for the services that need a descriptor to fail a few times
        assert proc.poll() is None
        assert descriptors(proc.pid) >= limit - 2  # still exhausted, by the crowd

        # The crowd leaves: its descriptors come back at once (not after the idle timer).
        for sock in crowd:
            sock.close()
        crowd.clear()
        back = wait_for("descriptors back", lambda: descriptors(proc.pid) <= at_rest + 5, 5)
        with httpx.Client(timeout=5, headers=AUTH) as client:
            for role in LISTENER_ROLES:
                assert client.get(f"http://127.0.0.1:{ports[role]}/healthz").status_code == 200, role
            assert client.post(f"{api}/v1/sales", json=sale(2)).status_code in (200, 201)
            assert client.get(f"{api}/v1/sales/emfile-sale-2").status_code == 200

            def every_service_running() -> bool:
                services = client.get(f"http://127.0.0.1:{ports['admin']}/api/status").json()["services"]
                assert all(s["crashes"] == 0 for s in services), services
                return all(s["state"] in ("running", "disabled") for s in services)

            wait_for("every service running", every_service_running, 15)
        text = log.read_text()
        # The media shelf's scan failed for want of descriptors (else the test forced nothing
        # beyond accept) and was tried again, never counted as a crash.
        assert "service media stopped for want of file descriptors" in text, text[-3000:]
        assert " crashed: " not in text, text[-3000:]
        print(f"descriptors back to rest in {back * 1000:.0f} ms; services restarted for want of descriptors: "
              f"{text.count('stopped for want of file descriptors')}")
        # One line a minute per listener at most, however long accept kept failing.
        assert len(re.findall(r"listener: out of descriptors", text)) <= len(LISTENER_ROLES)
        assert back < 5
    finally:
        for sock in crowd:
            sock.close()
        for conn, _path in asking:
            conn.close()
        proc.terminate()
        assert proc.wait(15) == 0, log.read_text()[-3000:]


def _ask(conn: http.client.HTTPConnection, path: str) -> int:
    # POST /health: a forced run of every health check (the others read the cache).
    conn.request("POST" if path == "/health" else "GET", path, headers={"Host": "127.0.0.1", **AUTH})
    answer = conn.getresponse()
    answer.read()
    return answer.status
