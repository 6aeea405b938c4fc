"""`no_due_date`: an open task at or above a priority level with no due date."""

from __future__ import annotations

from pydantic import Field

from rules.base import Rule, RuleConfig, RuleContext, Severity, Verdict
from store.canonical import Priority
from store.models import Task


class NoDueDateConfig(RuleConfig):
    severity: Severity = Field("info", description="info, warning or critical.")
    min_priority: Priority = Field(Priority.MEDIUM, description="Flag tasks at or above this priority.")


class NoDueDate(Rule[NoDueDateConfig]):
    id = "no_due_date"
    config_model = NoDueDateConfig

    def evaluate(self, ctx: RuleContext) -> list[Verdict]:
        levels = [p.value for p in Priority if p.rank >= self.config.min_priority.rank and p is not Priority.NONE]
        if self.config.min_priority is Priority.NONE:
            levels.append(Priority.NONE.value)
        stmt = ctx.open_tasks(Task.id, Task.priority).where(Task.due.is_(None), Task.priority.in_(levels))
        return [
            Verdict(task_id, f"{priority} priority and no due date", {"priority": priority})
            for task_id, priority in ctx.session.execute(ctx.scoped(stmt, self.config))
        ]
