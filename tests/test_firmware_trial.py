"""The database across slots (docs/updates.md): a snapshot before the new slot first opens it,
and its restore, carrying the trial's sales over, when the trial fails.

Real SQLite files and the real migrations. The "newer firmware" is this firmware's
migrations plus one more (a new column and a new table), applied as the new slot would;
the slots themselves are the kernel command line's ``rauc.slot=`` read from a file
(``[update.testing] cmdline``), since the default suite cannot boot slots.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from appliance.config import Config
from appliance.protocol.firmware import OutcomeKind, TrialRecord
from appliance.services.firmware import files_of, prepare_storage
from appliance.storage import DATABASE_FILE, Database
from appliance.storage.events import receive
from appliance.storage.schema import Migration, SchemaError, load_migrations, migrate

NEWER = Migration(version=load_migrations()[-1].version + 1, name="trial_feature", sql=(
    "ALTER TABLE device_sales ADD COLUMN note TEXT NOT NULL DEFAULT '';\n"
    "CREATE TABLE loyalty (id TEXT PRIMARY KEY) STRICT;\n"))


def sale(conn: sqlite3.Connection, n: int, now: float) -> None:
    body = json.dumps({"lines": [{"qty": 1, "sku": "SKU-1", "unit_price_cents": 100}], "total_cents": 100},
                      sort_keys=True, separators=(",", ":"))
    receipt = receive(conn, kind="sale", id=f"sale-{n}", device_id="pos-1", body=body, event_id=f"sale-{n}",
                      event_body=body, now=now)
    assert receipt.outcome.name == "CREATED"


def count(db_path: Path, table: str) -> int:
    conn = sqlite3.connect(db_path)
    try:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    finally:
        conn.close()


class Slots:
    """The booted slot and boot id as the kernel would give them."""

    def __init__(self, tmp: Path, make_config: Callable[..., Config]) -> None:
        self.cmdline, self.boot_id = tmp / "cmdline", tmp / "boot_id"
        self.config = make_config(update={"testing": {"cmdline": str(self.cmdline), "boot_id": str(self.boot_id)}})
        self.boots = 0

    def boot(self, slot: str) -> None:
        self.boots += 1
        self.cmdline.write_text(f"console=ttyS0 root=LABEL=root-{slot} rauc.slot={slot} quiet\n")
        self.boot_id.write_text(f"boot-{self.boots}\n")

    @property
    def db(self) -> Path:
        return Path(self.config.storage.dir) / DATABASE_FILE


@pytest.fixture
def slots(tmp_path: Path, make_config: Callable[..., Config]) -> Slots:
    return Slots(tmp_path, make_config)


def start_trial(slots: Slots, **extra: Any) -> None:
    files = files_of(slots.config)
    files.prepare()
    files.write_trial(TrialRecord(version="0.2.0", from_version="0.1.0", from_slot="A", to_slot="B",
                                  started_at=1.0, boot_id=f"boot-{slots.boots}", **extra))


def test_a_failed_trial_after_a_migration_restores_the_database_and_keeps_the_trials_sales(slots: Slots) -> None:
    slots.boot("A")
    db = Database.open_sync(slots.db)
    for n in range(3):
        db.write_sync(lambda conn, n=n: sale(conn, n, now=100.0 + n))
    db.close()
    start_trial(slots)
    assert prepare_storage(slots.config) == "", "the same boot: the reboot into B is still due"

    slots.boot("B")  # the new slot: snapshot, then its newer schema, then sales during the trial
    assert prepare_storage(slots.config) == "snapshot"
    assert files_of(slots.config).read_trial() is not None and files_of(slots.config).read_trial().snapshot  # type: ignore[union-attr]
    conn = sqlite3.connect(slots.db, isolation_level=None)
    migrate(conn, (*load_migrations(), NEWER))
    conn.execute("BEGIN")
    for n in range(3, 8):
        sale(conn, n, now=200.0 + n)
    conn.execute("UPDATE events_outbox SET state = 'sent', batch_key = 'k1' WHERE id = 'sale-7'")
    conn.execute("COMMIT")
    conn.close()
    assert prepare_storage(slots.config) == "", "a second start of the new slot takes no second snapshot"
    with pytest.raises(SchemaError, match="newer than this firmware"):
        Database.open_sync(slots.db)  # what the old slot would meet without the restore

    slots.boot("A")  # the bootloader went back
    assert prepare_storage(slots.config) == "restored"
    db = Database.open_sync(slots.db)  # the old firmware opens it
    try:
        assert db.schema_version == load_migrations()[-1].version
        rows = db.read_sync(lambda c: c.execute("SELECT id, state, batch_key FROM events_outbox ORDER BY seq")
                            .fetchall())
        assert [r[0] for r in rows] == [f"sale-{n}" for n in range(8)], "every sale, in order, each once"
        assert {r[1] for r in rows} == {"queued"} and rows[-1][2] is None, "in flight in the trial: sent again"
        assert db.read_sync(lambda c: c.execute("SELECT count(*) FROM device_sales").fetchone()[0]) == 8
    finally:
        db.close()
    files = files_of(slots.config)
    last = files.read_last()
    assert last is not None and last.kind is OutcomeKind.ROLLED_BACK and last.slot == "A"
    assert last.carried == 10, "5 sales and their 5 events"
    assert "did not confirm itself" in last.reason and "10 record(s)" in last.reason
    assert files.read_trial() is None and not files.snapshot.exists()
    aside = files.trial_db("0.2.0")
    assert count(aside, "loyalty") == 0 and count(aside, "device_sales") == 8, "the trial's database kept aside"
    assert prepare_storage(slots.config) == "", "done once"


def test_the_reason_the_new_slot_gave_is_what_the_old_slot_reports(slots: Slots) -> None:
    slots.boot("A")
    Database.open_sync(slots.db).close()
    start_trial(slots)
    slots.boot("B")
    prepare_storage(slots.config)
    files = files_of(slots.config)
    trial = files.read_trial()
    assert trial is not None
    files.write_trial(TrialRecord(**{**trial.as_dict(), "verdict": "bad", "reason": "lan.listener.api: down"}))
    slots.boot("A")
    assert prepare_storage(slots.config) == "restored"
    last = files.read_last()
    assert last is not None and last.reason.startswith("lan.listener.api: down; database restored")


def test_a_trial_that_never_opened_the_database_rolls_back_without_a_restore(slots: Slots) -> None:
    slots.boot("A")
    db = Database.open_sync(slots.db)
    db.write_sync(lambda conn: sale(conn, 1, now=1.0))
    db.close()
    start_trial(slots)
    slots.boot("A")  # the new slot did not even boot: the bootloader went back at once
    assert prepare_storage(slots.config) == "restored"
    last = files_of(slots.config).read_last()
    assert last is not None and last.kind is OutcomeKind.ROLLED_BACK and last.carried == 0
    assert count(slots.db, "device_sales") == 1


def test_a_restore_cut_half_way_is_run_again_to_the_same_end(slots: Slots) -> None:
    """A power cut after the trial's file was moved aside and before the snapshot was in
    place: the next start finds the snapshot and the aside copy, and finishes."""
    slots.boot("A")
    db = Database.open_sync(slots.db)
    db.write_sync(lambda conn: sale(conn, 1, now=1.0))
    db.close()
    start_trial(slots)
    slots.boot("B")
    prepare_storage(slots.config)
    conn = sqlite3.connect(slots.db, isolation_level=None)
    sale(conn, 2, now=2.0)
    conn.close()
    files = files_of(slots.config)
    slots.boot("A")
    slots.db.rename(files.trial_db("0.2.0"))  # the first step of the restore, then the cut
    assert prepare_storage(slots.config) == "restored"
    assert count(slots.db, "device_sales") == 2
