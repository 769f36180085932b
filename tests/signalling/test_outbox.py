"""The parts of the WebSocket edge that decide, without a socket: the outbox (backpressure for
replies, overflow for events), the encoder fallback, and the log limiter."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import msgpack
import pytest

from signalling.codec import Codec, JsonCodec, MsgpackCodec, check_outbound, event, response_ok
from signalling.ws import LogLimiter, Outbox, _payload

CODECS: list[Codec] = [JsonCodec(), MsgpackCodec()]


def decode(codec: Codec, payload: bytes) -> Any:
    return msgpack.unpackb(payload) if codec.binary else json.loads(payload)


async def drain(outbox: Outbox) -> list[Any]:
    out = []
    while (message := await outbox.get()) is not None:
        out.append(message["n"])
    return out


async def test_replies_wait_for_room_and_keep_their_order() -> None:
    outbox = Outbox(limit=8, reply_window=2)
    puts = asyncio.gather(*[outbox.put_reply({"n": i}) for i in range(5)])
    await asyncio.sleep(0)  # let the puts run until they wait
    assert len(outbox) == 2  # the rest wait: backpressure, not overflow
    got = [(await outbox.get())["n"] for _ in range(5)]  # type: ignore[index]
    await puts
    assert got == [0, 1, 2, 3, 4]
    assert not outbox.slow_consumer


async def test_events_never_wait_and_an_overflow_marks_a_slow_consumer() -> None:
    outbox = Outbox(limit=3, reply_window=2)
    for i in range(3):
        outbox.push({"n": i})
    assert [len(outbox), outbox.slow_consumer] == [3, False]
    outbox.push({"n": 3})
    assert [len(outbox), outbox.slow_consumer, outbox.closed] == [0, True, True]
    assert await outbox.get() is None


async def test_a_reply_waiting_for_room_is_released_when_the_outbox_is_abandoned() -> None:
    outbox = Outbox(limit=4, reply_window=1)
    await outbox.put_reply({"n": 0})
    waiting = asyncio.create_task(outbox.put_reply({"n": 1}))
    await asyncio.sleep(0)
    assert not waiting.done()
    outbox.abandon()
    await asyncio.wait_for(waiting, 5)
    assert await outbox.get() is None


async def test_finish_sends_what_is_queued_then_stops() -> None:
    outbox = Outbox()
    await outbox.put_reply({"n": 1})
    outbox.push({"n": 2})
    outbox.finish()
    outbox.push({"n": 3})  # too late: dropped
    await outbox.put_reply({"n": 4})
    assert await drain(outbox) == [1, 2]


@pytest.mark.parametrize("codec", CODECS, ids=["json", "msgpack"])
def test_an_unencodable_message_is_scrubbed_replaced_or_dropped(codec: Codec) -> None:
    # A lone surrogate (from a token's name, say): sent with U+FFFD instead.
    created = event("connectionCreated", {"connection": {"name": "Eve\ud800"}})
    assert decode(codec, _payload(codec, created) or b"")["data"]["connection"]["name"] == "Eve\ufffd"
    # Something no encoder takes: a reply becomes internal_error for the same id, an event is dropped.
    reply = _payload(codec, response_ok(7, {"x": object()}))
    assert reply is not None
    decoded = decode(codec, reply)
    check_outbound(decoded)
    assert (decoded["id"], decoded["error"]["code"]) == (7, "internal_error")
    assert _payload(codec, event("chatMessage", {"x": float("nan") if not codec.binary else object()})) is None
    assert _payload(codec, response_ok(8, {"ok": "fine"})) is not None


def test_log_limiter_lets_one_line_through_per_interval_and_counts_the_rest() -> None:
    limiter = LogLimiter(10.0)
    assert limiter.allow(100.0) == 0
    assert [limiter.allow(t) for t in (101.0, 105.0, 109.9)] == [None, None, None]
    assert limiter.allow(110.0) == 3
    assert limiter.allow(110.1) is None


@pytest.mark.parametrize("value", ["0", "-1", "301", "soon"])
def test_write_timeout_is_checked(value: str) -> None:
    from signalling.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="server.write_timeout_s"):
        load_config(env={"OPENCONSULT_SERVER__WRITE_TIMEOUT_S": value})
    assert load_config(env={"OPENCONSULT_SERVER__WRITE_TIMEOUT_S": "2.5"}).server.write_timeout_s == 2.5
