"""Writing tasks: batched upserts that skip unchanged records and keep the history."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.orm import Session

from store.canonical import ActivityRecord, Status, TaskRecord, utc
from store.models import Person, Task, TaskEvent, TaskLink
from store.people import IdentityResolver

# Identity lookups in one IN () list stay well under every backend's parameter limit.
_CHUNK = 900


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return utc(value).isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, frozenset | set):
        return sorted(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def content_hash(record: TaskRecord) -> str:
    """A digest of everything the connector said about a task; equal hashes mean no write."""
    payload = json.dumps(asdict(record), sort_keys=True, default=_json_default, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass(slots=True)
class UpsertStats:
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    events: int = 0
    cancelled: int = 0

    def add(self, other: UpsertStats) -> None:
        for name in ("inserted", "updated", "unchanged", "events", "cancelled"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def _opt_utc(value: datetime | None) -> datetime | None:
    return utc(value) if value is not None else None


def _row_values(
    record: TaskRecord, *, source: str, kind: str, owner_id: int | None, reporter_id: int | None, digest: str
) -> dict[str, Any]:
    updated_at = _opt_utc(record.updated_at)
    return {
        "source": source,
        "kind": kind,
        "external_id": record.external_id,
        "scope": record.scope,
        "url": record.url,
        "title": record.title,
        "body": record.body,
        "status": str(record.status),
        "raw_status": record.raw_status[:200],
        "owner_id": owner_id,
        "reporter_id": reporter_id,
        "assignee_count": len(record.assignees),
        "due": record.due,
        "priority": str(record.priority),
        "labels": list(record.labels),
        "acceptance_criteria": record.acceptance_criteria,
        "created_at": _opt_utc(record.created_at),
        "updated_at": updated_at,
        "closed_at": _opt_utc(record.closed_at),
        "status_changed_at": _opt_utc(record.status_changed_at),
        "last_activity_at": _opt_utc(record.last_activity_at) or updated_at,
        "original_estimate_s": record.original_estimate_s,
        "remaining_estimate_s": record.remaining_estimate_s,
        "time_spent_s": record.time_spent_s,
        "verified": record.verified,
        "extra": dict(record.extra),
        "content_hash": digest,
    }


class TaskWriter:
    """Upserts pages of one source's records inside the caller's transaction."""

    def __init__(self, *, source: str, kind: str, resolver: IdentityResolver, now: datetime) -> None:
        self.source = source
        self.kind = kind
        self.resolver = resolver
        self.now = now
        self._person_keys: dict[int, str] = {}

    def _key_of(self, session: Session, person_id: int | None) -> str | None:
        if person_id is None:
            return None
        if person_id not in self._person_keys:
            self._person_keys[person_id] = session.scalar(select(Person.key).where(Person.id == person_id)) or ""
        return self._person_keys[person_id]

    def upsert(self, session: Session, records: Sequence[TaskRecord]) -> UpsertStats:
        stats = UpsertStats()
        latest: dict[str, tuple[TaskRecord, str]] = {}
        for record in records:  # a page may repeat a task; the last word wins
            latest[record.external_id] = (record, content_hash(record))
        existing = self._existing(session, list(latest))
        inserts, updates, events, linked = [], [], [], []
        for external_id, (record, digest) in latest.items():
            row = existing.get(external_id)
            if row is not None and row["content_hash"] == digest:
                stats.unchanged += 1
                continue
            owner_id = self.resolver.resolve(session, record.assignees[0]) if len(record.assignees) == 1 else None
            reporter_id = self.resolver.resolve(session, record.reporter)
            values = _row_values(
                record, source=self.source, kind=self.kind, owner_id=owner_id, reporter_id=reporter_id, digest=digest
            )
            values["synced_at"] = self.now
            if row is None:
                values["first_seen_at"] = self.now
                inserts.append(values)
            else:
                values["id"] = row["id"]
                updates.append(values)
                events.extend(self._changes(session, row, values, record))
            linked.append(record)
        if inserts:
            result = session.execute(insert(Task).returning(Task.id, Task.external_id), inserts)
            new_ids = {ext: tid for tid, ext in result}
            for values in inserts:
                tid = new_ids[values["external_id"]]
                since = values["status_changed_at"] or values["created_at"] or values["updated_at"]
                events.append(self._event(tid, since, "status", None, values["status"], origin="initial"))
            for external_id, tid in new_ids.items():
                existing[external_id] = {"id": tid}
            stats.inserted = len(inserts)
        if updates:
            session.execute(update(Task), updates)
            stats.updated = len(updates)
        if linked:
            self._replace_links(session, linked, existing)
        if events:
            session.execute(insert(TaskEvent), events)
            stats.events = len(events)
        return stats

    def _existing(self, session: Session, external_ids: list[str]) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        cols = (Task.id, Task.external_id, Task.content_hash, Task.status, Task.owner_id, Task.due)
        for i in range(0, len(external_ids), _CHUNK):
            chunk = external_ids[i : i + _CHUNK]
            stmt = select(*cols).where(Task.source == self.source, Task.external_id.in_(chunk))
            for row in session.execute(stmt).mappings():
                found[row["external_id"]] = dict(row)
        return found

    def _event(
        self, task_id: int, at: datetime | None, field: str, old: str | None, new: str | None, origin: str = "sync"
    ) -> dict[str, Any]:
        return {"task_id": task_id, "at": at or self.now, "field": field, "old": old, "new": new,
                "actor": None, "origin": origin}

    def _changes(
        self, session: Session, row: dict[str, Any], values: dict[str, Any], record: TaskRecord
    ) -> Iterable[dict[str, Any]]:
        when = values["status_changed_at"] or values["updated_at"] or self.now
        if row["status"] != values["status"]:
            yield self._event(row["id"], when, "status", row["status"], values["status"])
        if row["owner_id"] != values["owner_id"]:
            old, new = self._key_of(session, row["owner_id"]), self._key_of(session, values["owner_id"])
            yield self._event(row["id"], values["updated_at"], "owner", old, new)
        if row["due"] != values["due"]:
            old_due = row["due"].isoformat() if row["due"] else None
            new_due = values["due"].isoformat() if values["due"] else None
            yield self._event(row["id"], values["updated_at"], "due", old_due, new_due)

    def _replace_links(
        self, session: Session, records: list[TaskRecord], ids: dict[str, dict[str, Any]]
    ) -> None:
        declared = [ids[r.external_id]["id"] for r in records]
        for i in range(0, len(declared), _CHUNK):
            session.execute(delete(TaskLink).where(TaskLink.declared_by.in_(declared[i : i + _CHUNK])))
        rows, seen = [], set()
        for record in records:
            tid = ids[record.external_id]["id"]
            for link in record.links:
                here = (self.source, record.external_id)
                there = (link.target.source or self.source, link.target.external_id)
                src, dst = (there, here) if link.inverse else (here, there)
                key = (tid, str(link.kind), src, dst)
                if key in seen or src == dst:
                    continue
                seen.add(key)
                rows.append({"declared_by": tid, "kind": str(link.kind), "src_source": src[0],
                             "src_external_id": src[1], "dst_source": dst[0], "dst_external_id": dst[1]})
        if rows:
            session.execute(insert(TaskLink), rows)

    def record_activities(self, session: Session, activities: Sequence[ActivityRecord]) -> int:
        """Bump `last_activity_at` and log an event for each activity on a known task."""
        count = 0
        for activity in activities:
            source = activity.target.source or self.source
            task = session.execute(
                select(Task.id, Task.last_activity_at).where(
                    Task.source == source, Task.external_id == activity.target.external_id
                )
            ).first()
            if task is None:
                continue
            at = utc(activity.at)
            exists = session.scalar(
                select(func.count()).select_from(TaskEvent).where(
                    TaskEvent.task_id == task.id, TaskEvent.field == "activity", TaskEvent.at == at
                )
            )
            if exists:
                continue  # a rerun over the overlap sees the same activity again
            actor = activity.actor.value if activity.actor else None
            session.add(TaskEvent(task_id=task.id, at=at, field="activity", old=None, new=activity.what,
                                  actor=actor, origin="source"))
            if task.last_activity_at is None or task.last_activity_at < at:
                session.execute(update(Task).where(Task.id == task.id).values(last_activity_at=at))
            count += 1
        return count

    def cancel_missing(self, session: Session, scope: str, seen: set[str]) -> int:
        """Mark open tasks of a fully listed scope that the listing did not return as cancelled."""
        rows = session.execute(
            select(Task.id, Task.external_id, Task.status).where(
                Task.source == self.source, Task.scope == scope, Task.status != Status.CANCELLED.value
            )
        ).all()
        gone = [r for r in rows if r.external_id not in seen]
        for row in gone:
            session.execute(
                update(Task)
                .where(Task.id == row.id)
                .values(status=Status.CANCELLED.value, raw_status="(gone from source)", synced_at=self.now,
                        content_hash="", status_changed_at=self.now)
            )
            session.add(TaskEvent(task_id=row.id, at=self.now, field="status", old=row.status,
                                  new=Status.CANCELLED.value, origin="sync"))
        return len(gone)
