"""Media serving on 8002 next to Debian's nginx serving the same files from the same disk.

    python -m benchmarks.media [--seconds 10] [--image-clients 50] [--large-clients 4]
                               [--large-mb 100] [--nginx-workers 1]

Two files are put in the box's media cache as the fetcher leaves them (``blobs/<sha256>``
with their database rows and a replica manifest listing them): a 1 MB image and a 100 MB
video. The appliance runs as ``python -m appliance run`` and serves them at
``/media/{key}``; nginx (started here, ``sendfile on``, ``worker_processes`` 1 by default,
as the box is one process) serves the very same files from the same directory. Load comes
from ``wrk`` (keep-alive): the image to 50 clients, the video to 4. Prints the throughput
of each, the ratio, and the box's resident memory before and at its peak during the load.

Goals (issue 12): at least 0.3x nginx for the image, 0.5x for the large file, and the box's
RSS growing by under 30 MB. Needs ``nginx`` and ``wrk`` (``scripts/bench`` installs
``nginx-light`` and ``wrk`` when run as root).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

from benchmarks import _cpus

TOKEN = "bench-token"
IMAGE_KEY = "products/bench-image.jpg"
VIDEO_KEY = "promotions/bench-video.mp4"
CHUNK = 1024 * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_file(path: Path, size: int, seed: bytes) -> str:
    """``size`` pseudo-random bytes (incompressible, like a JPEG or an MP4); returns the sha256."""
    digest = hashlib.sha256()
    with path.open("wb") as f:
        for index in range(0, size, CHUNK):
            block = hashlib.shake_256(seed + index.to_bytes(8, "big")).digest(min(CHUNK, size - index))
            f.write(block)
            digest.update(block)
    return digest.hexdigest()


def _prepare_box(root: Path, port: int, large_bytes: int) -> tuple[Path, Path, dict[str, str]]:
    """The box's state: the manifest, the cached files and their rows; returns the config,
    the blobs directory and key -> sha256."""
    from appliance.storage import Database
    from appliance.storage import media as rows
    from appliance.storage.catalog import ReplicaWrite, apply_changes

    state = root / "state"
    blobs = state / "media" / "blobs"
    blobs.mkdir(parents=True)
    (state / "media" / "partial").mkdir()
    tmp = root / "incoming"
    tmp.mkdir()
    files = {IMAGE_KEY: (1_000_000, "image/jpeg"), VIDEO_KEY: (large_bytes, "video/mp4")}
    shas: dict[str, str] = {}
    writes = []
    for key, (size, ctype) in files.items():
        sha = _write_file(tmp / "f", size, key.encode())
        (tmp / "f").replace(blobs / sha)
        shas[key] = sha
        writes.append(ReplicaWrite(entity="media", key=key, seq=len(writes) + 1, data=json.dumps({
            "key": key, "url": f"https://127.0.0.1:9/{key}", "sha256": sha, "size": size, "content_type": ctype})))
    db = Database.open_sync(state / "appliance.db")
    db.write_sync(partial(apply_changes, writes=writes, cursor="2", now=time.time()))

    def record(conn: object) -> None:
        for key, sha in shas.items():
            rows.add_blob(conn, sha, files[key][0], now=time.time())  # type: ignore[arg-type]
            rows.set_key_blobs(conn, {key: sha})  # type: ignore[arg-type]

    db.write_sync(record)
    db.close()
    config = root / "appliance.toml"
    ports = "\n".join(f"{r} = 0" for r in ("admin", "api", "events", "provisioning", "ops", "support", "discovery"))
    config.write_text(f'[lan]\nbind = "127.0.0.1"\n[lan.ports]\nmedia = {port}\n{ports}\n[storage]\ndir = "{state}"\n'
                      f'[admin]\ntoken = "{TOKEN}"\n[discovery]\nenabled = false\n[orders]\nenabled = false\n'
                      '[cloud]\napi_url = "https://127.0.0.1:9"\n[media]\nmin_free_bytes = 0\n'
                      '[log]\nlevel = "warning"\n')
    return config, blobs, shas


def _nginx_config(root: Path, blobs: Path, port: int, workers: int) -> Path:
    conf = root / "nginx.conf"
    user = "user root;\n" if os.geteuid() == 0 else ""  # its workers must read the temp directory
    temp = root / "nginx-temp"
    temp.mkdir()
    conf.write_text(f"""{user}worker_processes {workers};
pid {root / "nginx.pid"};
error_log {root / "nginx-error.log"} warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        root {blobs};
        etag on;
    }}
}}
""")
    return conf


def _wait_port(port: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port} after {timeout_s:g} s")


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class RssWatch:
    """The largest RSS of ``pid`` seen while the block runs (sampled every 50 ms)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_kb = pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, _rss_kb(self.pid))
            self._stop.wait(0.05)

    def __enter__(self) -> RssWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


_UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}


def _wrk(url: str, clients: int, seconds: float) -> dict[str, float]:
    """Run wrk; its transfer rate (bytes/s) and requests/s. wrk counts every byte read, so a
    large file still being sent when the time is up counts too."""
    threads = max(1, min(clients, 2))
    out = subprocess.run(["wrk", "-t", str(threads), "-c", str(clients), "-d", f"{seconds:g}s", "--timeout", "60s",
                          url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s*([\d.]+)", out).group(1))  # type: ignore[union-attr]
    value, unit = re.search(r"Transfer/sec:\s*([\d.]+)(\w+)", out).groups()  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"{url}: {errors.group(1)} error answers\n{out}")
    return {"rps": rps, "bytes_per_s": float(value) * _UNITS[unit.upper()]}


def _same_bytes(url: str, sha: str, timeout_s: float = 30.0) -> None:
    """Wait until ``url`` answers the file (the box's media service starts after its listener)."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = subprocess.run(["curl", "-s", "--noproxy", "*", url], capture_output=True, check=True).stdout
        if hashlib.sha256(got).hexdigest() == sha:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer the file's bytes: {got[:200]!r}")
        time.sleep(0.2)


def _check_tools() -> tuple[str, str]:
    nginx = shutil.which("nginx", path="/usr/sbin:/usr/bin:/sbin:/bin")
    wrk = shutil.which("wrk")
    if nginx is None or wrk is None:
        sys.exit("benchmarks.media needs nginx and wrk: apt-get install nginx-light wrk "
                 "(scripts/bench does it as root)")
    return nginx, wrk


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.media")
    parser.add_argument("--seconds", type=float, default=10.0, help="each load's duration (default 10)")
    parser.add_argument("--image-clients", type=int, default=50)
    parser.add_argument("--large-clients", type=int, default=4)
    parser.add_argument("--large-mb", type=int, default=100, help="the large file's size in MB (default 100)")
    parser.add_argument("--nginx-workers", type=int, default=1, help="nginx worker processes (default 1)")
    _cpus.add_option(parser)
    opts = parser.parse_args()
    nginx, _ = _check_tools()
    results: dict[tuple[str, str], dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-media-") as tmp:
        root = Path(tmp)
        os.chmod(root, 0o755)
        box_port, nginx_port = _free_port(), _free_port()
        config, blobs, shas = _prepare_box(root, box_port, opts.large_mb * 1_000_000)
        box = subprocess.Popen([sys.executable, "-m", "appliance", "run", "--config", str(config)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        web = subprocess.Popen([nginx, "-c", str(_nginx_config(root, blobs, nginx_port, opts.nginx_workers)),
                                "-p", str(root), "-g", "daemon off;"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        try:
            _wait_port(box_port)
            _wait_port(nginx_port)
            box_url = f"http://127.0.0.1:{box_port}/media/"
            nginx_url = f"http://127.0.0.1:{nginx_port}/"
            for key in (IMAGE_KEY, VIDEO_KEY):  # both answer the same bytes (and warm the page cache)
                for url in (box_url + key, nginx_url + shas[key]):
                    _same_bytes(url, shas[key])
            rss_before = _rss_kb(box.pid)
            with RssWatch(box.pid) as watch:
                for name, key, clients in (("1 MB image", IMAGE_KEY, opts.image_clients),
                                           (f"{opts.large_mb} MB file", VIDEO_KEY, opts.large_clients)):
                    results[(name, "appliance")] = _wrk(box_url + key, clients, opts.seconds)
                    results[(name, "nginx")] = _wrk(nginx_url + shas[key], clients, opts.seconds)
            rss_peak = watch.peak_kb
        finally:
            for proc in (box, web):
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
    print(f"Media serving, same files on the same disk, wrk keep-alive, {opts.seconds:g} s each "
          f"(nginx {opts.nginx_workers} worker(s), sendfile on):")
    goals = {"1 MB image": 0.3, f"{opts.large_mb} MB file": 0.5}
    for name, goal in goals.items():
        box_r, nginx_r = results[(name, "appliance")], results[(name, "nginx")]
        clients = opts.image_clients if name == "1 MB image" else opts.large_clients
        ratio = box_r["bytes_per_s"] / nginx_r["bytes_per_s"]
        print(f"  {name:12} to {clients:2} clients: appliance {box_r['bytes_per_s'] / 1e6:8.1f} MB/s "
              f"({box_r['rps']:7.1f} req/s)   nginx {nginx_r['bytes_per_s'] / 1e6:8.1f} MB/s "
              f"({nginx_r['rps']:7.1f} req/s)   ratio {ratio:.2f}x (goal >= {goal}x: "
              f"{'met' if ratio >= goal else 'NOT met'})")
    growth = (rss_peak - rss_before) / 1024
    print(f"  appliance RSS: {rss_before / 1024:.1f} MB before the load, {rss_peak / 1024:.1f} MB at its peak: "
          f"+{growth:.1f} MB (goal < 30 MB: {'met' if growth < 30 else 'NOT met'})")


if __name__ == "__main__":
    _cpus.run_main(main)
