-- Online orders received through Service Bus (docs/architecture.md §5), keyed by the message's
-- message_id: a redelivered message finds its row and changes nothing. The order and the
-- device commands it caused are written in one transaction, before the message is
-- completed. `body` is the parsed order as canonical JSON (sorted keys, no spaces).
-- Times are Unix seconds.
CREATE TABLE online_orders (
    message_id     TEXT PRIMARY KEY,
    order_id       TEXT NOT NULL,
    kind           TEXT NOT NULL,             -- the command kind it caused (order.created, ...)
    body           TEXT NOT NULL,
    received_at    REAL NOT NULL,
    delivery_count INTEGER NOT NULL DEFAULT 0 -- Service Bus's count when it was first taken
) STRICT;
CREATE INDEX online_orders_by_order ON online_orders (order_id);
CREATE INDEX online_orders_by_time ON online_orders (received_at);

-- The device commands each online order caused (the commands themselves live in the
-- device outbox, ids derived from message_id and device, so a repeat is a no-op there too).
CREATE TABLE online_order_commands (
    message_id TEXT NOT NULL REFERENCES online_orders (message_id) ON DELETE CASCADE,
    command_id TEXT NOT NULL,
    device_id  TEXT NOT NULL,
    kind       TEXT NOT NULL,
    PRIMARY KEY (message_id, command_id)
) STRICT;
