"""The sync engine: pull each connector page by page and commit every page with its cursor.

Crash safety comes from one rule: a page's records, its history events and the cursor that
follows it are written in one transaction. A crash at any point leaves the store at the end of
the last committed page, and the rerun resumes from the cursor saved with it; connectors resume
with an overlap and upserts absorb the repeats, so the end state equals an uninterrupted run's.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy.orm import Session

from connectors.base import Confirmed, Connector, RequestStats
from connectors.errors import RateLimited
from store.canonical import Page, SyncState
from store.db import Store
from store.errors import TrackloopError
from store.people import IdentityResolver, sync_people
from store.sync_state import (
    LeaseLost,
    load_state,
    record_attempt,
    record_failure,
    record_success,
    save_progress,
)
from store.tasks import TaskWriter, UpsertStats
from sync.config import AppConfig

log = logging.getLogger("trackloop.sync")

Clock = Callable[[], datetime]


@dataclass(slots=True)
class SyncResult:
    connector: str
    kind: str
    ok: bool = True
    error: str | None = None
    note: str | None = None  # e.g. stopped early for a rate limit, to resume next run
    stopped_early: bool = False  # not a failure, but not a complete sync either
    pages: int = 0
    upserts: UpsertStats = field(default_factory=UpsertStats)
    requests: RequestStats = field(default_factory=RequestStats)
    seconds: float = 0.0

    def stats(self) -> dict[str, Any]:
        return {
            "pages": self.pages,
            "inserted": self.upserts.inserted,
            "updated": self.upserts.updated,
            "unchanged": self.upserts.unchanged,
            "cancelled": self.upserts.cancelled,
            "events": self.upserts.events,
            "requests": self.requests.requests,
            "not_modified": self.requests.not_modified,
            "retries": self.requests.retries,
            "rate_limit_remaining": self.requests.rate_limit_remaining,
            "seconds": round(self.seconds, 3),
            "note": self.note,
        }


def build_connector(
    config: AppConfig,
    types: Mapping[str, type[Connector]],  # type: ignore[type-arg]
    name: str,
    *,
    clock: Clock | None = None,
) -> Connector:  # type: ignore[type-arg]
    """Instantiate the configured connector `name` with its validated config."""
    cfg = config.connectors[name]
    return types[cfg.type](name, cfg, clock=clock)


class _DryRun(Exception):
    """Raised inside the dry-run transaction so that nothing is committed."""


class SyncControl(Protocol):
    """How the daemon steers a sync it runs under a lease."""

    def check(self, session: Session, connector: str) -> None:
        """Inside every write transaction, before commit: raise `LeaseLost` if the lease is gone."""

    def stop_requested(self) -> bool:
        """Asked after each committed page: True ends the pull there (shutdown, lost lease)."""


class _Interrupted(Exception):
    """The control asked to stop between pages; the saved cursor resumes the pull."""


class SyncEngine:
    """Runs connectors against a store."""

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
        self.on_page = on_page

    def build(self, name: str) -> Connector:  # type: ignore[type-arg]
        return build_connector(self.config, self.types, name, clock=self.clock)

    def apply_people(self, session: Session) -> None:
        sync_people(session, (p.spec(key) for key, p in self.config.people.items()))

    def _names(self, only: Iterable[str] | None) -> list[str]:
        return list(only) if only is not None else [n for n, c in self.config.connectors.items() if c.enabled]

    def run(self, only: Iterable[str] | None = None, *, full: bool = False, dry_run: bool = False) -> list[SyncResult]:
        """Sync the named (default: every enabled) connector; one failure never stops the rest.

        A dry run does everything inside one transaction that is then rolled back."""
        if dry_run:
            results: list[SyncResult] = []
            try:
                with self.store.transaction() as session:
                    results = self.run_in(session, only, full=full)
                    raise _DryRun
            except _DryRun:
                return results
        with self.store.transaction() as session:
            self.apply_people(session)
        return [self.sync_one(name, full=full) for name in self._names(only)]

    def run_in(self, session: Session, only: Iterable[str] | None = None, *, full: bool = False) -> list[SyncResult]:
        """Pull into the caller's transaction (dry runs): nothing is committed here, no state recorded."""
        self.apply_people(session)
        return [self.sync_one(name, full=full, session=session) for name in self._names(only)]

    def sync_one(
        self, name: str, *, full: bool = False, session: Session | None = None, control: SyncControl | None = None
    ) -> SyncResult:
        """Pull one connector, committing page by page (or into `session`, committing nothing).

        Under a `control` (the daemon's lease), a lost lease or a stop request ends the pull
        after the last committed page and records no outcome."""
        kind = self.config.connectors[name].type
        result = SyncResult(connector=name, kind=kind)
        started = time.monotonic()
        connector: Connector | None = None  # type: ignore[type-arg]
        record = session is None
        try:
            connector = self.build(name)  # inside the try: a constructor that raises fails this connector only
            result.requests = connector.stats
            if session is not None:  # a dry run (run_in): the source must stay untouched too
                state = replace(self._state(session, connector, full), dry_run=True)
                self._consume(connector, state, result, transaction=lambda: nullcontext(session))
            else:
                self._pull(connector, result, full, control)
        except _Interrupted:
            result.note, record = "interrupted; resumes from the saved cursor", False
        except LeaseLost as exc:
            result.ok, result.error, record = False, str(exc), False
        except RateLimited as exc:
            result.note, result.stopped_early = f"stopped early: {exc}; resuming next run", True
            log.warning("%s: %s", name, result.note)
        except TrackloopError as exc:
            result.ok, result.error = False, str(exc)
        except Exception as exc:  # a connector bug must not stop the other connectors
            log.debug("unexpected error in %s", name, exc_info=True)
            result.ok, result.error = False, f"unexpected {exc.__class__.__name__}: {exc}"
        finally:
            if connector is not None:
                connector.close()
        result.seconds = time.monotonic() - started
        if record:
            try:
                self._record(result, control)
            except LeaseLost as exc:
                result.ok, result.error = False, str(exc)
        log.info(
            "sync %s: %s, %d pages, %d new, %d changed, %d unchanged, %d requests in %.2fs%s",
            name, "ok" if result.ok else "FAILED", result.pages, result.upserts.inserted, result.upserts.updated,
            result.upserts.unchanged, result.requests.requests, result.seconds,
            f" ({result.error or result.note})" if result.error or result.note else "",
            extra={"fields": {"event": "sync", "connector": name, "type": kind, "ok": result.ok,
                              "error": result.error, **result.stats()}},
        )
        return result

    def _state(self, session: Session, connector: Connector, full: bool) -> SyncState:  # type: ignore[type-arg]
        row = load_state(session, connector.name)
        if row is None:
            return SyncState(full=full)
        return SyncState(cursor=connector.load_cursor(row.cursor), validators=dict(row.validators or {}), full=full)

    def _pull(
        self, connector: Connector, result: SyncResult, full: bool, control: SyncControl | None  # type: ignore[type-arg]
    ) -> None:
        with self.store.transaction() as session:
            if control is not None:
                control.check(session, connector.name)
            state = self._state(session, connector, full)
            record_attempt(session, connector.name, connector.kind, self.clock())
        self._consume(connector, state, result, transaction=self.store.transaction, control=control)

    def _consume(
        self,
        connector: Connector,  # type: ignore[type-arg]
        state: SyncState,  # type: ignore[type-arg]
        result: SyncResult,
        *,
        transaction: Callable[[], Any],
        control: SyncControl | None = None,
    ) -> None:
        resolver = IdentityResolver()
        writer = TaskWriter(source=connector.name, kind=connector.kind, resolver=resolver, now=self.clock())
        seen: dict[str, set[str]] = defaultdict(set)
        for page in connector.pull(state):
            for task in page.tasks:
                seen[task.scope].add(task.external_id)
            verdicts = self._confirm(connector, writer, page, seen, transaction)
            try:
                with transaction() as session:
                    if control is not None:
                        control.check(session, connector.name)
                    self._write_page(session, writer, connector, page, seen, verdicts, result)
            except BaseException:
                resolver.rollback()
                raise
            resolver.commit()
            result.pages += 1
            if self.on_page:
                self.on_page(connector.name, result)
            if control is not None and control.stop_requested():
                raise _Interrupted

    @staticmethod
    def _confirm(
        connector: Connector,  # type: ignore[type-arg]
        writer: TaskWriter,
        page: Page,  # type: ignore[type-arg]
        seen: Mapping[str, set[str]],
        transaction: Callable[[], Any],
    ) -> dict[str, Confirmed]:
        """Ask the connector about the tasks each completed scope's listing lacked (absence alone can
        be a page shift), before and outside the page's write transaction; only candidates are asked."""
        if not page.completed_scopes:
            return {}
        with transaction() as session:
            missing = {scope: writer.missing(session, scope, seen.get(scope, set())) for scope in page.completed_scopes}
        return {scope: connector.confirm_missing(scope, ids) for scope, ids in missing.items() if ids}

    @staticmethod
    def _write_page(
        session: Session,
        writer: TaskWriter,
        connector: Connector,  # type: ignore[type-arg]
        page: Page,  # type: ignore[type-arg]
        seen: Mapping[str, set[str]],
        verdicts: Mapping[str, Confirmed],
        result: SyncResult,
    ) -> None:
        stats = writer.upsert(session, page.tasks)
        writer.record_activities(session, page.activities)
        for scope in page.completed_scopes:
            verdict = verdicts.get(scope, Confirmed())
            stats.add(writer.upsert(session, verdict.found))
            stats.cancelled += writer.cancel_missing(session, scope, seen.get(scope, set()), verdict.gone)
        cursor = page.cursor.model_dump(mode="json") if page.cursor is not None else None
        save_progress(session, connector.name, connector.kind, cursor, page.validators)
        result.upserts.add(stats)

    def _record(self, result: SyncResult, control: SyncControl | None = None) -> None:
        with self.store.transaction() as session:
            if control is not None:
                control.check(session, result.connector)
            if result.ok and not result.stopped_early:
                record_success(session, result.connector, result.kind, self.clock(), result.stats())
            else:  # a rate-limited stop is no failure, but the data is not current: it shows, and backs off
                record_failure(session, result.connector, result.kind, self.clock(), result.error or result.note or "",
                               result.stats())

