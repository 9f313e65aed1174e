-- The device registry: every device the box knows, how it learned of it, and whether an
-- admin adopted it (the dispatcher pushes commands to adopted devices only).
--   state:  pending (heard from, not yet decided), adopted, rejected
--   source: discovery (a probe on UDP 57854) or config ([[devices]] in the config file)
-- Times are Unix seconds. last_seen is NULL for a declared device never heard from.
CREATE TABLE devices (
    id            TEXT PRIMARY KEY,
    kind          TEXT NOT NULL,
    name          TEXT NOT NULL,
    address       TEXT NOT NULL,
    port          INTEGER NOT NULL CHECK (port BETWEEN 1 AND 65535),
    state         TEXT NOT NULL CHECK (state IN ('pending', 'adopted', 'rejected')),
    source        TEXT NOT NULL CHECK (source IN ('discovery', 'config')),
    first_seen    REAL NOT NULL,
    last_seen     REAL,
    state_changed REAL NOT NULL
) STRICT;

CREATE INDEX devices_by_state ON devices (state, last_seen);
