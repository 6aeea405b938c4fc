"""The whole loop in one place: pull a connector, run the rules, plan follow-ups.

The CLI's `sync` and the daemon both drive trackloop through a `Pipeline`, so the order of
steps (and what a dry run skips) is decided here once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from connectors.base import Connector
from rules.engine import RuleOutcome, RulesEngine, build_rules
from rules.registry import rule_types
from store.db import Store
from store.locks import exclusive
from sync.config import AppConfig
from sync.engine import SyncEngine, SyncResult

Clock = Callable[[], datetime]


@dataclass(slots=True)
class CycleReport:
    syncs: list[SyncResult] = field(default_factory=list)
    rules: list[RuleOutcome] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.syncs)


class Pipeline:
    def __init__(
        self,
        store: Store,
        config: AppConfig,
        connector_types: Mapping[str, type[Connector]],  # type: ignore[type-arg]
        *,
        clock: Clock | None = None,
        on_page: Callable[[str, SyncResult], None] | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.types = connector_types
        self.clock = clock or (lambda: datetime.now(UTC))
        self.engine = SyncEngine(store, config, connector_types, clock=self.clock, on_page=on_page)
        self.rules = RulesEngine(build_rules(rule_types(), config.rules), clock=self.clock)

    def sync(self, only: Iterable[str] | None = None, *, full: bool = False, dry_run: bool = False) -> CycleReport:
        """Pull the connectors, then evaluate the rules (a dry run writes nothing and skips rules)."""
        report = CycleReport(syncs=self.engine.run(only, full=full, dry_run=dry_run))
        if not dry_run:
            report.rules = self.run_rules()
        return report

    def run_rules(self) -> list[RuleOutcome]:
        with self.store.transaction() as session:
            exclusive(session, "rules")  # replicas take turns: findings are reconciled set-wise
            return self.rules.run(session)
