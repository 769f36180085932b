"""A WebSocket client on a plain socket, for what a well-behaved library will not do: hand-made
frames (compressed bombs, oversized, fragmented), a shrunk receive buffer, never reading.

Only what the edge tests need: the RFC 6455 handshake (optionally with permessage-deflate),
masked client frames, and reading server frames up to the close frame.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
import zlib
from functools import lru_cache

OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE = 0x0, 0x1, 0x2, 0x8
_DEFLATE_TAIL = b"\x00\x00\xff\xff"


def client_frame(opcode: int, payload: bytes, *, fin: bool = True, rsv1: bool = False) -> bytes:
    """One masked client frame."""
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", first, 0x80 | n)
    elif n < 65536:
        header = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, n)
    mask = os.urandom(4)
    if n == 0:
        return header + mask
    key = (mask * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
    return header + mask + masked


@lru_cache(maxsize=8)
def deflate_bomb(compressed_bytes: int) -> bytes:
    """A raw-deflate payload (permessage-deflate form, tail stripped) of about ``compressed_bytes``
    that inflates to roughly a thousand times as many zero bytes."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = bytes(1 << 20)
    parts: list[bytes] = []
    size = 0
    while size < compressed_bytes - 1100:
        part = compressor.compress(chunk)
        parts.append(part)
        size += len(part)
    parts.append(compressor.flush(zlib.Z_SYNC_FLUSH))
    payload = b"".join(parts)
    assert payload.endswith(_DEFLATE_TAIL)
    return payload[: -len(_DEFLATE_TAIL)]


def deflated(data: bytes) -> bytes:
    """``data`` as one permessage-deflate payload."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    payload = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
    return payload[: -len(_DEFLATE_TAIL)]


class RawWebSocket:
    def __init__(self, sock: socket.socket, deflate: bool) -> None:
        self.sock = sock
        self.deflate = deflate
        self._buffer = b""
        self._inflater = zlib.decompressobj(-15)

    @classmethod
    async def connect(cls, port: int, *, protocol: str = "openconsult.v1", deflate: bool = False,
                      rcvbuf: int | None = None) -> RawWebSocket:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: sets the window
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            "GET /ws HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket", "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13", f"Sec-WebSocket-Protocol: {protocol}",
        ]
        if deflate:
            lines.append("Sec-WebSocket-Extensions: permessage-deflate")
        await loop.sock_sendall(sock, ("\r\n".join(lines) + "\r\n\r\n").encode())
        ws = cls(sock, deflate)
        head = await ws._read_until(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0]
        assert b" 101 " in status, head
        if deflate:
            assert b"permessage-deflate" in head.lower(), head
        return ws

    async def _recv(self) -> bytes:
        data = await asyncio.get_running_loop().sock_recv(self.sock, 65536)
        if not data:
            raise ConnectionResetError("EOF")
        return data

    async def _read_until(self, marker: bytes) -> bytes:
        while marker not in self._buffer:
            self._buffer += await self._recv()
        head, self._buffer = self._buffer.split(marker, 1)
        return head

    async def _read_exactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            self._buffer += await self._recv()
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    async def send(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def send_text(self, text: str) -> None:
        await self.send(client_frame(OP_TEXT, text.encode("utf-8")))

    async def send_json(self, message: object) -> None:
        await self.send_text(json.dumps(message))

    async def read_frame(self) -> tuple[int, bytes]:
        """The next server frame as (opcode, payload), inflated if it was compressed."""
        first, second = await self._read_exactly(2)
        n = second & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await self._read_exactly(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await self._read_exactly(8))
        payload = await self._read_exactly(n)
        if first & 0x40:
            payload = self._inflater.decompress(payload + _DEFLATE_TAIL)
        return first & 0x0F, payload

    async def read_message(self) -> dict[str, object]:
        """The next text or binary message as JSON (fails on a close frame)."""
        opcode, payload = await self.read_frame()
        assert opcode in (OP_TEXT, OP_BINARY), (opcode, payload[:100])
        message = json.loads(payload)
        assert isinstance(message, dict)
        return message

    async def close_code(self) -> int | None:
        """Read until the server's close frame: its code, or None if the connection ended without one."""
        try:
            while True:
                opcode, payload = await self.read_frame()
                if opcode == OP_CLOSE:
                    return int(struct.unpack("!H", payload[:2])[0]) if len(payload) >= 2 else None
        except (ConnectionError, OSError):
            return None

    def close(self) -> None:
        self.sock.close()


def vm_rss_kib(pid: int) -> int:
    """Resident memory of a process, from /proc/<pid>/status."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")
