"""Signalling: the aiohttp edge. CLI, config, WebSocket protocol, JWT auth, HTTP API and static pages."""
