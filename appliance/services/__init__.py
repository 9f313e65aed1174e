"""The trio tasks of the appliance and the ASGI apps its listeners serve.

Each long-lived task has the shape ``async def run_x(deps, *, task_status)`` and calls
``task_status.started(...)`` once it is really ready (sockets bound, state loaded).
"""
