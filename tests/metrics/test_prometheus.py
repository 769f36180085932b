"""Prometheus definitions: names, pre-created Enum labels, no id labels, exposition output."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from media.events import ForwardDropReason
from metrics import prometheus
from rooms.model import DisconnectReason, StreamDestroyedReason


def exposed() -> dict[str, list[dict[str, str]]]:
    body, content_type = prometheus.render()
    assert content_type.startswith("text/plain")
    families: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(body.decode()):
        if family.name.startswith("openconsult_"):
            families[family.name] = [dict(s.labels) for s in family.samples]
    return families


def test_expected_metric_names_are_exposed() -> None:
    families = exposed()
    for name in [
        "openconsult_connections_active",
        "openconsult_sessions_active",
        "openconsult_streams_active",
        "openconsult_subscriptions_active",
        "openconsult_connections_closed",
        "openconsult_streams_destroyed",
        "openconsult_tokens_rejected",
        "openconsult_rtp_packets_forwarded",
        "openconsult_rtp_bytes_forwarded",
        "openconsult_keyframes_requested",
        "openconsult_nacks_answered",
        "openconsult_eventlog_entries_written",
        "openconsult_eventlog_entries_dropped",
        "openconsult_eventlog_entries_queued",
        "openconsult_ws_messages",
    ]:
        assert name in families, name


def test_labelled_series_exist_up_front() -> None:
    families = exposed()
    assert {s["reason"] for s in families["openconsult_connections_closed"]} == {r.value for r in DisconnectReason}
    assert {s["reason"] for s in families["openconsult_streams_destroyed"]} == {
        r.value for r in StreamDestroyedReason
    }
    assert {s["code"] for s in families["openconsult_tokens_rejected"]} == {
        "unauthorized",
        "token_expired",
        "token_not_yet_valid",
        "room_mismatch",
    }
    assert {s["kind"] for s in families["openconsult_rtp_packets_forwarded"]} == {"audio", "video"}
    assert len(families["openconsult_ws_messages"]) == len(prometheus.WsDirection) * len(prometheus.WsResult)
    assert {s["reason"] for s in families["openconsult_rtp_packets_dropped"]} == {
        r.value for r in ForwardDropReason
    }


def test_no_id_labels() -> None:
    for samples in exposed().values():
        for labels in samples:
            assert not {"session_id", "connection_id", "stream_id", "participant", "user"} & set(labels)


def test_counters_render_with_total_suffix() -> None:
    prometheus.CONNECTIONS_CLOSED.labels(reason=DisconnectReason.SERVER_SHUTDOWN).inc()
    body, _ = prometheus.render()
    assert b'openconsult_connections_closed_total{reason="serverShutdown"}' in body
    assert b"openconsult_connections_closed_created" not in body
