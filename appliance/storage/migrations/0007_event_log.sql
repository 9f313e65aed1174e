-- The local event log: one row per state change worth pushing to the shop's devices and
-- browsers (port 8001), written in the same transaction as the change itself, so the log
-- and the tables it describes always agree, even across a crash.
--   id:        rising, never reused (AUTOINCREMENT: not even after the newest rows are
--              pruned or the box restarts); clients resume from the last id they saw
--   topic:     what a client subscribes to (catalog, orders, commands, devices, sync, media)
--   type:      what happened (price.changed, order.received, ...); docs/events.md lists them
--   device_id: the device the event is about ('' for store-wide events); a device's
--              credential only ever sees its own device's events and store-wide ones
--   subject:   what a filter matches besides the device: the SKU or key ('' for none)
--   body:      the event's small JSON object
-- Times are Unix seconds. Pruned by count and age ([events] retention_rows, retention_s).
CREATE TABLE event_log (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    topic     TEXT NOT NULL,
    type      TEXT NOT NULL,
    device_id TEXT NOT NULL DEFAULT '',
    subject   TEXT NOT NULL DEFAULT '',
    at        REAL NOT NULL,
    body      TEXT NOT NULL
) STRICT;
CREATE INDEX event_log_by_at ON event_log (at);
