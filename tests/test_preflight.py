"""The WAN preflight (scripts/preflight): every hop, its failure words, through a real proxy.

The TLS server is real (trustme CA) on loopback; hosts are mapped to it with connect_to,
so no name is resolved and nothing leaves the machine.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from appliance.health.wanprobe import ProbeProxy, Target, exit_code, probe

ROOT = Path(__file__).resolve().parent.parent


class TlsServer:
    """A tiny HTTPS server answering every request with 204, in a thread."""

    def __init__(self, ca: trustme.CA, names: list[str]) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(*names).configure_cert(self.context)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(4096)
                    tls.sendall(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
            except (OSError, ssl.SSLError):
                conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def ca(tmp_path: Path) -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
def server(ca: trustme.CA) -> Iterator[TlsServer]:
    srv = TlsServer(ca, ["api.server.commerce-hub.io", "localhost"])
    yield srv
    srv.close()


def test_all_hops_pass(server: TlsServer, ca_file: str) -> None:
    report = probe(Target("sync", "api.server.commerce-hub.io", connect_to=f"127.0.0.1:{server.port}"),
                   ca_file=ca_file)
    assert [h.hop for h in report.hops] == ["tcp", "tls", "http"]
    assert report.ok and report.hops[-1].message == "HTTP/1.1 204 No Content"


def test_untrusted_certificate_names_the_tls_hop(server: TlsServer) -> None:
    report = probe(Target("sync", "api.server.commerce-hub.io", connect_to=f"127.0.0.1:{server.port}"))
    failed = report.failed_hop
    assert failed is not None and failed.hop == "tls"
    assert "does not verify" in failed.message and "ca_file" in failed.fix
    assert exit_code([report]) == 2


def test_wrong_name_fails_verification(server: TlsServer, ca_file: str) -> None:
    report = probe(Target("x", "other.example", connect_to=f"127.0.0.1:{server.port}"), ca_file=ca_file)
    assert report.failed_hop is not None and report.failed_hop.hop == "tls"


def test_closed_port_names_the_tcp_hop() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    report = probe(Target("sync", "api.server.commerce-hub.io", connect_to=f"127.0.0.1:{port}"), timeout=2)
    assert report.failed_hop is not None and report.failed_hop.hop == "tcp"
    assert "firewall" in report.failed_hop.fix


def test_optional_failures_only_warn() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    report = probe(Target("logs", "api.logmatic.io", required=False, connect_to=f"127.0.0.1:{port}"), timeout=2)
    assert exit_code([report]) == 1


def test_proxy_down_names_the_proxy() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    report = probe(Target("sync", "localhost", 443), proxy=ProbeProxy("127.0.0.1", port), timeout=2)
    assert report.failed_hop is not None and report.failed_hop.hop == "proxy"
    assert f"127.0.0.1:{port}" in report.failed_hop.message


def test_proxy_url_parsing() -> None:
    assert ProbeProxy.parse("http://u:p@10.0.0.1:8080") == ProbeProxy("10.0.0.1", 8080, "u", "p")
    assert ProbeProxy.parse("proxy.lan") == ProbeProxy("proxy.lan", 3128)
    with pytest.raises(ValueError, match="proxy must look like"):
        ProbeProxy.parse("socks5://x:1")


@pytest.mark.skipif(shutil.which("tinyproxy") is None, reason="tinyproxy is not installed (scripts/setup --test)")
def test_through_a_real_proxy(server: TlsServer, ca_file: str, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        proxy_port = s.getsockname()[1]
    log = tmp_path / "tinyproxy.log"
    conf = tmp_path / "tinyproxy.conf"
    conf.write_text(f"Port {proxy_port}\nListen 127.0.0.1\nTimeout 10\nLogFile \"{log}\"\nLogLevel Connect\n"
                    f"MaxClients 10\nAllow 127.0.0.1\nConnectPort {server.port}\nPidFile \"{tmp_path / 'tp.pid'}\"\n")
    proc = subprocess.Popen(["tinyproxy", "-d", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):  # until it listens
            try:
                socket.create_connection(("127.0.0.1", proxy_port), timeout=0.1).close()
                break
            except OSError:
                threading.Event().wait(0.05)
        result = subprocess.run([sys.executable, str(ROOT / "scripts" / "preflight"), "--json", "--proxy",
                                 f"http://127.0.0.1:{proxy_port}", "--ca-file", ca_file,
                                 "--host", f"sync=localhost:{server.port}"],
                                capture_output=True, text=True, timeout=30, check=False)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    report = json.loads(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [h["hop"] for h in report["hosts"][0]["hops"]] == ["tcp", "proxy", "tls", "http"]
    assert f"CONNECT localhost:{server.port}" in log.read_text()


def test_preflight_is_standard_library_only() -> None:
    """It must run on a technician's laptop with a bare Python 3."""
    source = (ROOT / "appliance" / "health" / "wanprobe.py").read_text()
    result = subprocess.run([sys.executable, "-I", "-S", "-c", source.replace('if __name__ == "__main__":',
                                                                               "if False:")],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    assert "import appliance" not in source and "from appliance" not in source
