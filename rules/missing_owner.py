"""`missing_owner`: an open task with no single owner (nobody, a group, or several people)."""

from __future__ import annotations

from datetime import timedelta

from pydantic import Field
from sqlalchemy import func

from rules.base import Rule, RuleConfig, RuleContext, Verdict, days_text
from store.durations import Duration, format_duration
from store.models import Task


class MissingOwnerConfig(RuleConfig):
    grace: Duration = Field(timedelta(hours=1), description="How long a new task may stay unowned.")


class MissingOwner(Rule[MissingOwnerConfig]):
    id = "missing_owner"
    config_model = MissingOwnerConfig

    def evaluate(self, ctx: RuleContext) -> list[Verdict]:
        born = func.coalesce(Task.created_at, Task.first_seen_at)
        stmt = ctx.open_tasks(Task.id, Task.assignee_count, born).where(
            Task.owner_id.is_(None), born < ctx.now - self.config.grace
        )
        verdicts = []
        for task_id, assignees, created in ctx.session.execute(ctx.scoped(stmt, self.config)):
            age = days_text(ctx.now - created)
            if assignees > 1:
                why = f"{assignees} people are assigned, so nobody owns it"
            else:
                why = "nobody is assigned"
            message = f"no owner: {why} (open {age}; grace {format_duration(self.config.grace)})"
            verdicts.append(Verdict(task_id, message, {"assignees": assignees}))
        return verdicts
