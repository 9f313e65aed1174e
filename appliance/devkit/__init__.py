"""Simulators and tools for tests, the demo and technicians.

- ``cloud*``: the platform's sync API over HTTPS (``appliance devkit cloud``);
- ``device``: a shop device on the device channel (``appliance simulate-device``);
- ``orders_sender``: puts online orders on a Service Bus queue, as the platform does;
- ``lancheck``: the technician's bare-Python LAN check (``scripts/lan-check``).

Nothing under ``devkit`` runs inside the appliance; the appliance only talks to what it
serves, over the same sockets and protocols as in production.
"""
