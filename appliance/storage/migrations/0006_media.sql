-- The media cache (docs/media.md): one row per file held in <storage.dir>/media/blobs,
-- named by its sha256. A row is written only after the file was verified and renamed
-- into place; at start-up a file without a row is hashed again (adopted or deleted) and
-- a row without a file is dropped. `last_served_at` orders eviction (least recently
-- served first); 0 means never served. Times are Unix seconds.
CREATE TABLE media_blobs (
    sha256         TEXT PRIMARY KEY,
    size           INTEGER NOT NULL,
    cached_at      REAL NOT NULL,
    last_served_at REAL NOT NULL DEFAULT 0
) STRICT;

-- Which verified file each catalog key is served from. It changes only once a new
-- version's file is verified, so a changed entry keeps serving the previous file until
-- then; a key the manifest no longer lists loses its row.
CREATE TABLE media_keys (
    key    TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL
) STRICT;
CREATE INDEX media_keys_by_blob ON media_keys(sha256);
