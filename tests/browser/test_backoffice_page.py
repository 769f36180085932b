"""The back-office log page (/backoffice) in real headless Chromium against a real server: a
support token searches, the rows show newest first with the booking of a patient whose name is
HTML shown as text (never executed), the search itself appears as a LookUp on the next search,
and a clinician token gets the server's refusal."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import pytest

from rooms.model import Role
from tests.browser.conftest import BrowserFactory, ServerHandle
from tests.call_helpers import authority
from tests.helpers import wait_until_sync
from tests.workflow.helpers import now_ms

pytestmark = pytest.mark.browser

XSS = '<img src=x onerror="window.__pwned=1">'
ROWS_JS = """
return Array.from(document.querySelectorAll('#entries tbody tr'))
  .map((row) => Array.from(row.cells).map((cell) => cell.textContent));
"""


def post(server: ServerHandle, path: str, token: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(server.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        data: dict[str, Any] = json.loads(response.read())
        return data


def search(page: Any, token: str) -> list[list[str]]:
    page.find_element("id", "staff-token").clear()
    page.find_element("id", "staff-token").send_keys(token)
    done = "return document.getElementById('status').dataset.done || '0';"
    before = int(page.execute_script(done))
    page.find_element("id", "search").click()
    wait_until_sync(lambda: int(page.execute_script(done)) > before, timeout=30, message="the search to finish")
    return [list(r) for r in page.execute_script(ROWS_JS)]


def test_support_searches_the_log_and_html_stays_text(server: ServerHandle, browser: BrowserFactory) -> None:
    tokens = authority(server.data_dir)
    org = tokens.mint("staff", Role.ORGANISATION_ADMIN, "Olga", sub="olga")
    post(server, "/api/waiting-rooms", org, {"room_id": "bo-room", "name": "Bo", "department": "bo-dept"})
    booked = post(server, "/api/consultations", org, {
        "department": "bo-dept", "waiting_room": "bo-room", "patient_ref": XSS, "patient_name": "Anna",
        "appointment_ms": now_ms() + 3_600_000})
    sid = booked["consultation"]["session_id"]
    page = browser()
    page.get(f"{server.url}/backoffice")
    support = tokens.mint("support", Role.SUPPORT, "Sue", sub="sue-page")
    rows = search(page, support)
    mine = [r for r in rows if r[2] == sid]
    assert [r[1] for r in mine] == ["Consultation", "Consultation"], rows
    assert any(XSS in r[3] for r in mine), mine  # the patient reference, as text
    assert page.execute_script("return document.querySelectorAll('#entries img').length;") == 0
    assert page.execute_script("return typeof window.__pwned;") == "undefined"
    # The first search was a LookUp by Sue: the next one shows it, newest first.
    rows = search(page, support)
    assert rows[0][1] == "LookUp" and rows[0][4] == "Sue (sue-page) · support", rows[0]
    # A clinician's token: the server's refusal is shown, no rows.
    clinician = tokens.mint("staff", Role.CLINICIAN, "Dr", sub="dr", departments=("bo-dept",))
    assert search(page, clinician) == []
    status = page.execute_script("return document.getElementById('status').textContent;")
    assert "[forbidden]" in status, status
