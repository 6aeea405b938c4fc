"""Reading tasks for people: listing with filters and finding one by reference or URL."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.orm import Session, aliased

from store.canonical import OPEN_STATUSES
from store.models import Person, Task
from store.people import key_in


@dataclass(frozen=True, slots=True)
class TaskFilter:
    owner: str | None = None  # a person key; "none" lists tasks without an owner
    source: str | None = None
    statuses: Sequence[str] = ()  # empty: open tasks, unless include_closed
    include_closed: bool = False


def _filtered(flt: TaskFilter) -> Select[Any]:
    owner = aliased(Person)
    stmt = select(Task, owner.key).outerjoin(owner, Task.owner_id == owner.id)
    if flt.statuses:
        stmt = stmt.where(Task.status.in_(list(flt.statuses)))
    elif not flt.include_closed:
        stmt = stmt.where(Task.status.in_([s.value for s in OPEN_STATUSES]))
    if flt.source:
        stmt = stmt.where(Task.source == flt.source)
    if flt.owner == "none":
        stmt = stmt.where(Task.owner_id.is_(None))
    elif flt.owner:
        stmt = stmt.where(key_in(owner.key, [flt.owner]))
    return stmt.order_by(Task.source, Task.due.is_(None), Task.due, Task.id)


def list_tasks(session: Session, flt: TaskFilter) -> list[tuple[Task, str | None]]:
    return [(task, key) for task, key in session.execute(_filtered(flt))]


def find_task(session: Session, ref: str) -> Task | None:
    """A task named `SOURCE:EXTERNAL_ID` (e.g. `gh:acme/api#42`) or by its URL."""
    if "://" in ref:
        return session.scalars(select(Task).where(Task.url == ref).limit(1)).first()
    source, sep, external_id = ref.partition(":")
    if not sep:
        return None
    return session.scalar(select(Task).where(Task.source == source, Task.external_id == external_id))


def task_json(task: Task, owner_key: str | None) -> dict[str, Any]:
    """The `tasks --json` contract (documented in the README)."""
    return {
        "source": task.source,
        "kind": task.kind,
        "external_id": task.external_id,
        "url": task.url,
        "title": task.title,
        "status": task.status,
        "raw_status": task.raw_status,
        "owner": owner_key,
        "due": task.due.isoformat() if task.due else None,
        "priority": task.priority,
        "labels": list(task.labels or []),
        "created_at": task.created_at.isoformat() if task.created_at else None,
        "updated_at": task.updated_at.isoformat() if task.updated_at else None,
        "closed_at": task.closed_at.isoformat() if task.closed_at else None,
        "last_activity_at": task.last_activity_at.isoformat() if task.last_activity_at else None,
    }
