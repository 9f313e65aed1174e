-- The device outbox: every command accepted for a device, from enqueue until it is acked
-- or dead, then kept for [dispatch] acked_retention_s and pruned.
--   state: queued (not sent yet), sent (sent at least once, no ack yet),
--          acked (the device took it), dead (expired, or refused for good: see reason)
--   seq:   per device, rising by one per command (outbox_seq holds the last one given,
--          so pruning old rows never makes a seq come back)
--   body:  the command's JSON object, compact, exactly as sent
-- Times are Unix seconds.
CREATE TABLE outbox (
    id          TEXT PRIMARY KEY,
    device_id   TEXT NOT NULL,
    seq         INTEGER NOT NULL CHECK (seq >= 1),
    kind        TEXT NOT NULL,
    body        TEXT NOT NULL,
    expires_at  REAL,
    state       TEXT NOT NULL CHECK (state IN ('queued', 'sent', 'acked', 'dead')),
    reason      TEXT NOT NULL DEFAULT '',
    attempts    INTEGER NOT NULL DEFAULT 0,
    created_at  REAL NOT NULL,
    sent_at     REAL,
    settled_at  REAL,
    UNIQUE (device_id, seq)
) STRICT;

-- What the dispatcher reads: a device's unsettled commands in seq order.
CREATE INDEX outbox_unsettled ON outbox (device_id, seq) WHERE state IN ('queued', 'sent');
-- What pruning reads.
CREATE INDEX outbox_settled ON outbox (settled_at) WHERE state IN ('acked', 'dead');

CREATE TABLE outbox_seq (
    device_id TEXT PRIMARY KEY,
    last_seq  INTEGER NOT NULL
) STRICT;
