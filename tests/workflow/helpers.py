"""Helpers for the workflow edge tests: a staff HTTP client, token minting, event-log reads
and waits for pushed events. Everything talks to a real ``openconsult serve`` subprocess."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from loadtest.client import RequestFailed, SignallingClient
from rooms.model import Role
from signalling.auth import TokenAuthority
from tests.call_helpers import authority
from tests.helpers import wait_until
from tests.server import ServerProcess

BACKOFFICE_KINDS = ("Consultation", "Queue", "VideoSession", "Chat")
MINUTE_MS = 60_000


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class Clinic:
    """One server, its token authority and an HTTP session; tokens for a few staff members."""

    server: ServerProcess
    tokens: TokenAuthority
    http: aiohttp.ClientSession

    @classmethod
    def open(cls, server: ServerProcess) -> Clinic:
        return cls(server, authority(server.data_dir), aiohttp.ClientSession())

    async def close(self) -> None:
        await self.http.close()

    def staff(self, role: Role, user: str, *departments: str) -> str:
        return self.tokens.mint("staff", role, user, sub=user, departments=departments, ttl_s=3600)

    async def call(self, method: str, path: str, token: str | None, body: Any = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.http.request(method, self.server.url + path, json=body, headers=headers) as response:
            return response.status, await response.json()

    async def ok(self, method: str, path: str, token: str, body: Any = None) -> Any:
        status, data = await self.call(method, path, token, body)
        assert status in (200, 201), (status, data)
        return data

    async def waiting_room(self, token: str, room_id: str, name: str, department: str) -> None:
        await self.ok("POST", "/api/waiting-rooms", token,
                      {"room_id": room_id, "name": name, "department": department})

    async def book(self, token: str, *, department: str, room_id: str, patient: str, clinician: str | None,
                   appointment_ms: int, patient_name: str = "Anna") -> dict[str, Any]:
        body: dict[str, Any] = {"department": department, "waiting_room": room_id, "patient_ref": patient,
                                "patient_name": patient_name, "appointment_ms": appointment_ms}
        if clinician is not None:
            body.update(clinician=clinician, clinician_name=f"Dr {clinician}")
        data: dict[str, Any] = await self.ok("POST", "/api/consultations", token, body)
        return data

    async def consultation(self, token: str, session_id: str) -> dict[str, Any]:
        data: dict[str, Any] = await self.ok("GET", f"/api/consultations/{session_id}", token)
        return data

    async def queue(self, token: str, room_id: str) -> list[dict[str, Any]]:
        data = await self.ok("GET", f"/api/waiting-rooms/{room_id}/queue", token)
        return list(data["queue"])

    async def events(self, session_id: str) -> list[dict[str, Any]]:
        support = self.tokens.mint("support", Role.SUPPORT, "Support", sub="support")
        data = await self.ok("GET", f"/api/sessions/{session_id}/events", support)
        return list(data["events"])

    async def backoffice(self, session_id: str) -> list[tuple[str, str]]:
        return [(e["kind"], e["text"]) for e in await self.events(session_id) if e["kind"] in BACKOFFICE_KINDS]

    async def connect(self, token: str) -> SignallingClient:
        client = await SignallingClient(self.server.ws_url).connect()
        await client.join(token)
        return client


async def wait_event(client: SignallingClient, name: str, predicate: Any, timeout: float = 30.0) -> dict[str, Any]:
    """The first pushed event ``name`` whose data satisfies ``predicate``."""

    def find() -> dict[str, Any] | None:
        return next((e for e in client.events if e["event"] == name and predicate(e["data"])), None)

    await wait_until(lambda: find() is not None, timeout=timeout, message=f"{name} event")
    found = find()
    assert found is not None
    return found


async def refused(client: SignallingClient, type_: str, **fields: Any) -> str:
    """The error code of a request that must fail."""
    try:
        await client.request(type_, **fields)
    except RequestFailed as exc:
        return exc.code
    raise AssertionError(f"{type_} {fields} succeeded")
