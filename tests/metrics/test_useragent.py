"""metrics.useragent: the inspector's browser / OS / device words from real User-Agent strings."""

from __future__ import annotations

import pytest

from metrics.useragent import MAX_USER_AGENT_CHARS, parse

CASES = [
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 "
     "Safari/537.36", {"browser": "Chrome 120", "os": "Windows 10", "device": "desktop"}),
    ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/120.0.0.0 "
     "Safari/537.36", {"browser": "HeadlessChrome 120", "os": "Linux", "device": "desktop"}),
    ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
     "Version/17.0 Mobile/15E148 Safari/604.1", {"browser": "Mobile Safari 17", "os": "iOS 17", "device": "mobile"}),
    ("Mozilla/5.0 (Linux; Android 13; Pixel 7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 "
     "Mobile Safari/537.36", {"browser": "Chrome 120", "os": "Android 13", "device": "mobile"}),
    ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10.15; rv:121.0) Gecko/20100101 Firefox/121.0",
     {"browser": "Firefox 121", "os": "Mac OS X 10.15", "device": "desktop"}),
]


@pytest.mark.parametrize(("user_agent", "expected"), CASES)
def test_real_user_agents(user_agent: str, expected: dict[str, str]) -> None:
    assert parse(user_agent) == expected


def test_ipad_is_a_tablet() -> None:
    ua = "Mozilla/5.0 (iPad; CPU OS 16_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148"
    assert parse(ua)["device"] == "tablet"
    assert parse(ua)["os"] == "iOS 16"


@pytest.mark.parametrize("junk", ["", "   ", "aiohttp/3.9", "\x00\ud800" * 50, "x" * (MAX_USER_AGENT_CHARS * 20)])
def test_unknown_or_hostile_gives_empty_words(junk: str) -> None:
    result = parse(junk)
    assert set(result) == {"browser", "os", "device"}
    assert all(isinstance(v, str) for v in result.values())


def test_results_are_independent_copies() -> None:
    ua = CASES[0][0]
    parse(ua)["browser"] = "changed"
    assert parse(ua)["browser"] == "Chrome 120"
