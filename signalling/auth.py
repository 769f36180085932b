"""JWT tokens: minting (CLI, demo endpoint) and verification at join, with the access window enforced.

Demo tokens (POST /api/demo/token) carry ``"demo": true`` and a ``sub`` the server picks in its own
``demo:`` namespace: they reach a media room, never the clinical workflow or any HTTP API.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from rooms.model import Role
from signalling.config import Config, ConfigError
from signalling.errors import RoomMismatch, TokenExpired, TokenNotYetValid, Unauthorized

ROOM_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
NAME_MAX = 80
DEPARTMENTS_MAX = 64
#: Optional string claims of consultation join links (see signalling.workflow).
LINK_CLAIMS = ("consultation", "waiting_room", "link")
#: Longest token accepted, in characters: above any token OpenConsult mints (a staff token with
#: 64 departments of 64 characters is ~6 KB), below aiohttp's 8190-byte header line.
TOKEN_MAX = 8000
#: The ``sub`` namespace of demo tokens: no workflow identity lives there.
DEMO_SUB_PREFIX = "demo:"


@dataclass(frozen=True)
class Claims:
    room: str
    role: Role
    name: str
    sub: str
    nbf: int
    exp: int
    #: Staff: the departments the user belongs to (strict department separation).
    departments: tuple[str, ...] = ()
    #: A consultation join link: the consultation's session id (also the token's room).
    consultation: str | None = None
    #: A patient's join link: the waiting room to queue in, and the link token issued by ``invite``.
    waiting_room: str | None = None
    link: str | None = None
    #: Minted by the demo endpoint: media only, refused by the workflow and every HTTP API.
    demo: bool = False


class TokenAuthority:
    """Signs and verifies tokens with the configured key (HS256 secret or RS256 key pair)."""

    def __init__(self, algorithm: str, verify_key: str | bytes, sign_key: str | bytes | None, leeway_s: int) -> None:
        self.algorithm = algorithm
        self._verify_key = verify_key
        self._sign_key = sign_key
        self.leeway_s = leeway_s

    @classmethod
    def from_config(cls, config: Config, create_secret: bool = True) -> TokenAuthority:
        auth = config.auth
        if auth.algorithm == "RS256":
            try:
                public = Path(auth.public_key_file).read_bytes()
                private = Path(auth.private_key_file).read_bytes() if auth.private_key_file else None
            except OSError as exc:
                raise ConfigError(f"auth: cannot read key file: {exc}") from None
            return cls("RS256", public, private, auth.leeway_s)
        secret = auth.secret or load_or_create_secret(config.data_path, create=create_secret)
        return cls("HS256", secret, secret, auth.leeway_s)

    def mint(
        self, room: str, role: Role, name: str, sub: str | None = None, not_before: int | None = None,
        expires: int | None = None, ttl_s: int = 3600, departments: tuple[str, ...] | list[str] = (),
        demo: bool = False, **link_claims: str,
    ) -> str:
        """A signed token. ``departments`` and ``link_claims`` (``consultation``, ``waiting_room``,
        ``link``) are optional claims; they are only written when given. ``demo`` marks a demo
        token: its ``sub`` is picked here in the ``demo:`` namespace and it carries no link claims."""
        if self._sign_key is None:
            raise ConfigError("auth.private_key_file is needed to sign RS256 tokens")
        if not ROOM_PATTERN.match(room):
            raise ValueError(f'room "{room}" must be 1-64 characters of A-Z a-z 0-9 _ . : -')
        if not name or len(name) > NAME_MAX:
            raise ValueError(f"name must be 1-{NAME_MAX} characters")
        now = int(time.time())
        nbf = now if not_before is None else not_before
        exp = (nbf if not_before is not None else now) + ttl_s if expires is None else expires
        if exp <= nbf:
            raise ValueError("the token's expiry must be after its start")
        if demo:
            if sub is not None or departments or link_claims:
                raise ValueError("a demo token carries no sub, departments or link claims of its own")
            sub = DEMO_SUB_PREFIX + secrets.token_urlsafe(12)
        elif (sub or name).startswith(DEMO_SUB_PREFIX):
            raise ValueError(f'sub "{sub or name}" is in the demo namespace ({DEMO_SUB_PREFIX}…)')
        claims: dict[str, Any] = {"room": room, "role": str(role), "name": name, "sub": sub or name, "nbf": nbf,
                                  "exp": exp, "iat": now}
        if demo:
            claims["demo"] = True
        if departments:
            claims["departments"] = _departments(list(departments), ValueError)
        for key, value in link_claims.items():
            if key not in LINK_CLAIMS or not isinstance(value, str) or not 0 < len(value) <= 256:
                raise ValueError(f'claim "{key}" is not a known link claim or not a 1-256 character string')
            claims[key] = value
        return jwt.encode(claims, self._sign_key, algorithm=self.algorithm)

    def verify(self, token: str, room: str | None = None, now: float | None = None) -> Claims:
        """Check signature, window and claims; raise a coded error naming what was wrong."""
        if not isinstance(token, str) or not token:
            raise Unauthorized("token must be a non-empty string")
        if len(token) > TOKEN_MAX:
            raise Unauthorized(f"token is {len(token)} characters, over the {TOKEN_MAX} accepted")
        try:
            header = jwt.get_unverified_header(token)
        except (jwt.PyJWTError, ValueError):
            raise Unauthorized("token is not a JWT") from None
        alg = header.get("alg")
        if alg != self.algorithm:
            # ascii(): the header is the client's; a lone surrogate or control character stays text.
            shown = _shown(alg) if isinstance(alg, str) else type(alg).__name__
            raise Unauthorized(f'token algorithm "{shown}" is not the configured {self.algorithm}')
        try:
            data: dict[str, Any] = jwt.decode(
                token, self._verify_key, algorithms=[self.algorithm],
                options={"require": ["exp", "nbf", "room", "role", "name"], "verify_exp": False, "verify_nbf": False},
            )
        except jwt.InvalidSignatureError:
            raise Unauthorized("token signature is invalid") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthorized(f'token lacks the "{exc.claim}" claim') from None
        except (jwt.PyJWTError, ValueError) as exc:
            raise Unauthorized(f"token is invalid: {_shown(str(exc), 120)}") from None
        # The window is checked here rather than by PyJWT so the error names which end failed.
        t = time.time() if now is None else now
        nbf, exp = data["nbf"], data["exp"]
        if not isinstance(nbf, int) or not isinstance(exp, int) or isinstance(nbf, bool) or isinstance(exp, bool):
            raise Unauthorized("token nbf and exp must be integers")
        if t < nbf - self.leeway_s:
            raise TokenNotYetValid(f"token is valid from {_iso(nbf)}, it is now {_iso(int(t))}: too early")
        if t > exp + self.leeway_s:
            raise TokenExpired(f"token expired at {_iso(exp)}, it is now {_iso(int(t))}: too late")
        if not isinstance(data["role"], str) or data["role"] not in set(Role):
            raise Unauthorized(f'token role "{_shown(str(data["role"]))}" is not one of {", ".join(Role)}')
        role = Role(data["role"])
        if not isinstance(data["room"], str) or not ROOM_PATTERN.match(data["room"]):
            raise Unauthorized("token room claim is malformed")
        if not isinstance(data["name"], str) or not 0 < len(data["name"]) <= NAME_MAX:
            raise Unauthorized("token name claim is malformed")
        if room is not None and room != data["room"]:
            raise RoomMismatch(f'token is for room "{data["room"]}", not "{room}"')
        sub = data.get("sub", data["name"])
        if not isinstance(sub, str) or not 0 < len(sub) <= 256:
            raise Unauthorized("token sub claim must be a string of 1-256 characters")
        demo = data.get("demo", False)
        if not isinstance(demo, bool):
            raise Unauthorized("token demo claim must be true or false")
        if sub.startswith(DEMO_SUB_PREFIX) and not demo:
            raise Unauthorized(f"token sub is in the demo namespace ({DEMO_SUB_PREFIX}…) but the token is not a demo token")
        departments = _departments(data.get("departments", []), Unauthorized)
        extra: dict[str, str | None] = {}
        for key in LINK_CLAIMS:
            value = data.get(key)
            if value is not None and (not isinstance(value, str) or not 0 < len(value) <= 256):
                raise Unauthorized(f"token {key} claim is malformed")
            extra[key] = value
        if demo and (departments or any(extra.values()) or not sub.startswith(DEMO_SUB_PREFIX)):
            raise Unauthorized("a demo token carries no workflow claims")
        return Claims(room=data["room"], role=role, name=data["name"], sub=sub,
                      nbf=nbf, exp=exp, departments=departments, demo=demo, **extra)


def _departments(value: Any, error: type[Exception]) -> tuple[str, ...]:
    """The ``departments`` claim: a list of at most 64 strings of 1-64 characters."""
    if (not isinstance(value, list) or len(value) > DEPARTMENTS_MAX
            or not all(isinstance(d, str) and 0 < len(d) <= 64 for d in value)):
        raise error(f"token departments claim must be a list of at most {DEPARTMENTS_MAX} strings of 1-64 characters")
    return tuple(value)


def unverified_room(token: str) -> str | None:
    """The room a token claims, signature unchecked: only to file a rejected token
    under the room support staff will look in."""
    try:
        room = jwt.decode(token, options={"verify_signature": False}).get("room")
    except jwt.PyJWTError:
        return None
    return room if isinstance(room, str) and ROOM_PATTERN.match(room) else None


def unverified_consultation(token: str) -> str | None:
    """The consultation a token names, signature unchecked: only to file a refused link
    (expired, too early, for another room, forged) under that consultation's own session, where
    support staff look. None unless it is well formed and is also the token's room claim."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    consultation = claims.get("consultation") if isinstance(claims, dict) else None
    if not isinstance(consultation, str) or not ROOM_PATTERN.match(consultation):
        return None
    return consultation if claims.get("room") == consultation else None


def _shown(text: str, limit: int = 40) -> str:
    """Client text quoted in an error message: non-ASCII and control characters escaped (a lone
    surrogate stays encodable), at most ``limit`` characters."""
    return ascii(text[:limit])[1:-1]


def _iso(t: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def load_or_create_secret(data_dir: Path, create: bool = True) -> str:
    """The HS256 secret kept in <data_dir>/jwt-secret, generated (0600) on first start."""
    path = data_dir / "jwt-secret"
    if path.exists():
        secret = path.read_text().strip()
        if len(secret) < 32:
            raise ConfigError(f"{path} holds a secret shorter than 32 characters")
        return secret
    if not create:
        raise ConfigError(f"no auth.secret configured and {path} does not exist yet: start the server once first")
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    # O_EXCL: two processes starting at once must not each write their own secret.
    try:
        fd = path.open("x")
    except FileExistsError:
        return load_or_create_secret(data_dir, create=False)
    with fd:
        path.chmod(0o600)
        fd.write(secret + "\n")
    return secret
