"""Delivering the outbox: claim due actions, push them through their connector, record the result.

The outbox is the only retry layer for writes: a failed attempt is rescheduled with back-off and,
after `max_attempts`, parked as failed (shown by `trackloop outbox`, retried by `outbox retry`).
A crash between a connector's post and the record of it is harmless: the claim expires, the
action is delivered again, and the connector finds its own marker instead of posting twice.
Follow-ups wait out `[notify]` quiet hours and days off (retries too; digests keep their own
schedule), and one whose finding resolved before delivery is cancelled instead of sent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from connectors.base import Connector
from connectors.errors import AuthError, ConnectorError, PushError, TransientError
from connectors.smtp import SmtpConfig, SmtpSender, address_domain, compose, message_id_for
from store.canonical import Action, PushResult
from store.db import Store
from store.errors import TrackloopError
from store.models import Finding, OutboxAction, Task
from store.outbox import claim_due, mark_cancelled, mark_failed, mark_sent
from store.sync_state import load_state
from sync.config import AppConfig
from sync.digests import SMTP_VIA
from sync.engine import build_connector

log = logging.getLogger("trackloop.outbox")

CLAIM_LEASE = timedelta(minutes=5)


@dataclass(slots=True)
class DeliveryReport:
    sent: int = 0
    already_delivered: int = 0
    retrying: int = 0
    failed: int = 0
    cancelled: int = 0
    paused: str | None = None  # why follow-ups wait (quiet hours, a day off)


def to_action(row: OutboxAction, task: Task | None) -> Action:
    return Action(
        key=row.key,
        kind=row.kind,
        text=row.text,
        target=row.target,
        task_external_id=task.external_id if task else None,
        task_url=task.url if task else None,
        task_extra=dict(task.extra or {}) if task else {},
        subject=row.subject,
        payload=dict(row.payload or {}),
    )


class SmtpMail:
    """Email digests sent straight through `[smtp]`, for installs with no imap connector.

    The Message-ID is derived from the key, but with no Sent folder to look in, a crash between
    the send and its record sends that digest again (an imap connector would find it first).
    """

    def __init__(self, config: SmtpConfig, clock: Callable[[], datetime]) -> None:
        self.config = config
        self.clock = clock

    def push(self, action: Action) -> PushResult:
        sender = self.config.from_address
        if not sender:
            raise PushError("[smtp] has no sender (and username is no address): set [smtp] sender", permanent=True)
        message_id = message_id_for(action.key, address_domain(sender))
        try:
            message = compose(sender, message_id, self.clock(), to=(action.target or "").strip(),
                              subject=action.subject or "trackloop", text=action.text,
                              html=action.payload.get("html"))
        except ValueError as exc:
            raise PushError(f"[smtp]: cannot compose the message: {exc}", permanent=True) from None
        try:
            SmtpSender(self.config, logger=log).send(message)
        except (TransientError, AuthError) as exc:
            raise PushError(f"[smtp]: {exc}", permanent=False) from exc
        except ConnectorError as exc:
            raise PushError(f"[smtp]: {exc}", permanent=True) from exc
        return PushResult(message_id)

    def close(self) -> None:
        """Nothing held open: SmtpSender connects once per message."""


class Deliverer:
    def __init__(
        self,
        store: Store,
        config: AppConfig,
        connector_types: Mapping[str, type[Connector]],  # type: ignore[type-arg]
        *,
        worker: str,
        clock: Callable[[], datetime] | None = None,
        max_attempts: int = 5,
    ) -> None:
        self.store = store
        self.config = config
        self.types = connector_types
        self.worker = worker
        self.clock = clock or (lambda: datetime.now(UTC))
        self.max_attempts = max_attempts
        self._connectors: dict[str, Connector | SmtpMail] = {}  # type: ignore[type-arg]

    def connector(self, name: str) -> Connector | SmtpMail:  # type: ignore[type-arg]
        if name == SMTP_VIA and self.config.smtp is not None:
            self._connectors.setdefault(name, SmtpMail(self.config.smtp, self.clock))
        if name not in self._connectors:
            if name not in self.config.connectors:
                raise PushError(f"connector {name!r} is no longer configured", permanent=True)
            connector = build_connector(self.config, self.types, name, clock=self.clock)
            with self.store.transaction() as session:
                row = load_state(session, name)
                connector.restore(connector.load_cursor(row.cursor) if row is not None else None)
            self._connectors[name] = connector
        return self._connectors[name]

    def close(self) -> None:
        for connector in self._connectors.values():
            connector.close()
        self._connectors.clear()

    def deliver_due(self, limit: int = 50) -> DeliveryReport:
        """Claim and deliver up to `limit` due actions."""
        report = DeliveryReport()
        now = self.clock()
        paused = report.paused = self.config.notify.in_quiet_time(now) if self.config.notify else None
        claimed = []
        with self.store.transaction() as session:
            for row in claim_due(session, self.worker, now, limit, CLAIM_LEASE, digests_only=paused is not None):
                finding = session.get(Finding, row.finding_id) if row.finding_id else None
                if finding is not None and finding.status == "resolved":
                    mark_cancelled(session, row.id, self.worker, "finding resolved before delivery")
                    report.cancelled += 1
                    log.info("outbox %s: cancelled, its finding resolved before delivery", row.key)
                    continue
                task = session.get(Task, row.task_id) if row.task_id else None
                claimed.append((row.id, to_action(row, task), row.connector))
        for action_id, action, connector_name in claimed:
            self._deliver_one(action_id, action, connector_name, report)
        return report

    def _deliver_one(self, action_id: int, action: Action, connector_name: str, report: DeliveryReport) -> None:
        try:
            result = self.connector(connector_name).push(action)
        except TrackloopError as exc:
            permanent = isinstance(exc, PushError) and exc.permanent
            with self.store.transaction() as session:
                row = session.get(OutboxAction, action_id)
                if row is None:
                    return
                status = mark_failed(session, row, self.worker, str(exc), self.clock(), permanent=permanent,
                                     max_attempts=self.max_attempts)
            if status == "failed":
                report.failed += 1
                log.error("outbox %s: failed for good: %s", action.key, exc)
            else:
                report.retrying += 1
                log.warning("outbox %s: %s; will retry", action.key, exc)
            return
        with self.store.transaction() as session:
            mark_sent(session, action_id, self.worker, result.remote_id, self.clock())
        if result.already_delivered:
            report.already_delivered += 1
            log.info("outbox %s: found already delivered as %s", action.key, result.remote_id)
        else:
            report.sent += 1
            log.info("outbox %s: delivered as %s", action.key, result.remote_id)
