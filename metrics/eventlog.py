"""The durable per-session event log: an append-only SQLite table fed by a writer thread.

Callers on the event loop (and on the media path) only ever call :meth:`EventLog.append`,
which puts the entry on a bounded in-memory queue and returns at once. One writer thread
drains the queue and commits entries in batches: a batch closes after ``batch_max`` entries
or ``batch_interval_s`` after its first entry, whichever comes first, and at once on a flush,
a close, or while someone waits in :meth:`EventLog.committed`. SQLite runs in WAL mode so
readers never wait for the writer.

Durability (group commit): :attr:`EventLog.appended` counts the entries accepted so far;
``await log.committed(mark)`` returns once every entry up to ``mark`` is committed (or was
refused by SQLite and counted as dropped). The writer wakes waiters with one
``call_soon_threadsafe`` per commit, and while anyone waits it commits what is queued at
once instead of waiting out the batch window, so many waiting requests share one commit.
The signalling edge waits like this before every reply whose request appended entries:
what a client was told succeeded survives ``kill -9``.

One bad entry never costs another: the writer stores :meth:`LogEntry.made_safe` of every
entry (lone surrogates and control characters replaced, long texts cut, payloads JSON-ready),
and if SQLite still refuses a batch, the batch is split in halves and retried until only the
entries that fail on their own are left; those alone are dropped and counted.

If the writer falls far behind (the queue holds ``max_queue`` entries), new entries are
dropped rather than stalling the room that produced them. Every loss is counted in
``openconsult_eventlog_entries_dropped_total{reason}`` and warned about (at most every 10 s).
:meth:`flush` / :meth:`flush_sync` return once everything appended before the call is
committed.

Roll-ups: the writer folds every quality sample and client-stats entry it commits into the
roll-up tables (metrics.rollup: buckets per track of 10 s and 60 s, track totals, connection
quality per second, the samples findings name, freeze counters), in the same transaction, so
the summary, the diagnosis and the charts read a few thousand rows instead of every sample
(:meth:`EventLog.analysis`, :meth:`EventLog.quality_points_sync`). Retention deletes them with the
samples. The folding is :class:`EventStore`'s (both backends); a backend writes what was folded
and reads it back.

Queries open their own read connection and run in a worker thread (``asyncio.to_thread``)
from the async API, or directly from the ``*_sync`` twins. They see committed entries only:
flush first if you need to read your own writes.

:class:`EventStore` is the contract and the writer machinery (queue, batches, group commit,
isolation of a bad entry); a backend supplies the connection, the batch insert, the queries and
retention. :class:`EventLog` stores in SQLite (the embedded default);
:class:`metrics.eventlog_pg.PgEventLog` in PostgreSQL (``[eventlog] url``), for nodes on several
hosts. The app picks one from the config; both pass the same contract tests.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import logging
import queue
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from metrics import prometheus, rollup
from metrics.events import LogEntry, safe_name
from metrics.prometheus import EventLogDropReason

logger = logging.getLogger(__name__)

DEFAULT_MAX_QUEUE: Final = 100_000
DEFAULT_BATCH_MAX: Final = 2_000
DEFAULT_BATCH_INTERVAL_S: Final = 0.05
DEFAULT_QUERY_LIMIT: Final = 10_000
#: Most entries (samples aside) one analysis reads.
DEFAULT_ANALYSIS_LIMIT: Final = 200_000
#: The resolutions the quality timeline's roll-ups are served at, finest first (ms).
RESOLUTIONS_MS: Final = (10_000, 60_000, 300_000, 900_000, 3_600_000)


def fit_resolution(resolution_ms: int, spans: Iterable[tuple[int, int]] | None = None,
                   max_points: int | None = None) -> int:
    """The timeline's resolution: ``resolution_ms`` rounded down to one of :data:`RESOLUTIONS_MS`,
    then, with ``max_points``, coarsened until the tracks' ``spans`` ((first, last) ms, as from
    ``rollup_tracks``) give no more points than that."""
    resolution = max([r for r in RESOLUTIONS_MS if r <= resolution_ms] or [RESOLUTIONS_MS[0]])
    if max_points is None or spans is None:
        return resolution
    spans = list(spans)
    for candidate in (r for r in RESOLUTIONS_MS if r >= resolution):
        resolution = candidate
        if sum(last // candidate - first // candidate + 1 for first, last in spans) <= max_points:
            break
    return resolution
_WARNING_INTERVAL_S: Final = 10.0

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS events (
    seq           INTEGER PRIMARY KEY,  -- insertion order, tie-break for equal times
    time_ms       INTEGER NOT NULL,
    session_id    TEXT NOT NULL,
    connection_id TEXT,
    stream_id     TEXT,
    kind          TEXT NOT NULL,
    component     TEXT NOT NULL,
    text          TEXT NOT NULL,
    payload       TEXT NOT NULL         -- JSON object
);
CREATE INDEX IF NOT EXISTS events_by_session ON events (session_id, time_ms, seq);
CREATE INDEX IF NOT EXISTS events_by_time ON events (time_ms);
-- What the summary and the diagnosis read besides the roll-ups: a few hundred entries a call.
CREATE INDEX IF NOT EXISTS events_notes ON events (session_id, time_ms, seq)
    WHERE kind NOT IN ('qualitySample', 'clientStats');
-- Roll-ups (metrics.rollup), written in the same transaction as the samples they sum up.
CREATE TABLE IF NOT EXISTS rollups (
    session_id     TEXT NOT NULL,
    span_ms        INTEGER NOT NULL,  -- the bucket's width (metrics.rollup.SPANS_MS)
    track          TEXT NOT NULL,     -- the stream id upstream ("in"), the subscription's peer id downstream
    direction      TEXT NOT NULL,
    kind           TEXT NOT NULL,
    bucket_ms      INTEGER NOT NULL,  -- the bucket's start
    connection_id  TEXT NOT NULL, peer_id TEXT NOT NULL, stream_id TEXT NOT NULL,
    n INTEGER NOT NULL, n_media INTEGER NOT NULL,
    first_ms INTEGER NOT NULL, first_seq INTEGER NOT NULL, last_ms INTEGER NOT NULL, last_seq INTEGER NOT NULL,
    first_media_ms INTEGER,
    packets REAL NOT NULL, packets_lost REAL NOT NULL,
    bitrate_sum REAL NOT NULL, bitrate_min REAL, bitrate_max REAL,
    loss_sum REAL NOT NULL, loss_max REAL,
    jitter_sum REAL NOT NULL, jitter_n INTEGER NOT NULL, jitter_max REAL,
    rtt_sum REAL NOT NULL, rtt_n INTEGER NOT NULL, rtt_max REAL,
    fps_sum REAL NOT NULL, fps_n INTEGER NOT NULL,
    width INTEGER, height INTEGER,
    q_min REAL,
    PRIMARY KEY (session_id, span_ms, bucket_ms, track, direction, kind)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS rollups_by_time ON rollups (last_ms);
CREATE TABLE IF NOT EXISTS rollup_tracks (
    session_id TEXT NOT NULL, track TEXT NOT NULL, direction TEXT NOT NULL, kind TEXT NOT NULL,
    connection_id TEXT NOT NULL, stream_id TEXT NOT NULL,
    n INTEGER NOT NULL, n_media INTEGER NOT NULL, first_ms INTEGER NOT NULL, first_seq INTEGER NOT NULL,
    first_media_ms INTEGER, mos_c INTEGER NOT NULL, mos_n INTEGER NOT NULL,
    level0 INTEGER NOT NULL, level1 INTEGER NOT NULL, level2 INTEGER NOT NULL, level3 INTEGER NOT NULL,
    level4 INTEGER NOT NULL, last_ms INTEGER NOT NULL, last_loss REAL NOT NULL, last_jitter REAL NOT NULL,
    PRIMARY KEY (session_id, track, direction, kind)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS rollup_tracks_by_time ON rollup_tracks (last_ms);
CREATE TABLE IF NOT EXISTS quality_rollups (  -- per second (metrics.rollup.QUALITY_MS)
    session_id TEXT NOT NULL, connection_id TEXT NOT NULL, bucket_ms INTEGER NOT NULL, q_min REAL NOT NULL,
    PRIMARY KEY (session_id, connection_id, bucket_ms)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS quality_rollups_by_time ON quality_rollups (bucket_ms);
CREATE TABLE IF NOT EXISTS sample_marks (
    seq INTEGER PRIMARY KEY,  -- the sample's entry
    session_id TEXT NOT NULL, time_ms INTEGER NOT NULL, connection_id TEXT NOT NULL, track TEXT NOT NULL,
    peer_id TEXT NOT NULL, stream_id TEXT NOT NULL, direction TEXT NOT NULL, kind TEXT NOT NULL,
    idx INTEGER NOT NULL, packets REAL NOT NULL, bitrate_kbps REAL NOT NULL, loss_pct REAL NOT NULL,
    jitter_ms REAL NOT NULL, rtt_ms REAL NOT NULL, up_loss REAL NOT NULL, up_jitter REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS sample_marks_by_session ON sample_marks (session_id, time_ms, seq);
CREATE INDEX IF NOT EXISTS sample_marks_by_time ON sample_marks (time_ms);
CREATE TABLE IF NOT EXISTS freeze_tracks (
    session_id TEXT NOT NULL, connection_id TEXT NOT NULL, stream_id TEXT NOT NULL,
    first_ms INTEGER NOT NULL, first_seq INTEGER NOT NULL, last_ms INTEGER NOT NULL,
    count INTEGER NOT NULL, frozen_s REAL NOT NULL, last_count INTEGER NOT NULL, last_s REAL NOT NULL,
    evidence TEXT NOT NULL,  -- JSON: the first samples
    PRIMARY KEY (session_id, connection_id, stream_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS freeze_tracks_by_time ON freeze_tracks (last_ms);
CREATE TABLE IF NOT EXISTS bad_tallies (
    session_id TEXT NOT NULL, track TEXT NOT NULL, direction TEXT NOT NULL, kind TEXT NOT NULL,
    type TEXT NOT NULL,  -- metrics.rollup.BAD_FIGURE
    count INTEGER NOT NULL, first_ms INTEGER NOT NULL, first_seq INTEGER NOT NULL, last_ms INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    bins TEXT NOT NULL,  -- JSON [[figure, count], ...]
    PRIMARY KEY (session_id, track, direction, kind, type)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS bad_tallies_by_time ON bad_tallies (last_ms);
"""

#: Schema version (PRAGMA user_version): 1 added the roll-ups, built on open from older files.
_SCHEMA_VERSION: Final = 1

#: Bucket columns after the key, in the order of :class:`metrics.rollup.Bucket`'s fields.
_BUCKET_VALUES: Final = (
    "connection_id", "peer_id", "stream_id", "n", "n_media", "first_ms", "first_seq", "last_ms", "last_seq",
    "first_media_ms", "packets", "packets_lost", "bitrate_sum", "bitrate_min", "bitrate_max", "loss_sum", "loss_max",
    "jitter_sum", "jitter_n", "jitter_max", "rtt_sum", "rtt_n", "rtt_max", "fps_sum", "fps_n", "width", "height",
    "q_min",
)
_BUCKET_KEY: Final = ("session_id", "span_ms", "track", "direction", "kind", "bucket_ms")
_TRACK_KEY: Final = ("session_id", "track", "direction", "kind")
_TRACK_VALUES: Final = ("connection_id", "stream_id", "n", "n_media", "first_ms", "first_seq", "first_media_ms",
                        "mos_c", "mos_n", "level0", "level1", "level2", "level3", "level4", "last_ms", "last_loss",
                        "last_jitter")
_SUMS: Final = frozenset({"n", "n_media", "packets", "packets_lost", "bitrate_sum", "loss_sum", "jitter_sum",
                          "jitter_n", "rtt_sum", "rtt_n", "fps_sum", "fps_n", "mos_c", "mos_n", "level0", "level1",
                          "level2", "level3", "level4"})


def _merged(column: str, last: str, pg: bool = False) -> str:
    """How a stored row and a newer partial one of the same key merge: sums add, minima and
    maxima combine, the first sample's figures stay, the last sample's (``last`` orders them) win.
    Every expression reads the stored row as it was before the update (SQL's SET semantics).
    ``pg``: PostgreSQL's spelling (the stored row is ``cur``; LEAST and GREATEST)."""
    cur, lo, hi = ("cur.", "LEAST", "GREATEST") if pg else ("", "MIN", "MAX")
    stored = f"{cur}{column}"
    if column in _SUMS:
        return f"{stored} + excluded.{column}"
    if column in ("bitrate_min", "q_min", "first_media_ms"):
        return f"COALESCE({lo}({stored}, excluded.{column}), {stored}, excluded.{column})"
    if column in ("bitrate_max", "loss_max", "jitter_max", "rtt_max"):
        return f"COALESCE({hi}({stored}, excluded.{column}), {stored}, excluded.{column})"
    if column in ("first_ms", "first_seq", "connection_id", "peer_id", "stream_id"):
        return f"CASE WHEN excluded.first_seq < {cur}first_seq THEN excluded.{column} ELSE {stored} END"
    if column in ("width", "height"):
        return f"COALESCE(CASE WHEN excluded.{last} >= {cur}{last} THEN excluded.{column} END, {stored})"
    return f"CASE WHEN excluded.{last} >= {cur}{last} THEN excluded.{column} ELSE {stored} END"


def _upsert(table: str, key: tuple[str, ...], values: tuple[str, ...], last: str, pg: bool = False) -> str:
    columns = key + values
    mark = "%s" if pg else "?"
    return (f"INSERT INTO {table}{' AS cur' if pg else ''} ({', '.join(columns)})"
            f" VALUES ({', '.join([mark] * len(columns))})"
            f" ON CONFLICT ({', '.join(key)}) DO UPDATE SET "
            + ", ".join(f"{c} = {_merged(c, last, pg)}" for c in values))


def _replace(table: str, key: tuple[str, ...], columns: tuple[str, ...]) -> str:
    """PostgreSQL's INSERT OR REPLACE: the new row wins whole."""
    return (f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(['%s'] * len(columns))})"
            f" ON CONFLICT ({', '.join(key)}) DO UPDATE SET "
            + ", ".join(f"{c} = excluded.{c}" for c in columns if c not in key))


_UPSERT_BUCKET: Final = _upsert("rollups", _BUCKET_KEY, _BUCKET_VALUES, "last_seq")
_UPSERT_TRACK: Final = _upsert("rollup_tracks", _TRACK_KEY, _TRACK_VALUES, "last_ms")
_UPSERT_QUALITY: Final = ("INSERT INTO quality_rollups (session_id, connection_id, bucket_ms, q_min)"
                          " VALUES (?, ?, ?, ?) ON CONFLICT (session_id, connection_id, bucket_ms) DO UPDATE SET"
                          " q_min = MIN(q_min, excluded.q_min)")
_MARK_COLUMNS: Final = ("seq", "session_id", "time_ms", "connection_id", "track", "peer_id", "stream_id", "direction",
                        "kind", "idx", "packets", "bitrate_kbps", "loss_pct", "jitter_ms", "rtt_ms", "up_loss",
                        "up_jitter")
_INSERT_MARK: Final = (f"INSERT OR REPLACE INTO sample_marks ({', '.join(_MARK_COLUMNS)})"
                       f" VALUES ({', '.join('?' * len(_MARK_COLUMNS))})")
_FREEZE_COLUMNS: Final = ("session_id", "connection_id", "stream_id", "first_ms", "first_seq", "last_ms", "count",
                          "frozen_s", "last_count", "last_s", "evidence")
_UPSERT_FREEZE: Final = (f"INSERT OR REPLACE INTO freeze_tracks ({', '.join(_FREEZE_COLUMNS)})"
                         f" VALUES ({', '.join('?' * len(_FREEZE_COLUMNS))})")
#: Kinds the roll-ups stand for (the partial index events_notes leaves them out).
_SAMPLE_KINDS_SQL: Final = "kind NOT IN ('qualitySample', 'clientStats')"
_ROLLED_KINDS: Final = frozenset({"qualitySample", "clientStats"})
#: Retention of the roll-ups (one parameter: the cut-off): a bucket, track, tally or freeze
#: track goes when its last sample is older, a quality second when it ends by the cut-off.
_ROLLUP_RETENTION: Final = (
    "DELETE FROM rollups WHERE last_ms < ?",
    "DELETE FROM rollup_tracks WHERE last_ms < ?",
    f"DELETE FROM quality_rollups WHERE bucket_ms <= ? - {rollup.QUALITY_MS}",
    "DELETE FROM sample_marks WHERE time_ms < ?",
    "DELETE FROM freeze_tracks WHERE last_ms < ?",
    "DELETE FROM bad_tallies WHERE last_ms < ?",
)
_ROLLUP_TABLES: Final = ("rollups", "rollup_tracks", "quality_rollups", "sample_marks", "freeze_tracks", "bad_tallies")


def _freeze_of(row: tuple[Any, ...]) -> rollup.FreezeTrack:
    """A freeze track from its columns after session_id (:data:`_FREEZE_COLUMNS`)."""
    cid, stream_id, first_ms, first_seq, last_ms, count, frozen_s, last_count, last_s, evidence = row
    decoded = json.loads(evidence)
    return rollup.FreezeTrack(cid, stream_id, first_ms, first_seq, last_ms, count, frozen_s, last_count, last_s,
                              decoded if isinstance(decoded, list) else [])


def _bucket_row(session_id: str, b: rollup.Bucket) -> tuple[Any, ...]:
    return (session_id, b.span_ms, b.track, b.direction, b.kind, b.bucket_ms, b.connection_id, b.peer_id,
            b.stream_id, b.n, b.n_media, b.first_ms, b.first_seq, b.last_ms, b.last_seq, b.first_media_ms, b.packets,
            b.packets_lost, b.bitrate_sum, b.bitrate_min, b.bitrate_max, b.loss_sum, b.loss_max, b.jitter_sum,
            b.jitter_n, b.jitter_max, b.rtt_sum, b.rtt_n, b.rtt_max, b.fps_sum, b.fps_n, b.width, b.height, b.q_min)


def _track_row(session_id: str, t: rollup.Track) -> tuple[Any, ...]:
    return (session_id, t.track, t.direction, t.kind, t.connection_id, t.stream_id, t.n, t.n_media, t.first_ms,
            t.first_seq, t.first_media_ms, t.mos_c, t.mos_n, *t.levels, t.last_ms, t.last_loss, t.last_jitter)


def _track_of(r: tuple[Any, ...]) -> rollup.Track:
    """A track from its columns (:data:`_TRACK_KEY` without the session, then :data:`_TRACK_VALUES`)."""
    (track, direction, kind, cid, stream_id, n, n_media, first_ms, first_seq, first_media_ms, mos_c, mos_n,
     l0, l1, l2, l3, l4, last_ms, last_loss, last_jitter) = r
    return rollup.Track(track, direction, kind, cid, stream_id, n, n_media, first_ms, first_seq, first_media_ms,
                        mos_c, mos_n, [l0, l1, l2, l3, l4], last_ms, last_loss, last_jitter)


_TALLY_COLUMNS: Final = ("session_id", "track", "direction", "kind", "type", "count", "first_ms", "first_seq",
                         "last_ms", "last_seq", "bins")
_UPSERT_TALLY: Final = (f"INSERT OR REPLACE INTO bad_tallies ({', '.join(_TALLY_COLUMNS)})"
                        f" VALUES ({', '.join('?' * len(_TALLY_COLUMNS))})")


def _tally_row(session_id: str, key: tuple[str, str, str, str], t: rollup.Tally) -> tuple[Any, ...]:
    return (session_id, *key, t.count, t.first_ms, t.first_seq, t.last_ms, t.last_seq,
            json.dumps(sorted(t.bins.items()), separators=(",", ":")))


def _tally_of(count: int, first_ms: int, first_seq: int, last_ms: int, last_seq: int, bins: str) -> rollup.Tally:
    return rollup.Tally(count, first_ms, first_seq, last_ms, last_seq, {float(v): int(c) for v, c in json.loads(bins)})


def _write_drained(conn: sqlite3.Connection, drained: rollup.Drained) -> None:
    conn.executemany(_UPSERT_BUCKET, [_bucket_row(sid, b) for sid, b in drained.buckets])
    conn.executemany(_UPSERT_TRACK, [_track_row(sid, t) for sid, t in drained.tracks])
    conn.executemany(_UPSERT_QUALITY, drained.quality)
    conn.executemany(_INSERT_MARK, [_mark_row(sid, m) for sid, m in drained.marks])
    conn.executemany(_UPSERT_FREEZE, [_freeze_row(sid, f) for sid, f in drained.freezes])
    conn.executemany(_UPSERT_TALLY, [_tally_row(sid, key, t) for sid, key, t in drained.tallies])


def _mark_row(session_id: str, m: rollup.Mark) -> tuple[Any, ...]:
    return (m.seq, session_id, m.time_ms, m.connection_id, m.track, m.peer_id, m.stream_id, m.direction, m.kind,
            m.idx, m.packets, m.bitrate_kbps, m.loss_pct, m.jitter_ms, m.rtt_ms, m.up_loss, m.up_jitter)


def _freeze_row(session_id: str, f: rollup.FreezeTrack) -> tuple[Any, ...]:
    return (session_id, f.connection_id, f.stream_id, f.first_ms, f.first_seq, f.last_ms, f.count, f.frozen_s,
            f.last_count, f.last_s, json.dumps(f.evidence, separators=(",", ":"), ensure_ascii=False))

_INSERT: Final = (
    "INSERT INTO events (time_ms, session_id, connection_id, stream_id, kind, component, text, payload)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_COLUMNS: Final = "seq, time_ms, session_id, connection_id, stream_id, kind, component, text, payload"


@dataclass(slots=True)
class _Flush:
    """Queue marker: the writer commits what it holds, then sets ``done``."""

    done: threading.Event


class _Close:
    """Queue marker: the writer commits what it holds and exits."""


class _CommitNow:
    """Queue marker: someone waits in :meth:`EventLog.committed`; commit without waiting."""


_COMMIT_NOW: Final = _CommitNow()

_QueueItem = LogEntry | _Flush | _Close | _CommitNow


def _row(safe: LogEntry) -> tuple[Any, ...]:
    """The SQLite row of an entry already made safe (:meth:`LogEntry.made_safe`): encodable by
    construction."""
    return (
        safe.time_ms,
        safe.session_id,
        safe.connection_id,
        safe.stream_id,
        safe.kind,
        safe_name(safe.component),
        safe.text,
        json.dumps(safe.payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False),
    )


@dataclass(frozen=True, slots=True)
class Analysis:
    """What :meth:`EventLog.analysis` reads for the summary and the diagnosis."""

    entries: list[dict[str, Any]]  # every kind but the samples
    rolled: rollup.SessionRollup
    span: tuple[int | None, int | None]  # first and last entry time of any kind


def _point_columns(grouped: bool, pg: bool = False) -> str:
    """The SQL of a chart point's figures (:data:`_POINT_KEYS` from ``time_ms`` on): one stored
    bucket's, or (``grouped``) those of the buckets of a coarser window. Means are computed in
    the database: no per-point work in Python. ``pg``: PostgreSQL's spelling (typed results:
    integer sums, float means; the window's two parameters only)."""
    def agg(fn: str, column: str) -> str:
        return f"{fn}({column})" if grouped else column

    def total(column: str) -> str:
        return f"{agg('SUM', column)}::bigint" if pg and grouped else agg("SUM", column)

    def whole(column: str) -> str:
        return f"TRUNC({agg('SUM', column)})::bigint" if pg else f"CAST({agg('SUM', column)} AS INTEGER)"

    def mean(column: str, count: str, digits: int) -> str:
        if pg:
            return (f"CASE WHEN {agg('SUM', count)} > 0 THEN ROUND(({agg('SUM', column)} * 1.0 / {agg('SUM', count)})"
                    f"::numeric, {digits})::float8 END")
        return (f"CASE WHEN {agg('SUM', count)} > 0 THEN ROUND({agg('SUM', column)} * 1.0 / {agg('SUM', count)},"
                f" {digits}) END")

    mark = "%s" if pg else "?"
    if pg:
        t = f"(bucket_ms / {mark}) * {mark}" if grouped else "bucket_ms"
        interval = "%s::float8 / 1000.0"
    else:
        t = "(bucket_ms / ?) * ?" if grouped else "bucket_ms + 0 * ? * ?"  # two parameters either way
        interval = "? / 1000.0"
    return ", ".join([
        t, interval, total("n"), total("n_media"), whole("packets"), whole("packets_lost"),
        mean("bitrate_sum", "n", 1), agg("MIN", "bitrate_min"),
        agg("MAX", "bitrate_max"), mean("loss_sum", "n", 2), agg("MAX", "loss_max"), mean("jitter_sum", "jitter_n", 2),
        agg("MAX", "jitter_max"), mean("rtt_sum", "rtt_n", 1), agg("MAX", "rtt_max"), mean("fps_sum", "fps_n", 1),
        agg("MAX", "width"), agg("MAX", "height"), agg("MIN", "q_min"),
    ])


#: The keys of a chart point, in the order of the query's columns.
_POINT_KEYS: Final = (
    "connection_id", "peer_id", "stream_id", "direction", "kind", "time_ms", "interval_s", "samples",
    "samples_with_media", "packets", "packets_lost", "bitrate_kbps", "bitrate_min_kbps", "bitrate_max_kbps",
    "loss_pct", "loss_max_pct", "jitter_ms", "jitter_max_ms", "rtt_ms", "rtt_max_ms", "frame_rate", "width",
    "height", "quality_score",
)
_POINTS_OF_BUCKETS: Final = (
    f"SELECT connection_id, peer_id, stream_id, direction, kind, {_point_columns(False)} FROM rollups"
    " WHERE session_id = ? AND span_ms = ? AND bucket_ms >= ? ORDER BY bucket_ms, track, direction, kind")
_POINTS_GROUPED: Final = (
    f"SELECT MIN(connection_id), MIN(peer_id), MIN(stream_id), direction, kind, {_point_columns(True)}"
    " FROM rollups WHERE session_id = ? AND span_ms = ? AND bucket_ms >= ?"
    " GROUP BY track, direction, kind, (bucket_ms / ?) ORDER BY 6, track, direction, kind")


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


@dataclass(frozen=True)
class SqlDialect:
    """How one backend spells the parts of the sessions search that differ."""

    #: The parameter placeholder: ``?`` (sqlite3) or ``%s`` (psycopg).
    param: str
    #: A case-insensitive substring match on a backslash-escaped pattern; ``{p}`` is the placeholder.
    like: str
    #: The text of one top-level payload field; ``{field}`` is its name.
    json_text: str


SQLITE_DIALECT: Final = SqlDialect("?", "LIKE {p} ESCAPE '\\'", "json_extract(payload, '$.{field}')")
POSTGRES_DIALECT: Final = SqlDialect("%s", "ILIKE {p}", "payload::jsonb ->> '{field}'")


def sessions_query(dialect: SqlDialect, since_ms: int, until_ms: int, text: str | None, limit: int,
                   room: str | None, name: str | None, session_id: str | None) -> tuple[str, list[Any]]:
    """The back-office session search (see :meth:`EventStore.sessions_sync`) as SQL and its
    parameters, in ``dialect``: one query for every backend."""
    p = dialect.param

    def like(column: str) -> str:
        return f"{column} {dialect.like.format(p=p)}"

    window = f"time_ms >= {p} AND time_ms < {p}"
    params: list[Any] = [since_ms, until_ms]
    filters = ""
    if text:
        pattern = f"%{_like_escape(text)}%"
        filters += (f" AND session_id IN (SELECT DISTINCT session_id FROM events WHERE {window} AND ("
                    f"{like('session_id')} OR {like('connection_id')} OR {like('stream_id')} OR {like('text')}))")
        params.extend([since_ms, until_ms, pattern, pattern, pattern, pattern])
    if room:
        filters += (f" AND (session_id = {p} OR session_id IN (SELECT DISTINCT session_id FROM events"
                    f" WHERE {window} AND kind = 'VideoSession' AND {dialect.json_text.format(field='room')} = {p}))")
        params.extend([room, since_ms, until_ms, room])
    if name:
        filters += (f" AND session_id IN (SELECT DISTINCT session_id FROM events WHERE {window}"
                    f" AND kind = 'serverDetectedConnect' AND {like(dialect.json_text.format(field='name'))})")
        params.extend([since_ms, until_ms, f"%{_like_escape(name)}%"])
    if session_id:
        filters += f" AND {like('session_id')}"
        params.append(f"%{_like_escape(session_id)}%")
    params.append(limit)
    sql = ("SELECT session_id, MIN(time_ms) AS first_ms, MAX(time_ms) AS last_ms, COUNT(*) AS count"
           f" FROM events WHERE {window}{filters} GROUP BY session_id ORDER BY last_ms DESC, session_id LIMIT {p}")
    return sql, params


class _RateLimited:
    """At most one log line per interval for one kind of trouble (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = -_WARNING_INTERVAL_S

    def due(self) -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._last < _WARNING_INTERVAL_S:
                return False
            self._last = now
            return True


class EventStore(ABC):
    """The event log contract and its writer machinery, whatever stores the entries.

    :param where: names the store in log lines and the writer thread's name.
    :param max_queue: entries held in memory before :meth:`append` starts dropping.
    :param batch_max: most entries committed in one transaction.
    :param batch_interval_s: longest an entry waits in memory for its batch to fill (when
        nobody waits for it in :meth:`committed`).
    :param before_write: test hook called in the writer thread with each batch before it is
        written, and again with each half of a batch the store refused; an exception it raises
        counts as the store refusing those entries (lets tests simulate a slow or failing disk).

    A backend creates its schema, then calls :meth:`_start_writer`.
    """

    def __init__(
        self,
        where: str,
        *,
        max_queue: int = DEFAULT_MAX_QUEUE,
        batch_max: int = DEFAULT_BATCH_MAX,
        batch_interval_s: float = DEFAULT_BATCH_INTERVAL_S,
        before_write: Callable[[Sequence[LogEntry]], object] | None = None,
    ) -> None:
        if max_queue < 1 or batch_max < 1 or batch_interval_s < 0:
            raise ValueError("max_queue and batch_max must be >= 1, batch_interval_s >= 0")
        self._where = where
        self._batch_max = batch_max
        self._batch_interval_s = batch_interval_s
        self._before_write = before_write
        self._queue: queue.Queue[_QueueItem] = queue.Queue(maxsize=max_queue)
        self._closed = False
        self._close_lock = threading.Lock()
        self._drop_lock = threading.Lock()
        self._drop_warning = _RateLimited()
        self._failure_warning = _RateLimited()
        self.dropped = 0  # entries this instance dropped (the Prometheus counter is process-wide)
        self.written = 0  # entries this instance committed
        # Group commit. Entries get their number under _append_lock in queue order, so the
        # writer knows the number of each entry it takes: the n-th entry taken is entry n.
        self._append_lock = threading.Lock()
        self._appended = 0  # entries accepted into the queue (dropped ones are not numbered)
        self._taken = 0  # writer thread: entries taken off the queue
        self._handled = 0  # entries committed or refused: waiters up to here may go
        self._wanted = 0  # highest mark anyone waits for (set on the loop, read by the writer)
        self._commit_requested = False  # a _CommitNow marker is queued
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []  # heap, on self._loop only
        self._waiter_ids = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer = threading.Thread(target=self._run_writer, name=f"eventlog-writer:{where}", daemon=True)
        self._roller = rollup.Roller(count=self._stored_count, upstream=self._stored_upstream,
                                     freeze=self._stored_freeze, tally=self._stored_tally)
        self._roller_conn: Any = None  # the loaders read through the connection of whoever folds

    def _start_writer(self) -> None:
        self._writer.start()

    # --- what a backend supplies -----------------------------------------------------------

    @abstractmethod
    def _open_writer(self) -> Any:
        """The writer thread's connection (opened in the writer thread)."""

    @abstractmethod
    def _close_writer(self, conn: Any) -> None:
        """Release the writer thread's connection."""

    @abstractmethod
    def _insert(self, conn: Any, rows: list[tuple[Any, ...]], entries: list[LogEntry]) -> None:
        """Commit ``rows`` (from :meth:`_row`, of the safe ``entries``) in one transaction with
        their roll-ups (:meth:`_roll_up`), or raise, commit none and :meth:`Roller.forget`."""

    def _row(self, entry: LogEntry) -> tuple[Any, ...]:
        """The stored row of ``entry``, made safe (see :func:`_row`)."""
        return _row(entry)

    # --- roll-ups (folded in the writer thread, in the transaction of the entries) ----------

    def _roll_up(self, conn: Any, entries: Iterable[LogEntry], seqs: Iterable[int]) -> None:
        """Fold the samples of ``entries`` (stored with ``seqs``) into the roll-ups and write
        what changed through ``conn``, inside the transaction that writes the entries."""
        roller = self._roller
        self._roller_conn = conn
        for seq, e in zip(seqs, entries, strict=True):
            if e.kind in _ROLLED_KINDS:
                roller.add(e.session_id, seq, e.time_ms, e.connection_id or "", e.kind, e.payload)
        self._write_drained(conn, roller.drain())

    @abstractmethod
    def _write_drained(self, conn: Any, drained: rollup.Drained) -> None:
        """Upsert what the roller folded (inside the open transaction)."""

    @abstractmethod
    def _fetch_one(self, query: str, params: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """One row of ``query`` (SQLite placeholders) through the folding connection."""

    # Loaders of the roll-up state the writer's roller evicted (or never saw: a reopened store).

    def _stored_count(self, session_id: str, key: rollup.TrackKey) -> int:
        row = self._fetch_one(
            "SELECT n FROM rollup_tracks WHERE session_id = ? AND track = ? AND direction = ? AND kind = ?",
            (session_id, *key))
        return 0 if row is None else int(row[0])

    def _stored_upstream(self, session_id: str, stream_id: str, kind: str) -> tuple[float, float] | None:
        row = self._fetch_one(
            "SELECT last_loss, last_jitter FROM rollup_tracks WHERE session_id = ? AND track = ? AND direction = 'in'"
            " AND kind = ?", (session_id, stream_id, kind))
        return None if row is None else (float(row[0]), float(row[1]))

    def _stored_freeze(self, session_id: str, connection_id: str, stream_id: str) -> rollup.FreezeTrack | None:
        row = self._fetch_one(
            f"SELECT {', '.join(_FREEZE_COLUMNS[1:])} FROM freeze_tracks WHERE session_id = ?"
            " AND connection_id = ? AND stream_id = ?", (session_id, connection_id, stream_id))
        return None if row is None else _freeze_of(tuple(row))

    def _stored_tally(self, session_id: str, track: str, direction: str, kind: str,
                      bad_type: str) -> rollup.Tally | None:
        row = self._fetch_one(
            "SELECT count, first_ms, first_seq, last_ms, last_seq, bins FROM bad_tallies WHERE session_id = ?"
            " AND track = ? AND direction = ? AND kind = ? AND type = ?",
            (session_id, track, direction, kind, bad_type))
        return None if row is None else _tally_of(*row)

    # --- roll-up queries -------------------------------------------------------------------

    @abstractmethod
    def analysis_sync(self, session_id: str, limit: int = DEFAULT_ANALYSIS_LIMIT, *, marks: bool = True) -> Analysis:
        """What the summary and the diagnosis read, in one snapshot (see :meth:`EventLog.analysis_sync`)."""

    async def analysis(self, session_id: str, limit: int = DEFAULT_ANALYSIS_LIMIT, *, marks: bool = True) -> Analysis:
        """:meth:`analysis_sync` in a worker thread."""
        return await asyncio.to_thread(lambda: self.analysis_sync(session_id, limit, marks=marks))

    @abstractmethod
    def sample_count_sync(self, session_id: str) -> int:
        """How many quality samples the session has (from its roll-ups)."""

    @abstractmethod
    def quality_points_sync(self, session_id: str, resolution_ms: int, since_ms: int | None = None,
                            max_points: int | None = None) -> tuple[int, list[dict[str, Any]]]:
        """The quality timeline from its roll-ups (see :meth:`EventLog.quality_points_sync`)."""

    @abstractmethod
    def events_sync(
        self,
        session_id: str,
        kinds: Iterable[str] | None = None,
        since_ms: int | None = None,
        until_ms: int | None = None,
        limit: int = DEFAULT_QUERY_LIMIT,
    ) -> list[dict[str, Any]]:
        """Committed entries of one session, oldest first (by time, then write order).

        ``kinds`` keeps only those kinds; ``since_ms`` is inclusive, ``until_ms`` exclusive.
        Each dict has the :class:`LogEntry` fields, ``payload`` decoded, plus ``seq``.
        """

    @abstractmethod
    def sessions_sync(
        self,
        since_ms: int,
        until_ms: int,
        text: str | None = None,
        limit: int = 1_000,
        *,
        room: str | None = None,
        name: str | None = None,
        session_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """Back-office search: sessions with entries in ``[since_ms, until_ms)``, newest first
        (see :meth:`EventLog.sessions_sync` for the filters)."""

    @abstractmethod
    def delete_before_sync(self, before_ms: int) -> int:
        """Retention: delete every entry older than ``before_ms``; returns how many."""

    @abstractmethod
    def anonymise_before_sync(self, before_ms: int, chunk: int = 1_000) -> int:
        """Retention: anonymise every entry older than ``before_ms``; returns how many changed."""

    # --- writing ---------------------------------------------------------------------------

    def append(self, entry: LogEntry) -> None:
        """Queue ``entry`` for writing. Never blocks and never raises on a full queue.

        Thread-safe. Once the log is closed, or when the queue is full, the entry is dropped
        and counted (and not numbered in :attr:`appended`, so nobody waits for it).
        """
        if self._closed:
            self._drop(1, EventLogDropReason.CLOSED)
            return
        with self._append_lock:
            try:
                self._queue.put_nowait(entry)
            except queue.Full:
                pass
            else:
                self._appended += 1
                return
        self._drop(1, EventLogDropReason.QUEUE_FULL)

    def extend(self, entries: Iterable[LogEntry]) -> None:
        """:meth:`append` each of ``entries``."""
        for entry in entries:
            self.append(entry)

    @property
    def appended(self) -> int:
        """Entries accepted so far (a monotonic count): the mark for :meth:`committed`."""
        return self._appended

    async def committed(self, mark: int) -> None:
        """Return once every entry up to ``mark`` (an earlier :attr:`appended`) is committed.

        Entries SQLite refused count as done (they are dropped and counted), and so does
        everything once the log is closed: this never waits for an entry that cannot come.
        While anyone waits, the writer commits at once (group commit); it wakes waiters with
        one thread hop per commit. Call it from one event loop.
        """
        mark = min(mark, self._appended)
        if mark <= self._handled or not self._writer.is_alive():
            return
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if any(not waiter.done() for _, _, waiter in self._waiters):
                raise RuntimeError("EventLog.committed() is waited on from another event loop")
            self._waiters.clear()  # cancelled waiters of a loop that is gone
            self._loop = loop
        future: asyncio.Future[None] = loop.create_future()
        self._waiter_ids += 1
        heapq.heappush(self._waiters, (mark, self._waiter_ids, future))
        # Say what is wanted, then look again: the writer publishes _handled, then reads
        # _wanted, so one of the two sides sees the other.
        self._wanted = max(self._wanted, mark)
        if mark <= self._handled or not self._writer.is_alive():
            self._wake_waiters()
        elif not self._commit_requested:
            # Wake a writer that waits out its batch window; a full queue needs no marker (the
            # writer takes full batches without waiting and then sees _wanted).
            self._commit_requested = True
            try:
                self._queue.put_nowait(_COMMIT_NOW)
            except queue.Full:
                self._commit_requested = False
        await future

    async def committed_since(self, mark: int) -> None:
        """If entries were appended since ``mark`` (an earlier :attr:`appended`), wait until
        they are all committed; otherwise return at once."""
        now = self._appended
        if now != mark:
            await self.committed(now)

    def _wake_waiters(self) -> None:
        """On the waiters' loop: release every waiter whose mark is handled."""
        handled = self._handled if self._writer.is_alive() else self._appended
        while self._waiters and self._waiters[0][0] <= handled:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)

    def _publish_handled(self, handled: int) -> None:
        """Writer thread: entries up to ``handled`` are done; wake whoever waits for them."""
        previous = self._handled
        self._handled = handled
        loop = self._loop
        if loop is not None and self._wanted > previous:
            try:
                loop.call_soon_threadsafe(self._wake_waiters)
            except RuntimeError:  # the loop is closed: nobody is left to wake
                pass

    def flush_sync(self, timeout: float | None = None) -> bool:
        """Block until every entry appended before this call is committed (or dropped).

        Returns False if ``timeout`` seconds passed first. Not for the event loop: use
        :meth:`flush` there.
        """
        if self._closed or not self._writer.is_alive():
            return True
        marker = _Flush(threading.Event())
        # A flush may wait for room in the queue: flushing is allowed to block, appending is not.
        try:
            self._queue.put(marker, timeout=timeout)
        except queue.Full:
            return False
        return marker.done.wait(timeout)

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait, off the event loop, until every entry appended so far is committed."""
        return await asyncio.to_thread(self.flush_sync, timeout)

    def close(self) -> None:
        """Flush, stop the writer thread and release the file. Idempotent; blocks until done."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._queue.put(_Close())
        self._writer.join()

    async def aclose(self) -> None:
        """:meth:`close` off the event loop."""
        await asyncio.to_thread(self.close)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def queued(self) -> int:
        """Entries waiting for the writer (approximate)."""
        return self._queue.qsize()

    def _drop(self, count: int, reason: EventLogDropReason) -> None:
        prometheus.EVENTLOG_ENTRIES_DROPPED.labels(reason=reason.value).inc(count)
        with self._drop_lock:
            self.dropped += count
        # Rate-limited: a writer that is behind would otherwise add a log line per entry.
        if self._drop_warning.due():
            logger.warning("Dropping event-log entries for %s: %s (%d dropped so far)", self._where, reason.value,
                           self.dropped)

    # --- the writer thread -----------------------------------------------------------------

    def _run_writer(self) -> None:
        conn = self._open_writer()
        try:
            while True:
                batch, markers, closing = self._next_batch()
                if batch:
                    self._write(conn, batch)
                self._publish_handled(self._taken)
                for marker in markers:
                    marker.done.set()
                prometheus.EVENTLOG_ENTRIES_QUEUED.set(self._queue.qsize())
                if closing:
                    return
        finally:
            self._close_writer(conn)
            # An append that raced close() may have queued an entry behind the close marker.
            left = 0
            while True:
                try:
                    left += isinstance(self._queue.get_nowait(), LogEntry)
                except queue.Empty:
                    break
            if left:
                self._drop(left, EventLogDropReason.CLOSED)
            # Whatever happened, nobody waits for this writer any more.
            self._handled = self._appended
            loop = self._loop
            if loop is not None:
                try:
                    loop.call_soon_threadsafe(self._wake_waiters)
                except RuntimeError:
                    pass

    def _next_batch(self) -> tuple[list[LogEntry], list[_Flush], bool]:
        """Wait for an item, then gather more until the batch is full, old enough, wanted by a
        waiter, or a marker comes."""
        batch: list[LogEntry] = []
        markers: list[_Flush] = []
        item = self._queue.get()
        deadline = time.monotonic() + self._batch_interval_s
        while True:
            if isinstance(item, _Close):
                return batch, markers, True
            if isinstance(item, _Flush):
                markers.append(item)
                return batch, markers, False
            if isinstance(item, _CommitNow):
                self._commit_requested = False
                if batch:
                    return batch, markers, False
            else:
                batch.append(item)
                self._taken += 1
                if len(batch) >= self._batch_max:
                    return batch, markers, False
            # Take what is already queued without waiting; wait only until the deadline, and
            # not at all while someone waits for an entry already taken.
            try:
                item = self._queue.get_nowait()
                continue
            except queue.Empty:
                pass
            remaining = deadline - time.monotonic()
            if (batch and self._wanted > self._handled) or remaining <= 0:
                return batch, markers, False
            try:
                item = self._queue.get(timeout=remaining)
            except queue.Empty:
                return batch, markers, False

    def _write(self, conn: Any, batch: list[LogEntry]) -> None:
        """Commit ``batch``; if the store refuses it, retry each half until only the entries that
        fail on their own are left, and drop and count just those."""
        rows: list[tuple[Any, ...]] = []
        entries: list[LogEntry] = []
        safe_entries: list[LogEntry] = []
        for entry in batch:
            try:
                safe = entry.made_safe()
                rows.append(self._row(safe))
                entries.append(entry)
                safe_entries.append(safe)
            except Exception as exc:  # made_safe() never raises; this is the last line of defence
                self._refused(1, exc)
        pending = [(0, len(rows))]
        while pending:
            start, end = pending.pop()
            try:
                if self._before_write is not None:
                    self._before_write(entries[start:end])
                self._insert(conn, rows[start:end], safe_entries[start:end])
            except Exception as exc:
                if end - start == 1:
                    self._refused(1, exc)
                    continue
                middle = (start + end) // 2
                pending.extend([(middle, end), (start, middle)])  # first half first: keep order
                continue
            self.written += end - start
            prometheus.EVENTLOG_ENTRIES_WRITTEN.inc(end - start)

    def _refused(self, count: int, exc: Exception) -> None:
        # The writer must outlive a bad entry (and a bad disk): count, warn now and then, go on.
        if self._failure_warning.due():
            logger.warning("Event-log writer could not write an entry to %s: %r", self._where, exc)
        self._drop(count, EventLogDropReason.WRITE_FAILED)

    # --- queries (async) -------------------------------------------------------------------

    async def events(
        self,
        session_id: str,
        kinds: Iterable[str] | None = None,
        since_ms: int | None = None,
        until_ms: int | None = None,
        limit: int = DEFAULT_QUERY_LIMIT,
    ) -> list[dict[str, Any]]:
        """:meth:`events_sync` in a worker thread."""
        kind_list = None if kinds is None else list(kinds)
        return await asyncio.to_thread(self.events_sync, session_id, kind_list, since_ms, until_ms, limit)

    async def sessions(
        self,
        since_ms: int,
        until_ms: int,
        text: str | None = None,
        limit: int = 1_000,
        *,
        room: str | None = None,
        name: str | None = None,
        session_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """:meth:`sessions_sync` in a worker thread."""
        return await asyncio.to_thread(lambda: self.sessions_sync(since_ms, until_ms, text, limit, room=room,
                                                                  name=name, session_id=session_id))

    # --- retention -------------------------------------------------------------------------

    async def delete_before(self, before_ms: int) -> int:
        return await asyncio.to_thread(self.delete_before_sync, before_ms)

    async def anonymise_before(self, before_ms: int) -> int:
        return await asyncio.to_thread(self.anonymise_before_sync, before_ms)


class EventLog(EventStore):
    """Append-only, durable event log in one SQLite file (WAL mode).

    :param path: the database file; created with its table on first use, reopened as is after.
    The other parameters are :class:`EventStore`'s.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        max_queue: int = DEFAULT_MAX_QUEUE,
        batch_max: int = DEFAULT_BATCH_MAX,
        batch_interval_s: float = DEFAULT_BATCH_INTERVAL_S,
        before_write: Callable[[Sequence[LogEntry]], object] | None = None,
    ) -> None:
        self.path = Path(path)
        super().__init__(str(self.path), max_queue=max_queue, batch_max=batch_max,
                         batch_interval_s=batch_interval_s, before_write=before_write)
        # Create the schema here, synchronously, so a bad path fails the constructor.
        conn = self._connect()
        try:
            conn.executescript(_SCHEMA)
            self._backfill(conn)
        finally:
            conn.close()
        self._start_writer()

    def _open_writer(self) -> sqlite3.Connection:
        return self._connect()

    def _close_writer(self, conn: Any) -> None:
        conn.close()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives a process crash; only an OS crash or power
        # loss can lose the last transactions.
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def _insert(self, conn: Any, rows: list[tuple[Any, ...]], entries: list[LogEntry]) -> None:
        """Insert ``rows`` (of ``entries``) and fold their samples into the roll-ups, in one
        transaction: the roll-ups always sum up exactly the committed samples."""
        conn.execute("BEGIN")
        try:
            conn.executemany(_INSERT, rows)
            if any(e.kind in _ROLLED_KINDS for e in entries):
                # One writer, one transaction: the rows got consecutive seqs ending at the last one.
                last = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
                self._roll_up(conn, entries, range(last - len(entries) + 1, last + 1))
            conn.execute("COMMIT")
        except BaseException:
            self._roller.forget()  # its state may hold what was just rolled back
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _write_drained(self, conn: Any, drained: rollup.Drained) -> None:
        _write_drained(conn, drained)

    def _fetch_one(self, query: str, params: tuple[Any, ...]) -> tuple[Any, ...] | None:
        row = self._roller_conn.execute(query, params).fetchone()
        return None if row is None else tuple(row)

    def _backfill(self, conn: sqlite3.Connection, chunk: int = 5_000) -> None:
        """Build the roll-ups of a file written before they existed (once: PRAGMA user_version)."""
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version >= _SCHEMA_VERSION:
            return
        roller, last = self._roller, 0
        self._roller_conn = conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            for table in _ROLLUP_TABLES:
                conn.execute(f"DELETE FROM {table}")
            while True:
                rows = conn.execute(
                    "SELECT seq, session_id, time_ms, connection_id, kind, payload FROM events"
                    " WHERE kind IN ('qualitySample', 'clientStats') AND seq > ? ORDER BY seq LIMIT ?",
                    (last, chunk)).fetchall()
                if not rows:
                    break
                for seq, session_id, time_ms, connection_id, kind, payload in rows:
                    decoded = json.loads(payload)
                    if isinstance(decoded, dict):
                        roller.add(session_id, seq, time_ms, connection_id or "", kind, decoded)
                last = rows[-1][0]
                _write_drained(conn, roller.drain())
            conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            roller.forget()
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        roller.forget()

    # --- queries ---------------------------------------------------------------------------

    def _read_connection(self) -> sqlite3.Connection:
        conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=30.0)
        conn.row_factory = sqlite3.Row
        return conn

    def events_sync(
        self,
        session_id: str,
        kinds: Iterable[str] | None = None,
        since_ms: int | None = None,
        until_ms: int | None = None,
        limit: int = DEFAULT_QUERY_LIMIT,
    ) -> list[dict[str, Any]]:
        """Committed entries of one session, oldest first (by time, then insertion order).

        ``kinds`` keeps only those kinds; ``since_ms`` is inclusive, ``until_ms`` exclusive.
        Each dict has the :class:`LogEntry` fields, ``payload`` decoded, plus ``seq``.
        """
        where = ["session_id = ?"]
        params: list[Any] = [session_id]
        if kinds is not None:
            kind_list = [str(k) for k in kinds]
            if not kind_list:
                return []
            where.append(f"kind IN ({', '.join('?' * len(kind_list))})")
            params.extend(kind_list)
        if since_ms is not None:
            where.append("time_ms >= ?")
            params.append(since_ms)
        if until_ms is not None:
            where.append("time_ms < ?")
            params.append(until_ms)
        params.append(limit)
        sql = f"SELECT {_COLUMNS} FROM events WHERE {' AND '.join(where)} ORDER BY time_ms, seq LIMIT ?"
        conn = self._read_connection()
        try:
            rows = conn.execute(sql, params).fetchall()
        finally:
            conn.close()
        return [{**dict(row), "payload": json.loads(row["payload"])} for row in rows]

    def analysis_sync(self, session_id: str, limit: int = DEFAULT_ANALYSIS_LIMIT, *, marks: bool = True) -> Analysis:
        """What the summary and the diagnosis read, in one snapshot: the session's entries but its
        samples (at most ``limit``, oldest first), its roll-ups and the times of its first and
        last entry of any kind. ``marks=False`` leaves out the bad samples' tallies and the
        samples findings name one by one (the summary needs neither)."""
        conn = self._read_connection()
        plain = conn.cursor()
        plain.row_factory = None  # tuples: no per-row name lookup
        try:
            conn.execute("BEGIN")  # one read snapshot for the four queries
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM events WHERE session_id = ? AND {_SAMPLE_KINDS_SQL}"
                " ORDER BY time_ms, seq LIMIT ?", (session_id, limit)).fetchall()
            entries = [{**dict(row), "payload": json.loads(row["payload"])} for row in rows]
            # Two index seeks (one MIN and one MAX would each scan the session).
            first = conn.execute("SELECT time_ms FROM events WHERE session_id = ? ORDER BY time_ms LIMIT 1",
                                 (session_id,)).fetchone()
            last = conn.execute("SELECT time_ms FROM events WHERE session_id = ? ORDER BY time_ms DESC LIMIT 1",
                                (session_id,)).fetchone()
            tracks = {}
            for r in conn.execute(f"SELECT {', '.join(_TRACK_KEY[1:] + _TRACK_VALUES)} FROM rollup_tracks"
                                  " WHERE session_id = ?", (session_id,)):
                track = _track_of(tuple(r))
                tracks[(track.track, track.direction, track.kind)] = track
            quality: list[tuple[str, int, float]] = plain.execute(
                "SELECT connection_id, bucket_ms, q_min FROM quality_rollups WHERE session_id = ? ORDER BY bucket_ms",
                (session_id,)).fetchall()
            mark_list = [rollup.Mark(*r) for r in plain.execute(
                f"SELECT {', '.join(c for c in _MARK_COLUMNS if c != 'session_id')} FROM sample_marks"
                " WHERE session_id = ? ORDER BY time_ms, seq", (session_id,))] if marks else []
            freezes = [_freeze_of(tuple(r)) for r in conn.execute(
                f"SELECT {', '.join(_FREEZE_COLUMNS[1:])} FROM freeze_tracks WHERE session_id = ?"
                " ORDER BY first_ms, first_seq", (session_id,))]
            tallies = {(r[0], r[1], r[2], r[3]): _tally_of(*r[4:]) for r in plain.execute(
                "SELECT track, direction, kind, type, count, first_ms, first_seq, last_ms, last_seq, bins"
                " FROM bad_tallies WHERE session_id = ?", (session_id,))} if marks else {}
            conn.execute("COMMIT")
        finally:
            conn.close()
        span = (None if first is None else first[0], None if last is None else last[0])
        return Analysis(entries, rollup.SessionRollup(tracks, quality, mark_list, freezes, tallies), span)

    def sample_count_sync(self, session_id: str) -> int:
        """How many quality samples the session has (from its roll-ups)."""
        conn = self._read_connection()
        try:
            row = conn.execute("SELECT COALESCE(SUM(n), 0) FROM rollup_tracks WHERE session_id = ?",
                               (session_id,)).fetchone()
        finally:
            conn.close()
        return int(row[0])

    def quality_points_sync(self, session_id: str, resolution_ms: int, since_ms: int | None = None,
                            max_points: int | None = None) -> tuple[int, list[dict[str, Any]]]:
        """The quality timeline from its roll-ups: one point per track, kind and window of
        ``resolution_ms`` (rounded down to one of :data:`RESOLUTIONS_MS`), oldest first, with the
        window's sums, means, minima and maxima. With ``max_points``, the resolution is first
        coarsened until the points fit (counted from the tracks' spans, without reading the
        buckets). Returns (resolution, points)."""
        resolution_ms = fit_resolution(resolution_ms)
        since = 0 if since_ms is None else since_ms
        conn = self._read_connection()
        try:
            if max_points is not None:
                spans = conn.execute("SELECT MAX(first_ms, ?), last_ms FROM rollup_tracks WHERE session_id = ?"
                                     " AND last_ms >= ?", (since, session_id, since)).fetchall()
                resolution_ms = fit_resolution(resolution_ms, spans, max_points)
            # The finest stored width that divides the resolution; coarser ones are summed up here.
            span = max(w for w in rollup.SPANS_MS if resolution_ms % w == 0)
            start = since - since % resolution_ms
            if span == resolution_ms:
                rows = conn.execute(_POINTS_OF_BUCKETS, (resolution_ms, resolution_ms, resolution_ms, session_id, span,
                                                         start)).fetchall()
            else:
                rows = conn.execute(_POINTS_GROUPED, (resolution_ms, resolution_ms, resolution_ms, session_id, span,
                                                      start, resolution_ms)).fetchall()
        finally:
            conn.close()
        return resolution_ms, [dict(zip(_POINT_KEYS, r, strict=True)) for r in rows]

    def sessions_sync(
        self,
        since_ms: int,
        until_ms: int,
        text: str | None = None,
        limit: int = 1_000,
        *,
        room: str | None = None,
        name: str | None = None,
        session_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """Back-office search: sessions with entries in ``[since_ms, until_ms)``, newest first.

        ``text`` (case-insensitive substring) keeps sessions where some entry in the window
        mentions it in its session, connection or stream id, or its text (names, roles…).
        ``room`` keeps sessions of that room (exactly: a consultation's session id, or the
        ``room`` of its connect and video-session entries); ``name`` (substring) sessions a
        participant of that name joined; ``session_id`` (substring) sessions whose id holds it.
        The filters combine. Each dict: ``session_id``, ``first_ms``, ``last_ms``, ``count``
        (counted over the window).
        """
        sql, params = sessions_query(SQLITE_DIALECT, since_ms, until_ms, text, limit, room, name, session_id)
        conn = self._read_connection()
        try:
            rows = conn.execute(sql, params).fetchall()
        finally:
            conn.close()
        return [dict(row) for row in rows]

    # --- retention -------------------------------------------------------------------------

    def _write_connection(self) -> sqlite3.Connection:
        conn = self._connect()
        conn.row_factory = sqlite3.Row
        return conn

    def delete_before_sync(self, before_ms: int) -> int:
        """Retention: delete every entry older than ``before_ms`` (event log, quality timeline and
        client stats alike) and the roll-ups of those samples. Returns how many entries were
        deleted."""
        conn = self._write_connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
            deleted = conn.execute("DELETE FROM events WHERE time_ms < ?", (before_ms,)).rowcount
            # Their roll-ups go with them: a bucket or freeze track whose last sample is older.
            for statement in _ROLLUP_RETENTION:
                conn.execute(statement, (before_ms,))
            conn.execute("COMMIT")
        finally:
            conn.close()
        return int(deleted)

    def anonymise_before_sync(self, before_ms: int, chunk: int = 1_000) -> int:
        """Retention: replace the personal data of every entry older than ``before_ms`` (see
        :func:`anonymised`), ``chunk`` entries per transaction. Entries anonymised earlier are
        left alone. Returns how many were changed. The roll-ups hold figures and random ids
        only, nothing personal: they stay."""
        changed = 0
        conn = self._write_connection()
        try:
            last = 0
            while True:
                rows = conn.execute(
                    "SELECT seq, kind, payload FROM events WHERE time_ms < ? AND seq > ?"
                    " AND json_extract(payload, '$.anonymised') IS NULL ORDER BY seq LIMIT ?",
                    (before_ms, last, chunk)).fetchall()
                if not rows:
                    return changed
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for row in rows:
                        text, payload = anonymised(row["kind"], json.loads(row["payload"]))
                        conn.execute("UPDATE events SET text = ?, payload = ? WHERE seq = ?",
                                     (text, json.dumps(payload, separators=(",", ":"), ensure_ascii=False),
                                      row["seq"]))
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
                changed += len(rows)
                last = rows[-1]["seq"]
        finally:
            conn.close()


#: Payload keys that hold personal data: names, patient and staff references, IP addresses, user
#: agents. Anonymisation removes them at every nesting level.
PERSONAL_KEYS: Final = frozenset({
    "name", "patient_name", "clinician_name", "display_name", "user", "user_name",
    "patient", "patient_ref", "clinician", "sender", "by", "author", "admitted_by", "added_by", "sub",
    "ip", "client_ip", "remote_ip", "address", "remote_address", "forwarded_for",
    "user_agent", "userAgent", "ua",
})


def _without_personal(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_personal(v) for k, v in value.items() if k not in PERSONAL_KEYS}
    if isinstance(value, list):
        return [_without_personal(v) for v in value]
    return value


def anonymised(kind: str, payload: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """An entry's text and payload without personal data: the text (a sentence that names people)
    becomes a neutral one naming the kind; personal payload keys (:data:`PERSONAL_KEYS`) go; what
    support and statistics need (times, durations, reasons, figures, random ids) stays, and the
    payload is marked ``"anonymised": true``."""
    kept = _without_personal(payload)
    return f"{kind} entry (personal data removed by the retention policy).", {**kept, "anonymised": True}
