"""Optional token claims of the workflow: staff departments and consultation link claims."""

from __future__ import annotations

import time

import jwt
import pytest

from rooms.model import Role
from signalling.auth import TokenAuthority
from signalling.errors import Unauthorized

SECRET = "s" * 40


def authority() -> TokenAuthority:
    return TokenAuthority("HS256", SECRET, SECRET, leeway_s=30)


def test_departments_and_link_claims_round_trip() -> None:
    tokens = authority()
    plain = tokens.verify(tokens.mint("room-1", Role.PATIENT, "Anna"))
    assert (plain.departments, plain.consultation, plain.waiting_room, plain.link) == ((), None, None, None)
    staff = tokens.verify(tokens.mint("staff", Role.CLINICIAN, "Dr", departments=["cardio", "derm"]))
    assert staff.departments == ("cardio", "derm")
    link = tokens.verify(tokens.mint("s_abc", Role.PATIENT, "Anna", consultation="s_abc", waiting_room="wr-1",
                                     link="tok"))
    assert (link.consultation, link.waiting_room, link.link) == ("s_abc", "wr-1", "tok")
    with pytest.raises(ValueError):
        tokens.mint("r", Role.PATIENT, "A", colour="red")


@pytest.mark.parametrize("claims", [{"departments": "cardio"}, {"departments": [1]}, {"departments": [""]},
                                    {"consultation": 5}, {"waiting_room": ""}])
def test_malformed_optional_claims_are_refused(claims: dict[str, object]) -> None:
    now = int(time.time())
    token = jwt.encode({"room": "r", "role": "clinician", "name": "Dr", "nbf": now, "exp": now + 60, **claims},
                       SECRET, algorithm="HS256")
    with pytest.raises(Unauthorized):
        authority().verify(token)
