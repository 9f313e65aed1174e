"""Snapshot ingest: the sync service reading 100,000 products' snapshot (400,000+ records:
products, prices, stock, media), staging it in batches and swapping it in, next to raw
SQLite ``executemany`` of the same rows.

    python -m benchmarks.snapshot [--products N] [--rounds N] [--lookups] [--cpus 1]

The simulator makes the snapshot once (downloaded over TLS and kept in a file); the naive
side reads that file, and the ingest reads the same bytes from a file server (TLS) in
another process, so the simulator's generation is not counted against the box. Each side
runs in a fresh process so its peak RSS is its own; with ``--rounds N`` they alternate N
times (the machine's load falling on both alike) and the medians are printed too. Prints
records/s, seconds, peak RSS, the final swap's writer hold and the ratios.
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
from functools import partial
from pathlib import Path
from statistics import median
from typing import Any

import httpx
import trio

from benchmarks import _cpus

# A product lookup this often while the ingest runs (the store API stays readable).
LOOKUP_EVERY_S = 0.01


def cpu_s() -> float:
    """This process's CPU time so far (user + system, every thread), in seconds."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


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


async def _ingest(args: Sequence[str]) -> dict[str, Any]:
    """The ingest's child: ``args`` are the replay URL, its CA, the token, the store, the
    state directory and "lookups" (or "") for the lookups during the ingest."""
    from appliance.config import parse_config
    from appliance.services import heap
    from appliance.services.loop_lag import hand_back_the_gil
    from appliance.services.sync import CloudSync
    from appliance.services.wan import open_client
    from appliance.storage.catalog import get_item_text, replica_counts
    from appliance.storage.pairing import StoreLink
    from appliance.supervisor import open_runtime

    url, ca, token, store, state, probe = args
    config = parse_config({"storage": {"dir": state},
                           "admin": {"token": "bench-admin-token-0123456789", "first_start_ticket": False},
                           "cloud": {"api_url": url, "ca_file": ca, "read_timeout_s": 300.0}})
    runtime = await open_runtime(config)
    heap.settle()  # as the appliance's process does once it is up (supervisor, before READY)
    hand_back_the_gil()  # the process's switch interval, as the appliance's supervisor sets it
    baseline = peak_rss_mb()
    link = StoreLink(store_id=store, token=token)
    lookups: list[float] = []

    async def look_up() -> None:
        """The store API's product lookup (a read in trio's thread) every LOOKUP_EVERY_S
        while the ingest runs: how late each answer is against when it was due."""
        due = trio.current_time()
        while True:
            due += LOOKUP_EVERY_S
            await trio.sleep_until(due)
            await runtime.db.read_small(partial(get_item_text, entity="product", key="SKU-000001"))
            lookups.append(trio.current_time() - due)

    async with open_client(url, ca_file=ca, connect_timeout_s=10, read_timeout_s=300) as client, \
            trio.open_nursery() as nursery:
        # As the box's storage.checkpoints service: the WAL copied beside the writer.
        await nursery.start(runtime.db.run_checkpoints)
        if probe:
            nursery.start_soon(look_up)
        sync = CloudSync(runtime, client, proxy=None)
        start, cpu = time.perf_counter(), cpu_s()
        await sync.read_snapshot(link)
        seconds, cpu = time.perf_counter() - start, cpu_s() - cpu
        nursery.cancel_scope.cancel()
    counts = await runtime.db.read(replica_counts)
    runtime.db.close()
    lookups.sort()
    return {"records": sum(counts.values()), "seconds": seconds, "cpu_s": cpu, "baseline_rss_mb": baseline,
            "peak_rss_mb": peak_rss_mb(), "swap_s": getattr(sync, "last_swap_s", None),
            "lookups": len(lookups), "lookup_p50_s": lookups[len(lookups) // 2] if lookups else None,
            "lookup_p99_s": lookups[int(len(lookups) * 0.99)] if lookups else None,
            "lookup_max_s": lookups[-1] if lookups else None, "checkpoints": runtime.db.checkpoints,
            "checkpoints_holding_writer": runtime.db.checkpoints_holding_writer}


def _download(url: str, ca: str, token: str, store: str, out: Path) -> float:
    """Fetch the simulator's snapshot into ``out`` (the stream both sides then read);
    returns the seconds it took (the simulator making it, TLS: no parsing)."""
    fetching = time.perf_counter()
    with httpx.Client(verify=ca, timeout=300) as client, \
            client.stream("GET", f"{url}/v1/stores/{store}/snapshot", headers={"Authorization": f"Bearer {token}"}) \
            as response, out.open("wb") as file:
        response.raise_for_status()
        for chunk in response.iter_bytes():
            file.write(chunk)
    return time.perf_counter() - fetching


def _raw(body_file: str, state: str) -> dict[str, Any]:
    """The naive side: the whole body in memory, ``json`` per line, one ``executemany``."""
    body = Path(body_file).read_bytes()
    lines = body.splitlines()[:-1]
    start, cpu = time.perf_counter(), cpu_s()
    rows = []
    for line in lines:
        record = json.loads(line)
        rows.append((record["entity"], record["key"], json.dumps(record["data"], separators=(",", ":"))))
    parsed, parse_cpu = time.perf_counter(), cpu_s() - cpu
    conn = sqlite3.connect(Path(state) / "raw.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("CREATE TABLE raw (entity TEXT, key TEXT, data TEXT, PRIMARY KEY (entity, key)) STRICT")
    inserting, cpu = time.perf_counter(), cpu_s()
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO raw VALUES (?, ?, ?)", rows)
    conn.execute("COMMIT")
    done, insert_cpu = time.perf_counter(), cpu_s() - cpu
    conn.close()
    return {"records": len(rows), "bytes": len(body), "executemany_s": done - inserting,
            "parse_and_executemany_s": (parsed - start) + (done - inserting),
            "parse_and_executemany_cpu_s": parse_cpu + insert_cpu, "peak_rss_mb": peak_rss_mb()}


def _round(body: Path, url: str, ca: str, store: str, root: Path, *, lookups: bool,
           ) -> tuple[dict[str, Any], dict[str, Any]]:
    """One naive run and one ingest, each in a fresh process and a fresh directory."""
    with tempfile.TemporaryDirectory(dir=root) as raw_dir:
        raw = child_json("benchmarks.snapshot", ["--child", "raw", "--", str(body), raw_dir])
    with tempfile.TemporaryDirectory(dir=root) as box_dir:
        ingest = child_json("benchmarks.snapshot", ["--child", "ingest", "--", url, ca, "token", store, box_dir,
                                                    "lookups" if lookups else ""])
    return raw, ingest


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.snapshot")
    parser.add_argument("--products", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=1,
                        help="naive side and ingest this many times, alternating; prints each and the medians")
    parser.add_argument("--lookups", action="store_true",
                        help=f"also look up a product every {LOOKUP_EVERY_S * 1000:.0f} ms during the ingest (the "
                             "store API's read) and print how late the answers were (off by default: it shares the "
                             "loop with the ingest it measures)")
    parser.add_argument("--child", choices=["ingest", "raw", "replay"])
    parser.add_argument("args", nargs="*")
    _cpus.add_option(parser)
    opts = parser.parse_args()
    if opts.rounds < 1:
        parser.error("--rounds must be at least 1")
    if opts.child == "ingest":
        print(json.dumps(trio.run(_ingest, opts.args)))
        return
    if opts.child == "raw":
        print(json.dumps(_raw(*opts.args)))
        return
    if opts.child == "replay":
        _replay(Path(opts.args[0]))
        return
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as tmp:
        root = Path(tmp)
        body = root / "snapshot.ndjson"
        with simulator(root / "tls", opts.products) as sim:
            download_s = _download(sim["url"], sim["ca"], sim["token"], sim["store_id"], body)
        with replay_server(body) as (url, ca):
            rounds = [_round(body, url, ca, sim["store_id"], root, lookups=opts.lookups) for _ in range(opts.rounds)]
    raw, ingest = rounds[0]
    n = ingest["records"]
    print(f"snapshot of {opts.products} products: {n} records (products, prices, stock, media, config, devices)")
    print(f"  the simulator's stream alone (download, no parsing): {download_s:.2f} s, "
          f"{raw['records'] / download_s:,.0f} records/s, {raw['bytes'] / 2**20:.0f} MiB")
    for at, (raw, ingest) in enumerate(rounds, 1):
        if len(rounds) > 1:
            print(f" round {at} of {len(rounds)} (the naive side, then the ingest):")
        print(f"  sync ingest (the stream precomputed, TLS, parse, stage in batches, swap): {ingest['seconds']:.2f} s, "
              f"{n / ingest['seconds']:,.0f} records/s, peak RSS {ingest['peak_rss_mb']:.0f} MiB (baseline "
              f"{ingest['baseline_rss_mb']:.0f} MiB, +{ingest['peak_rss_mb'] - ingest['baseline_rss_mb']:.0f})")
        if ingest.get("swap_s") is not None:
            print(f"  the final swap held the writer {ingest['swap_s'] * 1000:.0f} ms (its write, commit included)")
        if ingest.get("checkpoints") is not None:
            print(f"  WAL checkpoints beside the writer: {ingest['checkpoints']} "
                  f"({ingest['checkpoints_holding_writer']} of them holding it for their last pages); "
                  "none inside a commit")
        if ingest.get("lookups"):
            print(f"  a product lookup every {LOOKUP_EVERY_S * 1000:.0f} ms during the ingest (the store API's read, "
                  f"in trio's thread), late against when due: p50 {ingest['lookup_p50_s'] * 1000:.1f} ms, "
                  f"p99 {ingest['lookup_p99_s'] * 1000:.1f} ms, max {ingest['lookup_max_s'] * 1000:.1f} ms "
                  f"({ingest['lookups']} lookups)")
        print(f"  raw sqlite executemany, one transaction: {raw['executemany_s']:.2f} s, "
              f"{raw['records'] / raw['executemany_s']:,.0f} rows/s")
        print(f"  raw json parse + executemany:           {raw['parse_and_executemany_s']:.2f} s, "
              f"{raw['records'] / raw['parse_and_executemany_s']:,.0f} rows/s, peak RSS {raw['peak_rss_mb']:.0f} MiB "
              "(whole body in memory)")
        print(f"  ratio ingest / executemany: {ingest['seconds'] / raw['executemany_s']:.2f}x; "
              f"ingest / (parse + executemany): {ingest['seconds'] / raw['parse_and_executemany_s']:.2f}x")
        cpu_ratio = ingest["cpu_s"] / raw["parse_and_executemany_cpu_s"]
        print(f"  CPU (user + system, every thread): ingest {ingest['cpu_s']:.2f} s, parse + executemany "
              f"{raw['parse_and_executemany_cpu_s']:.2f} s: {cpu_ratio:.2f}x (steadier on a shared machine)")
    if len(rounds) > 1:
        ratios = [i["seconds"] / r["parse_and_executemany_s"] for r, i in rounds]
        cpu_ratios = [i["cpu_s"] / r["parse_and_executemany_cpu_s"] for r, i in rounds]
        swaps = [i["swap_s"] * 1000 for _, i in rounds if i.get("swap_s") is not None]
        print(f" medians of {len(rounds)} rounds: ingest {median(i['seconds'] for _, i in rounds):.2f} s, "
              f"parse + executemany {median(r['parse_and_executemany_s'] for r, _ in rounds):.2f} s, "
              f"ingest / (parse + executemany) {median(ratios):.2f}x (highest {max(ratios):.2f}x), "
              f"CPU {median(cpu_ratios):.2f}x (highest {max(cpu_ratios):.2f}x)"
              + (f", swap {median(swaps):.0f} ms" if swaps else ""))
    sys.stdout.flush()


if __name__ == "__main__":
    if "--child" in sys.argv:
        main()  # a helper process: pinned like its parent, and no banner before what it prints
    else:
        _cpus.run_main(main)
