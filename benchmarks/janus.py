"""Janus side by side: start Debian's ``janus`` in a temp dir and speak its videoroom API.

``benchmarks/forwarding.py --janus`` measures Janus with the same aiortc publisher
(pre-encoded VP8 + Opus), the same counting subscribers and the same window as
OpenConsult, so anyone can check the ratio on their own machine. Nothing of Janus
is part of OpenConsult: the package is installed by ``ensure_janus()`` when
missing (``apt-get install -y janus``, through sudo when not root), and the only
Janus text here is the config templates written into a temp dir per run:

- ``janus.jcfg``: only the videoroom plugin and the WebSocket transport load,
  ICE on loopback only, an RTP port range, no session timeout, and
  ``event_loops`` when asked (Janus's default is a thread per handle);
- ``janus.transport.websockets.jcfg``: plain ``ws://127.0.0.1:<free port>``;
- ``janus.plugin.videoroom.jcfg``: one VP8 + Opus room.

The client is a small one, not a dependency: one WebSocket per participant
(subprotocol ``janus-protocol``), ``create`` a session, ``attach`` the videoroom
plugin, then a publisher ``join``s and ``configure``s with its SDP offer, and a
subscriber ``join``s with the publisher's feed id and ``start``s with its answer.
aiortc puts its candidates in the SDP and Janus answers with its own, so no
trickle is needed.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from loadtest.hooks import PacketCount, count_instead_of_decoding, on_keyframe_request
from loadtest.media import EncodedMedia, PreEncodedTrack

ROOM = 1234
VIDEOROOM = "janus.plugin.videoroom"
JANUS_LIB = Path("/usr/lib/x86_64-linux-gnu/janus")


class JanusError(RuntimeError):
    """Janus (or its videoroom plugin) answered a request with an error."""


# --- the server ---------------------------------------------------------------------


def ensure_janus() -> str:
    """The path of the ``janus`` binary, installing Debian's package when missing."""
    found = shutil.which("janus")
    if found:
        return found
    policy = subprocess.run(["apt-cache", "policy", "janus"], capture_output=True, text=True, check=False)
    if "Candidate:" not in policy.stdout or "Candidate: (none)" in policy.stdout:
        raise RuntimeError("no janus package in the apt sources (apt-cache policy janus); install Janus by hand")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([*sudo, "apt-get", "install", "-y", "janus"], check=True, env=env)
    found = shutil.which("janus")
    if not found:
        raise RuntimeError("apt-get installed janus but no janus binary is on PATH")
    return found


def _lib_dir(kind: str) -> Path:
    for base in (JANUS_LIB, Path("/usr/lib/janus"), Path("/usr/local/lib/janus")):
        if (base / kind).is_dir():
            return base / kind
    raise RuntimeError(f"no Janus {kind} folder under {JANUS_LIB}")


def _others(folder: Path, keep: str) -> str:
    """Every module in ``folder`` but ``keep``, for a ``disable`` list."""
    return ",".join(sorted(p.name for p in folder.glob("libjanus_*.so") if p.name != keep))


JANUS_JCFG = """general: {{
    configs_folder = "{conf}"
    plugins_folder = "{plugins}"
    transports_folder = "{transports}"
    events_folder = "{events}"
    loggers_folder = "{loggers}"
    log_to_stdout = true
    debug_level = 4
    session_timeout = 0
    {event_loops}
}}
certificates: {{
}}
media: {{
    rtp_port_range = "{rtp_ports}"
}}
nat: {{
    nice_debug = false
    ice_enforce_list = "{ice_address}"
}}
plugins: {{
    disable = "{disable_plugins}"
}}
transports: {{
    disable = "{disable_transports}"
}}
loggers: {{
    disable = "{disable_loggers}"
}}
events: {{
    broadcast = false
    disable = "{disable_events}"
}}
"""

WEBSOCKETS_JCFG = """general: {{
    json = "compact"
    ws = true
    ws_port = {port}
    ws_ip = "127.0.0.1"
    wss = false
}}
admin: {{
    admin_ws = false
    admin_wss = false
}}
"""

VIDEOROOM_JCFG = """general: {{
}}
room-{room}: {{
    description = "OpenConsult forwarding benchmark"
    publishers = 4
    bitrate = 0
    fir_freq = 0
    audiocodec = "opus"
    videocodec = "vp8"
    notify_joining = false
}}
"""


def host_address() -> str:
    """This host's outgoing IPv4 address (no packet is sent). Janus (libnice) leaves
    loopback out of its candidates, so Janus and its clients meet on this address;
    datagrams to one's own address still go through the kernel's loopback path."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 9))
        except OSError as exc:
            raise RuntimeError("no IPv4 route: Janus needs a non-loopback address for its ICE candidates") from exc
        return str(probe.getsockname()[0])


def write_config(conf: Path, port: int, rtp_ports: str, event_loops: int, ice_address: str) -> None:
    """Write Janus's three config files into ``conf`` (``event_loops`` 0: Janus's default)."""
    conf.mkdir(parents=True, exist_ok=True)
    folders = {kind: _lib_dir(kind) for kind in ("plugins", "transports", "events", "loggers")}
    (conf / "janus.jcfg").write_text(JANUS_JCFG.format(
        conf=conf, **{k: str(v) for k, v in folders.items()}, rtp_ports=rtp_ports, ice_address=ice_address,
        event_loops=f"event_loops = {event_loops}" if event_loops else "",
        disable_plugins=_others(folders["plugins"], "libjanus_videoroom.so"),
        disable_transports=_others(folders["transports"], "libjanus_websockets.so"),
        disable_loggers=_others(folders["loggers"], ""), disable_events=_others(folders["events"], "")))
    (conf / "janus.transport.websockets.jcfg").write_text(WEBSOCKETS_JCFG.format(port=port))
    (conf / "janus.plugin.videoroom.jcfg").write_text(VIDEOROOM_JCFG.format(room=ROOM))


@dataclass
class JanusProcess:
    """A running ``janus`` with its config in ``conf``; ``stop()`` is idempotent."""

    proc: subprocess.Popen[bytes]
    ws_url: str
    ice_address: str
    log_path: Path
    _log: IO[bytes] = field(repr=False)

    def log_tail(self, lines: int = 40) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        if not self._log.closed:
            self._log.close()


def start_janus(workdir: Path, event_loops: int = 0, rtp_ports: str = "40000-49999",
                timeout: float = 30.0) -> JanusProcess:
    """Start ``janus`` configured in ``workdir``; ready when its WebSocket accepts a connection."""
    import socket

    from tests.helpers import free_port

    binary = ensure_janus()
    port = free_port()
    conf = workdir / "conf"
    ice_address = host_address()
    write_config(conf, port, rtp_ports, event_loops, ice_address)
    log_path = workdir / "janus.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen([binary, "-C", str(conf / "janus.jcfg"), "-F", str(conf)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    janus = JanusProcess(proc, f"ws://127.0.0.1:{port}", ice_address, log_path, log)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            tail = janus.log_tail()
            janus.stop()
            raise RuntimeError(f"janus exited with {proc.returncode}:\n{tail}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return janus
        except OSError:
            if time.monotonic() > deadline:
                tail = janus.log_tail()
                janus.stop()
                raise RuntimeError(f"janus did not listen on {port} within {timeout}s:\n{tail}") from None
            time.sleep(0.1)


# --- the client -----------------------------------------------------------------------


class JanusClient:
    """One WebSocket to Janus, one session, one videoroom handle."""

    _transactions = itertools.count(1)

    def __init__(self, ws_url: str) -> None:
        self.ws_url = ws_url
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._seen: set[str] = set()
        self._seen_changed = asyncio.Event()
        self.session_id = 0
        self.handle_id = 0

    async def connect(self) -> None:
        self._http = aiohttp.ClientSession()
        self._ws = await self._http.ws_connect(self.ws_url, protocols=("janus-protocol",))
        self._reader = asyncio.create_task(self._read())
        self.session_id = int((await self._request({"janus": "create"}))["data"]["id"])
        attached = await self._request({"janus": "attach", "plugin": VIDEOROOM, "session_id": self.session_id})
        self.handle_id = int(attached["data"]["id"])

    async def _read(self) -> None:
        assert self._ws is not None
        async for message in self._ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            data: dict[str, Any] = message.json()
            # The first answer that is not an "ack" settles a transaction: "success"
            # for create/attach, the plugin's "event" for a message.
            future = self._pending.get(str(data.get("transaction", "")))
            if future is not None and data.get("janus") != "ack" and not future.done():
                future.set_result(data)
            elif "transaction" not in data:  # an event of the handle: webrtcup, media, hangup, …
                self._seen.add(str(data.get("janus")))
                self._seen_changed.set()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(JanusError("Janus closed the WebSocket"))

    async def _request(self, body: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        assert self._ws is not None
        transaction = str(next(self._transactions))
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[transaction] = future
        try:
            await self._ws.send_json({**body, "transaction": transaction})
            answer = await asyncio.wait_for(future, timeout)
        finally:
            del self._pending[transaction]
        if answer.get("janus") == "error":
            raise JanusError(f"{body['janus']}: {answer['error']}")
        return answer

    async def wait_for(self, kind: str, timeout: float = 30.0) -> None:
        """Wait until Janus has sent an event of ``kind`` (e.g. ``webrtcup``) for this handle."""
        async def seen() -> None:
            while kind not in self._seen:
                self._seen_changed.clear()
                await self._seen_changed.wait()

        await asyncio.wait_for(seen(), timeout)

    async def message(self, body: dict[str, Any], jsep: dict[str, str] | None = None) -> dict[str, Any]:
        """Send a videoroom request; return the plugin's event (``data`` and ``jsep``)."""
        request: dict[str, Any] = {"janus": "message", "session_id": self.session_id,
                                   "handle_id": self.handle_id, "body": body}
        if jsep is not None:
            request["jsep"] = jsep
        answer = await self._request(request)
        data: dict[str, Any] = answer.get("plugindata", {}).get("data", {})
        if "error" in data:
            raise JanusError(f"videoroom {body['request']}: {data['error']} ({data.get('error_code')})")
        return {"data": data, "jsep": answer.get("jsep")}

    async def close(self) -> None:
        if self._ws is not None and not self._ws.closed and self.session_id:
            try:
                await asyncio.wait_for(self._request({"janus": "destroy", "session_id": self.session_id}), 5)
            except (JanusError, OSError, asyncio.TimeoutError):
                pass
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._http is not None:
            await self._http.close()


def _peer_connection() -> RTCPeerConnection:
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))


class JanusPublisher:
    """Publishes one stream of pre-encoded audio and video into the benchmark room."""

    def __init__(self, ws_url: str, media: EncodedMedia) -> None:
        self.client = JanusClient(ws_url)
        self.media = media
        self.pc: RTCPeerConnection | None = None
        self.tracks: dict[str, PreEncodedTrack] = {}

    async def publish(self, display: str = "publisher", room: int = ROOM, create: bool = False) -> int:
        """Join ``room`` as publisher (``create``: make it first, like the configured one),
        configure with the offer; return the feed id subscribers ask for."""
        await self.client.connect()
        if create:
            await self.client.message({"request": "create", "room": room, "publishers": 2, "bitrate": 0,
                                       "fir_freq": 0, "audiocodec": "opus", "videocodec": "vp8"})
        joined = await self.client.message({"request": "join", "ptype": "publisher", "room": room,
                                            "display": display})
        feed = int(joined["data"]["id"])
        self.pc = pc = _peer_connection()
        for kind in ("audio", "video"):
            track = PreEncodedTrack(kind, self.media)
            transceiver = pc.addTransceiver(track, direction="sendonly")
            on_keyframe_request(transceiver.sender, track.request_keyframe)
            self.tracks[kind] = track
        await pc.setLocalDescription(await pc.createOffer())
        configured = await self.client.message({"request": "configure", "audio": True, "video": True},
                                               {"type": "offer", "sdp": pc.localDescription.sdp})
        if not configured["jsep"]:
            raise JanusError(f"configure answered without an SDP: {configured['data']}")
        await pc.setRemoteDescription(RTCSessionDescription(sdp=configured["jsep"]["sdp"], type="answer"))
        # Janus offers a feed to subscribers once its PeerConnection is up.
        await self.client.wait_for("webrtcup")
        return feed

    @property
    def keyframe_requests(self) -> int:
        track = self.tracks.get("video")
        return track.keyframe_requests if track else 0

    async def close(self) -> None:
        for track in self.tracks.values():
            track.stop()
        if self.pc is not None:
            await self.pc.close()
        await self.client.close()


class JanusSubscriber:
    """Subscribes to one feed and counts its packets without decoding them."""

    def __init__(self, ws_url: str) -> None:
        self.client = JanusClient(ws_url)
        self.pc: RTCPeerConnection | None = None
        self.counts: dict[str, PacketCount] = {}

    async def subscribe(self, feed: int, room: int = ROOM) -> None:
        """Join as subscriber to ``feed``, answer Janus's offer and ``start``."""
        await self.client.connect()
        attached = await self.client.message({"request": "join", "ptype": "subscriber", "room": room,
                                              "streams": [{"feed": feed}]})
        if not attached["jsep"]:
            raise JanusError(f"subscriber join answered without an SDP: {attached['data']}")
        self.pc = pc = _peer_connection()
        await pc.setRemoteDescription(RTCSessionDescription(sdp=attached["jsep"]["sdp"], type="offer"))
        for transceiver in pc.getTransceivers():
            self.counts[transceiver.kind] = count_instead_of_decoding(transceiver.receiver)
        await pc.setLocalDescription(await pc.createAnswer())
        await self.client.message({"request": "start", "room": room},
                                  {"type": "answer", "sdp": pc.localDescription.sdp})

    @property
    def packets(self) -> int:
        return sum(c.packets for c in self.counts.values())

    @property
    def octets(self) -> int:
        return sum(c.octets for c in self.counts.values())

    def receiving(self) -> bool:
        return bool(self.counts) and all(c.packets > 0 for c in self.counts.values())

    async def close(self) -> None:
        if self.pc is not None:
            await self.pc.close()
        await self.client.close()


async def _smoke(seconds: float = 5.0) -> None:
    """``python -m benchmarks.janus``: one publisher, one subscriber, packets counted."""
    from loadtest.media import encode_media
    from media.aiortc_internals import configure_ice_addresses

    with tempfile.TemporaryDirectory(prefix="janus-") as tmp:
        janus = await asyncio.to_thread(start_janus, Path(tmp))
        configure_ice_addresses((janus.ice_address,))
        publisher = JanusPublisher(janus.ws_url, encode_media(3.0))
        subscriber = JanusSubscriber(janus.ws_url)
        try:
            feed = await publisher.publish()
            await subscriber.subscribe(feed)
            await asyncio.sleep(seconds)
            print(f"feed {feed}: subscriber got {subscriber.packets} packets ({subscriber.counts})")
        except Exception:
            print(janus.log_tail())
            raise
        finally:
            await subscriber.close()
            await publisher.close()
            tail = janus.log_tail()
            await asyncio.to_thread(janus.stop)
        if not subscriber.receiving():
            raise SystemExit(f"no media through Janus; log tail:\n{tail}")


if __name__ == "__main__":
    asyncio.run(_smoke())
