"""TURN credentials for clients: short-lived username/password pairs derived from
the TURN server's shared secret (the TURN REST API scheme coturn implements with
``use-auth-secret``), so no client ever holds the secret itself."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from typing import Any

from signalling.config import MediaConfig


def credentials(secret: str, user: str, ttl_s: int, now: float | None = None) -> tuple[str, str]:
    """``(username, credential)``: the username is ``<expiry unix time>:<user>``, the
    credential base64(HMAC-SHA1(secret, username))."""
    expiry = int(time.time() if now is None else now) + ttl_s
    username = f"{expiry}:{user}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode()


def ice_servers(media: MediaConfig, user: str, now: float | None = None) -> list[dict[str, Any]]:
    """The RTCIceServer list a client should use (W3C field names); empty without TURN."""
    stun = [u for u in media.turn_urls if u.startswith("stun:")]
    turn = [u for u in media.turn_urls if not u.startswith("stun:")]
    servers: list[dict[str, Any]] = []
    if stun:
        servers.append({"urls": stun})
    if turn:
        username, credential = credentials(media.turn_secret, user, media.turn_credential_ttl_s, now)
        servers.append({"urls": turn, "username": username, "credential": credential})
    return servers
