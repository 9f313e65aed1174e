"""A real AMQP 1.0 peer that stands in for Azure Service Bus in tests.

No Service Bus emulator runs here (Microsoft's is Docker-only), so the tests talk to
:mod:`tests.amqp.peer`, a small python-qpid-proton broker, through
:mod:`tests.amqp.wsfront`, a TLS WebSocket endpoint at ``/$servicebus/websocket``. The
unmodified azure-servicebus SDK reaches it over its production transport
(``AmqpOverWebsocket``, TLS verified against a trustme CA). :mod:`tests.amqp.server` runs
both in a subprocess; :mod:`tests.amqp.fixtures` starts it for pytest.
"""
