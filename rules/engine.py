"""Running the rules: evaluate each enabled rule, pick who should act, keep findings in step."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from rules.base import Rule, RuleConfig, RuleContext, Verdict
from store.batch import gc_paused
from store.findings import Draft, ReconcileStats, reconcile
from store.models import Person, Task

log = logging.getLogger("trackloop.rules")


@dataclass(slots=True)
class RuleOutcome:
    rule: str
    enabled: bool
    flagged: int = 0
    stats: ReconcileStats = field(default_factory=ReconcileStats)
    seconds: float = 0.0


def build_rules(
    types: Mapping[str, type[Rule]],  # type: ignore[type-arg]
    settings: Mapping[str, RuleConfig],
) -> list[Rule]:  # type: ignore[type-arg]
    """One instance per installed rule, configured from `[rules.ID]` or the rule's defaults."""
    return [cls(settings.get(rule_id) or cls.config_model()) for rule_id, cls in types.items()]


def _ordered(rules: list[Rule]) -> list[Rule]:  # type: ignore[type-arg]
    """Rules that read other rules' verdicts run after them."""
    ids = {r.id for r in rules}
    done: set[str] = set()
    ordered: list[Rule] = []  # type: ignore[type-arg]
    pending = list(rules)
    while pending:
        ready = [r for r in pending if all(dep in done or dep not in ids for dep in r.requires)]
        if not ready:  # a dependency cycle among plugins: run the rest as they come
            ready = pending
        for rule in ready:
            ordered.append(rule)
            done.add(rule.id)
        pending = [r for r in pending if r not in ready]
    return ordered


class RulesEngine:
    def __init__(self, rules: list[Rule], *, clock: Callable[[], datetime] | None = None) -> None:  # type: ignore[type-arg]
        self.rules = _ordered(rules)
        self.clock = clock or (lambda: datetime.now(UTC))

    def run(self, session: Session) -> list[RuleOutcome]:
        """Evaluate every rule inside the caller's transaction (bulk work: see store.batch)."""
        with gc_paused():
            return self._run(session)

    def _run(self, session: Session) -> list[RuleOutcome]:
        now = self.clock()
        ctx = RuleContext(session=session, now=now, configs={rule.id: rule.config for rule in self.rules})
        lead_id = session.scalar(select(Person.id).where(Person.lead.is_(True)).order_by(Person.key).limit(1))
        # Who may act on each task, read once per run: one scan is cheaper than per-rule lookups.
        people = {tid: (owner, reporter) for tid, owner, reporter in
                  session.execute(select(Task.id, Task.owner_id, Task.reporter_id))}
        outcomes = []
        for rule in self.rules:
            started = time.monotonic()
            outcome = RuleOutcome(rule=rule.id, enabled=rule.config.enabled)
            verdicts = rule.evaluate(ctx) if rule.config.enabled else []
            ctx.results[rule.id] = {v.task_id: v for v in verdicts}
            drafts = self._drafts(verdicts, people, lead_id)
            outcome.stats = reconcile(session, rule.id, rule.config.severity, drafts, now)
            outcome.flagged = len(drafts)
            outcome.seconds = time.monotonic() - started
            log.info("rule %s: %d flagged, %d new, %d resolved in %.2fs", rule.id, outcome.flagged,
                     outcome.stats.opened, outcome.stats.resolved, outcome.seconds)
            outcomes.append(outcome)
        return outcomes

    @staticmethod
    def _drafts(
        verdicts: list[Verdict], people: dict[int, tuple[int | None, int | None]], lead_id: int | None
    ) -> dict[int, Draft]:
        """Who should act: the owner, else the reporter, else a lead."""
        drafts = {}
        for v in verdicts:
            owner_id, reporter_id = people.get(v.task_id, (None, None))
            act = v.act_person_id or owner_id or reporter_id or lead_id
            drafts[v.task_id] = Draft(message=v.message, act_person_id=act, data=v.data)
        return drafts
