"""HTTP with the cluster's Redis gone, against docs/openapi.yaml: on a node sharing a real
redis-server that is then stopped, every operation whose responses list 503 answers 503
``cluster_unavailable`` (naming Redis) to a caller it admits, and every other operation answers as
usual — never 503, never 500. The yaml is the contract: nothing here lists routes again."""

from __future__ import annotations

import re
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from rooms.model import Role
from signalling.auth import TokenAuthority
from signalling.staff_api import WALK_IN_SUB
from tests.helpers import wait_until
from tests.redis_server import redis_server
from tests.server import ServerProcess, start_server
from tests.test_http_authz import DEPT, METHODS, OPENAPI, ROOM, example_body

SECRET = "cluster-unavailable-secret-0123456789abcdef"

pytestmark = [pytest.mark.slow, pytest.mark.redis]


def caller_token(tokens: TokenAuthority, op: dict[str, Any]) -> str | None:
    """A token the operation admits (its x-roles and x-room); a department admin where the answer
    depends on the department (own_departments: the only scope that reads the workflow store to
    filter), a walk-in link's token where only that is admitted."""
    if op.get("security") == []:
        return None
    roles: dict[str, str] = op["x-roles"]
    room = op.get("x-room", "staff")
    if roles.get("department_admin") == "own_departments":
        return tokens.mint(room, Role.DEPARTMENT_ADMIN, "dana", sub="dana", departments=[DEPT])
    if roles.get("patient") == "walk_in_link":
        return tokens.mint(ROOM, Role.PATIENT, "Walk-in patient", sub=WALK_IN_SUB, waiting_room=ROOM)
    for role in ("admin", "organisation_admin", "support", "department_admin", "clinician"):
        if role in roles:
            return tokens.mint(room, Role(role), "u", sub="u", departments=[DEPT])
    raise AssertionError(f"no role to call {op.get('summary')} with: {roles}")


def concrete(path: str) -> str:
    values = {"session_id": "s_none", "room_id": ROOM, "department": DEPT, "announcement_id": "a_none",
              "guest_id": "g_none"}
    return re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], path)


def scrape_redis_up(server: ServerProcess) -> float | None:
    with urllib.request.urlopen(server.url + "/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("openconsult_cluster_redis_up "):
                return float(line.split()[1])
    return None


async def test_operations_listing_503_answer_it_while_redis_is_away(tmp_path: Path) -> None:
    tokens = TokenAuthority("HS256", SECRET, SECRET, leeway_s=30)
    config = (f'[auth]\nsecret = "{SECRET}"\n[cluster]\nlease_s = 3.0\n'
              f'namespace = "u{uuid.uuid4().hex[:8]}:"\n')
    with redis_server() as redis:
        server = start_server(tmp_path, config, env={"OPENCONSULT_REDIS_URL": redis.url})
        try:
            redis.process.terminate()
            redis.process.wait(timeout=10)
            await wait_until(lambda: scrape_redis_up(server) == 0, timeout=30, interval=0.2,
                             message="the node noticing Redis is gone")
            listed, unlisted = 0, 0
            async with aiohttp.ClientSession() as http:
                for path, item in OPENAPI["paths"].items():
                    for method in METHODS:
                        op = item.get(method)
                        if op is None or op.get("x-ends-node"):
                            continue  # an operation that ends its node (a drain) is not for this node
                        token = caller_token(tokens, op)
                        headers = {"Authorization": f"Bearer {token}"} if token else {}
                        async with http.request(method.upper(), server.url + concrete(path), headers=headers,
                                                json=example_body(op)) as response:
                            status = response.status
                            data = await response.json() if response.content_type == "application/json" else None
                        name = f"{method.upper()} {path}"
                        if "ClusterUnavailable" in str(op["responses"].get("503", "")):
                            listed += 1
                            assert status == 503 and isinstance(data, dict), (name, status, data)
                            assert data["error"]["code"] == "cluster_unavailable", (name, data)
                            assert "Redis" in data["error"]["message"], (name, data)
                        else:
                            unlisted += 1
                            assert status < 500, (name, status, data)
            assert listed >= 15 and unlisted >= 5, (listed, unlisted)
        finally:
            server.stop()
