"""The aiohttp service: the WebSocket sessions (`live/`), the event log (`eventlog/`), the HTTP routes."""
