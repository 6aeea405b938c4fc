"""`missing_context`: an open task with no acceptance criteria and too short a description."""

from __future__ import annotations

from pydantic import Field
from sqlalchemy import func, or_

from rules.base import Rule, RuleConfig, RuleContext, Severity, Verdict
from store.models import Task


class MissingContextConfig(RuleConfig):
    severity: Severity = Field("info", description="info, warning or critical.")
    min_body_chars: int = Field(40, ge=0, description="Descriptions shorter than this count as missing.")


class MissingContext(Rule[MissingContextConfig]):
    id = "missing_context"
    config_model = MissingContextConfig

    def evaluate(self, ctx: RuleContext) -> list[Verdict]:
        length = func.length(func.trim(func.coalesce(Task.body, "")))
        stmt = ctx.open_tasks(Task.id, length).where(
            or_(Task.acceptance_criteria.is_(None), func.trim(Task.acceptance_criteria) == ""),
            length < self.config.min_body_chars,
        )
        verdicts = []
        for task_id, chars in ctx.session.execute(ctx.scoped(stmt, self.config)):
            body = "no description" if chars == 0 else f"a {chars}-character description"
            message = f"no acceptance criteria and {body} (minimum {self.config.min_body_chars})"
            verdicts.append(Verdict(task_id, message, {"body_chars": chars}))
        return verdicts
