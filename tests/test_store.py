"""The canonical store on SQLite and PostgreSQL: schema, upserts, history, people, links."""

from __future__ import annotations

import os
import stat
from datetime import UTC, date, datetime, timedelta, timezone

import pytest
from sqlalchemy import select, text

from store.canonical import IdentityKind, IdentityRef, LinkKind, LinkRecord, Priority, Status, TaskRecord, TaskRef
from store.db import Store, current_revision, head_revision
from store.errors import StoreError
from store.findings import Draft, open_findings, reconcile
from store.models import Identity, Person, Task, TaskEvent, TaskLink
from store.people import IdentityResolver, PersonSpec, sync_people
from store.queries import TaskFilter, find_task, list_tasks, task_json
from store.tasks import TaskWriter

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def rec(ext: str, **kw) -> TaskRecord:
    base = dict(external_id=ext, title=f"task {ext}", status=Status.TODO, raw_status="open", updated_at=T0)
    base.update(kw)
    return TaskRecord(**base)


def write(store: Store, records, *, source="src", now=T0, resolver=None):
    resolver = resolver or IdentityResolver()
    with store.transaction() as s:
        stats = TaskWriter(source=source, kind="test", resolver=resolver, now=now).upsert(s, records)
    resolver.commit()
    return stats


def test_empty_database_is_migrated_on_first_use(store: Store) -> None:
    assert current_revision(store.engine) == head_revision()
    with store.transaction() as s:
        assert s.scalar(select(Task.id)) is None


def test_sqlite_file_is_private_wal_and_enforces_foreign_keys(tmp_path) -> None:
    path = tmp_path / "sub" / "t.db"
    store = Store(f"sqlite:///{path}")
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with store.engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
    finally:
        store.close()


def test_store_behind_head_asks_for_db_upgrade(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    Store(url).close()
    with Store(url, migrate=False).engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'older'"))
    with pytest.raises(StoreError, match="trackloop db upgrade"):
        Store(url)


def test_bad_url_is_a_store_error_without_password() -> None:
    with pytest.raises(StoreError) as info:
        Store("nosuchdb+driver://user:hunter22@host/db")
    assert "hunter22" not in str(info.value)


def test_insert_then_unchanged_then_update(store: Store) -> None:
    assert write(store, [rec("1"), rec("2")]).inserted == 2
    again = write(store, [rec("1"), rec("2")])
    assert (again.inserted, again.updated, again.unchanged) == (0, 0, 2)
    changed = write(store, [rec("1", title="renamed"), rec("2")])
    assert (changed.updated, changed.unchanged) == (1, 1)
    with store.transaction() as s:
        titles = dict(s.execute(select(Task.external_id, Task.title)).all())
    assert titles == {"1": "renamed", "2": "task 2"}


def test_unchanged_task_row_is_not_rewritten(store: Store) -> None:
    write(store, [rec("1")], now=T0)
    write(store, [rec("1")], now=T0 + timedelta(hours=1))
    with store.transaction() as s:
        assert s.scalar(select(Task.synced_at)) == T0


def test_unique_per_source_and_external_id(store: Store) -> None:
    write(store, [rec("1")], source="a")
    write(store, [rec("1")], source="b")
    write(store, [rec("1"), rec("1", title="last wins")], source="a")
    with store.transaction() as s:
        rows = s.execute(select(Task.source, Task.title).order_by(Task.source)).all()
    assert rows == [("a", "last wins"), ("b", "task 1")]


def test_times_come_back_aware_utc(store: Store) -> None:
    plus2 = timezone(timedelta(hours=2))
    write(store, [rec("1", created_at=datetime(2026, 11, 1, 14, 0, tzinfo=plus2))])
    with store.transaction() as s:
        task = s.scalar(select(Task))
    assert task.created_at == datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
    assert task.created_at.tzinfo is not None and task.created_at.utcoffset() == timedelta(0)


def test_history_records_status_owner_and_due_changes(store: Store) -> None:
    bob = IdentityRef(IdentityKind.GITHUB, "bob")
    write(store, [rec("1", status_changed_at=T0 - timedelta(days=3))])
    later = T0 + timedelta(hours=2)
    write(store, [rec("1", status=Status.IN_PROGRESS, assignees=(bob,), due=date(2026, 12, 1), updated_at=later)])
    with store.transaction() as s:
        events = s.execute(select(TaskEvent.field, TaskEvent.old, TaskEvent.new, TaskEvent.at, TaskEvent.origin)
                           .order_by(TaskEvent.id)).all()
    assert events[0] == ("status", None, "todo", T0 - timedelta(days=3), "initial")
    assert ("status", "todo", "in_progress", later, "sync") in events
    assert ("owner", None, "github:bob", later, "sync") in events
    assert ("due", None, "2026-12-01", later, "sync") in events
    assert len(events) == 4


def test_single_assignee_is_owner_several_is_none(store: Store) -> None:
    a, b = IdentityRef(IdentityKind.GITHUB, "a"), IdentityRef(IdentityKind.GITHUB, "b")
    write(store, [rec("solo", assignees=(a,)), rec("shared", assignees=(a, b)), rec("nobody")])
    with store.transaction() as s:
        rows = dict(s.execute(select(Task.external_id, Task.owner_id)).all())
        counts = dict(s.execute(select(Task.external_id, Task.assignee_count)).all())
    assert rows["solo"] is not None and rows["shared"] is None and rows["nobody"] is None
    assert counts == {"solo": 1, "shared": 2, "nobody": 0}


def test_identities_from_config_and_by_email(store: Store) -> None:
    with store.transaction() as s:
        sync_people(s, [PersonSpec("alice", "Alice", True, (("email", "Alice@Example.com"), ("github", "alice-k")))])
    write(store, [
        rec("gh", assignees=(IdentityRef(IdentityKind.GITHUB, "Alice-K"),)),
        rec("slack", assignees=(IdentityRef(IdentityKind.SLACK, "U01", email="alice@example.com"),)),
        rec("unknown", assignees=(IdentityRef(IdentityKind.JIRA, "557058:x", display_name="Zed"),)),
    ])
    with store.transaction() as s:
        owners = dict(s.execute(select(Task.external_id, Person.key).join(Person, Task.owner_id == Person.id)).all())
        slack_ident = s.scalar(select(Identity).where(Identity.kind == "slack"))
        assert slack_ident is not None and slack_ident.person.key == "alice"
    assert owners == {"gh": "alice", "slack": "alice", "unknown": "jira:557058:x"}


def test_adding_a_person_to_config_later_adopts_their_tasks(store: Store) -> None:
    write(store, [rec("1", assignees=(IdentityRef(IdentityKind.GITHUB, "bob"),))])
    with store.transaction() as s:
        sync_people(s, [PersonSpec("bob", "Bob", False, (("github", "bob"),))])
    with store.transaction() as s:
        assert s.scalar(select(Person.key).join(Task, Task.owner_id == Person.id)) == "bob"


def test_configuring_a_person_later_merges_their_auto_created_duplicate(store: Store) -> None:
    bob = IdentityRef(IdentityKind.SLACK, "U01BOB", email="bob@x.org")
    write(store, [rec("1", assignees=(bob,))])
    with store.transaction() as s:
        assert s.scalar(select(Person.key).join(Task, Task.owner_id == Person.id)) == "slack:U01BOB"
        sync_people(s, [PersonSpec("bob", "Bob", False, (("email", "bob@x.org"),))])
    with store.transaction() as s:
        assert s.scalars(select(Person.key)).all() == ["bob"]
        idents = set(s.execute(select(Identity.kind, Identity.value)).all())
        assert idents == {("slack", "U01BOB"), ("email", "bob@x.org")}
    write(store, [rec("1", title="edited", assignees=(bob,))])  # the next Slack change stays with bob
    with store.transaction() as s:
        assert s.scalar(select(Person.key).join(Task, Task.owner_id == Person.id)) == "bob"


def test_owner_filter_finds_auto_created_people_by_the_key_tasks_json_prints(store: Store) -> None:
    write(store, [rec("1", assignees=(IdentityRef(IdentityKind.SLACK, "U01BOB"),)),
                  rec("2", assignees=(IdentityRef(IdentityKind.GITHUB, "Carol"),))])
    with store.transaction() as s:
        printed = {t["external_id"]: t["owner"] for t in (task_json(*row) for row in list_tasks(s, TaskFilter()))}
        assert printed == {"1": "slack:U01BOB", "2": "github:carol"}
        reconcile(s, "r", "warning", {t.id: Draft("m", None) for t in s.scalars(select(Task))}, T0)
    with store.transaction() as s:
        for ext, key in [("1", "slack:U01BOB"), ("2", "github:carol"), ("2", "GitHub:Carol")]:
            assert [t.external_id for t, _ in list_tasks(s, TaskFilter(owner=key))] == [ext]
            assert [v.task.external_id for v in open_findings(s, owner=key)] == [ext]


def test_find_task_by_reference_or_url(store: Store) -> None:
    write(store, [rec("acme/api#42", url="https://github.com/acme/api/issues/42"), rec("acme/api#43")], source="gh")
    with store.transaction() as s:
        by_url = find_task(s, "https://github.com/acme/api/issues/42")
        assert by_url is not None and by_url.external_id == "acme/api#42"
        assert find_task(s, "gh:acme/api#43").external_id == "acme/api#43"
        assert find_task(s, "https://github.com/acme/api/issues/43") is None
        assert find_task(s, "nope") is None


def test_links_across_sources_and_inverse(store: Store) -> None:
    links = (
        LinkRecord(LinkKind.BLOCKS, TaskRef("OPS-1", source="jira")),
        LinkRecord(LinkKind.BLOCKS, TaskRef("7"), inverse=True),  # "blocked by #7"
        LinkRecord(LinkKind.PARENT, TaskRef("9")),
    )
    write(store, [rec("1", links=links)], source="gh")
    with store.transaction() as s:
        rows = set(s.execute(select(TaskLink.src_source, TaskLink.src_external_id, TaskLink.kind,
                                    TaskLink.dst_source, TaskLink.dst_external_id)).all())
    assert rows == {("gh", "1", "blocks", "jira", "OPS-1"), ("gh", "7", "blocks", "gh", "1"),
                    ("gh", "1", "parent", "gh", "9")}
    write(store, [rec("1", title="x", links=links[:1])], source="gh")
    with store.transaction() as s:
        assert s.scalar(select(text("count(*)")).select_from(TaskLink)) == 1


def test_failed_transaction_leaves_no_trace_and_resolver_forgets(store: Store) -> None:
    resolver = IdentityResolver()
    with pytest.raises(RuntimeError), store.transaction() as s:
        TaskWriter(source="src", kind="t", resolver=resolver, now=T0).upsert(
            s, [rec("1", assignees=(IdentityRef(IdentityKind.GITHUB, "ghost"),))])
        raise RuntimeError("crash")
    resolver.rollback()
    write(store, [rec("2", assignees=(IdentityRef(IdentityKind.GITHUB, "ghost"),))], resolver=resolver)
    with store.transaction() as s:
        assert s.scalars(select(Task.external_id)).all() == ["2"]
        assert s.scalar(select(Person.key).join(Task, Task.owner_id == Person.id)) == "github:ghost"


def test_cancel_missing_only_in_named_scope(store: Store) -> None:
    write(store, [rec("a1", scope="a"), rec("a2", scope="a"), rec("b1", scope="b")])
    with store.transaction() as s:
        n = TaskWriter(source="src", kind="t", resolver=IdentityResolver(), now=T0).cancel_missing(s, "a", {"a1"})
    assert n == 1
    with store.transaction() as s:
        status = dict(s.execute(select(Task.external_id, Task.status)).all())
    assert status == {"a1": "todo", "a2": "cancelled", "b1": "todo"}
    write(store, [rec("a2", scope="a")])  # it came back: same record as before, yet rewritten
    with store.transaction() as s:
        assert s.scalar(select(Task.status).where(Task.external_id == "a2")) == "todo"


def test_priority_and_labels_round_trip(store: Store) -> None:
    write(store, [rec("1", priority=Priority.HIGH, labels=("a", "ünïcode"), extra={"k": [1, 2]})])
    with store.transaction() as s:
        task = s.scalar(select(Task))
    assert (task.priority, task.labels, task.extra) == ("high", ["a", "ünïcode"], {"k": [1, 2]})


def _other(value):
    """A different value of the same field type."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, Status):
        return Status.DONE
    if isinstance(value, Priority):
        return Priority.HIGH
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, datetime):
        return value + timedelta(seconds=1)
    if isinstance(value, date):
        return value + timedelta(days=1)
    if isinstance(value, int):
        return value + 1
    raise AssertionError(f"no variant for {value!r}")


FULL = TaskRecord(
    external_id="1", title="t", status=Status.TODO, raw_status="open", url="u", body="b", scope="s",
    assignees=(IdentityRef(IdentityKind.GITHUB, "a"),), reporter=IdentityRef(IdentityKind.GITHUB, "r"),
    due=date(2026, 1, 1), priority=Priority.LOW, labels=("l",), acceptance_criteria="ac", created_at=T0,
    updated_at=T0, closed_at=T0, status_changed_at=T0, last_activity_at=T0, original_estimate_s=1,
    remaining_estimate_s=1, time_spent_s=1, verified=False,
    links=(LinkRecord(LinkKind.BLOCKS, TaskRef("2")),), extra={"k": 1},
)
VARIANTS = {
    "assignees": (IdentityRef(IdentityKind.GITHUB, "a", email="a@x"),),
    "reporter": IdentityRef(IdentityKind.JIRA, "r"),
    "labels": ("l", "m"),
    "links": (LinkRecord(LinkKind.BLOCKS, TaskRef("2"), inverse=True),),
    "extra": {"k": 2},
}


@pytest.mark.parametrize("field", [f.name for f in __import__("dataclasses").fields(TaskRecord)])
def test_every_record_field_counts_in_the_content_hash(field: str) -> None:
    from dataclasses import replace

    from store.tasks import content_hash

    changed = replace(FULL, **{field: VARIANTS.get(field) or _other(getattr(FULL, field))})
    assert content_hash(changed) != content_hash(FULL)
    assert content_hash(replace(FULL)) == content_hash(FULL)


def test_status_since_is_kept_across_unrelated_changes(store: Store) -> None:
    write(store, [rec("1", status=Status.IN_PROGRESS, updated_at=T0)])
    write(store, [rec("1", status=Status.IN_PROGRESS, title="edited", updated_at=T0 + timedelta(days=2))])
    with store.transaction() as s:
        assert s.scalar(select(Task.status_changed_at)) == T0
    write(store, [rec("1", status=Status.BLOCKED, title="edited", updated_at=T0 + timedelta(days=3))])
    with store.transaction() as s:
        assert s.scalar(select(Task.status_changed_at)) == T0 + timedelta(days=3)


def test_trackloops_own_post_is_not_activity(store: Store) -> None:
    from store.models import OutboxAction

    write(store, [rec("1", updated_at=T0)])
    posted = T0 + timedelta(days=4)
    with store.transaction() as s:
        tid = s.scalar(select(Task.id))
        s.add(OutboxAction(key="k1", connector="src", kind="comment", text="nudge", task_id=tid, status="sent",
                           created_at=posted, next_attempt_at=posted, sent_at=posted))
    # the source's updated_at moves only because of our comment: the clock must not reset
    write(store, [rec("1", updated_at=posted + timedelta(seconds=3))], now=posted + timedelta(minutes=5))
    with store.transaction() as s:
        assert s.scalar(select(Task.last_activity_at)) == T0
    # a human's later change does count
    write(store, [rec("1", updated_at=posted + timedelta(hours=1), title="human")], now=posted + timedelta(hours=2))
    with store.transaction() as s:
        assert s.scalar(select(Task.last_activity_at)) == posted + timedelta(hours=1)


def test_own_post_recorded_late_is_still_not_activity(store: Store) -> None:
    """A lost reply: the post landed at the first attempt, the retry that found it recorded it later."""
    from store.models import OutboxAction
    from store.outbox import NewAction, claim_due, enqueue

    write(store, [rec("1", updated_at=T0)])
    first = T0 + timedelta(days=4)
    with store.transaction() as s:
        tid = s.scalar(select(Task.id))
        enqueue(s, [NewAction(key="k1", connector="src", kind="comment", text="nudge", task_id=tid)], first)
        claim_due(s, "w", first, 10, timedelta(minutes=5))
        row = s.scalar(select(OutboxAction))
        assert row.first_attempt_at == first
        row.status, row.sent_at = "sent", first + timedelta(minutes=1)  # the retry found it delivered
    write(store, [rec("1", updated_at=first + timedelta(seconds=2))], now=first + timedelta(minutes=5))
    with store.transaction() as s:
        assert s.scalar(select(Task.last_activity_at)) == T0


def test_activity_never_moves_backwards(store: Store) -> None:
    write(store, [rec("1", last_activity_at=T0 + timedelta(days=1))])
    write(store, [rec("1", last_activity_at=T0, title="older report")])
    with store.transaction() as s:
        assert s.scalar(select(Task.last_activity_at)) == T0 + timedelta(days=1)


def test_migrations_match_the_models(store: Store) -> None:
    """The Alembic history builds exactly the schema the models declare (nothing forgotten)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from store.models import Base

    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_content_hash_is_stable_across_processes() -> None:
    """The hash is stored: another process (another hash seed, other object identities) must agree."""
    import subprocess
    import sys

    from store.tasks import content_hash

    code = ("import sys; sys.path.insert(0, 'tests'); from test_store import FULL; "
            "from store.tasks import content_hash; print(content_hash(FULL))")
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin"},
                             cwd=str(__import__("pathlib").Path(__file__).parent.parent))
        assert out.stdout.strip() == content_hash(FULL)


def test_gc_pause_nests_and_restores_the_collectors_state() -> None:
    import gc

    from store.batch import gc_paused

    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():  # another thread's bulk work, say
            assert not gc.isenabled()
        assert not gc.isenabled()  # still paused until the outer pass ends
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # a collector someone else turned off stays off
    finally:
        gc.enable()
