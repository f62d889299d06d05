"""Realtime AI conversation backend: the aiohttp service and the domain it shares with the worker."""
