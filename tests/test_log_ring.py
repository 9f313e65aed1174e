"""The log ring (appliance/storage/logring.py) on a real disk: bounded, crash-safe, reopened
where it stopped; and the redaction every record goes through."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.config import parse_config
from appliance.protocol.redact import MASK, Redactor
from appliance.storage.known_secrets import SecretContext, known_secrets
from appliance.storage.logring import (
    MAX_MESSAGE_CHARS,
    LogRing,
    RingHandler,
    RingReader,
    last_lines,
    load_cursor,
    read_after,
    save_cursor,
)
from appliance.storage.pairing import StoreLink


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    lg = logging.getLogger("test.ring")
    lg.setLevel(logging.DEBUG)
    lg.propagate = False
    yield lg
    lg.handlers.clear()


def open_ring(directory: Path, ring_bytes: int = 64 * 1024) -> LogRing:
    return LogRing.open(directory, ring_bytes=ring_bytes, flush_interval_s=0.05)


def records(directory: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in read_after(directory, 0, max_records=10**9, max_bytes=10**12).lines]


def test_records_keep_level_logger_message_fields_and_traceback(tmp_path: Path, logger: logging.Logger) -> None:
    ring = open_ring(tmp_path / "logs")
    logger.addHandler(RingHandler(ring))
    logger.info("order %s sent", "A17", extra={"device": "kitchen-1", "attempt": 2})
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("it failed")
    logger.warning("x" * (MAX_MESSAGE_CHARS + 50))
    ring.close()
    got = records(tmp_path / "logs")
    assert [r["seq"] for r in got] == [1, 2, 3]
    assert got[0] | {"ts": 0} == {"seq": 1, "ts": 0, "level": "info", "logger": "test.ring", "msg": "order A17 sent",
                                  "fields": {"device": "kitchen-1", "attempt": 2}}
    assert got[1]["level"] == "error" and "ValueError: boom" in str(got[1]["exc"])
    assert len(str(got[2]["msg"])) < MAX_MESSAGE_CHARS + 100 and "50 more characters cut" in str(got[2]["msg"])


def test_the_ring_stays_within_its_cap_and_keeps_the_newest(tmp_path: Path, logger: logging.Logger) -> None:
    cap = 64 * 1024
    ring = open_ring(tmp_path / "logs", cap)
    logger.addHandler(RingHandler(ring))
    for i in range(20_000):
        logger.info("record number %d with a little text to make it a normal size", i)
        if i % 2000 == 0:
            assert ring.flush()
            assert sum(p.stat().st_size for p in (tmp_path / "logs").glob("seg-*")) <= cap + ring.segment_bytes
    ring.close()
    sizes = [p.stat().st_size for p in (tmp_path / "logs").glob("seg-*")]
    assert sum(sizes) <= cap + ring.segment_bytes and len(sizes) > 2
    kept = records(tmp_path / "logs")
    seqs = [int(str(r["seq"])) for r in kept]
    assert seqs == list(range(seqs[0], 20_001)), "the newest records, contiguous, in order"
    assert kept[-1]["msg"] == "record number 19999 with a little text to make it a normal size"


def test_reopened_after_a_torn_write_it_continues_after_the_last_whole_record(tmp_path: Path,
                                                                               logger: logging.Logger) -> None:
    directory = tmp_path / "logs"
    ring = open_ring(directory)
    logger.addHandler(RingHandler(ring))
    for i in range(10):
        logger.info("before %d", i)
    ring.close()
    logger.handlers.clear()
    last = sorted(directory.glob("seg-*"))[-1]
    with last.open("ab") as f:
        f.write(b'{"seq":11,"ts":1.0,"level":"info","logger":"x","msg":"cut in the mid')  # a crash mid-write
    ring = open_ring(directory)
    logger.addHandler(RingHandler(ring))
    logger.info("after")
    ring.close()
    got = records(directory)
    assert [r["seq"] for r in got] == list(range(1, 12))
    assert got[-1]["msg"] == "after"
    assert not last.read_bytes().count(b"cut in the mid")


def test_a_sigkilled_writer_loses_at_most_its_last_interval(tmp_path: Path) -> None:
    """A real process logs, is SIGKILLed; the ring it leaves opens cleanly and is contiguous."""
    directory = tmp_path / "logs"
    script = textwrap.dedent(f"""
        import logging, sys, time
        from pathlib import Path
        from appliance.storage.logring import LogRing, RingHandler
        ring = LogRing.open(Path({str(directory)!r}), ring_bytes=1 << 20, flush_interval_s=0.05)
        lg = logging.getLogger("kid"); lg.setLevel(logging.INFO); lg.addHandler(RingHandler(ring))
        for i in range(2000):
            lg.info("line %d", i)
        ring.flush()
        print("flushed", flush=True)
        i = 0
        while True:
            i += 1
            lg.info("more %d", i)
            if i % 100 == 0:
                time.sleep(0.001)
    """)
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"flushed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    ring = open_ring(directory, 1 << 20)
    ring.close()
    seqs = [int(str(r["seq"])) for r in records(directory)]
    assert seqs[:2000] == list(range(1, 2001))
    assert seqs == list(range(1, len(seqs) + 1))


def test_reading_in_batches_resumes_where_it_stopped(tmp_path: Path, logger: logging.Logger) -> None:
    ring = open_ring(tmp_path / "logs", 1 << 20)
    logger.addHandler(RingHandler(ring))
    for i in range(5000):
        logger.info("r %d", i)
    ring.close()
    reader = RingReader(tmp_path / "logs")
    cursor, seen = 0, []
    while True:
        batch = reader.read_after(cursor, max_records=333, max_bytes=8000)
        if not batch.lines:
            break
        assert batch.first == cursor + 1 and len(batch.lines) <= 333 and batch.size <= 8000 + 200
        seen.extend(json.loads(line)["seq"] for line in batch.lines)
        cursor = batch.last
    assert seen == list(range(1, 5001))
    assert [json.loads(line)["seq"] for line in last_lines(tmp_path / "logs", 3)] == [4998, 4999, 5000]


def test_the_cursor_survives_and_seqs_never_go_back_below_it(tmp_path: Path) -> None:
    directory = tmp_path / "logs"
    directory.mkdir()
    assert load_cursor(directory) == (0, 0)
    save_cursor(directory, 41, 3)
    assert load_cursor(directory) == (41, 3)
    ring = open_ring(directory)  # no segment survived (a power cut), but 41 was shipped
    assert ring.last_seq == 41
    ring.close()


# --- redaction -----------------------------------------------------------------------------------------


SECRET_CONFIG = {
    "admin": {"token": "admin-token-0123456789-abcdef"},
    "orders": {"sas_key": "orders-sas-key-abcdef"},
    "support": {"sas_key": "support-sas-key-abcdef"},
    "logs": {"api_key": "logs-api-key-abcdef"},
    "wan": {"proxy": "http://shop:pr%40xy-pass-123@10.0.0.1:3128"},
}


def test_every_known_secret_comes_from_the_one_list(tmp_path: Path) -> None:
    config = parse_config({**SECRET_CONFIG, "storage": {"dir": str(tmp_path)},
                           "devices": [{"id": "kds-1", "kind": "kds", "address": "10.0.0.7", "key": "d1" * 32}]})
    (tmp_path / "box.key").write_text("b0" * 32 + "\n")
    store = StoreLink(store_id="s", token="platform-token-abcdef", store_secret="ab" * 32, services={
        "orders": {"sas_key": "paired-orders-key"}, "support": {"sas_key": "paired-support-key"},
        "logs": {"url": "https://x", "api_key": "paired-logs-key"}})
    found = known_secrets(SecretContext(config=config, admin_token="generated-admin-token", store=store))
    assert found == {"admin-token-0123456789-abcdef", "generated-admin-token", "orders-sas-key-abcdef",
                     "support-sas-key-abcdef", "logs-api-key-abcdef", "pr@xy-pass-123", "platform-token-abcdef",
                     "ab" * 32, "paired-orders-key", "paired-support-key", "paired-logs-key", "b0" * 32,
                     "d1" * 32}


def test_redaction_by_value_and_by_shape() -> None:
    r = Redactor(["platform-token-abcdef", "pr@xy-pass-123", "abc"])
    assert r.redact("token platform-token-abcdef refused") == f"token {MASK} refused"
    assert MASK in r.redact("proxy http://shop:pr%40xy-pass-123@10.0.0.1:3128")
    assert "pr%40xy" not in r.redact("proxy http://shop:pr%40xy-pass-123@10.0.0.1:3128")
    assert r.redact("abc is too short to mask verbatim") == "abc is too short to mask verbatim"
    for text, secret in [("Authorization: Bearer eyJhbGci.xyz", "eyJhbGci"),
                         ("Endpoint=sb://x/;SharedAccessKeyName=n;SharedAccessKey=Zm9vYmFy", "Zm9vYmFy"),
                         ("https://u:hunter2@proxy:3128", "hunter2"),
                         ('{"api_key": "k-123", "n": 1}', "k-123"),
                         ("device_key=deadbeef", "deadbeef"),
                         ("key " + "a1" * 32, "a1" * 32),
                         ("sas " + "A" * 43 + "=", "A" * 43)]:
        assert secret not in r.redact(text), text


@given(st.text(max_size=200), st.sampled_from(["s3cret-value", 'quo"te\\secret', "Bearer zzz"]))
def test_redacted_json_stays_json(text: str, secret: str) -> None:
    line = json.dumps({"msg": text + secret + text}, ensure_ascii=False)
    out = Redactor([secret]).redact(line)
    assert isinstance(json.loads(out), dict)
