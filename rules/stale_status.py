"""`stale_status`: no activity and no status change for longer than its status allows.

Activity is the task's own (as the source reports it, minus trackloop's own posts) or that of
a task linked to it: an issue whose pull request moves is being worked on.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime, timedelta

from pydantic import Field, field_validator
from sqlalchemy import and_, func, or_, select, type_coerce
from sqlalchemy.orm import aliased

from rules.base import OPEN, Rule, RuleConfig, RuleContext, Verdict, business_since, days_text
from store.canonical import LinkKind
from store.durations import Duration, format_duration
from store.models import Task, TaskLink, UTCDateTime
from store.sql import latest, one_of

DEFAULT_AFTER = {"in_progress": timedelta(days=3), "todo": timedelta(days=14), "blocked": timedelta(days=2)}


class StaleStatusConfig(RuleConfig):
    after: dict[str, Duration] = Field(
        default_factory=lambda: dict(DEFAULT_AFTER),
        description="Quiet time allowed per open status (todo, in_progress, blocked); "
        "a status left out is not checked.",
    )
    business_days: bool = Field(True, description="Count only Monday to Friday.")

    @field_validator("after")
    @classmethod
    def _open_statuses(cls, value: dict[str, object]) -> dict[str, object]:
        unknown = sorted(set(value) - set(OPEN))
        if unknown:
            raise ValueError(f"expected open statuses ({', '.join(OPEN)}), got {', '.join(unknown)}")
        return value


class StaleStatus(Rule[StaleStatusConfig]):
    id = "stale_status"
    config_model = StaleStatusConfig

    def evaluate(self, ctx: RuleContext) -> list[Verdict]:
        return self.stale(ctx)

    def stale(self, ctx: RuleContext, among: Collection[int] | None = None) -> list[Verdict]:
        """The stale tasks in scope, optionally only `among` these ids (dependency_at_risk asks
        about blockers, whatever this rule's own switch and scope)."""
        # Business time is never more than calendar time, so the calendar cutoff is a safe SQL
        # prefilter; the exact business-day check runs on the few candidates left.
        candidates: dict[int, tuple[str, datetime]] = {}
        for status, allowed in self.config.after.items():
            cutoff = ctx.now - allowed
            quiet_since = func.coalesce(latest(ctx.session, Task.last_activity_at, Task.status_changed_at),
                                        Task.first_seen_at)
            stmt = select(Task.id, type_coerce(quiet_since, UTCDateTime())).where(
                Task.status == status,
                or_(Task.last_activity_at.is_(None), Task.last_activity_at < cutoff),
                or_(Task.status_changed_at.is_(None), Task.status_changed_at < cutoff),
                or_(Task.last_activity_at.is_not(None), Task.status_changed_at.is_not(None),
                    Task.first_seen_at < cutoff),
            )
            if among is not None:
                stmt = stmt.where(one_of(ctx.session, Task.id, list(among)))
            for tid, since in ctx.session.execute(ctx.scoped(stmt, self.config)):
                candidates[tid] = (status, since)
        linked = self._linked_activity(ctx, set(candidates)) if candidates else {}
        business = self.config.business_days
        elapsed = business_since(ctx.now) if business else (lambda start: (ctx.now - start).total_seconds())
        allowed = {s: a.total_seconds() for s, a in self.config.after.items()}
        suffix = {s: f"; threshold {format_duration(a)}" for s, a in self.config.after.items()}
        verdicts = []
        for tid, (status, since) in candidates.items():
            since = max(since, linked.get(tid, since))
            quiet_for = elapsed(since)
            if quiet_for <= allowed[status]:
                continue
            quiet_text = days_text(timedelta(seconds=quiet_for), business)
            message = f"{status.replace('_', ' ')} with no activity for {quiet_text}{suffix[status]}"
            verdicts.append(Verdict(tid, message, {"status": status, "quiet_since": since.isoformat()}))
        return verdicts

    @staticmethod
    def _linked_activity(ctx: RuleContext, ids: set[int]) -> dict[int, datetime]:
        """Latest activity of the tasks that count as work on each candidate: related and
        duplicate tasks either way, and children for their parent (not blockers or blocked).

        One pass over those links (usually far fewer than candidates), filtered in Python."""
        here, there = aliased(Task), aliased(Task)
        latest: dict[int, datetime] = {}
        both_ways = [LinkKind.RELATES.value, LinkKind.DUPLICATE.value]
        directions = (("src", "dst", both_ways), ("dst", "src", [*both_ways, LinkKind.PARENT.value]))
        for mine, theirs, kinds in directions:
            stmt = (
                select(here.id, there.last_activity_at)
                .select_from(TaskLink)
                .join(here, and_(getattr(TaskLink, f"{mine}_source") == here.source,
                                 getattr(TaskLink, f"{mine}_external_id") == here.external_id))
                .join(there, and_(getattr(TaskLink, f"{theirs}_source") == there.source,
                                  getattr(TaskLink, f"{theirs}_external_id") == there.external_id))
                # No status filter on `here`: the candidates are open already, and one would make the
                # planner walk every open task instead of the few links of these kinds.
                .where(TaskLink.kind.in_(kinds), there.last_activity_at.is_not(None))
            )
            for tid, when in ctx.session.execute(stmt):
                if tid in ids and (tid not in latest or when > latest[tid]):
                    latest[tid] = when
        return latest
