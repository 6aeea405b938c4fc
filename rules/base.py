"""The rule plugin surface: subclass `Rule`, give it a config model, register it.

A rule turns stored tasks into verdicts. It reads the store through SQL (filters pushed into
the database, so 100,000 tasks are never loaded to flag a few hundred) and never calls a
remote API. The engine applies each rule's scope, decides who should act, and keeps the
findings' lifecycle; a rule only says which tasks it flags and why.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any, ClassVar, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Select, not_, select
from sqlalchemy.orm import Session

from store.canonical import OPEN_STATUSES
from store.models import Person, Task
from store.people import key_in
from store.sql import has_any_label

Severity = Literal["info", "warning", "critical"]
OPEN = sorted(s.value for s in OPEN_STATUSES)


class RuleConfig(BaseModel):
    """Keys every rule accepts under `[rules.ID]`; a rule's own model subclasses this."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="Disabled rules flag nothing and resolve their open findings.")
    severity: Severity = Field("warning", description="info, warning or critical.")
    sources: list[str] = Field(default_factory=list, description="Only tasks of these connectors (empty: all).")
    labels: list[str] = Field(default_factory=list, description="Only tasks with one of these labels (empty: all).")
    exclude_labels: list[str] = Field(
        default_factory=lambda: ["on-hold", "wontfix"], description="Never tasks with one of these labels."
    )
    owners: list[str] = Field(default_factory=list, description="Only tasks owned by these person keys (empty: all).")


ConfigT = TypeVar("ConfigT", bound=RuleConfig)


@dataclass(slots=True)
class Verdict:
    """A rule flags `task_id` with a short message carrying the numbers that triggered it."""

    task_id: int
    message: str
    data: Mapping[str, Any] = field(default_factory=dict)
    act_person_id: int | None = None  # default: owner, else reporter, else a lead


@dataclass(slots=True)
class RuleContext:
    """What a rule evaluates against: the session, "now", and earlier rules' verdicts."""

    session: Session
    now: datetime
    results: dict[str, dict[int, Verdict]] = field(default_factory=dict)
    configs: dict[str, RuleConfig] = field(default_factory=dict)  # every rule's settings, enabled or not

    @property
    def today(self) -> date:
        return self.now.date()

    def scoped(self, stmt: Select[Any], config: RuleConfig) -> Select[Any]:
        """Apply the rule's scope (sources, labels, exclude_labels, owners) to a select on Task."""
        if config.sources:
            stmt = stmt.where(Task.source.in_(config.sources))
        if config.labels:
            stmt = stmt.where(has_any_label(self.session, config.labels))
        if config.exclude_labels:
            stmt = stmt.where(not_(has_any_label(self.session, config.exclude_labels)))
        if config.owners:
            owners = select(Person.id).where(key_in(Person.key, config.owners))
            stmt = stmt.where(Task.owner_id.in_(owners))
        return stmt

    def open_tasks(self, *columns: Any) -> Select[Any]:
        return select(*columns).where(Task.status.in_(OPEN))


class Rule(ABC, Generic[ConfigT]):
    """Base class of every rule (built-in or plugin)."""

    id: ClassVar[str]
    config_model: ClassVar[type[RuleConfig]] = RuleConfig
    requires: ClassVar[tuple[str, ...]] = ()  # rules whose verdicts this one reads from the context

    def __init__(self, config: ConfigT) -> None:
        self.config = config

    @abstractmethod
    def evaluate(self, ctx: RuleContext) -> list[Verdict]:
        """Every task this rule flags now, within scope (use `ctx.scoped`)."""


# -- time helpers shared by rules --------------------------------------------------------------
_MONDAY_EPOCH = 4 * 86400  # 1970-01-05, a Monday, in Unix seconds
_WEEK, _WORKWEEK = 7 * 86400, 5 * 86400


def _business_seconds(moment: datetime) -> float:
    """Monday-to-Friday seconds (UTC) from a fixed Monday up to `moment`, in O(1)."""
    weeks, rest = divmod(moment.timestamp() - _MONDAY_EPOCH, _WEEK)
    return weeks * _WORKWEEK + min(rest, _WORKWEEK)


def business_since(end: datetime) -> Callable[[datetime], float]:
    """Seconds between a start and `end` that fall on Monday to Friday (UTC), for "3 business
    days"; made once per `end` for many starts (its half of the sum is done once)."""
    until = _business_seconds(end)
    return lambda start: max(0.0, until - _business_seconds(start))


def business_elapsed(start: datetime, end: datetime) -> timedelta:
    """Time between two instants that falls on Monday to Friday (UTC)."""
    return timedelta(seconds=business_since(end)(start))


def days_text(value: timedelta, business: bool = False) -> str:
    days = value.total_seconds() / 86400
    unit = "business day" if business else "day"
    if days < 1:
        hours = int(value.total_seconds() // 3600)
        return f"{hours} hour{'s' if hours != 1 else ''}"
    count = int(days)
    return f"{count} {unit}{'s' if count != 1 else ''}"

