"""The canonical model: what every connector produces and every other room consumes.

Plain frozen dataclasses with no database in sight, so a connector can depend on this module
(and `store.errors`) alone. The store maps these records onto rows; rules read the rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from enum import StrEnum
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict


class Status(StrEnum):
    TODO = "todo"
    IN_PROGRESS = "in_progress"
    BLOCKED = "blocked"
    DONE = "done"
    CANCELLED = "cancelled"

    @property
    def is_open(self) -> bool:
        return self in OPEN_STATUSES


OPEN_STATUSES = frozenset({Status.TODO, Status.IN_PROGRESS, Status.BLOCKED})


class Priority(StrEnum):
    HIGH = "high"
    MEDIUM = "medium"
    LOW = "low"
    NONE = "none"

    @property
    def rank(self) -> int:
        """Higher is more urgent; lets rules say "at or above medium"."""
        return {"high": 3, "medium": 2, "low": 1, "none": 0}[self.value]


class LinkKind(StrEnum):
    """A stored link reads "source KIND target": A blocks B; A's parent is B; A duplicates B."""

    BLOCKS = "blocks"
    PARENT = "parent"
    DUPLICATE = "duplicate"
    RELATES = "relates"


class IdentityKind(StrEnum):
    GITHUB = "github"
    JIRA = "jira"
    SLACK = "slack"
    EMAIL = "email"
    PERSON = "person"  # a trackloop person key written directly (e.g. a CSV owner cell)


def utc(value: datetime) -> datetime:
    """Make a datetime timezone-aware UTC; a naive value is taken to be UTC already."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class IdentityRef:
    """A person as one tool knows them; the store resolves it to a trackloop person."""

    kind: IdentityKind
    value: str
    display_name: str | None = None
    email: str | None = None  # lets the store match a person by email where config is silent


@dataclass(frozen=True, slots=True)
class TaskRef:
    """Points at a task by its identity; `source=None` means the same source as the pointer."""

    external_id: str
    source: str | None = None


@dataclass(frozen=True, slots=True)
class LinkRecord:
    """A link declared by a task. `inverse=True` flips it: "target KIND this task"."""

    kind: LinkKind
    target: TaskRef
    inverse: bool = False


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """One task as a connector sees it, already in canonical terms."""

    external_id: str
    title: str
    status: Status
    raw_status: str
    url: str | None = None
    body: str = ""
    scope: str = ""  # the listing it came from (repo, project, channel, folder); for --full
    assignees: tuple[IdentityRef, ...] = ()  # exactly one resolves to the owner; several: shared
    reporter: IdentityRef | None = None
    due: date | None = None
    priority: Priority = Priority.NONE
    labels: tuple[str, ...] = ()
    acceptance_criteria: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    closed_at: datetime | None = None
    status_changed_at: datetime | None = None  # where the source reports it
    last_activity_at: datetime | None = None  # latest human activity; defaults to updated_at
    original_estimate_s: int | None = None
    remaining_estimate_s: int | None = None
    time_spent_s: int | None = None
    verified: bool = False  # the source shows a verification signal
    links: tuple[LinkRecord, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)  # connector-specific, JSON-safe


@dataclass(frozen=True, slots=True)
class ActivityRecord:
    """Human activity on a task that is not itself a task record (a reply, a linked PR)."""

    target: TaskRef
    at: datetime
    actor: IdentityRef | None = None
    what: str = "activity"


class Cursor(BaseModel):
    """Base of every connector's cursor: small, frozen, versioned, stored as JSON."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    version: int = 1


CursorT = TypeVar("CursorT", bound=Cursor)


@dataclass(frozen=True, slots=True)
class SyncState(Generic[CursorT]):
    """What a connector resumes from: its cursor and HTTP validators (ETags) per URL or scope."""

    cursor: CursorT | None = None
    validators: Mapping[str, str] = field(default_factory=dict)
    full: bool = False  # re-list everything and reconcile what is gone
    dry_run: bool = False  # nothing is committed: the pull must not write to the source either


@dataclass(frozen=True, slots=True)
class Page(Generic[CursorT]):
    """A page of records plus the state to save with it, in the same transaction.

    `completed_scopes` names scopes whose listing is complete as of this page; the engine
    marks tasks of those scopes that this run did not see, and that the connector's
    `confirm_missing` finds gone, as cancelled (only ever for scopes the connector vouches for,
    so a half-failed listing never cancels anything).
    """

    tasks: Sequence[TaskRecord] = ()
    cursor: CursorT | None = None
    validators: Mapping[str, str] = field(default_factory=dict)
    activities: Sequence[ActivityRecord] = ()
    completed_scopes: Sequence[str] = ()


@dataclass(frozen=True, slots=True)
class Action:
    """Something to deliver through a connector's `push()`; `key` makes delivery idempotent."""

    key: str
    kind: str  # comment | dm | channel | reply | email | digest
    text: str
    target: str | None = None  # a user id, channel id or address, where the kind needs one
    task_external_id: str | None = None
    task_url: str | None = None
    task_extra: Mapping[str, Any] = field(default_factory=dict)
    subject: str | None = None
    payload: Mapping[str, Any] = field(default_factory=dict)  # kind-specific: blocks, html, ...


@dataclass(frozen=True, slots=True)
class PushResult:
    remote_id: str
    already_delivered: bool = False  # the connector found its own marker and posted nothing


@dataclass(frozen=True, slots=True)
class CheckResult:
    ok: bool
    detail: str
