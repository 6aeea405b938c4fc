"""Per-connector sync state: cursor and validators (saved with each page), outcomes, lease.

The lease (`lease_owner`, `lease_expires`) is how replicas of the daemon share connectors: a
replica claims a due connector's row (`SELECT … FOR UPDATE SKIP LOCKED` on PostgreSQL, so two
replicas never take the same row), renews the claim while it works, and releases it when done.
A replica that dies leaves its claim to expire; the next claimant resumes from the saved cursor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from store.errors import StoreError
from store.models import SyncStateRow
from store.sql import dialect_of


class LeaseLost(StoreError):
    """This worker no longer holds the connector's lease; another replica may be syncing it."""


class Schedule(NamedTuple):
    """What the daemon's scheduler reads of a row (no cursor: that can be large)."""

    connector: str
    last_attempt: datetime | None
    last_success: datetime | None
    last_error: str | None
    last_error_at: datetime | None
    failures: int
    lease_owner: str | None
    lease_expires: datetime | None


def load_state(session: Session, connector: str) -> SyncStateRow | None:
    return session.get(SyncStateRow, connector)


def all_states(session: Session) -> dict[str, SyncStateRow]:
    return {row.connector: row for row in session.scalars(select(SyncStateRow))}


def failures_of(stats: Mapping[str, Any] | None) -> int:
    """Consecutive failed syncs, kept in `last_stats` (0 after a success)."""
    return int((stats or {}).get("failures") or 0)


def schedules(session: Session) -> dict[str, Schedule]:
    r = SyncStateRow
    rows = session.execute(select(r.connector, r.last_attempt, r.last_success, r.last_error, r.last_error_at,
                                  r.last_stats, r.lease_owner, r.lease_expires))
    return {row[0]: Schedule(*row[:5], failures_of(row[5]), *row[6:]) for row in rows}


def _row(session: Session, connector: str, kind: str) -> SyncStateRow:
    row = session.get(SyncStateRow, connector)
    if row is None:
        row = SyncStateRow(connector=connector, kind=kind, cursor=None, validators={}, last_stats={})
        session.add(row)
    row.kind = kind
    return row


def save_progress(
    session: Session, connector: str, kind: str, cursor: dict[str, Any] | None, validators: Mapping[str, str]
) -> None:
    """Save what a committed page says to resume from; `None` keeps the cursor, "" drops a validator."""
    row = _row(session, connector, kind)
    if cursor is not None:
        row.cursor = cursor
    if validators:
        merged = dict(row.validators or {})
        for key, value in validators.items():
            if value:
                merged[key] = value
            else:
                merged.pop(key, None)
        row.validators = merged


def record_attempt(session: Session, connector: str, kind: str, now: datetime) -> None:
    _row(session, connector, kind).last_attempt = now


def record_success(session: Session, connector: str, kind: str, now: datetime, stats: dict[str, Any]) -> None:
    row = _row(session, connector, kind)
    row.last_success, row.last_error, row.last_error_at, row.last_stats = now, None, None, stats


def record_failure(
    session: Session, connector: str, kind: str, now: datetime, error: str, stats: dict[str, Any]
) -> None:
    """Record a failed sync; `last_stats["failures"]` counts failures since the last success."""
    row = _row(session, connector, kind)
    failures = failures_of(row.last_stats) + 1 if row.last_error else 1
    row.last_error, row.last_error_at, row.last_stats = error, now, {**stats, "failures": failures}


def reset_cursor(session: Session, connector: str) -> None:
    row = session.get(SyncStateRow, connector)
    if row is not None:
        row.cursor, row.validators = None, {}


# -- leases ------------------------------------------------------------------------------------
def ensure_states(session: Session, connectors: Mapping[str, str]) -> None:
    """Create missing rows (name -> kind), so there is a row to claim; concurrent callers are fine."""
    if not connectors:
        return
    known = set(session.scalars(select(SyncStateRow.connector)))
    values = [{"connector": name, "kind": kind, "validators": {}, "last_stats": {}}
              for name, kind in connectors.items() if name not in known]
    if not values:
        return
    table = SyncStateRow.__table__
    dialect = dialect_of(session)
    if dialect == "postgresql":
        session.execute(pg_insert(table).values(values).on_conflict_do_nothing(index_elements=["connector"]))
    elif dialect == "sqlite":
        session.execute(sqlite_insert(table).values(values).on_conflict_do_nothing(index_elements=["connector"]))
    else:  # pragma: no cover - only the two supported backends
        for value in values:
            session.add(SyncStateRow(**value))
    session.flush()


def claim(
    session: Session,
    candidates: Iterable[str],
    worker: str,
    now: datetime,
    lease: timedelta,
    *,
    limit: int,
    due: Callable[[Schedule], bool] = lambda _: True,
) -> list[str]:
    """Claim up to `limit` of `candidates` that nobody holds and that are still `due`, in that order.

    Rows held by another worker's live lease are skipped (a lease of `worker` itself is one it
    could not release, e.g. while the database restarted: the caller knows it is not syncing),
    and on PostgreSQL so are rows another replica is claiming right now (`SKIP LOCKED`); `due` is
    asked again on the freshly locked row, so a connector another replica has just synced is not
    synced twice.
    """
    order = list(candidates)
    if not order or limit <= 0:
        return []
    r = SyncStateRow
    skip_locked = dialect_of(session) == "postgresql"
    claimed: list[str] = []
    for name in order:  # one row at a time: a replica locks only what it takes, others take the rest
        if len(claimed) >= limit:
            break
        stmt = select(r).where(r.connector == name, or_(r.lease_owner.is_(None), r.lease_expires.is_(None),
                                                        r.lease_expires < now, r.lease_owner == worker))
        if skip_locked:
            stmt = stmt.with_for_update(skip_locked=True)
        row = session.scalar(stmt)
        if row is None:
            continue
        schedule = Schedule(row.connector, row.last_attempt, row.last_success, row.last_error,
                            row.last_error_at, failures_of(row.last_stats), row.lease_owner,
                            row.lease_expires)
        if due(schedule):
            row.lease_owner, row.lease_expires = worker, now + lease
            claimed.append(name)
    session.flush()
    return claimed


def renew(
    session: Session, connectors: Iterable[str], worker: str, now: datetime, lease: timedelta
) -> set[str]:
    """Extend this worker's leases; returns the connectors it still holds (others were lost)."""
    names = list(connectors)
    if not names:
        return set()
    r = SyncStateRow
    session.execute(update(r).where(r.connector.in_(names), r.lease_owner == worker)
                    .values(lease_expires=now + lease))
    return set(session.scalars(select(r.connector).where(r.connector.in_(names), r.lease_owner == worker)))


def release(session: Session, connector: str, worker: str) -> None:
    """Give the lease back (only if this worker still holds it)."""
    r = SyncStateRow
    session.execute(update(r).where(r.connector == connector, r.lease_owner == worker)
                    .values(lease_owner=None, lease_expires=None))


def release_all(session: Session, worker: str | None = None) -> int:
    """Drop the leases of `worker` (default: everyone's, for a store only one process may use)."""
    r = SyncStateRow
    stmt = update(r).where(r.lease_owner.is_not(None))
    if worker is not None:
        stmt = stmt.where(r.lease_owner == worker)
    return int(session.execute(stmt.values(lease_owner=None, lease_expires=None)).rowcount)  # type: ignore[attr-defined]


def check_lease(session: Session, connector: str, worker: str) -> None:
    """Inside a write transaction: lock the row and raise `LeaseLost` unless `worker` holds it.

    The row lock makes the check hold until commit: a replica that claims the connector after
    an expiry waits for this transaction, then sees the new cursor.
    """
    stmt = select(SyncStateRow.lease_owner).where(SyncStateRow.connector == connector)
    if dialect_of(session) == "postgresql":
        stmt = stmt.with_for_update()
    owner = session.scalar(stmt)
    if owner != worker:
        raise LeaseLost(f"connector {connector!r} is now held by {owner or 'nobody'}, not {worker}")
