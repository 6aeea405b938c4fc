"""The sync engine: pages committed with their cursor, crash safety, isolation of failures."""

from __future__ import annotations

from collections.abc import Collection, Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from connectors.base import Confirmed, Connector, ConnectorConfig
from connectors.errors import AuthError, RateLimited
from store.canonical import (
    ActivityRecord,
    CheckResult,
    Cursor,
    IdentityKind,
    IdentityRef,
    Page,
    Status,
    SyncState,
    TaskRecord,
    TaskRef,
)
from store.db import Store
from store.models import Person, SyncStateRow, Task, TaskEvent
from sync.config import parse_config
from sync.engine import SyncEngine

T0 = datetime(2026, 11, 1, tzinfo=UTC)
PAGE = 10


class FakeCursor(Cursor):
    version: int = 1
    offset: int = 0


class FakeConfig(ConnectorConfig):
    total: int = 35


class Boom(Exception):
    pass


class FakeConnector(Connector[FakeConfig, FakeCursor]):
    """Serves `total` tasks in pages of 10, resuming from its offset cursor with an overlap of 3.

    `FakeConnector.fail_after_pages` makes the next pull die after that many pages, like a crash.
    """

    kind = "fake"
    config_model = FakeConfig
    cursor_model = FakeCursor
    fail_after_pages: int | None = None
    data_version = 0
    pulls: list[SyncState] = []

    def check(self) -> CheckResult:
        return CheckResult(True, "fine")

    def record(self, i: int) -> TaskRecord:
        owner = IdentityRef(IdentityKind.GITHUB, f"user{i % 4}")
        return TaskRecord(
            external_id=str(i), title=f"task {i} v{self.data_version}", status=Status.TODO, raw_status="open",
            scope="all", assignees=(owner,), updated_at=T0 + timedelta(minutes=i),
        )

    def pull(self, state: SyncState[FakeCursor]) -> Iterator[Page[FakeCursor]]:
        FakeConnector.pulls.append(state)
        start = 0 if state.full or state.cursor is None else max(0, state.cursor.offset - 3)
        pages = 0
        for offset in range(start, self.config.total, PAGE):
            if FakeConnector.fail_after_pages is not None and pages >= FakeConnector.fail_after_pages:
                FakeConnector.fail_after_pages = None
                raise Boom("connection reset in the middle of a pull")
            end = min(offset + PAGE, self.config.total)
            last = end == self.config.total
            yield Page(
                tasks=[self.record(i) for i in range(offset, end)],
                cursor=FakeCursor(offset=end),
                activities=[ActivityRecord(TaskRef(str(i)), T0 + timedelta(hours=1))
                            for i in range(offset, end) if i % 10 == 0],
                completed_scopes=["all"] if last and start == 0 else [],
            )
            pages += 1


class BrokenConnector(FakeConnector):
    kind = "broken"

    def pull(self, state: SyncState[FakeCursor]) -> Iterator[Page[FakeCursor]]:
        raise AuthError("401 Bad credentials for token ghp_abcdefghijklmnopqrstuvwx")
        yield  # pragma: no cover


class LimitedConnector(FakeConnector):
    kind = "limited"

    def pull(self, state: SyncState[FakeCursor]) -> Iterator[Page[FakeCursor]]:
        yield Page(tasks=[self.record(0)], cursor=FakeCursor(offset=1))
        raise RateLimited("rate limit spent", reset_at=T0 + timedelta(hours=1))


class DoubtingConnector(FakeConnector):
    """Asked about what its listing lacked: even ids are gone, 31 is still there (a skipped one)."""

    kind = "doubting"
    asked: list[tuple[str, list[str]]] = []

    def confirm_missing(self, scope: str, external_ids: Collection[str]) -> Confirmed:
        DoubtingConnector.asked.append((scope, sorted(external_ids, key=int)))
        found = [self.record(31)] if "31" in external_ids else []
        return Confirmed(gone=frozenset(i for i in external_ids if int(i) % 2 == 0), found=found)


TYPES = {"fake": FakeConnector, "broken": BrokenConnector, "limited": LimitedConnector,
         "doubting": DoubtingConnector}


@pytest.fixture(autouse=True)
def _reset_fake() -> Iterator[None]:
    FakeConnector.fail_after_pages = None
    FakeConnector.data_version = 0
    FakeConnector.pulls = []
    DoubtingConnector.asked = []
    yield


def config(db_url: str, **connectors: dict) -> object:
    return parse_config({"store": {"url": db_url}, "connectors": connectors or {"src": {"type": "fake"}}},
                        env={}, connector_types=TYPES)


def snapshot(store: Store, source: str) -> dict:
    """Everything a sync of `source` decides, without the wall-clock bookkeeping columns."""
    with store.transaction() as s:
        tasks = {
            t.external_id: (t.title, t.status, t.owner.key if t.owner else None, t.last_activity_at, t.content_hash)
            for t in s.scalars(select(Task).where(Task.source == source))
        }
        events = sorted(
            (ext, e.field, e.old, e.new, e.at)
            for e, ext in s.execute(
                select(TaskEvent, Task.external_id).join(Task).where(Task.source == source)
            )
        )
        cursor = s.get(SyncStateRow, source).cursor
    return {"tasks": tasks, "events": events, "cursor": cursor}


def test_first_sync_pages_and_cursor(db_url: str) -> None:
    store = Store(db_url)
    [result] = SyncEngine(store, config(db_url), TYPES).run()
    assert result.ok and result.pages == 4 and result.upserts.inserted == 35
    with store.transaction() as s:
        assert s.scalar(select(SyncStateRow.cursor)) == {"version": 1, "offset": 35}
        assert s.scalar(select(SyncStateRow.last_success)) is not None
    store.close()


def test_resync_resumes_with_overlap_and_writes_nothing(db_url: str) -> None:
    store = Store(db_url)
    engine = SyncEngine(store, config(db_url), TYPES)
    engine.run()
    [again] = engine.run()
    assert FakeConnector.pulls[-1].cursor == FakeCursor(offset=35)
    assert (again.upserts.inserted, again.upserts.updated) == (0, 0)
    store.close()


@pytest.mark.parametrize("fail_after", [0, 1, 2, 3])
def test_crash_between_pages_then_rerun_equals_clean_run(db_url: str, fail_after: int) -> None:
    """Failure injected between batches: the rerun ends in exactly the state of a clean run."""
    store = Store(db_url)
    engine = SyncEngine(store, config(db_url, clean={"type": "fake"}, crashed={"type": "fake"}), TYPES)
    engine.run(["clean"])

    FakeConnector.fail_after_pages = fail_after
    [first] = engine.run(["crashed"])
    assert not first.ok and "connection reset" in (first.error or "")
    with store.transaction() as s:
        row = s.get(SyncStateRow, "crashed")
        assert (row.cursor or {}).get("offset", 0) == min(fail_after * PAGE, 35)
        assert row.last_error.startswith("unexpected Boom")
        stored = s.scalars(select(Task.id).where(Task.source == "crashed")).all()
        assert len(stored) == min(fail_after * PAGE, 35)
    [second] = engine.run(["crashed"])
    assert second.ok
    assert snapshot(store, "crashed") == snapshot(store, "clean")
    store.close()


def test_crash_inside_the_page_transaction_rolls_back_page_and_cursor(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(db_url)
    engine = SyncEngine(store, config(db_url), TYPES)
    import sync.engine as engine_mod

    real_save = engine_mod.save_progress
    calls = {"n": 0}

    def crash_on_second_page(*args, **kwargs):
        calls["n"] += 1
        real_save(*args, **kwargs)
        if calls["n"] == 2:
            raise Boom("killed after the upsert, before commit")

    monkeypatch.setattr(engine_mod, "save_progress", crash_on_second_page)
    [result] = engine.run()
    assert not result.ok
    with store.transaction() as s:
        assert s.scalar(select(SyncStateRow.cursor)) == {"version": 1, "offset": 10}
        assert len(s.scalars(select(Task.id)).all()) == 10
    monkeypatch.setattr(engine_mod, "save_progress", real_save)
    [result] = engine.run()
    assert result.ok
    with store.transaction() as s:
        assert len(s.scalars(select(Task.id)).all()) == 35
    store.close()


def test_one_failing_connector_does_not_stop_others(db_url: str) -> None:
    store = Store(db_url)
    cfg = config(db_url, bad={"type": "broken"}, good={"type": "fake"})
    results = {r.connector: r for r in SyncEngine(store, cfg, TYPES).run()}
    assert results["good"].ok and results["good"].upserts.inserted == 35
    assert not results["bad"].ok and "Bad credentials" in results["bad"].error
    with store.transaction() as s:
        row = s.get(SyncStateRow, "bad")
        assert row.last_error and row.last_success is None
    store.close()


def test_rate_limit_stops_cleanly_and_keeps_progress(db_url: str) -> None:
    store = Store(db_url)
    [result] = SyncEngine(store, config(db_url, lim={"type": "limited"}), TYPES).run()
    assert result.ok and "resuming next run" in result.note
    with store.transaction() as s:
        assert s.scalar(select(SyncStateRow.cursor)) == {"version": 1, "offset": 1}
    store.close()


def test_dry_run_writes_nothing(db_url: str) -> None:
    store = Store(db_url)
    [result] = SyncEngine(store, config(db_url), TYPES).run(dry_run=True)
    assert result.ok and result.upserts.inserted == 35
    with store.transaction() as s:
        assert s.scalar(select(Task.id)) is None
        assert s.scalar(select(SyncStateRow.connector)) is None
        assert s.scalar(select(Person.id)) is None
    store.close()


def test_activities_bump_last_activity_once(db_url: str) -> None:
    store = Store(db_url)
    engine = SyncEngine(store, config(db_url), TYPES)
    engine.run()
    engine.run(full=True)
    with store.transaction() as s:
        task0 = s.scalar(select(Task).where(Task.external_id == "0"))
        assert task0.last_activity_at == T0 + timedelta(hours=1)
        acts = s.scalars(select(TaskEvent).where(TaskEvent.task_id == task0.id, TaskEvent.field == "activity"))
        assert len(acts.all()) == 1
    store.close()


def test_full_listing_cancels_only_what_is_gone(db_url: str) -> None:
    store = Store(db_url)
    SyncEngine(store, config(db_url), TYPES).run()
    cfg = config(db_url, src={"type": "fake", "total": 30})
    [result] = SyncEngine(store, cfg, TYPES).run(full=True)
    assert result.upserts.cancelled == 5
    with store.transaction() as s:
        cancelled = s.scalars(select(Task.external_id).where(Task.status == "cancelled")).all()
    assert sorted(cancelled, key=int) == ["30", "31", "32", "33", "34"]
    store.close()


def test_incremental_listing_never_cancels(db_url: str) -> None:
    store = Store(db_url)
    SyncEngine(store, config(db_url), TYPES).run()
    [result] = SyncEngine(store, config(db_url, src={"type": "fake", "total": 30}), TYPES).run()
    assert result.upserts.cancelled == 0
    store.close()


def test_the_connector_confirms_absences_before_anything_is_cancelled(db_url: str) -> None:
    store = Store(db_url)
    SyncEngine(store, config(db_url, src={"type": "doubting"}), TYPES).run()
    assert DoubtingConnector.asked == []  # nothing stored yet: nothing to ask about
    FakeConnector.data_version = 1
    [result] = SyncEngine(store, config(db_url, src={"type": "doubting", "total": 30}), TYPES).run(full=True)
    assert DoubtingConnector.asked == [("all", ["30", "31", "32", "33", "34"])]  # only the candidates
    assert result.upserts.cancelled == 3
    with store.transaction() as s:
        rows = {t.external_id: t for t in s.scalars(select(Task).where(Task.external_id.in_(["30", "31", "33"])))}
        cancelled = s.scalars(select(Task.external_id).where(Task.status == "cancelled")).all()
        assert sorted(cancelled, key=int) == ["30", "32", "34"]
        assert rows["31"].title == "task 31 v1" and rows["33"].title == "task 33 v0"  # found: upserted
    store.close()
