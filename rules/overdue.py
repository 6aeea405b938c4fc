"""`overdue`: an open task past its due date."""

from __future__ import annotations

from rules.base import Rule, RuleConfig, RuleContext, Verdict
from store.models import Task


class Overdue(Rule[RuleConfig]):
    id = "overdue"

    def evaluate(self, ctx: RuleContext) -> list[Verdict]:
        stmt = ctx.open_tasks(Task.id, Task.due).where(Task.due < ctx.today)
        verdicts = []
        for task_id, due in ctx.session.execute(ctx.scoped(stmt, self.config)):
            late = (ctx.today - due).days
            message = f"overdue by {late} day{'s' if late != 1 else ''} (due {due.isoformat()})"
            verdicts.append(Verdict(task_id, message, {"due": due.isoformat(), "days_late": late}))
        return verdicts
