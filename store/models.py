"""The schema, as SQLAlchemy 2.x typed ORM classes. Alembic migrations are generated from it."""

from __future__ import annotations

from datetime import UTC, date, datetime
from functools import lru_cache
from typing import Annotated, Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in Python on every backend.

    PostgreSQL stores `timestamptz`. SQLite has no date type: it gets the same text SQLAlchemy
    would write ("YYYY-MM-DD HH:MM:SS.ffffff", UTC, sorting like the instant it names), but
    written and parsed here in one step with the C `isoformat`/`fromisoformat`, because rules
    and syncs move hundreds of thousands of timestamps at a time.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Any) -> Any:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(String(32))
        return dialect.type_descriptor(self.impl)

    def process_bind_param(self, value: datetime | None, dialect: Any) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; all times must be aware UTC")
        return _sqlite_text(value) if dialect.name == "sqlite" else value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@lru_cache(maxsize=4096)
def _sqlite_text(value: datetime) -> str:
    """Bulk writes repeat one instant ("now") on every row: convert each instant once."""
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")


JSONType = JSON().with_variant(JSONB(), "postgresql")

intpk = Annotated[int, mapped_column(Integer().with_variant(BigInteger(), "postgresql"), primary_key=True)]
ts = Annotated[datetime, mapped_column(UTCDateTime())]
ts_null = Annotated[datetime | None, mapped_column(UTCDateTime())]
name = Annotated[str, mapped_column(String(200))]
json_obj = Annotated[dict[str, Any], mapped_column(JSONType, default=dict)]
json_list = Annotated[list[Any], mapped_column(JSONType, default=list)]

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Person(Base):
    """A human; `key` is the config's `[people.KEY]`, or derived from an unknown identity."""

    __tablename__ = "people"
    id: Mapped[intpk]
    key: Mapped[name] = mapped_column(unique=True)
    name: Mapped[str | None] = mapped_column(String(200))
    lead: Mapped[bool] = mapped_column(default=False)
    from_config: Mapped[bool] = mapped_column(default=False)
    identities: Mapped[list[Identity]] = relationship(back_populates="person", cascade="all, delete-orphan")


class Identity(Base):
    """One tool's handle for a person: GitHub login, Jira accountId, Slack id, an email address."""

    __tablename__ = "identities"
    __table_args__ = (UniqueConstraint("kind", "value"),)
    id: Mapped[intpk]
    person_id: Mapped[int] = mapped_column(ForeignKey("people.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(20))
    value: Mapped[str] = mapped_column(String(320))
    person: Mapped[Person] = relationship(back_populates="identities")


class Task(Base):
    __tablename__ = "tasks"
    __table_args__ = (
        UniqueConstraint("source", "external_id"),
        Index("ix_tasks_status_due", "status", "due"),
        Index("ix_tasks_owner_status", "owner_id", "status"),
    )
    id: Mapped[intpk]
    source: Mapped[name]
    kind: Mapped[str] = mapped_column(String(40))
    external_id: Mapped[str] = mapped_column(String(400))
    scope: Mapped[str] = mapped_column(String(400), default="")
    url: Mapped[str | None] = mapped_column(Text)
    title: Mapped[str] = mapped_column(Text)
    body: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[str] = mapped_column(String(20))
    raw_status: Mapped[str] = mapped_column(String(200))
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("people.id", ondelete="SET NULL"))
    reporter_id: Mapped[int | None] = mapped_column(ForeignKey("people.id", ondelete="SET NULL"))
    assignee_count: Mapped[int] = mapped_column(default=0)
    due: Mapped[date | None]
    priority: Mapped[str] = mapped_column(String(10), default="none")
    labels: Mapped[json_list]
    acceptance_criteria: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[ts_null]
    updated_at: Mapped[ts_null]
    closed_at: Mapped[ts_null]
    status_changed_at: Mapped[ts_null]
    last_activity_at: Mapped[ts_null]
    original_estimate_s: Mapped[int | None]
    remaining_estimate_s: Mapped[int | None]
    time_spent_s: Mapped[int | None]
    verified: Mapped[bool] = mapped_column(default=False)
    extra: Mapped[json_obj]
    content_hash: Mapped[str] = mapped_column(String(64))
    first_seen_at: Mapped[ts]
    synced_at: Mapped[ts]

    owner: Mapped[Person | None] = relationship(foreign_keys=[owner_id])
    reporter: Mapped[Person | None] = relationship(foreign_keys=[reporter_id])

    @property
    def ref(self) -> str:
        return f"{self.source}:{self.external_id}"


class TaskLink(Base):
    """A link "src KIND dst" between tasks, possibly across sources; dst may not be synced yet.

    `declared_by` is the task whose record stated the link, so re-syncing that task replaces
    exactly the links it declared.
    """

    __tablename__ = "task_links"
    __table_args__ = (
        UniqueConstraint("declared_by", "kind", "src_source", "src_external_id", "dst_source", "dst_external_id"),
        Index("ix_task_links_dst", "dst_source", "dst_external_id"),
        Index("ix_task_links_src", "src_source", "src_external_id"),
    )
    id: Mapped[intpk]
    declared_by: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(20))
    src_source: Mapped[name]
    src_external_id: Mapped[str] = mapped_column(String(400))
    dst_source: Mapped[name]
    dst_external_id: Mapped[str] = mapped_column(String(400))


class TaskEvent(Base):
    """History: a change of status, owner or due date, human activity, or a verification."""

    __tablename__ = "task_events"
    __table_args__ = (Index("ix_task_events_task_at", "task_id", "at"),)
    id: Mapped[intpk]
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    at: Mapped[ts]
    field: Mapped[str] = mapped_column(String(20))  # status | owner | due | activity | verified | created
    old: Mapped[str | None] = mapped_column(Text)
    new: Mapped[str | None] = mapped_column(Text)
    actor: Mapped[str | None] = mapped_column(String(320))
    origin: Mapped[str] = mapped_column(String(20), default="sync")  # sync | source | trackloop | user


class SyncStateRow(Base):
    """Per-connector sync state; the cursor is saved in the same transaction as the data."""

    __tablename__ = "sync_state"
    connector: Mapped[str] = mapped_column(String(200), primary_key=True)
    kind: Mapped[str] = mapped_column(String(40))
    cursor: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    validators: Mapped[json_obj]
    last_success: Mapped[ts_null]
    last_attempt: Mapped[ts_null]
    last_error: Mapped[str | None] = mapped_column(Text)
    last_error_at: Mapped[ts_null]
    last_stats: Mapped[json_obj]
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires: Mapped[ts_null]


class Finding(Base):
    """A rule's verdict on a task, with a lifecycle: open -> resolved, or snoozed until a time."""

    __tablename__ = "findings"
    __table_args__ = (
        Index(
            "uq_findings_live",
            "rule",
            "task_id",
            unique=True,
            sqlite_where=text("status != 'resolved'"),
            postgresql_where=text("status != 'resolved'"),
        ),
        Index("ix_findings_status_rule", "status", "rule"),
    )
    id: Mapped[intpk]
    rule: Mapped[str] = mapped_column(String(100))
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(20), default="open")  # open | resolved | snoozed
    severity: Mapped[str] = mapped_column(String(20))
    message: Mapped[str] = mapped_column(Text)
    act_person_id: Mapped[int | None] = mapped_column(ForeignKey("people.id", ondelete="SET NULL"))
    data: Mapped[json_obj]
    first_seen: Mapped[ts]
    last_seen: Mapped[ts]
    resolved_at: Mapped[ts_null]
    snoozed_until: Mapped[ts_null]
    snoozed_hash: Mapped[str | None] = mapped_column(String(64))  # task content when snoozed

    task: Mapped[Task] = relationship()
    act_person: Mapped[Person | None] = relationship()


class OutboxAction(Base):
    """An action to push, delivered at most once per idempotency key."""

    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_status_next", "status", "next_attempt_at"),)
    id: Mapped[intpk]
    key: Mapped[str] = mapped_column(String(400), unique=True)
    connector: Mapped[name]
    kind: Mapped[str] = mapped_column(String(20))
    target: Mapped[str | None] = mapped_column(String(400))
    subject: Mapped[str | None] = mapped_column(Text)
    text: Mapped[str] = mapped_column(Text)
    payload: Mapped[json_obj]
    task_id: Mapped[int | None] = mapped_column(ForeignKey("tasks.id", ondelete="SET NULL"), index=True)
    finding_id: Mapped[int | None] = mapped_column(ForeignKey("findings.id", ondelete="SET NULL"))
    status: Mapped[str] = mapped_column(String(20), default="pending")  # pending | sent | failed | cancelled
    attempts: Mapped[int] = mapped_column(default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    remote_id: Mapped[str | None] = mapped_column(String(400))
    created_at: Mapped[ts]
    next_attempt_at: Mapped[ts]
    first_attempt_at: Mapped[ts_null]  # a post can land before `sent_at` records it (own posts are no activity)
    sent_at: Mapped[ts_null]
    claimed_by: Mapped[str | None] = mapped_column(String(200))
    claim_expires: Mapped[ts_null]
