"""SQL expressions that differ by backend, so queries elsewhere stay portable."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from operator import itemgetter
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


def seconds_between(session: Session, start: Any, end: Any) -> ColumnElement[float]:
    """`end - start` in seconds, computed by the database (no timestamps parsed in Python)."""
    if dialect_of(session) == "postgresql":
        return func.extract("epoch", end - start)
    return (func.julianday(end) - func.julianday(start)) * 86400.0


def bulk_insert(session: Session, table: Any, rows: Sequence[dict[str, Any]],
                same: Mapping[str, Any] | None = None) -> None:
    """Insert many rows through the driver's `executemany`, converting each value with its
    column type's own bind processor; `same` holds values shared by every row, converted once.

    Same rows as `session.execute(insert(table), rows)` (column defaults included), without
    SQLAlchemy's per-row parameter bookkeeping, which dominates a large insert (100,000 tasks
    on a first sync, 140,000 findings on a first rules run)."""
    if not rows:
        return
    connection = session.connection()
    dialect = connection.dialect
    names = list(rows[0])
    fixed = dict(same or {})
    for col in table.columns:  # the Python-side defaults `insert()` would apply to missing columns
        if col.name not in names and col.name not in fixed and col.default is not None:
            fixed[col.name] = col.default.arg(None) if col.default.is_callable else col.default.arg
    compiled = insert(table).values({name: bindparam(name) for name in [*names, *fixed]}).compile(dialect=dialect)

    def processor(name: str) -> Callable[[Any], Any] | None:
        return table.c[name].type._cached_bind_processor(dialect)  # type: ignore[no-any-return]

    base = {name: (process(value) if (process := processor(name)) else value) for name, value in fixed.items()}
    plain = [name for name in names if processor(name) is None]
    converted = [(name, process) for name in names if (process := processor(name)) is not None]
    order = list(compiled.positiontup or ()) if compiled.positional else []
    # qmark drivers take tuples: itemgetter builds them in C (with a second name, so it always returns one)
    pick = itemgetter(*order, order[0]) if order else None
    params: list[Any] = []
    for row in rows:
        values = {**base, **{name: row[name] for name in plain}}
        for name, process in converted:
            values[name] = process(row[name])
        params.append(pick(values)[:-1] if pick else values)
    connection.exec_driver_sql(str(compiled), params)
