"""Snapshot ingest: the sync service reading 100,000 products' snapshot (400,000+ records:
products, prices, stock, media), staging it in batches and swapping it in, next to raw
SQLite ``executemany`` of the same rows.

    python -m benchmarks.snapshot [--products N]

The simulator makes the snapshot once (the raw side downloads it over TLS and keeps it);
the ingest then reads those same bytes from a file server (TLS) in another process, so
the simulator's generation is not counted against the box. Each side runs in
a fresh process so its peak RSS is its own. Prints records/s, seconds, peak RSS, the
final swap's writer hold and the ratios.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import resource
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import trio

from benchmarks import _cpus


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def simulator(tls_dir: Path, products: int) -> Iterator[dict[str, Any]]:
    """``appliance devkit cloud`` in its own process (its CPU is not the box's); yields its
    ready line plus a paired token."""
    proc = subprocess.Popen([sys.executable, "-m", "appliance", "devkit", "cloud", "--products", str(products),
                             "--tls-dir", str(tls_dir)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        with httpx.Client(base_url=ready["url"], verify=ready["ca"]) as client:
            answer = client.post("/v1/appliances/pair", json={"code": ready["pair_code"], "appliance_id": "bench",
                                                              "firmware": "bench"})
            answer.raise_for_status()
        ready["token"] = answer.json()["token"]
        yield ready
    finally:
        proc.terminate()
        proc.wait(10)


def _replay(body: Path) -> None:
    """Serve ``body`` to any GET on a loopback port (printed), until killed."""
    # On every core even in a pinned run (--cpus): the stream's sender stands for the
    # platform, not the box, and its TLS would otherwise take the box's one core.
    os.sched_setaffinity(0, range(os.cpu_count() or 1))
    data = body.read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            view = memoryview(data)
            for at in range(0, len(view), 1 << 20):
                self.wfile.write(view[at:at + (1 << 20)])

        def log_message(self, *args: Any) -> None:
            pass

    import trustme  # the test extra's; the box insists on TLS to its platform

    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(body.with_name("replay-ca.pem")))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler) as server:
        server.socket = context.wrap_socket(server.socket, server_side=True)
        print(server.server_address[1], flush=True)
        server.serve_forever()


@contextmanager
def replay_server(body: Path) -> Iterator[tuple[str, str]]:
    """``(url, CA file)`` of :func:`_replay` in its own process."""
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.snapshot", "--child", "replay", "--", str(body)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield f"https://127.0.0.1:{proc.stdout.readline().strip()}", str(body.with_name("replay-ca.pem"))
    finally:
        proc.terminate()
        proc.wait(10)


def child_json(module: str, args: Sequence[str]) -> dict[str, Any]:
    """Run ``python -m module args`` (a fresh process, so its peak RSS is its own) and
    return the JSON object it prints last."""
    out = subprocess.run([sys.executable, "-m", module, *args], check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONHASHSEED": "0"})
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


async def _ingest(url: str, ca: str, token: str, store: str, state: str) -> dict[str, Any]:
    from appliance.config import parse_config
    from appliance.services.sync import CloudSync
    from appliance.services.wan import open_client
    from appliance.storage.catalog import replica_counts
    from appliance.storage.pairing import StoreLink
    from appliance.supervisor import open_runtime

    config = parse_config({"storage": {"dir": state},
                           "admin": {"token": "bench-admin-token-0123456789", "first_start_ticket": False},
                           "cloud": {"api_url": url, "ca_file": ca, "read_timeout_s": 300.0}})
    runtime = await open_runtime(config)
    baseline = peak_rss_mb()
    link = StoreLink(store_id=store, token=token)
    async with open_client(url, ca_file=ca, connect_timeout_s=10, read_timeout_s=300) as client:
        sync = CloudSync(runtime, client, proxy=None)
        start = time.perf_counter()
        await sync.read_snapshot(link)
        seconds = time.perf_counter() - start
    counts = await runtime.db.read(replica_counts)
    runtime.db.close()
    return {"records": sum(counts.values()), "seconds": seconds, "baseline_rss_mb": baseline,
            "peak_rss_mb": peak_rss_mb(), "swap_s": getattr(sync, "last_swap_s", None)}


def _raw(url: str, ca: str, token: str, store: str, state: str) -> dict[str, Any]:
    fetching = time.perf_counter()
    with httpx.Client(verify=ca, timeout=300) as client:
        body = client.get(f"{url}/v1/stores/{store}/snapshot", headers={"Authorization": f"Bearer {token}"}).content
    download_s = time.perf_counter() - fetching
    (Path(state) / "snapshot.ndjson").write_bytes(body)  # for the ingest, precomputed
    lines = body.splitlines()[:-1]
    start = time.perf_counter()
    rows = []
    for line in lines:
        record = json.loads(line)
        rows.append((record["entity"], record["key"], json.dumps(record["data"], separators=(",", ":"))))
    parsed = time.perf_counter()
    conn = sqlite3.connect(Path(state) / "raw.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("CREATE TABLE raw (entity TEXT, key TEXT, data TEXT, PRIMARY KEY (entity, key)) STRICT")
    inserting = time.perf_counter()
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO raw VALUES (?, ?, ?)", rows)
    conn.execute("COMMIT")
    done = time.perf_counter()
    conn.close()
    return {"records": len(rows), "download_s": download_s, "bytes": len(body),
            "executemany_s": done - inserting, "parse_and_executemany_s": (parsed - start) + (done - inserting),
            "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.snapshot")
    parser.add_argument("--products", type=int, default=100_000)
    parser.add_argument("--child", choices=["ingest", "raw", "replay"])
    parser.add_argument("args", nargs="*")
    _cpus.add_option(parser)
    opts = parser.parse_args()
    if opts.child == "ingest":
        print(json.dumps(trio.run(_ingest, *opts.args)))
        return
    if opts.child == "raw":
        print(json.dumps(_raw(*opts.args)))
        return
    if opts.child == "replay":
        _replay(Path(opts.args[0]))
        return
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as tmp:
        root = Path(tmp)
        (root / "box").mkdir()
        (root / "raw").mkdir()
        with simulator(root / "tls", opts.products) as sim:
            common = [sim["url"], sim["ca"], sim["token"], sim["store_id"]]
            raw = child_json("benchmarks.snapshot", ["--child", "raw", "--", *common, str(root / "raw")])
        with replay_server(root / "raw" / "snapshot.ndjson") as (url, ca):
            ingest = child_json("benchmarks.snapshot", ["--child", "ingest", "--", url, ca, "token", sim["store_id"],
                                                        str(root / "box")])
    n = ingest["records"]
    print(f"snapshot of {opts.products} products: {n} records (products, prices, stock, media, config, devices)")
    print(f"  sync ingest (the stream precomputed, TLS, parse, stage in batches, swap): {ingest['seconds']:.2f} s, "
          f"{n / ingest['seconds']:,.0f} records/s, peak RSS {ingest['peak_rss_mb']:.0f} MiB "
          f"(baseline {ingest['baseline_rss_mb']:.0f} MiB, +{ingest['peak_rss_mb'] - ingest['baseline_rss_mb']:.0f})")
    if ingest.get("swap_s") is not None:
        print(f"  the final swap held the writer {ingest['swap_s'] * 1000:.0f} ms (its write, commit included)")
    print(f"  the simulator's stream alone (download, no parsing): {raw['download_s']:.2f} s, "
          f"{raw['records'] / raw['download_s']:,.0f} records/s, {raw['bytes'] / 2**20:.0f} MiB")
    print(f"  raw sqlite executemany, one transaction: {raw['executemany_s']:.2f} s, "
          f"{raw['records'] / raw['executemany_s']:,.0f} rows/s")
    print(f"  raw json parse + executemany:           {raw['parse_and_executemany_s']:.2f} s, "
          f"{raw['records'] / raw['parse_and_executemany_s']:,.0f} rows/s, peak RSS {raw['peak_rss_mb']:.0f} MiB "
          "(whole body in memory)")
    print(f"  ratio ingest / executemany: {ingest['seconds'] / raw['executemany_s']:.2f}x; "
          f"ingest / (parse + executemany): {ingest['seconds'] / raw['parse_and_executemany_s']:.2f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    if "--child" in sys.argv:
        main()  # a helper process: pinned like its parent, and no banner before what it prints
    else:
        _cpus.run_main(main)
