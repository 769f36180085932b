"""User data for the inspector: browser, OS and device type from a User-Agent string.

The parsing is ua-parser's (the maintained uap-core rules that many analytics tools share), not a
regex of ours: browsers change their strings faster than a hand-written pattern is kept up. This
module only turns its result into the three words the inspector's user table shows, e.g.
``{"browser": "Chrome 120", "os": "Windows 10", "device": "desktop"}``. Empty input gives empty
words. Results are cached (a session's entries repeat a handful of user agents).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Final

from ua_parser import parse as _parse

#: Longest User-Agent string looked at; the rest is ignored (the parser's cost grows with length).
MAX_USER_AGENT_CHARS: Final = 512
_TABLET_WORDS: Final = ("ipad", "tablet", "kindle", "nexus 7", "nexus 9", "nexus 10", "sm-t", "tab")
_DESKTOP_OS: Final = frozenset({"Windows", "Mac OS X", "macOS", "Linux", "Ubuntu", "Fedora", "Chrome OS",
                                "ChromeOS", "FreeBSD", "OpenBSD", "Debian"})


def _version(family: str, major: str | None, minor: str | None) -> str:
    if not major:
        return family
    return f"{family} {major}.{minor}" if minor and minor != "0" else f"{family} {major}"


def _device_type(device_family: str, os_family: str, user_agent: str) -> str:
    """``desktop``, ``mobile``, ``tablet`` or ``bot`` (``""`` when nothing tells)."""
    lowered = user_agent.lower()
    if device_family == "Spider":
        return "bot"
    if any(word in device_family.lower() for word in _TABLET_WORDS) or "ipad" in lowered:
        return "tablet"
    if device_family and device_family not in ("Other", "Mac"):
        return "mobile"
    if os_family in ("Android",):
        return "tablet" if "mobile" not in lowered else "mobile"
    if os_family in ("iOS",):
        return "mobile"
    if os_family in _DESKTOP_OS or os_family.startswith("Windows"):
        return "desktop"
    return ""


def parse(user_agent: str) -> dict[str, str]:
    """``{"browser", "os", "device"}`` for a User-Agent string; each ``""`` when unknown. Never raises."""
    text = user_agent[:MAX_USER_AGENT_CHARS] if isinstance(user_agent, str) else ""
    if not text.strip():
        return {"browser": "", "os": "", "device": ""}
    browser, os_name, kind = _parse_cached(text)
    return {"browser": browser, "os": os_name, "device": kind}


@lru_cache(maxsize=1024)
def _parse_cached(text: str) -> tuple[str, str, str]:
    result = _parse(text)
    agent, system, device = result.user_agent, result.os, result.device
    browser = _version(agent.family, agent.major, agent.minor) if agent and agent.family != "Other" else ""
    os_name = _version(system.family, system.major, system.minor) if system and system.family != "Other" else ""
    kind = _device_type(device.family if device else "", system.family if system else "", text)
    return browser, os_name, kind
