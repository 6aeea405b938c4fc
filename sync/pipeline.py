"""The whole loop in one place: pull, run the rules, plan follow-ups, deliver, send digests.

The CLI and the daemon both drive trackloop through a `Pipeline`, so the order of steps, and
what a dry run does (everything, inside one transaction that is rolled back, with no remote
write), is decided here once.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from connectors.base import Connector
from rules.engine import RuleOutcome, RulesEngine, build_rules
from rules.registry import rule_types
from store.db import Store
from store.locks import exclusive
from store.models import Identity, OutboxAction, Person
from store.outbox import NewAction, enqueue
from sync import digests
from sync.config import AppConfig
from sync.delivery import Deliverer, DeliveryReport
from sync.engine import SyncEngine, SyncResult
from sync.notify import Plan, Planner, verify_signals

log = logging.getLogger("trackloop.pipeline")

Clock = Callable[[], datetime]


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(slots=True)
class CycleReport:
    syncs: list[SyncResult] = field(default_factory=list)
    rules: list[RuleOutcome] = field(default_factory=list)
    plan: Plan | None = None  # what was (or, in a dry run, would be) queued

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.syncs)


@dataclass(frozen=True, slots=True)
class DigestRun:
    name: str
    slot: datetime
    actions: list[NewAction]
    missed: list[str]
    content: digests.DigestContent
    queued: int = 0  # deliveries new to the outbox (0: this slot was queued before)


class _Rollback(Exception):
    """Raised at the end of a dry run so its transaction commits nothing."""


class Pipeline:
    def __init__(
        self,
        store: Store,
        config: AppConfig,
        connector_types: Mapping[str, type[Connector]],  # type: ignore[type-arg]
        *,
        clock: Clock | None = None,
        on_page: Callable[[str, SyncResult], None] | None = None,
        worker: str | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.types = connector_types
        self.clock = clock or (lambda: datetime.now(UTC))
        self.engine = SyncEngine(store, config, connector_types, clock=self.clock, on_page=on_page)
        self.rules = RulesEngine(build_rules(rule_types(), config.rules), clock=self.clock)
        self.worker = worker or default_worker_id()
        connectors = {name: (cfg.type, connector_types[cfg.type]) for name, cfg in config.connectors.items()}
        labels = getattr(config.rules.get("done_unverified"), "verified_labels", ["verified"])
        signals = verify_signals(config.connectors, labels)
        self.planner = Planner(config.notify, connectors, signals) if config.notify is not None else None

    # -- the cycle ------------------------------------------------------------------------------
    def sync(self, only: Iterable[str] | None = None, *, full: bool = False, dry_run: bool = False) -> CycleReport:
        """Pull the connectors, evaluate the rules, queue follow-ups."""
        if dry_run:
            return self._dry_cycle(only, full=full)
        report = CycleReport(syncs=self.engine.run(only, full=full))
        report.rules = self.run_rules()
        report.plan = self.plan_followups()
        return report

    def run_rules(self) -> list[RuleOutcome]:
        with self.store.transaction() as session:
            return self.rules_in(session)

    def rules_in(self, session: Session) -> list[RuleOutcome]:
        """Run the rules in the caller's transaction, one process at a time: findings are
        reconciled set-wise, and two runs at once would race on the one-open-finding index."""
        exclusive(session, "rules")
        return self.rules.run(session)

    def plan_followups(self, *, dry_run: bool = False) -> Plan | None:
        """Queue the follow-ups `[notify]` asks for; a dry run returns them and queues nothing."""
        if self.planner is None:
            return None
        with self.store.transaction() as session:
            exclusive(session, "plan")  # replicas take turns: two plans would queue the same keys
            plan = self._plan(session)
            if dry_run:
                session.rollback()
        return plan

    def _plan(self, session: Session) -> Plan:
        assert self.planner is not None
        plan = self.planner.plan(session, self.clock())
        enqueue(session, [p.action for p in plan.actions], self.clock())
        if plan.actions or plan.held_back:
            log.info("planned %d follow-ups (%d held back by caps)", len(plan.actions), plan.held_back)
        return plan

    def _dry_cycle(self, only: Iterable[str] | None, *, full: bool) -> CycleReport:
        """Everything a real cycle does, in one transaction that is then rolled back."""
        report = CycleReport()
        try:
            with self.store.transaction() as session:
                report.syncs = self.engine.run_in(session, only, full=full)
                report.rules = self.rules_in(session)
                report.plan = self._plan(session) if self.planner is not None else None
                raise _Rollback
        except _Rollback:
            pass
        return report

    # -- delivery -------------------------------------------------------------------------------
    def deliverer(self) -> Deliverer:
        max_attempts = self.config.notify.max_attempts if self.config.notify else 5
        return Deliverer(self.store, self.config, self.types, worker=self.worker, clock=self.clock,
                         max_attempts=max_attempts)

    def deliver_outbox(self, limit: int = 50) -> DeliveryReport:
        deliverer = self.deliverer()
        try:
            return deliverer.deliver_due(limit)
        finally:
            deliverer.close()

    # -- digests --------------------------------------------------------------------------------
    def digest(self, name: str) -> DigestRun:
        """Build digest `name` for the current slot and the actions that would deliver it."""
        cfg = self.config.digests[name]
        with self.store.transaction() as session:
            content = digests.build(session, name, cfg, self.clock(), digests.last_sent(session, name))
            identities = {(key, kind): value for key, kind, value in session.execute(
                select(Person.key, Identity.kind, Identity.value).join(Identity).order_by(Identity.id.desc()))}
        kinds = {n: c.type for n, c in self.config.connectors.items()}
        actions, missed = digests.recipients(name, cfg, content, kinds, identities, smtp=self.config.smtp is not None)
        return DigestRun(name, content.slot, actions, missed, content)

    def send_digest(self, name: str) -> DigestRun:
        """Queue digest `name` for its current slot (once per slot) and deliver it now."""
        run = self.digest(name)
        with self.store.transaction() as session:
            queued = len(enqueue(session, run.actions, self.clock()))
        for recipient in run.missed:
            log.warning("digest %s: cannot reach %s (no identity or connector for it)", name, recipient)
        self.deliver_outbox(limit=max(len(run.actions), 1) * 2)
        return replace(run, queued=queued)

    def send_due_digests(self) -> list[DigestRun]:
        """Send every digest whose current slot has not been sent yet."""
        sent = []
        for name, cfg in self.config.digests.items():
            slot = cfg.slot(self.clock())
            prefix = f"digest:{name}:{slot.isoformat()}:"
            with self.store.transaction() as session:
                queued = session.scalar(
                    select(OutboxAction.id).where(OutboxAction.key.startswith(prefix, autoescape=True)).limit(1)
                )
            if queued is None:
                sent.append(self.send_digest(name))
        return sent
