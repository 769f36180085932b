"""What one server peer connection holds and what setting it up costs, in one process: an
in-process ``Router``, N publishes (audio + video, from aiortc clients with no tracks) each
with one subscription, over loopback. It prints the process CPU while each of the router's
``publish``, ``subscribe`` and ``answer`` is awaited (per peer connection; the clients' side
of whatever the event loop ran meanwhile is in it too), then, once every peer connection is
connected, the Python objects reachable from the server's peer connections (``gc``
referents, stopping at what they share: the router, the loop, classes, functions, modules)
per peer connection by type, and the running tasks by coroutine.

    .venv/bin/python benchmarks/peer_footprint.py [--calls 20]

Compare trees by running each tree's copy of this file, alternately.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import sys
import time
import types
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(REPO_ROOT))

SHARED_TYPES = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.CodeType)


async def measure(calls: int) -> None:
    from aiortc import RTCPeerConnection, RTCSessionDescription

    from media import aiortc_internals as internals
    from media.router import Router

    internals.configure_ice_addresses(("127.0.0.1",))
    router = Router()
    clients: list[RTCPeerConnection] = []
    cpu = {"publish": 0.0, "subscribe": 0.0, "answer": 0.0}
    try:
        for i in range(calls):
            publisher = RTCPeerConnection()
            clients.append(publisher)
            publisher.addTransceiver("audio", direction="sendonly")
            publisher.addTransceiver("video", direction="sendonly")
            await publisher.setLocalDescription(await publisher.createOffer())
            started = time.process_time()
            answer = await router.publish(f"st{i}", publisher.localDescription.sdp)
            cpu["publish"] += time.process_time() - started
            await publisher.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        for i in range(calls):
            subscriber = RTCPeerConnection()
            clients.append(subscriber)
            started = time.process_time()
            offer = await router.subscribe(f"sub{i}", f"st{i}")
            cpu["subscribe"] += time.process_time() - started
            await subscriber.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
            await subscriber.setLocalDescription(await subscriber.createAnswer())
            started = time.process_time()
            await router.answer(f"sub{i}", subscriber.localDescription.sdp)
            cpu["answer"] += time.process_time() - started
        peers: list[Any] = [*router.publishes.values(), *router.subscriptions.values()]
        deadline = time.monotonic() + 120
        while not all(peer.connected for peer in peers):
            if time.monotonic() > deadline:
                raise RuntimeError("not every peer connection connected within 120 s")
            await asyncio.sleep(0.1)
        print("process CPU per peer connection while the router's call is awaited: "
              + ", ".join(f"{name} {seconds / calls * 1000:.2f} ms" for name, seconds in cpu.items()))
        gc.collect()
        stop = {id(router), id(asyncio.get_running_loop()), id(router.certificates), *(id(c) for c in clients)}
        seen: set[int] = set()
        sizes: collections.Counter[str] = collections.Counter()
        counts: collections.Counter[str] = collections.Counter()
        stack: list[Any] = list(peers)
        while stack:
            obj = stack.pop()
            if id(obj) in seen or id(obj) in stop or isinstance(obj, SHARED_TYPES):
                continue
            seen.add(id(obj))
            name = f"{type(obj).__module__.split('.')[0]}.{type(obj).__qualname__}"
            sizes[name] += sys.getsizeof(obj)
            counts[name] += 1
            stack.extend(gc.get_referents(obj))
        n = len(peers)
        print(f"{sum(sizes.values()) / n / 1024:.1f} KiB of Python objects per server peer connection ({n})")
        for name, size in sizes.most_common(15):
            print(f"  {size / n / 1024:7.2f} KiB {counts[name] / n:6.1f} objects  {name}")
        tasks = collections.Counter(t.get_coro().__qualname__ for t in asyncio.all_tasks())  # type: ignore[union-attr]
        print(f"tasks: {sum(tasks.values())} for {n} server and {len(clients)} client peer connections")
        for name, count in tasks.most_common(12):
            print(f"  {count:5d} {name}")
    finally:
        for client in clients:
            await client.close()
        await router.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20, help="publishes, each with one subscription")
    asyncio.run(measure(parser.parse_args().calls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
