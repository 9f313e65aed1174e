"""Storage: the SQLite schema, its migrations and every query. The only SQL in the tree."""

from appliance.storage.db import DATABASE_FILE, Database, StorageError, connect
from appliance.storage.schema import SchemaError, migrate

__all__ = ["DATABASE_FILE", "Database", "SchemaError", "StorageError", "connect", "migrate"]
