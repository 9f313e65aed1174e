"""Simulators for tests, the demo and technicians: the cloud sync API (``cloud*``).

Nothing under ``devkit`` runs inside the appliance; the appliance only talks to what it
serves, over the same sockets and protocols as in production.
"""
