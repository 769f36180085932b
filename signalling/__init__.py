"""Signalling: the aiohttp edge. CLI, config, WebSocket protocol, JWT auth, HTTP API and static pages."""

__version__ = "0.1.0"
