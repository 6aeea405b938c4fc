"""The daemon's Prometheus metrics; every name starts with `trackloop_`.

Counters and histograms count what this process did (Prometheus sums them over replicas).
Gauges about shared state (tasks, open findings, the outbox, connectors' last success) are read
from the store at scrape time, so every replica reports the same numbers for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from store.db import Store
from store.errors import StoreError
from store.models import Finding, OutboxAction, Task
from store.sync_state import schedules
from sync.engine import SyncResult

CONTENT_TYPE = CONTENT_TYPE_LATEST
SYNC_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class StoreCollector(Collector):
    """Gauges read from the store when Prometheus scrapes."""

    def __init__(self, store: Callable[[], Store]) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("trackloop_store_up", "1 if the store answered this scrape, else 0.")
        try:
            with self.store().transaction() as session:
                tasks = session.execute(
                    select(Task.source, Task.status, func.count()).group_by(Task.source, Task.status)
                ).all()
                findings = session.execute(
                    select(Finding.rule, func.count()).where(Finding.status == "open").group_by(Finding.rule)
                ).all()
                outbox = dict(session.execute(  # type: ignore[arg-type]
                    select(OutboxAction.status, func.count())
                    .where(OutboxAction.status.in_(("pending", "failed")))
                    .group_by(OutboxAction.status)
                ).all())
                states = schedules(session)
        except (SQLAlchemyError, StoreError):
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        g = GaugeMetricFamily("trackloop_tasks", "Tasks in the store by source and status.",
                              labels=["source", "status"])
        for source, status, count in tasks:
            g.add_metric([source, status], count)
        yield g
        g = GaugeMetricFamily("trackloop_findings_open", "Open findings by rule.", labels=["rule"])
        for rule, count in findings:
            g.add_metric([rule], count)
        yield g
        yield _single("trackloop_outbox_pending", "Actions waiting to be delivered.", outbox.get("pending", 0))
        yield _single("trackloop_outbox_failed", "Actions that failed for good.", outbox.get("failed", 0))
        last = GaugeMetricFamily("trackloop_connector_last_success_timestamp_seconds",
                                 "Unix time of the connector's last successful sync.", labels=["connector"])
        failures = GaugeMetricFamily("trackloop_connector_failures",
                                     "Failed syncs of the connector since its last success.", labels=["connector"])
        for name, state in sorted(states.items()):
            if state.last_success is not None:
                last.add_metric([name], state.last_success.timestamp())
            failures.add_metric([name], state.failures)
        yield last
        yield failures


def _single(name: str, doc: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc)
    g.add_metric([], value)
    return g


class Metrics:
    """One registry per daemon (tests run several in one process)."""

    def __init__(self, store: Callable[[], Store]) -> None:
        self.registry = r = CollectorRegistry()
        self.sync_duration = Histogram("trackloop_sync_duration_seconds", "Duration of connector syncs.",
                                       ["connector"], registry=r, buckets=SYNC_BUCKETS)
        self.syncs = Counter("trackloop_syncs", "Connector syncs by outcome (ok, failed, interrupted).",
                             ["connector", "result"], registry=r)
        self.sync_errors = Counter("trackloop_sync_errors", "Failed connector syncs.", ["connector"], registry=r)
        self.tasks_written = Counter("trackloop_tasks_written", "Tasks inserted, updated or cancelled by syncs.",
                                     ["connector", "change"], registry=r)
        self.api_requests = Counter("trackloop_api_requests", "Requests made to the source's API.",
                                    ["connector"], registry=r)
        self.rate_limit_remaining = Gauge("trackloop_rate_limit_remaining",
                                          "The source's remaining API budget as last reported.",
                                          ["connector"], registry=r)
        self.last_sync = Gauge("trackloop_sync_last_timestamp_seconds",
                               "Unix time this replica last finished a sync of the connector.", ["connector"],
                               registry=r)
        self.rules_duration = Histogram("trackloop_rules_duration_seconds", "Duration of rule runs.",
                                        registry=r, buckets=SYNC_BUCKETS)
        self.rules_errors = Counter("trackloop_rules_errors", "Rule runs that failed.", registry=r)
        self.digests_sent = Counter("trackloop_digests_sent", "Digests sent.", registry=r)
        self.outbox_delivered = Counter("trackloop_outbox_delivered", "Outbox actions delivered, by outcome.",
                                        ["result"], registry=r)
        self.webhooks = Counter("trackloop_webhooks", "Webhook requests by source and outcome.",
                                ["source", "outcome"], registry=r)
        self.leases_held = Gauge("trackloop_leases_held", "Connectors this replica is syncing now.", registry=r)
        ProcessCollector(namespace="trackloop", registry=r)
        r.register(StoreCollector(store))

    def connectors(self, names: Iterable[str]) -> None:
        """Create the per-connector series at zero, so a quiet connector still has them."""
        for name in names:
            self.sync_errors.labels(name)
            self.api_requests.labels(name)
            for result in ("ok", "failed"):
                self.syncs.labels(name, result)

    def observe_sync(self, result: SyncResult) -> None:
        name = result.connector
        outcome = "failed" if not result.ok else "interrupted" if result.note and "interrupted" in result.note \
            else "ok"
        self.syncs.labels(name, outcome).inc()
        if not result.ok:
            self.sync_errors.labels(name).inc()
        self.sync_duration.labels(name).observe(result.seconds)
        self.api_requests.labels(name).inc(result.requests.requests)
        if result.requests.rate_limit_remaining is not None:
            self.rate_limit_remaining.labels(name).set(result.requests.rate_limit_remaining)
        for change in ("inserted", "updated", "cancelled"):
            count = getattr(result.upserts, change)
            if count:
                self.tasks_written.labels(name, change).inc(count)
        self.last_sync.labels(name).set(datetime.now(UTC).timestamp())

    def render(self) -> bytes:
        return generate_latest(self.registry)
