"""Findings: a rule's verdicts kept with a lifecycle (open, snoozed, resolved).

One live (open or snoozed) finding per (rule, task): a rerun refreshes `last_seen`, never adds
a second. Work is done in a handful of set-wise statements per rule, so a rule that flags tens
of thousands of tasks costs a few bulk writes, not one round trip per task.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, aliased

from store.models import Finding, Person, Task
from store.people import key_in
from store.sql import bulk_insert, one_of

_CHUNK = 2000
LIVE = ("open", "snoozed")


@dataclass(slots=True)
class Draft:
    """What a rule says about one task this run."""

    message: str
    act_person_id: int | None
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class ReconcileStats:
    opened: int = 0
    kept: int = 0
    resolved: int = 0
    snoozed: int = 0


def reconcile(session: Session, rule: str, severity: str, drafts: Mapping[int, Draft], now: datetime) -> ReconcileStats:
    """Make the live findings of `rule` match this run's drafts (keyed by task id)."""
    stats = ReconcileStats()
    live = session.execute(
        select(Finding.id, Finding.task_id, Finding.status, Finding.snoozed_until, Finding.snoozed_hash,
               Finding.message, Finding.severity, Finding.act_person_id)
        .where(Finding.rule == rule, Finding.status.in_(LIVE))
    ).all()
    hashes = dict(session.execute(  # a snooze lasts while its task is unchanged: only snoozed rows ask
        select(Task.id, Task.content_hash).join(Finding, Finding.task_id == Task.id)
        .where(Finding.rule == rule, Finding.status == "snoozed")
    ).all())
    cleared = [row.id for row in live if row.task_id not in drafts]
    for i in range(0, len(cleared), _CHUNK):
        session.execute(
            update(Finding).where(one_of(session, Finding.id, cleared[i : i + _CHUNK]))
            .values(status="resolved", resolved_at=now, snoozed_until=None, snoozed_hash=None)
        )
    stats.resolved = len(cleared)

    changes: list[dict[str, Any]] = []
    for row in live:
        draft = drafts.get(row.task_id)
        if draft is None:
            continue
        still_snoozed = (row.status == "snoozed" and row.snoozed_until is not None and now < row.snoozed_until
                         and row.snoozed_hash == hashes.get(row.task_id))
        if still_snoozed:
            stats.snoozed += 1
        else:
            stats.kept += 1
        if row.status == "snoozed" and not still_snoozed:
            changes.append({"id": row.id, "status": "open", "snoozed_until": None, "snoozed_hash": None,
                            "message": draft.message, "severity": severity, "act_person_id": draft.act_person_id,
                            "data": dict(draft.data), "last_seen": now})
        elif (row.message, row.severity, row.act_person_id) != (draft.message, severity, draft.act_person_id):
            changes.append({"id": row.id, "message": draft.message, "severity": severity,
                            "act_person_id": draft.act_person_id, "data": dict(draft.data), "last_seen": now})
    session.execute(update(Finding).where(Finding.rule == rule, Finding.status.in_(LIVE)).values(last_seen=now))
    if changes:
        session.execute(update(Finding), changes)

    known = {row.task_id for row in live}
    fresh = [
        {"task_id": task_id, "message": draft.message, "act_person_id": draft.act_person_id, "data": dict(draft.data)}
        for task_id, draft in drafts.items()
        if task_id not in known
    ]
    bulk_insert(session, Finding.__table__, fresh,
                same={"rule": rule, "status": "open", "severity": severity, "first_seen": now, "last_seen": now})
    stats.opened = len(fresh)
    return stats


def snooze(session: Session, task: Task, rule: str, until: datetime) -> Finding | None:
    """Hide the live finding of `rule` on `task` until `until`, or until the task changes."""
    finding = session.scalar(
        select(Finding).where(Finding.task_id == task.id, Finding.rule == rule, Finding.status.in_(LIVE))
    )
    if finding is not None:
        finding.status, finding.snoozed_until, finding.snoozed_hash = "snoozed", until, task.content_hash
    return finding


@dataclass(frozen=True, slots=True)
class FindingView:
    finding: Finding
    task: Task
    owner: str | None
    act: str | None


def open_findings(session: Session, *, rule: str | None = None, owner: str | None = None) -> list[FindingView]:
    """Open findings with their task, ordered by severity then age."""
    owner_p, act_p = aliased(Person), aliased(Person)
    stmt = (
        select(Finding, Task, owner_p.key, act_p.key)
        .join(Task, Task.id == Finding.task_id)
        .outerjoin(owner_p, owner_p.id == Task.owner_id)
        .outerjoin(act_p, act_p.id == Finding.act_person_id)
        .where(Finding.status == "open")
    )
    if rule:
        stmt = stmt.where(Finding.rule == rule)
    if owner == "none":
        stmt = stmt.where(Task.owner_id.is_(None))
    elif owner:
        stmt = stmt.where(key_in(owner_p.key, [owner]))
    order = {"critical": 0, "warning": 1, "info": 2}
    rows = [FindingView(f, t, o, a) for f, t, o, a in session.execute(stmt)]
    rows.sort(key=lambda v: (order.get(v.finding.severity, 3), v.finding.first_seen, v.finding.rule, v.task.id))
    return rows


def finding_json(view: FindingView) -> dict[str, Any]:
    """The `flags --json` contract (documented in the README)."""
    f, t = view.finding, view.task
    return {
        "rule": f.rule,
        "severity": f.severity,
        "source": t.source,
        "external_id": t.external_id,
        "url": t.url,
        "title": t.title,
        "owner": view.owner,
        "act": view.act,
        "message": f.message,
        "since": f.first_seen.isoformat(),
        "last_seen": f.last_seen.isoformat(),
        "data": f.data or {},
    }
