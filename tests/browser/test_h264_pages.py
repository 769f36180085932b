"""Two demo pages forced to H264 (`?codec=h264`) decode each other's video through the SFU,
which relays H264 as is: each page's inbound video is H264 (getStats codec mimeType) and
frames are decoded on both sides."""

from __future__ import annotations

import secrets
from typing import Any

import pytest

from tests.browser.conftest import BrowserFactory, ServerHandle
from tests.browser.test_demo_page import demo_url, page_state, wait_for_decoded_video, wait_for_state
from tests.helpers import wait_until_sync

pytestmark = pytest.mark.browser

#: Per subscription: the inbound video codec and frames decoded; and the publisher's outbound codec.
CODECS_JS = """
const done = arguments[arguments.length - 1];
(async () => {
  const codecOf = (report, stat) => (stat.codecId && report.get(stat.codecId) || {}).mimeType || null;
  const inbound = [];
  for (const subscription of demo.subscriptions.values()) {
    const report = await subscription.getStats();
    report.forEach((stat) => {
      if (stat.type === 'inbound-rtp' && stat.kind === 'video') {
        inbound.push({codec: codecOf(report, stat), framesDecoded: stat.framesDecoded || 0});
      }
    });
  }
  const outbound = [];
  if (demo.publisher) {
    const report = await demo.publisher.getStats();
    report.forEach((stat) => {
      if (stat.type === 'outbound-rtp' && stat.kind === 'video') {
        outbound.push({codec: codecOf(report, stat), framesEncoded: stat.framesEncoded || 0});
      }
    });
  }
  return {inbound, outbound};
})().then(done, (err) => done({error: String(err)}));
"""


def video_codecs(driver: Any) -> dict[str, Any]:
    result = driver.execute_async_script(CODECS_JS)
    assert isinstance(result, dict) and "error" not in result, result
    return dict(result)


def test_two_pages_forced_to_h264_decode_each_other(server: ServerHandle, browser: BrowserFactory) -> None:
    room = f"h264-{secrets.token_hex(4)}"
    pages = [browser(), browser()]
    pages[0].get(demo_url(server, room=room, name="A", role="clinician", autojoin="1", codec="h264"))
    pages[1].get(demo_url(server, room=room, name="B", role="patient", autojoin="1", codec="h264"))
    for page in pages:
        wait_for_state(page, "joined")
    for page, who in zip(pages, ("A", "B")):
        wait_for_decoded_video(page, who)

    def decoding_h264(page: Any) -> bool:
        codecs = video_codecs(page)
        return bool(codecs["inbound"]) and all(
            s["codec"] == "video/H264" and s["framesDecoded"] > 0 for s in codecs["inbound"]) and any(
            s["codec"] == "video/H264" and s["framesEncoded"] > 0 for s in codecs["outbound"])

    for page in pages:
        wait_until_sync(lambda: decoding_h264(page), timeout=30, interval=0.5,
                        message=f"H264 both ways: {video_codecs(page)}")
        state = page_state(page)
        assert state["warning"] is None and state["sessionErrors"] == [], state
