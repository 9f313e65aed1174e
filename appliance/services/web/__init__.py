"""The ASGI apps, one per listener of the port map (Starlette, running on trio via anyio)."""
