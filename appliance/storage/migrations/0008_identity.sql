-- Device identity (docs/device-api.md): the key each device enrolled with, and the
-- enrollments waiting for an admin.
--   devices.public_key: the device's X25519 public key (64 hex) an admin accepted; NULL: none.
--   devices.legacy:     1 for a device adopted before the box had enrollment: it keeps its
--                       commands, unauthenticated, until it enrolls or an admin ends that.
ALTER TABLE devices ADD COLUMN public_key TEXT CHECK (public_key IS NULL OR length(public_key) = 64);
ALTER TABLE devices ADD COLUMN legacy INTEGER NOT NULL DEFAULT 0 CHECK (legacy IN (0, 1));
UPDATE devices SET legacy = 1 WHERE state = 'adopted' AND source = 'discovery';
CREATE INDEX devices_by_address ON devices (state, address);

-- One enrollment per device id (the latest), until an admin accepts or dismisses it.
-- The device commits to its nonce (commitment) before it learns the box's (box_nonce),
-- then reveals it (device_nonce); only then is the comparison code known.
CREATE TABLE enrollments (
    device_id    TEXT PRIMARY KEY,
    kind         TEXT NOT NULL,
    name         TEXT NOT NULL,
    address      TEXT NOT NULL,
    port         INTEGER NOT NULL CHECK (port BETWEEN 1 AND 65535),
    public_key   TEXT NOT NULL CHECK (length(public_key) = 64),
    commitment   TEXT NOT NULL CHECK (length(commitment) = 64),
    box_nonce    TEXT NOT NULL CHECK (length(box_nonce) = 32),
    device_nonce TEXT CHECK (device_nonce IS NULL OR length(device_nonce) = 32),
    code         TEXT CHECK (code IS NULL OR length(code) = 6),
    created      REAL NOT NULL
) STRICT;
