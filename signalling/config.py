"""Configuration: one frozen dataclass tree. Defaults in code, then a TOML file
(unknown keys rejected), then OPENCONSULT_* environment variables, then validate()."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Mapping, get_type_hints


#: Bounds of media.udp_rcvbuf_bytes: below 64 KiB a single keyframe burst overflows it; above
#: 256 MiB it is a typo (the kernel would pin that much memory per socket).
MIN_RCVBUF = 64 * 1024
MAX_RCVBUF = 256 * 1024 * 1024


class ConfigError(ValueError):
    """A config value is wrong; the message names the key and what was wrong."""

    code = "invalid_config"


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: str = "./data"
    #: Largest WebSocket frame accepted, in bytes (an SDP offer is ~5-10 KiB).
    max_message_bytes: int = 131072
    #: Invalid messages tolerated per connection before it is closed as abusive.
    max_invalid_messages: int = 50
    #: Interval of WebSocket pings; a client that does not answer one within half
    #: of it is dropped as networkDisconnected.
    heartbeat_s: float = 10.0
    #: Longest one outbound frame may wait for the client to read it before the connection is
    #: dropped as a slow consumer (close 4008, reason slowConsumer).
    write_timeout_s: float = 10.0
    #: Seconds a new WebSocket may stay without a successful join before it is closed (4001):
    #: an unauthenticated socket costs memory and a file descriptor, so it gets little time.
    join_timeout_s: float = 15.0
    #: WebSocket connections this node holds at once (joined or not); more are refused with HTTP
    #: 503 before the upgrade. Keep the process's open-file limit above it.
    max_connections: int = 20000
    #: Streams one connection may publish at once (camera, screen, …).
    max_publishes_per_connection: int = 4
    #: Subscriptions one connection may hold at once.
    max_subscriptions_per_connection: int = 32
    #: Client reports (client.event, client.stats, the tab-closed beacon) one connection may send
    #: per minute (bursts of a quarter of it); more get ``rate_limited``. The SDK sends one stats
    #: message every 5 s (12 a minute) and a few events.
    client_reports_per_min: int = 60
    #: Reverse proxies (addresses or CIDRs) whose X-Forwarded-For / Forwarded headers are believed
    #: for the client's IP (shown in the inspector). Empty: those headers are ignored and the IP is
    #: the TCP peer's.
    trusted_proxies: tuple[str, ...] = ()
    #: Log lines on stderr: "text" (readable) or "json" (one object per line, with node, session
    #: and connection ids as fields, for a log collector). ``--log-format`` overrides it.
    log_format: str = "text"


@dataclass(frozen=True)
class AuthConfig:
    #: HS256 (shared secret) or RS256 (public key file; tokens signed elsewhere).
    algorithm: str = "HS256"
    #: HS256 secret. Empty: generated into <data_dir>/jwt-secret on first start.
    secret: str = ""
    #: RS256: path to the PEM public key used to verify tokens.
    public_key_file: str = ""
    #: RS256: path to the PEM private key `openconsult token` signs with (optional).
    private_key_file: str = ""
    #: Seconds of clock skew tolerated at both ends of a token's window.
    leeway_s: int = 30


@dataclass(frozen=True)
class MediaConfig:
    #: Local addresses ICE gathers host candidates on. Empty: every interface
    #: except loopback (aioice's default). Tests use ["127.0.0.1"].
    ice_addresses: tuple[str, ...] = ()
    #: 1:1 NAT: the public address put in our candidates instead of the local one.
    announced_ip: str = ""
    #: One UDP port for all media of this server process: every peer connection's host
    #: candidate is on it (one socket per ICE address), datagrams routed by STUN username and
    #: then by remote address. 0: one socket per peer connection on an ephemeral port.
    #: Several processes on one host each need their own port (``serve --workers N``: worker i
    #: binds ``udp_port + i``).
    udp_port: int = 0
    #: TURN servers handed to clients (``turn:host:3478?transport=udp``, ``turns:host:443?transport=tcp``)
    #: for networks that block UDP to this server. Empty: clients get no TURN server.
    turn_urls: tuple[str, ...] = ()
    #: The TURN server's shared secret (coturn ``static-auth-secret``): each client gets
    #: short-lived credentials derived from it (the TURN REST API scheme), never the secret.
    turn_secret: str = ""
    #: Lifetime of those credentials.
    turn_credential_ttl_s: int = 86400
    #: Keyframe requests sent upstream for one stream at most this often.
    pli_interval_s: float = 0.5
    #: Interval of quality samples (bitrate, loss, jitter, RTT) per track.
    sample_interval_s: float = 2.0
    #: A subscription whose SDP answer has not come by then is closed.
    answer_timeout_s: float = 30.0
    #: A publish or subscription whose peer connection is not connected (ICE and DTLS)
    #: by then is closed, logged with the reason; a publish is announced only once connected.
    connect_timeout_s: float = 15.0
    #: Peer connections (publishes plus subscriptions) this node holds at most; more get
    #: ``over_capacity``. Each holds UDP sockets (one per ICE address) unless ``udp_port`` is set.
    max_peer_connections: int = 500
    #: Receive buffer (``SO_RCVBUF``) every media UDP socket asks for: what the kernel holds
    #: while the server is busy, before it drops datagrams. The kernel caps it at
    #: ``net.core.rmem_max``; the start-up log says the size granted and how to raise the cap.
    udp_rcvbuf_bytes: int = 4 * 1024 * 1024


@dataclass(frozen=True)
class DemoConfig:
    #: POST /api/demo/token mints media-only patient/clinician tokens for any room that is not a
    #: consultation's (never a workflow identity). "auto" (the default): served only while
    #: server.host is a loopback address, so a laptop demo works and a reachable node does not
    #: hand out tokens; true: served on any address (say so on purpose); false: never.
    enabled: bool | None = None


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback IP address (``0.0.0.0`` and ``::`` listen everywhere: not loopback)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


CHAT_RETENTIONS = ("keep", "delete_on_call_end", "delete_after_days")


@dataclass(frozen=True)
class WorkflowSettings:
    """The clinical workflow (waiting rooms, consultations, chat): organisation settings."""

    #: Staff see only their departments' consultations and queues (organisation admins see all).
    strict_departments: bool = True
    #: A booked patient not arrived by the appointment plus this many minutes may be marked no-show.
    no_show_grace_min: int = 15
    #: Arrival within this many minutes either side of the appointment counts as on time.
    on_time_window_min: int = 5
    #: Join links work from this many minutes before to this many after the appointment.
    link_valid_before_min: int = 60
    link_valid_after_min: int = 60
    #: Largest chat message, in bytes of UTF-8.
    chat_max_bytes: int = 4096
    #: "keep", "delete_on_call_end" or "delete_after_days" (with chat_retention_days).
    chat_retention: str = "keep"
    chat_retention_days: int = 0
    #: Seconds between two runs of the chat retention sweep (delete_after_days); runs never overlap.
    retention_sweep_s: float = 3600.0
    #: Default validity, in minutes, of a waiting room's walk-in link (POST .../walk-in-link).
    walk_in_link_valid_min: int = 480
    #: At most this many walk-ins per walk-in link per minute (POST /api/walk-in; more get 429 rate_limited).
    walk_in_per_link_per_min: int = 30
    #: Base URL written into join links (e.g. https://video.example.org); empty: the request's origin.
    public_url: str = ""


EVENTLOG_RETENTION_POLICIES = ("delete", "anonymise")


@dataclass(frozen=True)
class RetentionSettings:
    """How long the event log and the audit log keep what they hold (the organisation's policy).
    Runs with the workflow's retention job, every ``workflow.retention_sweep_s``."""

    #: Event-log entries (events, quality timeline, client stats) older than this many days are
    #: deleted or anonymised (``eventlog_policy``); 0 keeps them.
    eventlog_days: int = 0
    #: "delete" (the entries go) or "anonymise" (names, patient references, IP addresses and
    #: user agents are removed; times, durations, reasons and figures stay).
    eventlog_policy: str = "delete"
    #: Audit-log entries (Login, LookUp) older than this many days are deleted; 0 keeps them.
    audit_days: int = 0


@dataclass(frozen=True)
class AuditSettings:
    #: A staff token's first request is a sign-in (a Login entry); the same token (told apart by a
    #: digest) counts as signing in again once it has not been used for this many minutes.
    sign_in_window_min: int = 720


@dataclass(frozen=True)
class EventLogSettings:
    #: Where the event log and quality timeline live. Empty: SQLite in the data dir (one host;
    #: workers on one host share the file). ``postgresql://user:password@host:5432/db``: PostgreSQL,
    #: shared by nodes on several hosts (see docs/operations.md, "Event log in PostgreSQL").
    url: str = ""
    #: This node's name on its entries (the tie-break after time); empty: host name and process id.
    node_id: str = ""


@dataclass(frozen=True)
class ClusterSettings:
    """Several nodes sharing ``redis_url`` (ignored without it)."""

    #: Seconds a room lease and a node's heartbeat live without renewal: a node killed outright
    #: loses its rooms after at most this long. Heartbeats (which renew the leases) go every third.
    lease_s: float = 10.0
    #: Keys in Redis start with this (put it in a hash tag, ``{openconsult}:``, for Redis Cluster).
    namespace: str = "openconsult:"
    #: Seconds a draining node waits for its calls to end before it stops anyway (closing what
    #: is left with 1001, as a plain SIGTERM does).
    drain_timeout_s: float = 3600.0


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    media: MediaConfig = field(default_factory=MediaConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    workflow: WorkflowSettings = field(default_factory=WorkflowSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    eventlog: EventLogSettings = field(default_factory=EventLogSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    #: Redis URL for running several nodes; empty: one node, no Redis.
    redis_url: str = ""

    @property
    def data_path(self) -> Path:
        return Path(self.server.data_dir)

    @property
    def demo_served(self) -> bool:
        """Whether POST /api/demo/token is served (see :class:`DemoConfig`)."""
        if not self._can_sign:
            return False
        if self.demo.enabled is None:
            return is_loopback(self.server.host)
        return self.demo.enabled

    @property
    def _can_sign(self) -> bool:
        return self.auth.algorithm != "RS256" or bool(self.auth.private_key_file)

    def demo_status(self) -> str:
        """One line for start-up: whether the demo token endpoint is on, and why."""
        host = self.server.host
        if not self._can_sign:
            return "demo token endpoint off: RS256 without auth.private_key_file, this node signs no tokens"
        if self.demo.enabled is None:
            if is_loopback(host):
                return f"demo token endpoint on: the server listens on loopback ({host}) only"
            return (f"demo token endpoint off: the server listens on {host}, not loopback "
                    "(set [demo] enabled = true to serve it anyway)")
        if self.demo.enabled:
            return (f"demo token endpoint on: [demo] enabled = true (listening on {host}); anyone who reaches "
                    "it can mint media-only demo tokens")
        return "demo token endpoint off: [demo] enabled = false"

    def validate(self) -> Config:
        s, a, m = self.server, self.auth, self.media
        if not 0 < s.port < 65536:
            raise ConfigError(f"server.port must be 1-65535, got {s.port}")
        if s.max_message_bytes < 1024:
            raise ConfigError(f"server.max_message_bytes must be >= 1024, got {s.max_message_bytes}")
        if s.max_invalid_messages < 1:
            raise ConfigError("server.max_invalid_messages must be >= 1")
        if s.heartbeat_s <= 0:
            raise ConfigError("server.heartbeat_s must be > 0")
        if not 1 <= s.join_timeout_s <= 600:
            raise ConfigError(f"server.join_timeout_s must be 1-600 seconds, got {s.join_timeout_s}")
        if not 1 <= s.max_connections <= 1_000_000:
            raise ConfigError(f"server.max_connections must be 1-1000000, got {s.max_connections}")
        if not 0.1 <= s.write_timeout_s <= 300:
            raise ConfigError(f"server.write_timeout_s must be 0.1-300 seconds, got {s.write_timeout_s}")
        if not 1 <= s.max_publishes_per_connection <= 64 or not 1 <= s.max_subscriptions_per_connection <= 1024:
            raise ConfigError("server.max_publishes_per_connection must be 1-64 and "
                              "server.max_subscriptions_per_connection 1-1024")
        if not 1 <= s.client_reports_per_min <= 10_000:
            raise ConfigError(f"server.client_reports_per_min must be 1-10000, got {s.client_reports_per_min}")
        if s.log_format not in ("text", "json"):
            raise ConfigError(f'server.log_format must be "text" or "json", got "{s.log_format}"')
        for proxy in s.trusted_proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ConfigError(f'server.trusted_proxies: "{proxy}" is not an IP address or CIDR') from None
        if a.algorithm not in ("HS256", "RS256"):
            raise ConfigError(f'auth.algorithm must be "HS256" or "RS256", got "{a.algorithm}"')
        if a.algorithm == "RS256" and not a.public_key_file:
            raise ConfigError("auth.public_key_file is required when auth.algorithm is RS256")
        if a.algorithm == "HS256" and a.secret and len(a.secret) < 32:
            raise ConfigError("auth.secret must be at least 32 characters")
        if not 0 <= a.leeway_s <= 600:
            raise ConfigError(f"auth.leeway_s must be 0-600, got {a.leeway_s}")
        for url in m.turn_urls:
            if not url.startswith(("turn:", "turns:", "stun:")):
                raise ConfigError(f'media.turn_urls: "{url}" must start with turn:, turns: or stun:')
        if any(u.startswith(("turn:", "turns:")) for u in m.turn_urls) and len(m.turn_secret) < 16:
            raise ConfigError("media.turn_secret (at least 16 characters) is required with TURN urls")
        if not 60 <= m.turn_credential_ttl_s <= 7 * 86400:
            raise ConfigError(f"media.turn_credential_ttl_s must be 60-604800, got {m.turn_credential_ttl_s}")
        for addr in (*m.ice_addresses, *([m.announced_ip] if m.announced_ip else [])):
            try:
                ipaddress.ip_address(addr)
            except ValueError:
                raise ConfigError(f'media: "{addr}" is not an IP address') from None
        if not 0 <= m.udp_port <= 65535:
            raise ConfigError(f"media.udp_port must be 0 (one port per peer connection) or 1-65535, got {m.udp_port}")
        if m.pli_interval_s <= 0 or m.answer_timeout_s <= 0 or m.sample_interval_s <= 0:
            raise ConfigError("media intervals must be > 0")
        if not 0 < m.connect_timeout_s <= 600:
            raise ConfigError(f"media.connect_timeout_s must be > 0 and <= 600, got {m.connect_timeout_s}")
        if not 1 <= m.max_peer_connections <= 100_000:
            raise ConfigError(f"media.max_peer_connections must be 1-100000, got {m.max_peer_connections}")
        if not MIN_RCVBUF <= m.udp_rcvbuf_bytes <= MAX_RCVBUF:
            raise ConfigError(f"media.udp_rcvbuf_bytes must be {MIN_RCVBUF}-{MAX_RCVBUF} (64 KiB-256 MiB), "
                              f"got {m.udp_rcvbuf_bytes}")
        self._validate_workflow()
        self._validate_retention()
        self._validate_eventlog()
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f'redis_url must start with redis://, rediss:// or unix://, got "{self.redis_url}"')
        if not 1.0 <= self.cluster.lease_s <= 300.0:
            raise ConfigError(f"cluster.lease_s must be 1-300 seconds, got {self.cluster.lease_s}")
        if not 1.0 <= self.cluster.drain_timeout_s <= 86_400.0:
            raise ConfigError(f"cluster.drain_timeout_s must be 1-86400 seconds, got {self.cluster.drain_timeout_s}")
        if not self.cluster.namespace or len(self.cluster.namespace) > 64:
            raise ConfigError("cluster.namespace must be 1-64 characters")
        return self

    def _validate_eventlog(self) -> None:
        e = self.eventlog
        # The URL may hold a password: errors name the key, never echo the value.
        if e.url and not e.url.startswith(("postgresql://", "postgres://")):
            raise ConfigError("eventlog.url must be empty (SQLite in the data dir) or start with postgresql://")
        if len(e.node_id) > 64 or not all(c.isalnum() or c in "-_.:" for c in e.node_id):
            raise ConfigError(f'eventlog.node_id must be at most 64 letters, digits or "-_.:", got {e.node_id!r}')

    def _validate_retention(self) -> None:
        r = self.retention
        if not 0 <= r.eventlog_days <= 36500:
            raise ConfigError(f"retention.eventlog_days must be 0-36500 (0: keep), got {r.eventlog_days}")
        if r.eventlog_policy not in EVENTLOG_RETENTION_POLICIES:
            raise ConfigError(f'retention.eventlog_policy must be one of {", ".join(EVENTLOG_RETENTION_POLICIES)}, '
                              f'got "{r.eventlog_policy}"')
        if not 0 <= r.audit_days <= 36500:
            raise ConfigError(f"retention.audit_days must be 0-36500 (0: keep), got {r.audit_days}")
        if not 1 <= self.audit.sign_in_window_min <= 7 * 24 * 60:
            raise ConfigError(f"audit.sign_in_window_min must be 1-10080 minutes, got {self.audit.sign_in_window_min}")

    def _validate_workflow(self) -> None:
        w = self.workflow
        for name in ("no_show_grace_min", "on_time_window_min", "link_valid_before_min", "link_valid_after_min"):
            value = getattr(w, name)
            if not 0 <= value <= 7 * 24 * 60:
                raise ConfigError(f"workflow.{name} must be 0-10080 minutes, got {value}")
        if w.link_valid_before_min + w.link_valid_after_min < 1:
            raise ConfigError("workflow.link_valid_before_min + link_valid_after_min must be at least 1 minute")
        if not 1 <= w.chat_max_bytes <= 65536:
            raise ConfigError(f"workflow.chat_max_bytes must be 1-65536, got {w.chat_max_bytes}")
        if w.chat_retention not in CHAT_RETENTIONS:
            raise ConfigError(f'workflow.chat_retention must be one of {", ".join(CHAT_RETENTIONS)}, '
                              f'got "{w.chat_retention}"')
        if w.chat_retention == "delete_after_days" and w.chat_retention_days < 1:
            raise ConfigError("workflow.chat_retention_days must be >= 1 with chat_retention = delete_after_days")
        if w.chat_retention_days < 0:
            raise ConfigError("workflow.chat_retention_days must be >= 0")
        if not 0.1 <= w.retention_sweep_s <= 7 * 86400:
            raise ConfigError(f"workflow.retention_sweep_s must be 0.1-604800 seconds, got {w.retention_sweep_s}")
        if not 1 <= w.walk_in_link_valid_min <= 30 * 24 * 60:
            raise ConfigError(f"workflow.walk_in_link_valid_min must be 1-43200 minutes, got {w.walk_in_link_valid_min}")
        if not 1 <= w.walk_in_per_link_per_min <= 10_000:
            raise ConfigError(f"workflow.walk_in_per_link_per_min must be 1-10000, got {w.walk_in_per_link_per_min}")
        if w.public_url and not w.public_url.startswith(("http://", "https://")):
            raise ConfigError(f'workflow.public_url must start with http:// or https://, got "{w.public_url}"')


def _coerce(path: str, value: Any, typ: Any) -> Any:
    """Check/convert one value against its annotated type; name the key on error."""
    if typ == bool | None:  # a switch with an automatic default: true, false or "auto"
        if isinstance(value, str) and value.lower() == "auto":
            return None
        try:
            return _coerce(path, value, bool)
        except ConfigError:
            raise ConfigError(f'{path} must be true or false (or "auto"), got {value!r}') from None
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{path} must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{path} must be an integer, got {value!r}")
        try:
            return int(value) if isinstance(value, (int, str)) else _bad(path, "an integer", value)
        except ValueError:
            raise ConfigError(f"{path} must be an integer, got {value!r}") from None
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{path} must be a number, got {value!r}")
        try:
            return float(value) if isinstance(value, (int, float, str)) else _bad(path, "a number", value)
        except ValueError:
            raise ConfigError(f"{path} must be a number, got {value!r}") from None
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string, got {value!r}")
        return value
    if typ == tuple[str, ...]:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{path} must be a list of strings, got {value!r}")
        return tuple(value)
    raise ConfigError(f"{path}: unsupported type")  # pragma: no cover


def _bad(path: str, what: str, value: Any) -> Any:
    raise ConfigError(f"{path} must be {what}, got {value!r}")


def _merge(obj: Any, data: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a table")
    hints = get_type_hints(type(obj))
    names = {f.name for f in fields(obj)}
    changes: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f'unknown config key "{prefix}{key}"')
        current = getattr(obj, key)
        if is_dataclass(current):
            changes[key] = _merge(current, value, f"{prefix}{key}.")
        else:
            changes[key] = _coerce(f"{prefix}{key}", value, hints[key])
    return replace(obj, **changes)


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    """OPENCONSULT_SERVER__PORT=9000 → {"server": {"port": "9000"}}; OPENCONSULT_REDIS_URL → redis_url."""
    out: dict[str, Any] = {}
    for name, value in env.items():
        if not name.startswith("OPENCONSULT_") or name == "OPENCONSULT_CONFIG":
            continue
        parts = name[len("OPENCONSULT_") :].lower().split("__")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def load_config(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the config: defaults, then the TOML file, then the environment, then
    command-line overrides (``{"server": {"port": 9000}}``), then validate()."""
    config = Config()
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        config = _merge(config, data, "")
    config = _merge(config, _env_overrides(os.environ if env is None else env), "")
    if overrides:
        config = _merge(config, overrides, "")
    return config.validate()


def as_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)
