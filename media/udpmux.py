"""One UDP port for all media of a node (``media.udp_port``): one socket per ICE address,
shared by every peer connection, and the routing of each datagram to its peer connection.

Without it every peer connection binds its own socket on an ephemeral port, so a firewall
must open thousands of ports. With it each ICE agent gets a :class:`MuxTransport` on the
shared socket instead (``aiortc_internals.use_udp_mux`` does the aioice side) and its host
candidate carries the shared port.

Routing, per shared socket (after pion's UDPMux and mediasoup's WebRtcServer):

- A STUN **request** goes by its USERNAME: ``<server ufrag>:<client ufrag>``, and every
  peer connection's server ufrag is unique on the node (16 random characters). No route
  for it, or no USERNAME at all: dropped (``unknown_username``), never answered, so the
  port reflects nothing to strangers.
- A request whose MESSAGE-INTEGRITY checks with that peer connection's password moves the
  sender's address to it: a connectivity or consent check from a new address (NAT
  rebinding, a client's port reused by a new call) takes the route. An unauthenticated
  request is delivered (aioice answers 401) but moves nothing, so knowing a ufrag is not
  enough to steal a call's media.
- Everything else (DTLS, SRTP/SRTCP, STUN responses) goes by the sender's address
  ``(ip, port)``. An address is routed once its peer connection sent it a STUN request (a
  check, so the response finds its way back; only if no other peer connection holds the
  address) or once it sent an authenticated request. An unknown address: dropped
  (``unknown_address``).

The routed peer connection's own RFC 7983 demultiplexer (``demux_datagrams``) still
applies after this: junk first bytes, and media from anyone but its selected pair, are
dropped there. Closing a peer connection closes its transports, which removes its ufrag
and every address it holds: the tables never outlive their peer connections. Each peer
connection holds at most ``MAX_ADDRESSES`` addresses (the oldest goes first).

Hot path (media in): one dict lookup on the sender's address and one call. No logging,
no allocation for IPv4.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import socket
import string
from collections.abc import Iterable
from typing import Any, Protocol

from aioice import stun

from media.events import DatagramDropReason

logger = logging.getLogger(__name__)

#: Addresses one peer connection may hold on one shared socket (its remote candidates
#: are bounded by the router at 64; a few peer-reflexive ones come on top).
MAX_ADDRESSES = 128
#: Characters of a server ufrag (ICE allows 4-256 of [A-Za-z0-9+/]).
UFRAG_LENGTH = 16
#: Receive buffer requested for a shared socket: it carries every call of the node.
DEFAULT_RCVBUF_BYTES = 4 * 1024 * 1024
_UFRAG_CHARS = string.ascii_letters + string.digits

Address = tuple[str, int]


class DatagramReceiver(Protocol):
    """What a route leads to: an aioice StunProtocol (or anything that takes datagrams)."""

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None: ...

    def connection_made(self, transport: Any) -> None: ...

    def connection_lost(self, exc: Exception | None) -> None: ...


def canonical(addr: tuple[Any, ...]) -> Address:
    """An address as the socket reports senders (IPv6 compressed), whatever the SDP wrote."""
    host = str(addr[0])
    try:
        host = ipaddress.ip_address(host).compressed
    except ValueError:
        pass
    return host, int(addr[1])


class MuxTransport(asyncio.DatagramTransport):
    """One peer connection's ICE agent on one shared socket: sends through the socket,
    receives what the socket routes to it. ``close()`` removes all of its routes."""

    def __init__(self, mux_socket: MuxSocket, ufrag: str, key: bytes, receiver: DatagramReceiver) -> None:
        super().__init__()
        self.mux_socket = mux_socket
        self.ufrag = ufrag
        #: The ICE password (MESSAGE-INTEGRITY key) of this peer connection.
        self.key = key
        self.receiver = receiver
        #: Addresses this transport holds (routed form), oldest first.
        self.routes: dict[Address, None] = {}
        #: The same addresses as they are sent to (and routed form) → routed form: the send
        #: path's one membership test.
        self.owned: dict[tuple[Any, ...], Address] = {}
        self._closed = False
        self._sendto = mux_socket.transport.sendto

    def sendto(self, data: Any, addr: Any = None) -> None:
        # A STUN request (class bits 00) we send is a check: its response must find us. Nothing
        # else claims an address: answering a stranger (a 401) must not route it to us.
        if addr not in self.owned and len(data) > 1 and data[0] < 4 and not data[0] & 1 and not data[1] & 0x10:
            self.mux_socket.claim(self, addr)
        self._sendto(data, addr)

    def send_media(self, data: bytes, addr: tuple[Any, ...]) -> None:
        """Send SRTP/SRTCP: never a STUN request, so no route to claim; straight to the socket."""
        self._sendto(data, addr)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.mux_socket.transport.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.mux_socket.detach(self)
        asyncio.get_running_loop().call_soon(self.receiver.connection_lost, None)

    def abort(self) -> None:
        self.close()


class MuxSocket(asyncio.DatagramProtocol):
    """One shared UDP socket (one ICE address) and its two route tables."""

    def __init__(self, host: str, sock: socket.socket, drops: dict[DatagramDropReason, int]) -> None:
        self.host = host
        self.sock = sock
        self.port: int = sock.getsockname()[1]
        self.drops = drops
        self.by_ufrag: dict[str, MuxTransport] = {}
        self.by_address: dict[Address, MuxTransport] = {}
        self.transport: asyncio.DatagramTransport = None  # type: ignore[assignment]  # set by connection_made
        self.started = False
        self._ipv6 = sock.family == socket.AF_INET6

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.started = True

    # --- routes ---------------------------------------------------------------------------

    def attach(self, ufrag: str, key: bytes, receiver: DatagramReceiver) -> MuxTransport:
        """Route STUN requests for ``ufrag`` to ``receiver``; returns its transport (already
        handed to ``receiver.connection_made``)."""
        if ufrag in self.by_ufrag:
            raise ValueError(f'ICE ufrag "{ufrag}" is already routed on UDP port {self.port}')
        transport = MuxTransport(self, ufrag, key, receiver)
        self.by_ufrag[ufrag] = transport
        receiver.connection_made(transport)
        return transport

    def detach(self, transport: MuxTransport) -> None:
        if self.by_ufrag.get(transport.ufrag) is transport:
            del self.by_ufrag[transport.ufrag]
        for routed in transport.routes:
            if self.by_address.get(routed) is transport:
                del self.by_address[routed]
        transport.routes.clear()
        transport.owned.clear()

    def claim(self, transport: MuxTransport, addr: Any) -> None:
        """``transport`` sends to ``addr``: route replies from there to it, unless another
        peer connection holds the address (only an authenticated request moves a route)."""
        if transport.is_closing() or not isinstance(addr, tuple) or len(addr) < 2:
            return
        routed = canonical(addr)
        holder = self.by_address.get(routed)
        if holder is None and len(transport.routes) < MAX_ADDRESSES:
            self.by_address[routed] = transport
            transport.routes[routed] = None
            holder = transport
        if holder is transport:
            transport.owned[addr] = routed
            transport.owned[routed] = routed

    def _move(self, routed: Address, transport: MuxTransport) -> None:
        """An authenticated request from ``routed``: the address is ``transport``'s now."""
        previous = self.by_address.get(routed)
        if previous is not None:
            _forget(previous, routed)
        if len(transport.routes) >= MAX_ADDRESSES:
            oldest = next(iter(transport.routes))
            _forget(transport, oldest)
            del self.by_address[oldest]
        self.by_address[routed] = transport
        transport.routes[routed] = None
        transport.owned[routed] = routed

    # --- datagrams ------------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if self._ipv6:
            addr = (addr[0], addr[1])
        if not data:
            self.drops[DatagramDropReason.EMPTY] += 1
            return
        if data[0] > 3:  # not STUN (RFC 7983): DTLS, SRTP/SRTCP or junk, by address only
            transport = self.by_address.get(addr)  # type: ignore[call-overload]
            if transport is None:
                self.drops[DatagramDropReason.UNKNOWN_ADDRESS] += 1
                return
            transport.receiver.datagram_received(data, addr)
            return
        try:
            message = stun.parse_message(data)
        except Exception:
            self.drops[DatagramDropReason.MALFORMED_STUN] += 1
            return
        if message.message_class != stun.Class.REQUEST:
            transport = self.by_address.get(addr)  # type: ignore[call-overload]
            if transport is None:
                self.drops[DatagramDropReason.UNKNOWN_ADDRESS] += 1
                return
            transport.receiver.datagram_received(data, addr)
            return
        username = message.attributes.get("USERNAME")
        transport = self.by_ufrag.get(username.partition(":")[0]) if isinstance(username, str) else None
        if transport is None:
            self.drops[DatagramDropReason.UNKNOWN_USERNAME] += 1
            return
        routed = (addr[0], addr[1])
        if self.by_address.get(routed) is not transport and _authentic(message, transport.key):
            self._move(routed, transport)
        transport.receiver.datagram_received(data, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors for one remote address say nothing about the others


def _forget(transport: MuxTransport, routed: Address) -> None:
    transport.routes.pop(routed, None)
    for key in [k for k, v in transport.owned.items() if v == routed]:
        del transport.owned[key]


def _authentic(message: stun.Message, key: bytes) -> bool:
    try:
        return "MESSAGE-INTEGRITY" in message.attributes and message.check_message_integrity(key)
    except Exception:
        return False


class UdpMux:
    """The shared media sockets of a node: one per ICE address, all on one port."""

    def __init__(self, sockets: list[socket.socket], drops: dict[DatagramDropReason, int]) -> None:
        #: Datagrams the mux dropped, by reason (plain ints; the router reports them).
        self.drops = drops
        self.sockets = [MuxSocket(s.getsockname()[0], s, drops) for s in sockets]

    @classmethod
    def bind(cls, addresses: Iterable[str], port: int, drops: dict[DatagramDropReason, int],
             rcvbuf_bytes: int = DEFAULT_RCVBUF_BYTES) -> UdpMux:
        """Bind ``port`` on each address now (so a taken port stops start-up with an OSError
        naming it); the sockets start receiving in :meth:`start`."""
        bound: list[socket.socket] = []
        try:
            for host in addresses:
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_DGRAM)
                bound.append(sock)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf_bytes)
                try:
                    sock.bind((host, port))
                except OSError as exc:
                    raise OSError(exc.errno, f"cannot bind UDP {host}:{port} ({exc.strerror})") from None
                sock.setblocking(False)
        except BaseException:
            for sock in bound:
                sock.close()
            raise
        return cls(bound, drops)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for mux_socket in self.sockets:
            await loop.create_datagram_endpoint(lambda m=mux_socket: m, sock=mux_socket.sock)  # type: ignore[misc]
            logger.info("media on one UDP port: %s:%d (receive buffer %d bytes)", mux_socket.host, mux_socket.port,
                        mux_socket.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))

    def close(self) -> None:
        for mux_socket in self.sockets:
            if mux_socket.started:
                mux_socket.transport.close()
            else:
                mux_socket.sock.close()

    @staticmethod
    def new_ufrag() -> str:
        """A server ufrag, unique on the node in practice (16 random characters: 95 bits)."""
        return "".join(secrets.choice(_UFRAG_CHARS) for _ in range(UFRAG_LENGTH))

    def route_counts(self) -> tuple[int, int]:
        """(ufrag routes, address routes) over all shared sockets."""
        return (sum(len(s.by_ufrag) for s in self.sockets), sum(len(s.by_address) for s in self.sockets))
