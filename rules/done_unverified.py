"""`done_unverified`: moved to done a while ago, and nobody confirmed the outcome.

Verification signals: the source's own (a configured label, a Jira status, a ✅ reaction by
someone other than the owner: connectors set `verified`), a label listed here, or
`trackloop verify TASK`, recorded as a `verified` event after the task reached done.
"""

from __future__ import annotations

from datetime import timedelta

from pydantic import Field
from sqlalchemy import and_, exists, not_, select

from rules.base import Rule, RuleConfig, RuleContext, Verdict, days_text
from store.canonical import Status
from store.durations import Duration, format_duration
from store.models import Task, TaskEvent
from store.sql import has_any_label


class DoneUnverifiedConfig(RuleConfig):
    after: Duration = Field(timedelta(days=2), description="Time allowed after done before asking.")
    max_age: Duration = Field(
        timedelta(days=30), description="Ignore tasks done longer ago than this (old history is not news)."
    )
    verified_labels: list[str] = Field(default_factory=lambda: ["verified"], description="Labels that verify.")


class DoneUnverified(Rule[DoneUnverifiedConfig]):
    id = "done_unverified"
    config_model = DoneUnverifiedConfig

    def evaluate(self, ctx: RuleContext) -> list[Verdict]:
        verified_later = exists(
            select(1).where(TaskEvent.task_id == Task.id, TaskEvent.field == "verified",
                            TaskEvent.at >= Task.status_changed_at)
        )
        stmt = select(Task.id, Task.status_changed_at).where(
            Task.status == Status.DONE.value,
            Task.status_changed_at < ctx.now - self.config.after,
            Task.status_changed_at >= ctx.now - self.config.max_age,
            Task.verified.is_(False),
            not_(verified_later),
        )
        if self.config.verified_labels:
            stmt = stmt.where(and_(not_(has_any_label(ctx.session, self.config.verified_labels))))
        verdicts = []
        for task_id, done_at in ctx.session.execute(ctx.scoped(stmt, self.config)):
            message = (f"done for {days_text(ctx.now - done_at)} with no verification "
                       f"(threshold {format_duration(self.config.after)})")
            verdicts.append(Verdict(task_id, message, {"done_at": done_at.isoformat()}))
        return verdicts
