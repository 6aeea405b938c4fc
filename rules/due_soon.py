"""`due_soon`: an open task due within the window that shows no recent activity."""

from __future__ import annotations

from datetime import timedelta

from pydantic import Field
from sqlalchemy import func, or_

from rules.base import Rule, RuleConfig, RuleContext, Verdict, days_text
from store.durations import Duration
from store.models import Task


class DueSoonConfig(RuleConfig):
    within: Duration = Field(timedelta(days=2), description="How far ahead a due date counts as soon.")
    quiet: Duration = Field(timedelta(days=1), description="No activity for this long counts as no recent activity.")


class DueSoon(Rule[DueSoonConfig]):
    id = "due_soon"
    config_model = DueSoonConfig

    def evaluate(self, ctx: RuleContext) -> list[Verdict]:
        horizon = (ctx.now + self.config.within).date()
        quiet_since = ctx.now - self.config.quiet
        last = func.coalesce(Task.last_activity_at, Task.status_changed_at, Task.first_seen_at)
        stmt = ctx.open_tasks(Task.id, Task.due, last).where(
            Task.due >= ctx.today,
            Task.due <= horizon,
            or_(Task.last_activity_at.is_(None), Task.last_activity_at < quiet_since),
            or_(Task.status_changed_at.is_(None), Task.status_changed_at < quiet_since),
        )
        verdicts = []
        for task_id, due, last_seen in ctx.session.execute(ctx.scoped(stmt, self.config)):
            left = (due - ctx.today).days
            when = "today" if left == 0 else f"in {left} day{'s' if left != 1 else ''}"
            message = f"due {when} ({due.isoformat()}) with no activity for {days_text(ctx.now - last_seen)}"
            verdicts.append(Verdict(task_id, message, {"due": due.isoformat(), "days_left": left}))
        return verdicts
