-- Cloud sync (docs/architecture.md §4): the replica of the store's data pulled from the platform, the
-- sync cursor (committed in the same transaction as the changes it covers), the outbox of
-- events pushed to the platform, and the sales and orders the shop's devices post to the
-- store API. Online orders (Service Bus) live in their own table, so `GET /v1/orders` can
-- list device_orders and online orders side by side.

-- The replica: one table per entity of the changes feed. `data` is the platform's JSON
-- object as received; `seq` is the change that last wrote the row (0: from a snapshot).
CREATE TABLE products (
    sku      TEXT PRIMARY KEY,
    name     TEXT NOT NULL,
    name_key TEXT NOT NULL,  -- the name casefolded: search by name prefix
    data     TEXT NOT NULL,
    seq      INTEGER NOT NULL
) STRICT;
CREATE INDEX products_by_name ON products(name_key, sku);

CREATE TABLE prices (
    sku  TEXT PRIMARY KEY,
    data TEXT NOT NULL,
    seq  INTEGER NOT NULL
) STRICT;

CREATE TABLE stock (
    sku  TEXT PRIMARY KEY,
    data TEXT NOT NULL,
    seq  INTEGER NOT NULL
) STRICT;

CREATE TABLE store_config (
    key  TEXT PRIMARY KEY,
    data TEXT NOT NULL,
    seq  INTEGER NOT NULL
) STRICT;

-- What the media cache should hold (the files themselves are the media service's).
CREATE TABLE media_manifest (
    key  TEXT PRIMARY KEY,
    data TEXT NOT NULL,
    seq  INTEGER NOT NULL
) STRICT;

-- The store's devices as the platform knows them (the LAN registry is discovery's).
CREATE TABLE store_devices (
    key  TEXT PRIMARY KEY,
    data TEXT NOT NULL,
    seq  INTEGER NOT NULL
) STRICT;

-- One row: where the pull stands. cursor NULL means a snapshot is needed (first sync, a
-- 410 Gone, or a re-pair to another store).
CREATE TABLE sync_state (
    id             INTEGER PRIMARY KEY CHECK (id = 1),
    store_id       TEXT NOT NULL DEFAULT '',
    cursor         TEXT,
    last_pull_at   REAL,              -- unix time of the last pull that reached the end
    last_change_at REAL,              -- unix time the replica last changed
    snapshots      INTEGER NOT NULL DEFAULT 0,
    staged_rows    INTEGER NOT NULL DEFAULT 0  -- rows of the snapshot in progress so far
) STRICT;
INSERT INTO sync_state(id) VALUES (1);

-- A snapshot being read: rows are staged here in batches and swapped into the replica
-- in one transaction once the stream's last line (with its cursor) has arrived.
CREATE TABLE snapshot_staging (
    entity   TEXT NOT NULL,
    key      TEXT NOT NULL,
    name     TEXT,
    name_key TEXT,
    data     TEXT NOT NULL,
    PRIMARY KEY (entity, key)
) STRICT;

-- Events to the platform. `id` is made by the client (a device's sale id) or by the box,
-- and the platform dedupes on it. queued -> sent (in flight in batch `batch_key`, which
-- is the Idempotency-Key) -> accepted | rejected (kept with the platform's reason).
CREATE TABLE events_outbox (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    id         TEXT NOT NULL UNIQUE,
    kind       TEXT NOT NULL,
    body       TEXT NOT NULL,
    state      TEXT NOT NULL DEFAULT 'queued'
               CHECK (state IN ('queued', 'sent', 'accepted', 'rejected')),
    reason     TEXT NOT NULL DEFAULT '',
    attempts   INTEGER NOT NULL DEFAULT 0,
    batch_key  TEXT,
    created_at REAL NOT NULL,
    sent_at    REAL,
    done_at    REAL
) STRICT;
CREATE INDEX events_outbox_pending ON events_outbox(state, seq) WHERE state IN ('queued', 'sent');
CREATE INDEX events_outbox_batch ON events_outbox(batch_key) WHERE batch_key IS NOT NULL;

-- What the shop's devices posted to the store API, keyed by the device's own id, so the
-- same post again is recognised (idempotency) and a different body under the same id is
-- refused. `body` is the canonical JSON of the validated record.
CREATE TABLE device_sales (
    id          TEXT PRIMARY KEY,
    device_id   TEXT NOT NULL,
    body        TEXT NOT NULL,
    received_at REAL NOT NULL
) STRICT;

CREATE TABLE device_orders (
    id          TEXT PRIMARY KEY,
    device_id   TEXT NOT NULL,
    body        TEXT NOT NULL,
    received_at REAL NOT NULL
) STRICT;
