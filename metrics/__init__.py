"""Metrics: the per-session event log, quality timelines, inspector queries and Prometheus definitions. It only listens."""
