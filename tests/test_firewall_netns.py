"""The rendered firewall with real traffic, in network namespaces this test makes.

Three namespaces joined by veth pairs, addresses only inside them:

    lan peer 192.168.77.2 --- 192.168.77.1 box 203.0.113.1 --- 203.0.113.2 "internet"

The rendered ruleset is loaded in the box. Small Python listeners and clients run in each
namespace with ``ip netns exec`` (1 s connect timeouts): what the seed opens gets through,
nothing else does. Needs root (CI runs as root); skipped otherwise.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.config import Ports, parse_config
from appliance.health.firewall import Loaded, differences, render_config
from tests.netns import IP, why_no_namespaces

pytestmark = [pytest.mark.netns, pytest.mark.slow]

NFT = shutil.which("nft") or "/usr/sbin/nft"
BOX_LAN, PEER = "192.168.77.1", "192.168.77.2"
BOX_WAN, INTERNET = "203.0.113.1", "203.0.113.2"  # TEST-NET-3: never routed anywhere
PORTS = Ports()


_REASON = why_no_namespaces(NFT)
if _REASON:
    pytestmark.append(pytest.mark.skip(reason=_REASON))


def run(*args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, input=input, timeout=30)


# Runs in a namespace: listen on TCP and UDP ports; TCP accepts and closes, UDP echoes (when
# the namespace's firewall lets the echo out).
SERVER = textwrap.dedent("""
    import socket, sys, threading
    tcp = [int(p) for p in sys.argv[1].split(",") if p]
    udp = [int(p) for p in sys.argv[2].split(",") if p]
    def serve_tcp(s):
        while True:
            c, _ = s.accept(); c.sendall(b"hi"); c.close()
    def serve_udp(s):
        while True:
            data, peer = s.recvfrom(100)
            try:
                s.sendto(data, peer)
            except OSError:  # the box's own firewall refused the answer (EPERM)
                pass
    for p in tcp:
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", p)); s.listen(8); threading.Thread(target=serve_tcp, args=(s,), daemon=True).start()
    for p in udp:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", p))
        threading.Thread(target=serve_udp, args=(s,), daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()
""")

# Runs in a namespace: try each (proto, host, port) at once; print which got through.
CLIENT = textwrap.dedent("""
    import json, socket, sys, threading
    targets = json.loads(sys.argv[1]); result = {}
    def one(proto, host, port):
        key = f"{proto}:{host}:{port}"
        try:
            if proto == "tcp":
                with socket.create_connection((host, port), timeout=1) as c:
                    result[key] = c.recv(2) == b"hi"
            else:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.settimeout(1); s.sendto(b"probe", (host, port))
                    result[key] = s.recvfrom(100)[0] == b"probe"
        except OSError:
            result[key] = False
    threads = [threading.Thread(target=one, args=t) for t in targets]
    [t.start() for t in threads]; [t.join() for t in threads]
    print(json.dumps(result))
""")


class Namespaces:
    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.box, self.lan, self.inet = f"apl-box-{tag}", f"apl-lan-{tag}", f"apl-inet-{tag}"
        self.servers: list[subprocess.Popen[str]] = []
        self._tag = tag

    def create(self) -> None:
        t = self._tag
        for ns in (self.box, self.lan, self.inet):
            run(IP, "netns", "add", ns)
            run(IP, "-n", ns, "link", "set", "lo", "up")
        for side, peer, box_addr, peer_addr in ((self.lan, f"vl{t}", BOX_LAN, PEER),
                                                (self.inet, f"vi{t}", BOX_WAN, INTERNET)):
            run(IP, "link", "add", f"{peer}a", "netns", self.box, "type", "veth", "peer", "name", f"{peer}b",
                "netns", side)
            run(IP, "-n", self.box, "addr", "add", f"{box_addr}/24", "dev", f"{peer}a")
            run(IP, "-n", self.box, "link", "set", f"{peer}a", "up")
            run(IP, "-n", side, "addr", "add", f"{peer_addr}/24", "dev", f"{peer}b")
            run(IP, "-n", side, "link", "set", f"{peer}b", "up")

    def destroy(self) -> None:
        for proc in self.servers:
            proc.kill()
            proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()
        for ns in (self.box, self.lan, self.inet):
            run(IP, "netns", "del", ns, check=False)

    def serve(self, ns: str, tcp: list[int], udp: list[int]) -> None:
        proc = subprocess.Popen([IP, "netns", "exec", ns, sys.executable, "-c", SERVER, ",".join(map(str, tcp)),
                                 ",".join(map(str, udp))], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.servers.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"

    def reach(self, ns: str, targets: list[tuple[str, str, int]]) -> dict[str, bool]:
        out = run(IP, "netns", "exec", ns, sys.executable, "-c", CLIENT, json.dumps(targets)).stdout
        result: dict[str, bool] = json.loads(out)
        return result

    def load(self, config_data: dict[str, Any], tmp: Path) -> None:
        path = tmp / f"rules-{secrets.token_hex(3)}.nft"
        path.write_text(render_config(parse_config(config_data), "test"))
        run(IP, "netns", "exec", self.box, NFT, "-f", str(path))


LAN_IN_OPEN = [PORTS.admin, PORTS.api, PORTS.events, PORTS.media, PORTS.provisioning, PORTS.ops, PORTS.support]
CLOSED = [22, 8006, 8080]


@pytest.fixture(scope="module")
def nets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Namespaces]:
    ns = Namespaces()
    try:
        ns.create()
        ns.serve(ns.box, LAN_IN_OPEN + CLOSED, [PORTS.discovery])
        ns.serve(ns.lan, [PORTS.device, 3128], [PORTS.discovery])
        ns.serve(ns.inet, [443, 80], [])
        # Before any firewall, everything gets through: the blocks below are the firewall's.
        open_before = ns.reach(ns.inet, [("tcp", BOX_WAN, 22), ("tcp", BOX_WAN, PORTS.admin)])
        assert all(open_before.values()), open_before
        ns.load({}, tmp_path_factory.mktemp("nft"))
        yield ns
    finally:
        ns.destroy()


def test_the_lan_reaches_the_listeners_and_discovery_only(nets: Namespaces) -> None:
    targets = [("tcp", BOX_LAN, p) for p in LAN_IN_OPEN + CLOSED] + [("udp", BOX_LAN, PORTS.discovery)]
    got = nets.reach(nets.lan, targets)
    assert got == {f"{proto}:{BOX_LAN}:{port}": (port not in CLOSED) for proto, _, port in targets}


def test_the_internet_reaches_nothing(nets: Namespaces) -> None:
    targets = [("tcp", BOX_WAN, p) for p in LAN_IN_OPEN + CLOSED] + [("udp", BOX_WAN, PORTS.discovery)]
    got = nets.reach(nets.inet, targets)
    assert not any(got.values()), got


def test_the_box_reaches_https_the_devices_and_discovery_only(nets: Namespaces) -> None:
    got = nets.reach(nets.box, [("tcp", INTERNET, 443), ("tcp", INTERNET, 80), ("tcp", PEER, PORTS.device),
                                ("tcp", PEER, 3128), ("udp", PEER, PORTS.discovery)])
    assert got == {f"tcp:{INTERNET}:443": True, f"tcp:{INTERNET}:80": False, f"tcp:{PEER}:{PORTS.device}": True,
                   f"tcp:{PEER}:3128": False, f"udp:{PEER}:{PORTS.discovery}": True}


def test_drops_are_counted_and_the_loaded_table_checks_clean(nets: Namespaces) -> None:
    listing = run(IP, "netns", "exec", nets.box, NFT, "list", "table", "inet", "appliance").stdout
    assert differences(parse_config({}), Loaded(text=listing)) == []
    proc = run(IP, "netns", "exec", nets.box, sys.executable, "-m", "appliance", "firewall", "check", check=False)
    assert (proc.returncode, proc.stdout.strip()) == (0, "the loaded firewall matches the one rendered from "
                                                         "the port map")
    counters = run(IP, "netns", "exec", nets.box, NFT, "list", "counter", "inet", "appliance", "dropped_in").stdout
    assert "packets 0 " not in counters  # the internet's attempts above were counted


def test_with_a_proxy_only_the_proxy_port_goes_out(nets: Namespaces, tmp_path: Path) -> None:
    try:
        nets.load({"wan": {"proxy": f"http://{PEER}:3128"}}, tmp_path)
        got = nets.reach(nets.box, [("tcp", PEER, 3128), ("tcp", INTERNET, 443), ("tcp", PEER, PORTS.device)])
        assert got == {f"tcp:{PEER}:3128": True, f"tcp:{INTERNET}:443": False, f"tcp:{PEER}:{PORTS.device}": True}
        # A proxy given by name: its port is open to the LAN only.
        nets.load({"wan": {"proxy": "http://proxy.shop.lan:3128"}}, tmp_path)
        nets.serve(nets.inet, [3128], [])
        got = nets.reach(nets.box, [("tcp", PEER, 3128), ("tcp", INTERNET, 3128), ("tcp", INTERNET, 443)])
        assert got == {f"tcp:{PEER}:3128": True, f"tcp:{INTERNET}:3128": False, f"tcp:{INTERNET}:443": False}
    finally:
        nets.load({}, tmp_path)


# Runs in a namespace: ``count`` TCP connections to host:port, each kept open; how many got in.
HOLD = textwrap.dedent("""
    import socket, sys
    host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    held, got = [], 0
    for _ in range(count):
        try:
            c = socket.create_connection((host, port), timeout=1)
            held.append(c)
            got += c.recv(2) == b"hi"
        except OSError:
            pass
    print(got)
""")

# Runs in a namespace: a broadcast probe from each source port; which ports heard the box.
BROADCAST = textwrap.dedent("""
    import json, socket, sys
    box, target, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    out = {}
    for sport in (161, 40000):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        s.bind(("0.0.0.0", sport)); s.settimeout(1)
        s.sendto(b"probe", (target, port))
        out[sport] = False
        try:
            while True:
                data, peer = s.recvfrom(100)
                out[sport] = out[sport] or peer[0] == box
        except OSError:
            pass
        s.close()
    print(json.dumps(out))
""")


def test_one_address_over_its_connection_limit_is_dropped(nets: Namespaces, tmp_path: Path) -> None:
    try:
        # One per listener from one address: 7 in all across the TCP listeners.
        nets.load({"http": {"max_connections_per_source": 1}}, tmp_path)
        got = run(IP, "netns", "exec", nets.lan, sys.executable, "-c", HOLD, BOX_LAN, str(PORTS.api), "10").stdout
        assert int(got) == len(LAN_IN_OPEN)
    finally:
        nets.load({}, tmp_path)
    again = run(IP, "netns", "exec", nets.lan, sys.executable, "-c", HOLD, BOX_LAN, str(PORTS.api), "10").stdout
    assert int(again) == 10  # the default limit (32 per listener) is far above


def test_discovery_replies_never_go_to_a_privileged_port(nets: Namespaces) -> None:
    # A reply to a broadcast probe matches no conntrack entry: only the reply rule lets it
    # out, and a forged probe "from" port 161 (SNMP) must not make the box a reflector onto a service.
    out = run(IP, "netns", "exec", nets.lan, sys.executable, "-c", BROADCAST, BOX_LAN, "192.168.77.255",
              str(PORTS.discovery)).stdout
    assert json.loads(out) == {"161": False, "40000": True}
