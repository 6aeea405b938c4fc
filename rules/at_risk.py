"""`at_risk`: open work that, judged by similar finished work, will likely miss its due date.

"Similar" means the same source, scope (repository, project, channel) and priority. Cycle time
is measured from `task_events`: from the first move to in_progress (else the first event) to
the move to done. Where the source tracks a remaining estimate (Jira), that is used instead.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from datetime import datetime, timedelta

from pydantic import Field
from sqlalchemy import case, func, select, type_coerce

from rules.base import Rule, RuleConfig, RuleContext, Verdict
from store.canonical import Status
from store.durations import Duration
from store.models import Task, TaskEvent, UTCDateTime
from store.sql import seconds_between

WORKDAY_SECONDS = 8 * 3600


class AtRiskConfig(RuleConfig):
    min_samples: int = Field(5, ge=1, description="Finished similar tasks needed before predicting.")
    history: Duration = Field(timedelta(days=180), description="How far back finished tasks count.")


class AtRisk(Rule[AtRiskConfig]):
    id = "at_risk"
    config_model = AtRiskConfig

    def evaluate(self, ctx: RuleContext) -> list[Verdict]:
        medians = self._median_cycle_times(ctx)
        # When work started: looked up per candidate through the (task_id, at) index, which is
        # cheaper than aggregating the whole history.
        started = (
            select(func.min(TaskEvent.at))
            .where(TaskEvent.task_id == Task.id, TaskEvent.field == "status",
                   TaskEvent.new == Status.IN_PROGRESS.value)
            .scalar_subquery()
        )
        stmt = ctx.open_tasks(
            Task.id, Task.source, Task.scope, Task.priority, Task.due, Task.status, Task.remaining_estimate_s,
            type_coerce(started, UTCDateTime()),
        ).where(Task.due.is_not(None), Task.due >= ctx.today)
        verdicts = []
        for tid, source, scope, priority, due, status, remaining, began in ctx.session.execute(
            ctx.scoped(stmt, self.config)
        ):
            if remaining is not None:
                expected = _add_workdays(ctx.now, remaining / WORKDAY_SECONDS)
                basis = f"{remaining / 3600:.0f}h of work remain by its estimate"
            else:
                group = medians.get((source, scope, priority))
                if group is None:
                    continue
                median, samples = group
                if status == Status.IN_PROGRESS.value and began is not None:
                    expected = max(ctx.now, began + median)
                else:
                    expected = ctx.now + median
                where = f" in {scope}" if scope else ""
                basis = (f"similar tasks ({samples}{where}, {priority} priority) take a median of "
                         f"{median.total_seconds() / 86400:.1f} days")
            deadline = datetime.combine(due + timedelta(days=1), datetime.min.time(), ctx.now.tzinfo)
            if expected <= deadline:
                continue
            message = f"due {due.isoformat()} but {basis}; expected around {expected.date().isoformat()}"
            verdicts.append(Verdict(tid, message, {"expected": expected.date().isoformat(), "due": due.isoformat()}))
        return verdicts

    def _median_cycle_times(self, ctx: RuleContext) -> dict[tuple[str, str, str], tuple[timedelta, int]]:
        began = func.coalesce(
            func.min(case((TaskEvent.new == Status.IN_PROGRESS.value, TaskEvent.at))), func.min(TaskEvent.at)
        )
        finished = func.max(case((TaskEvent.new == Status.DONE.value, TaskEvent.at)))
        stmt = (
            select(Task.source, Task.scope, Task.priority, seconds_between(ctx.session, began, finished))
            .join(TaskEvent, TaskEvent.task_id == Task.id)
            .where(Task.status == Status.DONE.value, TaskEvent.field == "status",
                   Task.status_changed_at >= ctx.now - self.config.history)
            .group_by(Task.id, Task.source, Task.scope, Task.priority)
        )
        samples: dict[tuple[str, str, str], list[float]] = defaultdict(list)
        for source, scope, priority, seconds in ctx.session.execute(stmt):
            if seconds is not None and seconds > 0:
                samples[(source, scope, priority)].append(float(seconds))
        return {
            key: (timedelta(seconds=statistics.median(values)), len(values))
            for key, values in samples.items()
            if len(values) >= self.config.min_samples
        }


def _add_workdays(start: datetime, days: float) -> datetime:
    """`start` plus `days` of Monday-to-Friday time."""
    cursor = start
    while days > 0:
        if cursor.weekday() < 5:
            step = min(days, 1.0)
            days -= step
            cursor += timedelta(days=step)
        else:
            cursor += timedelta(days=1)
    return cursor
