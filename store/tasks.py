"""Writing tasks: batched upserts that skip unchanged records and keep the history."""

from __future__ import annotations

import hashlib
import marshal
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from store.canonical import ActivityRecord, IdentityRef, Status, TaskRecord, utc
from store.models import OutboxAction, Person, Task, TaskEvent, TaskLink
from store.people import IdentityResolver
from store.sql import bulk_insert, one_of

# One IN () list per page stays well under every backend's bound-parameter limit.
_CHUNK = 2000


def _ident(ref: IdentityRef | None) -> tuple[str, str, str | None, str | None] | None:
    return None if ref is None else (ref.kind._value_, ref.value, ref.display_name, ref.email)


def _instant(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def content_hash(record: TaskRecord) -> str:
    """A digest of everything the connector said about a task; equal hashes mean no write.

    Spelled out field by field, with instants as timestamps, and serialised with `marshal`,
    because it runs for every record of every sync (the generic dataclass repr costs four times
    as much); tests/test_store.py checks that every field counts.
    """
    r = record
    key = (
        r.external_id, r.title, r.status._value_, r.raw_status, r.url, r.body, r.scope,
        tuple(_ident(a) for a in r.assignees), _ident(r.reporter), r.due and r.due.toordinal(),
        r.priority._value_, r.labels, r.acceptance_criteria, _instant(r.created_at), _instant(r.updated_at),
        _instant(r.closed_at), _instant(r.status_changed_at), _instant(r.last_activity_at),
        r.original_estimate_s, r.remaining_estimate_s, r.time_spent_s, r.verified,
        tuple((lk.kind._value_, lk.target.external_id, lk.target.source, lk.inverse) for lk in r.links),
        sorted(r.extra.items()) if r.extra else None,
    )
    try:
        payload = marshal.dumps(key, 2)  # version 2: no back-references, so equal values give equal bytes
    except ValueError:  # a connector put something marshal cannot write into `extra`
        payload = repr(key).encode()
    return hashlib.blake2b(payload, digest_size=32).hexdigest()


# A source update from the first attempt of trackloop's own post (less the slack) until this
# window after its delivery was recorded is explained by that post.
OWN_POST_WINDOW = timedelta(minutes=2)
OWN_POST_SLACK = timedelta(seconds=5)  # clocks of the source and of trackloop differ a little
OWN_POST_MEMORY = timedelta(days=7)


class Tracked(NamedTuple):
    status: str
    owner_id: int | None
    due: date | None
    status_changed_at: datetime | None
    last_activity_at: datetime | None


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
            key = session.scalar(select(Person.key).where(Person.id == person_id))
            self._person_keys[person_id] = key or ""
        return self._person_keys[person_id]

    def upsert(self, session: Session, records: Sequence[TaskRecord]) -> UpsertStats:
        stats = UpsertStats()
        latest: dict[str, tuple[TaskRecord, str]] = {}
        for record in records:  # a page may repeat a task; the last word wins
            latest[record.external_id] = (record, content_hash(record))
        existing = self._existing(session, list(latest))
        changed = [(r, d) for ext, (r, d) in latest.items() if ext not in existing or existing[ext][1] != d]
        stats.unchanged = len(latest) - len(changed)
        if not changed:
            return stats
        known_ids = [existing[r.external_id][0] for r, _ in changed if r.external_id in existing]
        tracked = self._tracked(session, known_ids)
        own_posts = self._own_posts(session, known_ids)
        inserts, updates, events = [], [], []
        for record, digest in changed:
            sole = record.assignees[0] if len(record.assignees) == 1 else None
            values = _row_values(
                record,
                source=self.source,
                kind=self.kind,
                owner_id=self.resolver.resolve(session, sole),
                reporter_id=self.resolver.resolve(session, record.reporter),
                digest=digest,
            )
            values["synced_at"] = self.now
            if record.external_id in existing:
                values["id"] = tid = existing[record.external_id][0]
                before = tracked[tid]
                events.extend(self._changes(session, tid, before, values))
                self._carry_over(before, values, own_posts.get(tid, ()))
                updates.append(values)
            else:
                values["first_seen_at"] = self.now
                values["status_changed_at"] = (
                    values["status_changed_at"] or values["updated_at"] or values["created_at"] or self.now
                )
                inserts.append(values)
        if inserts:
            bulk_insert(session, Task.__table__, inserts)
            existing.update(self._existing(session, [v["external_id"] for v in inserts]))
            for values in inserts:
                tid = existing[values["external_id"]][0]
                events.append(
                    self._event(tid, values["status_changed_at"], "status", None, values["status"], origin="initial")
                )
        if updates:
            session.execute(update(Task), updates)
        self._replace_links(session, [r for r, _ in changed], existing, fresh={v["external_id"] for v in inserts})
        if events:
            bulk_insert(session, TaskEvent.__table__, events)
        stats.inserted, stats.updated, stats.events = len(inserts), len(updates), len(events)
        return stats

    def _existing(self, session: Session, external_ids: list[str]) -> dict[str, tuple[int, str]]:
        """(id, content hash) of the stored tasks among `external_ids`."""
        found: dict[str, tuple[int, str]] = {}
        for i in range(0, len(external_ids), _CHUNK):
            chunk = external_ids[i : i + _CHUNK]
            stmt = select(Task.external_id, Task.id, Task.content_hash).where(
                Task.source == self.source, one_of(session, Task.external_id, chunk)
            )
            for ext, tid, digest in session.execute(stmt):
                found[ext] = (tid, digest)
        return found

    def _tracked(self, session: Session, ids: list[int]) -> dict[int, Tracked]:
        """What a changing task looked like before, to write its history and carry values over."""
        found: dict[int, Tracked] = {}
        cols = (Task.id, Task.status, Task.owner_id, Task.due, Task.status_changed_at, Task.last_activity_at)
        for i in range(0, len(ids), _CHUNK):
            stmt = select(*cols).where(one_of(session, Task.id, ids[i : i + _CHUNK]))
            for tid, *rest in session.execute(stmt):
                found[tid] = Tracked(*rest)
        return found

    def _own_posts(self, session: Session, ids: list[int]) -> dict[int, list[tuple[datetime, datetime]]]:
        """When trackloop itself posted on these tasks lately (its posts are not human activity):
        from the first delivery attempt (a retry may find a post made long before) to the record."""
        found: dict[int, list[tuple[datetime, datetime]]] = {}
        since = self.now - OWN_POST_MEMORY
        for i in range(0, len(ids), _CHUNK):
            stmt = select(OutboxAction.task_id, OutboxAction.first_attempt_at, OutboxAction.sent_at).where(
                one_of(session, OutboxAction.task_id, ids[i : i + _CHUNK]),
                OutboxAction.status == "sent",
                OutboxAction.sent_at >= since,
            )
            for tid, first_attempt_at, sent_at in session.execute(stmt):
                found.setdefault(tid, []).append((first_attempt_at or sent_at, sent_at))
        return found

    @staticmethod
    def _carry_over(
        before: Tracked, values: dict[str, Any], own_posts: Iterable[tuple[datetime, datetime]]
    ) -> None:
        """Keep what a re-sync must not reset.

        The current status began when it began: a record that does not report the time keeps
        the stored one (or, for a new status, the update that brought it). Activity only moves
        forward, and never because of trackloop's own comment bumping the source's update time.
        """
        if values["status_changed_at"] is None:
            if before.status == values["status"]:
                values["status_changed_at"] = before.status_changed_at
            else:
                values["status_changed_at"] = values["updated_at"] or values["synced_at"]
        new, old = values["last_activity_at"], before.last_activity_at
        if new is None or (old is not None and new <= old):
            values["last_activity_at"] = old
        elif any(start - OWN_POST_SLACK <= new <= sent + OWN_POST_WINDOW for start, sent in own_posts):
            values["last_activity_at"] = old

    def _event(
        self, task_id: int, at: datetime | None, field: str, old: str | None, new: str | None,
        origin: str = "sync",
    ) -> dict[str, Any]:
        return {"task_id": task_id, "at": at or self.now, "field": field, "old": old, "new": new,
                "actor": None, "origin": origin}

    def _changes(
        self, session: Session, task_id: int, before: Tracked, values: dict[str, Any]
    ) -> Iterable[dict[str, Any]]:
        status, owner_id, due = before.status, before.owner_id, before.due
        when = values["status_changed_at"] or values["updated_at"] or self.now
        if status != values["status"]:
            yield self._event(task_id, when, "status", status, values["status"])
        if owner_id != values["owner_id"]:
            old, new = self._key_of(session, owner_id), self._key_of(session, values["owner_id"])
            yield self._event(task_id, values["updated_at"], "owner", old, new)
        if due != values["due"]:
            old_due = due.isoformat() if due else None
            new_due = values["due"].isoformat() if values["due"] else None
            yield self._event(task_id, values["updated_at"], "due", old_due, new_due)

    def _replace_links(
        self, session: Session, records: list[TaskRecord], ids: dict[str, tuple[int, str]], fresh: set[str]
    ) -> None:
        """Replace the links each record declares (a fresh task has none to delete)."""
        stale = [ids[r.external_id][0] for r in records if r.external_id not in fresh]
        for i in range(0, len(stale), _CHUNK):
            session.execute(delete(TaskLink).where(one_of(session, TaskLink.declared_by, stale[i : i + _CHUNK])))
        rows, seen = [], set()
        for record in records:
            tid = ids[record.external_id][0]
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
            bulk_insert(session, TaskLink.__table__, rows)

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

    def missing(self, session: Session, scope: str, seen: set[str]) -> list[str]:
        """External ids of the tasks of `scope`, cancelled ones aside, that a listing did not return."""
        rows = session.execute(
            select(Task.external_id).where(
                Task.source == self.source, Task.scope == scope, Task.status != Status.CANCELLED.value
            )
        ).scalars()
        return sorted(r for r in rows if r not in seen)

    def cancel_missing(
        self, session: Session, scope: str, seen: set[str], confirmed: Collection[str] | None = None
    ) -> int:
        """Mark every task of a fully listed scope that the listing did not return as cancelled,
        done ones included: a removed row or deleted issue is gone, whatever its last status (of
        those, only the ones in `confirmed` when the connector was asked)."""
        rows = session.execute(
            select(Task.id, Task.external_id, Task.status).where(
                Task.source == self.source, Task.scope == scope, Task.status != Status.CANCELLED.value
            )
        ).all()
        gone = [r for r in rows if r.external_id not in seen and (confirmed is None or r.external_id in confirmed)]
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
