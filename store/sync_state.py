"""Per-connector sync state: cursor and validators (saved with each page), outcomes, lease."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from store.models import SyncStateRow


def load_state(session: Session, connector: str) -> SyncStateRow | None:
    return session.get(SyncStateRow, connector)


def all_states(session: Session) -> dict[str, SyncStateRow]:
    return {row.connector: row for row in session.scalars(select(SyncStateRow))}


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
    row = _row(session, connector, kind)
    row.last_error, row.last_error_at, row.last_stats = error, now, stats


def reset_cursor(session: Session, connector: str) -> None:
    row = session.get(SyncStateRow, connector)
    if row is not None:
        row.cursor, row.validators = None, {}
