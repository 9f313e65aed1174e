"""Real broadcast discovery across network namespaces this test makes (root only).

    dev1 10.231.1.2/24 --- 10.231.1.1 box 10.231.2.1 --- 192.168.77.2/24 dev2

The box (``appliance run`` as a subprocess, discovery on, beacons to both veth broadcast
addresses) has two interfaces. dev1 is a well-configured device; dev2 has an address in
the wrong subnet for its link (a mistyped static address), the case where a route lookup
would name an unreachable address or none at all. Each device runs ``appliance discover``
(broadcast only): each must be answered with the box's address on its own link. A small
device script in dev1 also hears a beacon and gets its probe registered. Addresses exist
only inside the namespaces; they are deleted in a ``finally``.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from appliance.config import LISTENER_ROLES
from tests.netns import IP, why_no_namespaces

from .conftest import test_config_data

pytestmark = [pytest.mark.netns, pytest.mark.slow]

BOX1, DEV1 = "10.231.1.1", "10.231.1.2"
BOX2, DEV2 = "10.231.2.1", "192.168.77.2"  # dev2's address does not fit its link
DISCOVERY_PORT = 57854  # the real port: nothing else lives in these namespaces
BIN = Path(sys.executable).parent


_REASON = why_no_namespaces()
if _REASON:
    pytestmark.append(pytest.mark.skip(reason=_REASON))


def run(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=timeout)


def toml(data: dict[str, Any], prefix: str = "") -> str:
    """Enough TOML for the test config: tables, strings, numbers, booleans, string lists."""
    scalars, tables = [], []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append(toml(value, f"{prefix}{key}."))
        elif isinstance(value, bool):
            scalars.append(f"{key} = {'true' if value else 'false'}")
        else:
            scalars.append(f"{key} = {json.dumps(value)}")
    head = f"[{prefix[:-1]}]\n" if prefix and scalars else ""
    return head + "".join(f"{line}\n" for line in scalars) + "".join(tables)


# A device in a namespace: listens on the discovery port (for beacons), probes by
# broadcast, prints the reply and the first beacon as JSON.
DEVICE = textwrap.dedent("""
    import json, socket, sys, time
    sys.path[:0] = [sys.argv[1]]
    from appliance.protocol import discovery as wire
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    s.bind(("0.0.0.0", int(sys.argv[2])))
    probe = wire.Probe(device_id="pos-ns", kind="pos", name="Till in a namespace", port=8081, nonce="ns-nonce")
    s.sendto(wire.encode(probe), (sys.argv[3], int(sys.argv[2])))
    got, deadline = {}, time.monotonic() + 10
    while len(got) < 2 and time.monotonic() < deadline:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data, source = s.recvfrom(2048)
        except TimeoutError:
            break
        try:
            m = wire.decode(data)
        except wire.DiscoveryError:
            continue
        if isinstance(m, wire.Announce):
            kind = "reply" if m.nonce == "ns-nonce" else "beacon"
            got.setdefault(kind, {"address": m.address, "nonce": m.nonce, "from": source[0],
                                  "ports": dict(m.ports)})
    print(json.dumps(got))
""")


def wait_for_carrier(ns: str, dev: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while "LOWER_UP" not in run(IP, "-n", ns, "link", "show", "dev", dev).stdout:
        assert time.monotonic() < deadline, f"{dev} in {ns} has no carrier after {timeout_s} s"
        time.sleep(0.05)


class Lan:
    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.tag = tag
        self.box, self.dev1, self.dev2 = f"chub-box-{tag}", f"chub-d1-{tag}", f"chub-d2-{tag}"
        self.made: list[str] = []

    def create(self) -> None:
        for ns in (self.box, self.dev1, self.dev2):
            run(IP, "netns", "add", ns)
            self.made.append(ns)
            run(IP, "-n", ns, "link", "set", "lo", "up")
            # Strict reverse-path filtering would drop dev2's packets before discovery sees them;
            # it is off by default, and set so here whatever the host's defaults.
            for conf in ("all", "default"):
                run(IP, "netns", "exec", ns, "sysctl", "-qw", f"net.ipv4.conf.{conf}.rp_filter=0")
        for n, side, box_addr, dev_addr in ((1, self.dev1, BOX1, DEV1), (2, self.dev2, BOX2, DEV2)):
            a, b = f"cb{n}{self.tag}", f"cd{n}{self.tag}"
            run(IP, "link", "add", a, "netns", self.box, "type", "veth", "peer", "name", b, "netns", side)
            run(IP, "-n", self.box, "addr", "add", f"{box_addr}/24", "brd", "+", "dev", a)
            run(IP, "-n", self.box, "link", "set", a, "up")
            run(IP, "-n", side, "addr", "add", f"{dev_addr}/24", "brd", "+", "dev", b)
            run(IP, "-n", side, "link", "set", b, "up")
            # A veth end has carrier (IFF_RUNNING) only once both ends are up, a moment later;
            # the box and `appliance discover` skip interfaces without it.
            for ns, dev in ((self.box, a), (side, b)):
                wait_for_carrier(ns, dev)

    def destroy(self) -> None:
        for ns in self.made:
            run(IP, "netns", "del", ns, check=False)


def start_box(lan: Lan, tmp_path: Path) -> subprocess.Popen[bytes]:
    state = tmp_path / "state"
    data = test_config_data(state)
    data["lan"]["bind"] = "0.0.0.0"  # to hear broadcasts
    data["lan"]["ports"]["discovery"] = DISCOVERY_PORT
    data["discovery"] = {"enabled": True, "interval_s": 1.0, "broadcast": ["10.231.1.255", "10.231.2.255"]}
    config = tmp_path / "box.toml"
    config.write_text(toml(data))
    # READY=1 arrives on this socket once every service is up (a path socket: it crosses namespaces).
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_path = tmp_path / "notify"
    notify.bind(str(notify_path))
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path)}
    with (tmp_path / "box.log").open("wb") as log:  # the child keeps its own copy
        proc = subprocess.Popen([IP, "netns", "exec", lan.box, sys.executable, "-m", "appliance", "run",
                                 "--config", str(config)], env=env, stdout=subprocess.DEVNULL, stderr=log)
    notify.settimeout(30)
    try:
        while b"READY=1" not in notify.recv(4096):
            pass
    except TimeoutError:
        proc.kill()
        proc.wait()
        raise AssertionError("the box did not get ready: " + (tmp_path / "box.log").read_text()[-2000:]) from None
    finally:
        notify.close()
    return proc


def stop_box(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, as systemd stops it; killed only if it does not end within 15 s."""
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def discover(ns: str) -> list[dict[str, Any]]:
    result = run(IP, "netns", "exec", ns, str(BIN / "appliance"), "discover", "--json", "--timeout", "2",
                 check=False)
    assert result.returncode == 0, result.stderr
    boxes: list[dict[str, Any]] = json.loads(result.stdout)
    return boxes


def test_broadcast_discovery_across_namespaces(tmp_path: Path) -> None:
    lan = Lan()
    proc: subprocess.Popen[bytes] | None = None
    try:
        lan.create()
        proc = start_box(lan, tmp_path)

        (box1,) = discover(lan.dev1)
        assert box1["address"] == BOX1
        assert box1["replied_from"] == f"{BOX1}:{DISCOVERY_PORT}"
        assert box1["ports"]["discovery"] == DISCOVERY_PORT and box1["ports"]["admin"] != 0

        # The mis-addressed device is told the box's address on its own link, and the
        # answer reaches it although the box has no route to 192.168.77.2.
        (box2,) = discover(lan.dev2)
        assert box2["address"] == BOX2
        assert box2["replied_from"] == f"{BOX2}:{DISCOVERY_PORT}"
        assert box2["appliance_id"] == box1["appliance_id"]

        # A device: its broadcast probe is answered and registered, and it hears a beacon.
        source = str(Path(__file__).resolve().parent.parent)
        out = run(IP, "netns", "exec", lan.dev1, sys.executable, "-c", DEVICE, source, str(DISCOVERY_PORT),
                  "10.231.1.255")
        got = json.loads(out.stdout)
        assert got["reply"]["address"] == BOX1 and got["reply"]["from"] == BOX1
        assert got["beacon"]["address"] == BOX1 and got["beacon"]["nonce"] is None
        assert got["beacon"]["ports"] == box1["ports"]

        db = sqlite3.connect(f"file:{tmp_path / 'state' / 'appliance.db'}?mode=ro", uri=True)
        try:
            deadline = time.monotonic() + 10
            row = None
            while row is None and time.monotonic() < deadline:
                row = db.execute("SELECT address, port, state FROM devices WHERE id = 'pos-ns'").fetchone()
                if row is None:
                    time.sleep(0.05)  # another process writes it: no event reaches this one
            assert row == (DEV1, 8081, "pending")
            assert db.execute("SELECT count(*) FROM devices").fetchone()[0] == 1  # tools are not registered
        finally:
            db.close()
    finally:
        if proc is not None:
            stop_box(proc)
        lan.destroy()
    assert proc.returncode == 0, (tmp_path / "box.log").read_text()[-2000:]


# A crowd in dev1: 1,100 connections from four more addresses of dev1's link, spread over
# every listener, each sending one byte of a head that never completes; prints "held" and
# keeps them until its stdin closes.
CROWD = textwrap.dedent("""
    import json, socket, sys
    from contextlib import suppress
    box, ports, sources = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3].split(",")
    held = []
    for n in range(1100):
        s = socket.socket()
        s.setblocking(False)
        s.bind((sources[n % len(sources)], 0))
        with suppress(BlockingIOError):
            s.connect((box, ports[n % len(ports)]))
        held.append(s)
    import time; time.sleep(0.5)
    for s in held:
        with suppress(OSError):
            s.send(b"P")
    print("held", flush=True)
    sys.stdin.read()
""")

# From dev1's own address: every listener's /healthz, the slowest answer in seconds.
HEALTHZ = textwrap.dedent("""
    import json, sys, time, urllib.request
    slowest = 0.0
    for port in json.loads(sys.argv[2]):
        started = time.monotonic()
        with urllib.request.urlopen(f"http://{sys.argv[1]}:{port}/healthz", timeout=5) as answer:
            assert answer.status == 200, (port, answer.status)
        slowest = max(slowest, time.monotonic() - started)
    print(slowest)
""")


def test_discovery_stays_up_while_slow_connections_crowd_every_listener(tmp_path: Path) -> None:
    """The hostile-LAN case with discovery on: a crowd of slow connections from the
    devices' own link (the per-source cap resets what is over it, the rest are held open),
    and the box still answers probes there, and every listener's /healthz within a second;
    after the crowd goes, every service runs, none crashed, and probes are still answered."""
    lan = Lan()
    proc: subprocess.Popen[bytes] | None = None
    crowd: subprocess.Popen[str] | None = None
    try:
        lan.create()
        proc = start_box(lan, tmp_path)
        (box1,) = discover(lan.dev1)
        listener_ports = json.dumps([box1["ports"][role] for role in LISTENER_ROLES])
        sources = [f"10.231.1.{n}" for n in range(3, 7)]
        dev1_if = f"cd1{lan.tag}"
        for address in sources:
            run(IP, "-n", lan.dev1, "addr", "add", f"{address}/24", "dev", dev1_if)
        crowd = subprocess.Popen([IP, "netns", "exec", lan.dev1, sys.executable, "-c", CROWD, BOX1,
                                  listener_ports, ",".join(sources)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert crowd.stdout is not None and crowd.stdout.readline().strip() == "held"

        (during,) = discover(lan.dev1)
        assert during["address"] == BOX1 and during["appliance_id"] == box1["appliance_id"]
        slowest = float(run(IP, "netns", "exec", lan.dev1, sys.executable, "-c", HEALTHZ, BOX1,
                            listener_ports).stdout)
        assert slowest < 1.0, slowest

        assert crowd.stdin is not None
        crowd.stdin.close()
        crowd.wait(timeout=30)
        fetch = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())"
        status = run(IP, "netns", "exec", lan.dev1, sys.executable, "-c", fetch,
                     f"http://{BOX1}:{box1['ports']['admin']}/api/status").stdout
        services = json.loads(status)["services"]
        assert all(s["state"] in ("running", "disabled") and s["crashes"] == 0 for s in services), services
        (after,) = discover(lan.dev1)
        assert after["address"] == BOX1
        assert proc.poll() is None
    finally:
        if crowd is not None:
            if crowd.poll() is None:
                crowd.kill()
                crowd.wait()
            assert crowd.stdout is not None
            crowd.stdout.close()
        if proc is not None:
            stop_box(proc)
        lan.destroy()
    assert proc.returncode == 0, (tmp_path / "box.log").read_text()[-2000:]
