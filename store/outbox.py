"""The outbox: actions to push, each delivered at most once per idempotency key.

Planning inserts rows (a key that exists is never inserted again); workers claim due rows with
a lease (`FOR UPDATE SKIP LOCKED` on PostgreSQL, so replicas never take the same row), deliver
them, and record the outcome. A worker that dies leaves its claim to expire; the next claimant
delivers again, and the connector finds its own marker instead of posting twice.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from store.models import OutboxAction
from store.sql import dialect_of, one_of


@dataclass(frozen=True, slots=True)
class NewAction:
    key: str
    connector: str
    kind: str
    text: str
    target: str | None = None
    subject: str | None = None
    payload: dict[str, Any] = field(default_factory=dict)
    task_id: int | None = None
    finding_id: int | None = None


def enqueue(session: Session, actions: Sequence[NewAction], now: datetime) -> list[OutboxAction]:
    """Insert actions whose key is new; return the rows inserted."""
    if not actions:
        return []
    keys = [a.key for a in actions]
    known = set(session.scalars(select(OutboxAction.key).where(OutboxAction.key.in_(keys))))
    rows = []
    for action in actions:
        if action.key in known:
            continue
        known.add(action.key)
        row = OutboxAction(
            key=action.key, connector=action.connector, kind=action.kind, target=action.target,
            subject=action.subject, text=action.text, payload=action.payload, task_id=action.task_id,
            finding_id=action.finding_id, status="pending", attempts=0, created_at=now, next_attempt_at=now,
        )
        session.add(row)
        rows.append(row)
    session.flush()
    return rows


DIGEST_PREFIX = "digest:"  # digests' keys; they keep their own schedule, quiet hours or not


def claim_due(
    session: Session, worker: str, now: datetime, limit: int, lease: timedelta, *, digests_only: bool = False
) -> list[OutboxAction]:
    """Claim up to `limit` pending actions that are due and not held by a live claim
    (only digests while follow-ups are paused by quiet hours or a day off)."""
    stmt = (
        select(OutboxAction)
        .where(
            OutboxAction.status == "pending",
            OutboxAction.next_attempt_at <= now,
            or_(OutboxAction.claim_expires.is_(None), OutboxAction.claim_expires < now),
        )
        .order_by(OutboxAction.next_attempt_at, OutboxAction.id)
        .limit(limit)
    )
    if digests_only:
        stmt = stmt.where(OutboxAction.key.startswith(DIGEST_PREFIX))
    if dialect_of(session) == "postgresql":
        stmt = stmt.with_for_update(skip_locked=True)
    rows = list(session.scalars(stmt))
    for row in rows:
        row.claimed_by, row.claim_expires = worker, now + lease
        if row.first_attempt_at is None:  # a post may land from here on, long before `sent_at` records it
            row.first_attempt_at = now
    session.flush()
    return rows


def release_claims(session: Session, worker: str | None = None) -> int:
    """Drop the claims of `worker` (default: everyone's, for a store only one process may use)."""
    stmt = update(OutboxAction).where(OutboxAction.claimed_by.is_not(None))
    if worker is not None:
        stmt = stmt.where(OutboxAction.claimed_by == worker)
    result = session.execute(stmt.values(claimed_by=None, claim_expires=None))
    return int(result.rowcount)  # type: ignore[attr-defined]


def _owned(action_id: int, worker: str) -> Any:
    return and_(OutboxAction.id == action_id, OutboxAction.claimed_by == worker)


def mark_sent(session: Session, action_id: int, worker: str, remote_id: str, now: datetime) -> bool:
    """Record a delivery; False if the claim was lost to another worker meanwhile."""
    result = session.execute(
        update(OutboxAction)
        .where(_owned(action_id, worker))
        .values(status="sent", remote_id=remote_id, sent_at=now, last_error=None, claimed_by=None,
                claim_expires=None, attempts=OutboxAction.attempts + 1)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def mark_cancelled(session: Session, action_id: int, worker: str, reason: str) -> bool:
    """Drop a claimed action that no longer needs saying (its finding resolved before delivery)."""
    result = session.execute(
        update(OutboxAction)
        .where(_owned(action_id, worker))
        .values(status="cancelled", last_error=reason, claimed_by=None, claim_expires=None)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def backoff(attempts: int) -> timedelta:
    """1, 2, 4 … minutes (capped at an hour), with jitter so failed actions do not stampede."""
    base = min(60 * 2 ** max(attempts - 1, 0), 3600)
    return timedelta(seconds=base * random.uniform(0.8, 1.2))


def mark_failed(
    session: Session, action: OutboxAction, worker: str, error: str, now: datetime, *, permanent: bool,
    max_attempts: int,
) -> str:
    """Record a failed attempt: retry later with back-off, or park as failed. Returns the status."""
    attempts = action.attempts + 1
    status = "failed" if permanent or attempts >= max_attempts else "pending"
    session.execute(
        update(OutboxAction)
        .where(_owned(action.id, worker))
        .values(status=status, attempts=attempts, last_error=error[:2000], claimed_by=None, claim_expires=None,
                next_attempt_at=now + backoff(attempts))
    )
    return status


def retry_failed(session: Session, now: datetime, keys: Sequence[str] = ()) -> int:
    """Put failed actions (all, or those with `keys`) back in the queue."""
    stmt = update(OutboxAction).where(OutboxAction.status == "failed")
    if keys:
        stmt = stmt.where(OutboxAction.key.in_(list(keys)))
    result = session.execute(stmt.values(status="pending", attempts=0, next_attempt_at=now, last_error=None))
    return int(result.rowcount)  # type: ignore[attr-defined]


class PastAction(NamedTuple):
    key: str
    task_id: int | None
    connector: str
    target: str | None
    status: str
    created_at: datetime
    sent_at: datetime | None


def actions_for_tasks(session: Session, task_ids: Sequence[int]) -> list[PastAction]:
    """Every action about these tasks: reminder numbering and daily caps read them."""
    out: list[PastAction] = []
    ids = list(task_ids)
    cols = (OutboxAction.key, OutboxAction.task_id, OutboxAction.connector, OutboxAction.target,
            OutboxAction.status, OutboxAction.created_at, OutboxAction.sent_at)
    for i in range(0, len(ids), 2000):
        stmt = select(*cols).where(one_of(session, OutboxAction.task_id, ids[i : i + 2000]))
        out.extend(PastAction(*row) for row in session.execute(stmt))
    return out


def action_json(row: OutboxAction) -> dict[str, Any]:
    """The `outbox --json` contract (documented in the README)."""
    return {
        "key": row.key,
        "connector": row.connector,
        "kind": row.kind,
        "target": row.target,
        "status": row.status,
        "attempts": row.attempts,
        "last_error": row.last_error,
        "remote_id": row.remote_id,
        "created_at": row.created_at.isoformat(),
        "next_attempt_at": row.next_attempt_at.isoformat() if row.status == "pending" else None,
        "sent_at": row.sent_at.isoformat() if row.sent_at else None,
        "text": row.text,
    }
