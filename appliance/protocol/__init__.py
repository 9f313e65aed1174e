"""Sans-I/O protocol cores: pure, synchronous classes that take bytes or events and a
``now`` and return bytes, events or decisions. Nothing here touches a socket, a thread,
a clock or a file; the trio tasks in ``appliance.services`` only move bytes for them."""
