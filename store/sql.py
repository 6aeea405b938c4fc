"""SQL expressions that differ by backend, so queries elsewhere stay portable."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import BigInteger, ColumnElement, String, any_, bindparam, column, exists, func, insert, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session

from store.models import Task


def dialect_of(session: Session) -> str:
    return session.get_bind().dialect.name


def one_of(session: Session, col: Any, values: Sequence[Any]) -> ColumnElement[bool]:
    """`col IN values`, with the values bound as one parameter instead of thousands: `= ANY(array)`
    on PostgreSQL (whose plan would otherwise degrade into a filter over the whole table), a JSON
    array read by `json_each` on SQLite (no per-call expansion of a thousand placeholders)."""
    if dialect_of(session) == "postgresql":
        item = BigInteger() if values and isinstance(values[0], int) else String()
        return col == any_(bindparam(None, list(values), type_=ARRAY(item)))
    items = func.json_each(bindparam(None, json.dumps(list(values)), type_=String())).table_valued("value")
    return col.in_(select(items.c.value))


def has_any_label(session: Session, labels: Sequence[str]) -> ColumnElement[bool]:
    """The task carries at least one of `labels` (compared case-insensitively)."""
    wanted = sorted({label.lower() for label in labels})
    fn = func.jsonb_array_elements_text if dialect_of(session) == "postgresql" else func.json_each
    elements = fn(Task.labels).table_valued("value").alias("label")
    return exists(select(1).select_from(elements).where(func.lower(column("value")).in_(wanted)))


def latest(session: Session, *cols: Any) -> ColumnElement[Any]:
    """The latest non-null of several timestamps (GREATEST on PostgreSQL, MAX(a, b) on SQLite)."""
    if dialect_of(session) == "postgresql":
        return func.greatest(*cols)  # ignores NULLs
    first = func.coalesce(*cols)
    return func.max(*(func.coalesce(c, first) for c in cols))


def bulk_insert(session: Session, table: Any, rows: Sequence[dict[str, Any]]) -> None:
    """Insert many rows through the driver's `executemany`, converting each column's values
    with the column type's own bind processor. Same rows as `session.execute(insert(table),
    rows)`, without SQLAlchemy's per-row parameter bookkeeping, which dominates a large insert."""
    if not rows:
        return
    connection = session.connection()
    dialect = connection.dialect
    names = list(rows[0])
    processors = [table.c[name].type._cached_bind_processor(dialect) for name in names]
    compiled = insert(table).values({name: bindparam(name) for name in names}).compile(dialect=dialect)
    order = compiled.positiontup if compiled.positional else None
    params = []
    for row in rows:
        values = {name: (proc(row[name]) if proc else row[name]) for name, proc in zip(names, processors, strict=True)}
        params.append(tuple(values[name] for name in order) if order else values)
    connection.exec_driver_sql(str(compiled), params)
