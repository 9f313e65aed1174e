"""Storage: the SQLite schema, its migrations and every query. The only SQL in the tree."""

from appliance.storage.db import Database, StorageError, connect
from appliance.storage.schema import SchemaError, migrate

__all__ = ["Database", "SchemaError", "StorageError", "connect", "migrate"]
