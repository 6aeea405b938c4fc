"""The rules engine and every built-in rule, on SQLite and PostgreSQL, with time moved by a clock."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest
from sqlalchemy import select

from rules.base import business_elapsed
from rules.engine import RulesEngine, build_rules
from rules.registry import rule_types
from store.canonical import (
    IdentityKind,
    IdentityRef,
    LinkKind,
    LinkRecord,
    Priority,
    Status,
    TaskRecord,
    TaskRef,
)
from store.db import Store
from store.findings import open_findings, snooze
from store.models import Finding, Task, TaskEvent
from store.people import IdentityResolver, PersonSpec, sync_people
from store.tasks import TaskWriter

# A Monday, so business-day arithmetic is easy to follow.
NOW = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
TYPES = rule_types()
LONG_BODY = "Context: " + "the service must keep answering during the cutover. " * 2


def task(ext: str, **kw) -> TaskRecord:
    base = dict(external_id=ext, title=f"task {ext}", status=Status.TODO, raw_status="open", body=LONG_BODY,
                acceptance_criteria="works", created_at=NOW - timedelta(days=1), updated_at=NOW - timedelta(hours=1),
                assignees=(IdentityRef(IdentityKind.GITHUB, "bob"),), reporter=IdentityRef(IdentityKind.GITHUB, "rita"),
                scope="acme/api")
    base.update(kw)
    return TaskRecord(**base)


def put(store: Store, *records: TaskRecord, source: str = "gh", now: datetime = NOW) -> None:
    with store.transaction() as s:
        TaskWriter(source=source, kind="github", resolver=IdentityResolver(), now=now).upsert(s, list(records))


def run(store: Store, only: str, now: datetime = NOW, **settings) -> dict[str, str]:
    """Run one rule (others disabled); return {external_id: message} of its open findings."""
    config = {rid: cls.config_model(enabled=False) for rid, cls in TYPES.items()}
    config[only] = TYPES[only].config_model(**settings)
    if only == "dependency_at_risk":  # it reads the verdicts of these two
        config["stale_status"] = TYPES["stale_status"].config_model()
        config["overdue"] = TYPES["overdue"].config_model()
    with store.transaction() as s:
        RulesEngine(build_rules(TYPES, config), clock=lambda: now).run(s)
    with store.transaction() as s:
        return {v.task.external_id: v.finding.message for v in open_findings(s, rule=only)}


# -- missing_owner -------------------------------------------------------------------------------
def test_missing_owner(store: Store) -> None:
    put(store,
        task("none", assignees=()),
        task("shared", assignees=(IdentityRef(IdentityKind.GITHUB, "a"), IdentityRef(IdentityKind.GITHUB, "b"))),
        task("fresh", assignees=(), created_at=NOW - timedelta(minutes=30)),  # inside the 1h grace
        task("owned"),
        task("closed", assignees=(), status=Status.DONE),
        task("onhold", assignees=(), labels=("On-Hold",)),
        task("other", assignees=()) )
    put(store, task("elsewhere", assignees=()), source="jira")
    found = run(store, "missing_owner", sources=["gh"])
    assert set(found) == {"none", "shared", "other"}
    assert found["shared"].startswith("no owner: 2 people are assigned, so nobody owns it")
    assert "grace 1h" in found["none"]
    put(store, task("none"))  # someone took it
    assert set(run(store, "missing_owner", sources=["gh"])) == {"shared", "other"}


def test_owners_scope_matches_auto_created_keys_as_printed(store: Store) -> None:
    put(store, task("slack", assignees=(IdentityRef(IdentityKind.SLACK, "U01BOB"),), due=date(2026, 10, 1)),
        task("gh", due=date(2026, 10, 1)))
    assert set(run(store, "overdue", owners=["slack:U01BOB"])) == {"slack"}
    assert set(run(store, "overdue", owners=["GitHub:Bob"])) == {"gh"}


# -- stale_status --------------------------------------------------------------------------------
def test_stale_status_thresholds_per_status_in_business_days(store: Store) -> None:
    quiet = dict(updated_at=None, status_changed_at=None, created_at=NOW - timedelta(days=40))
    put(store,
        task("ip-6d", status=Status.IN_PROGRESS, last_activity_at=NOW - timedelta(days=8), **quiet),  # 5.4 bdays
        task("ip-3d", status=Status.IN_PROGRESS, last_activity_at=NOW - timedelta(days=5), **quiet),  # 3 bdays
        task("todo-10d", last_activity_at=NOW - timedelta(days=10), **quiet),
        task("blocked-3d", status=Status.BLOCKED, last_activity_at=NOW - timedelta(days=5, hours=1), **quiet),
        task("wontfix", status=Status.IN_PROGRESS, last_activity_at=NOW - timedelta(days=30), labels=("wontfix",),
             **quiet),
        now=NOW - timedelta(days=40))
    found = run(store, "stale_status")
    assert set(found) == {"ip-6d", "blocked-3d"}  # ip-3d is exactly at 3 business days: not over
    assert found["ip-6d"] == "in progress with no activity for 5 business days; threshold 3d"
    calendar = run(store, "stale_status", business_days=False)
    assert set(calendar) == {"ip-6d", "ip-3d", "blocked-3d"}


def test_stale_status_first_sync_uses_source_timestamps(store: Store) -> None:
    put(store, task("old", status=Status.IN_PROGRESS, updated_at=NOW - timedelta(days=20)), now=NOW)
    assert "old" in run(store, "stale_status")


def test_linked_activity_keeps_a_task_fresh(store: Store) -> None:
    long_ago = NOW - timedelta(days=20)
    put(store,
        task("issue", status=Status.IN_PROGRESS, updated_at=long_ago),
        task("lonely", status=Status.IN_PROGRESS, updated_at=long_ago),
        now=long_ago)
    put(store, task("pr-1", updated_at=NOW - timedelta(hours=2),
                    links=(LinkRecord(LinkKind.RELATES, TaskRef("issue")),)), now=NOW)
    found = run(store, "stale_status")
    assert "issue" not in found and "lonely" in found


def test_activity_resolves_stale_finding(store: Store) -> None:
    put(store, task("t", status=Status.IN_PROGRESS, updated_at=NOW - timedelta(days=10)), now=NOW - timedelta(days=10))
    assert "t" in run(store, "stale_status")
    put(store, task("t", status=Status.IN_PROGRESS, updated_at=NOW - timedelta(minutes=5), title="moved"))
    assert run(store, "stale_status") == {}
    with store.transaction() as s:
        finding = s.scalar(select(Finding).where(Finding.rule == "stale_status"))
        assert finding.status == "resolved" and finding.resolved_at == NOW


def test_business_elapsed() -> None:
    friday = datetime(2026, 10, 30, 12, tzinfo=UTC)
    assert business_elapsed(friday, friday + timedelta(days=3)) == timedelta(days=1)  # Fri noon -> Mon noon
    assert business_elapsed(friday, friday + timedelta(days=7 * 5)) == timedelta(days=25)
    assert business_elapsed(friday, friday - timedelta(days=1)) == timedelta(0)


# -- overdue / due_soon / no_due_date ------------------------------------------------------------------
def test_overdue(store: Store) -> None:
    put(store, task("late", due=date(2026, 10, 30)), task("today", due=date(2026, 11, 2)),
        task("done-late", due=date(2026, 10, 1), status=Status.DONE), task("x", due=date(2026, 10, 1),
                                                                         labels=("on-hold",)))
    found = run(store, "overdue")
    assert found == {"late": "overdue by 3 days (due 2026-10-30)"}
    put(store, task("late", due=date(2026, 11, 20)))
    assert run(store, "overdue") == {}


def test_due_soon_needs_quiet(store: Store) -> None:
    put(store,
        task("quiet", due=date(2026, 11, 3), updated_at=NOW - timedelta(days=3)),
        task("busy", due=date(2026, 11, 3), updated_at=NOW - timedelta(hours=2)),
        task("later", due=date(2026, 11, 5), updated_at=NOW - timedelta(days=3)),
        now=NOW - timedelta(days=5))
    found = run(store, "due_soon")
    assert found == {"quiet": "due in 1 day (2026-11-03) with no activity for 3 days"}
    assert set(run(store, "due_soon", within="3d")) == {"quiet", "later"}


def test_no_due_date_by_priority(store: Store) -> None:
    put(store, task("high", priority=Priority.HIGH), task("med", priority=Priority.MEDIUM),
        task("low", priority=Priority.LOW), task("dated", priority=Priority.HIGH, due=date(2026, 12, 1)))
    assert set(run(store, "no_due_date")) == {"high", "med"}
    assert set(run(store, "no_due_date", min_priority="high")) == {"high"}


# -- missing_context -------------------------------------------------------------------------------
def test_missing_context(store: Store) -> None:
    put(store, task("bare", body="fix it", acceptance_criteria=None),
        task("long", body=LONG_BODY, acceptance_criteria=None),
        task("ac", body="", acceptance_criteria="the page loads in < 1s"),
        task("edge", body="x" * 40, acceptance_criteria=""))
    found = run(store, "missing_context")
    assert found == {"bare": "no acceptance criteria and a 6-character description (minimum 40)"}
    assert set(run(store, "missing_context", min_body_chars=41)) == {"bare", "edge"}


# -- done_unverified ---------------------------------------------------------------------------------
def test_done_unverified_and_verification_signals(store: Store) -> None:
    done = dict(status=Status.DONE, status_changed_at=NOW - timedelta(days=3))
    put(store, task("plain", **done), task("labelled", labels=("Verified",), **done),
        task("source-verified", verified=True, **done),
        task("recent", status=Status.DONE, status_changed_at=NOW - timedelta(days=1)),
        task("ancient", status=Status.DONE, status_changed_at=NOW - timedelta(days=90)),
        task("by-cli", **done))
    with store.transaction() as s:
        tid = s.scalar(select(Task.id).where(Task.external_id == "by-cli"))
        s.add(TaskEvent(task_id=tid, at=NOW - timedelta(hours=5), field="verified", origin="user"))
    found = run(store, "done_unverified")
    assert found == {"plain": "done for 3 days with no verification (threshold 2d)"}


# -- dependency_at_risk --------------------------------------------------------------------------------
def blocks(target: str) -> tuple[LinkRecord, ...]:
    return (LinkRecord(LinkKind.BLOCKS, TaskRef(target)),)


def test_late_blocker_three_levels_down_flags_the_top(store: Store) -> None:
    put(store,
        task("top", due=date(2026, 12, 20)),
        task("mid", due=date(2026, 12, 10), links=blocks("top")),
        task("low", due=date(2026, 12, 5), links=blocks("mid")),
        task("root", due=date(2026, 10, 28), links=blocks("low")),  # overdue
        task("fine", due=date(2026, 12, 1)),
        task("helper", due=date(2026, 11, 20), links=blocks("fine")))
    found = run(store, "dependency_at_risk")
    assert set(found) == {"top", "mid", "low"}
    assert found["low"] == "blocked by gh:root, which is overdue by 5 days"
    assert found["top"] == ("blocked by gh:mid: 3 levels down, gh:root is overdue by 5 days "
                            "(gh:mid ← gh:low ← gh:root)")


def test_blocker_due_after_dependent_and_stale_blocker(store: Store) -> None:
    put(store,
        task("a", due=date(2026, 11, 10)),
        task("b", due=date(2026, 11, 20), links=blocks("a")),
        task("c"),
        task("d", status=Status.IN_PROGRESS, updated_at=NOW - timedelta(days=20), links=blocks("c")),
        now=NOW - timedelta(days=20))
    found = run(store, "dependency_at_risk")
    assert found["a"] == "blocked by gh:b, which is due 2026-11-20, after this task's 2026-11-10"
    assert found["c"].startswith("blocked by gh:d, which is stale (in progress with no activity")


@pytest.mark.parametrize("stale_settings", [dict(enabled=False), dict(sources=["jira"]), dict(labels=["team-b"]),
                                            dict(exclude_labels=["waiting"])])
def test_stale_blocker_counts_whatever_stale_status_flags(store: Store, stale_settings: dict) -> None:
    """Switching stale_status off or scoping it away from a blocker silences its nags, not the risk."""
    put(store, task("c"), task("d", status=Status.IN_PROGRESS, updated_at=NOW - timedelta(days=20),
                               labels=("waiting",), links=blocks("c")), now=NOW - timedelta(days=20))
    config = {rid: cls.config_model(enabled=False) for rid, cls in TYPES.items()}
    config["stale_status"] = TYPES["stale_status"].config_model(**stale_settings, after={"in_progress": "5d"})
    config["dependency_at_risk"] = TYPES["dependency_at_risk"].config_model()
    with store.transaction() as s:
        RulesEngine(build_rules(TYPES, config), clock=lambda: NOW).run(s)
    with store.transaction() as s:
        found = {v.task.external_id: v.finding.message for v in open_findings(s, rule="dependency_at_risk")}
        assert open_findings(s, rule="stale_status") == []  # stale_status itself says nothing about d
    assert found == {"c": "blocked by gh:d, which is stale (in progress with no activity for 14 business days; "
                          "threshold 5d)"}


def test_closed_blocker_is_no_risk(store: Store) -> None:
    put(store, task("a"), task("b", due=date(2026, 10, 1), status=Status.DONE, links=blocks("a")))
    assert run(store, "dependency_at_risk") == {}


def test_dependency_cycle_terminates_and_says_so(store: Store) -> None:
    put(store, task("x", links=blocks("y")), task("y", links=blocks("z")), task("z", links=blocks("x")),
        task("v", links=(LinkRecord(LinkKind.BLOCKS, TaskRef("x"), inverse=True),)),  # x blocks v
        task("top"), task("feeder", links=blocks("top")))
    found = run(store, "dependency_at_risk")
    assert found["x"] == "in a dependency cycle: gh:x → gh:y → gh:z → gh:x"
    assert found["y"] == found["x"] == found["z"]
    assert found["v"] == "blocked by gh:x, which is in a dependency cycle: gh:x → gh:y → gh:z → gh:x"
    assert "top" not in found and "feeder" not in found


# -- at_risk ---------------------------------------------------------------------------------------------
def test_at_risk_from_history_and_estimates(store: Store) -> None:
    history = []
    for i in range(6):  # six finished high-priority tasks in acme/api that took 10 days each
        start = NOW - timedelta(days=60 - i)
        history.append((task(f"h{i}", priority=Priority.HIGH, status=Status.IN_PROGRESS, status_changed_at=start),
                        task(f"h{i}", priority=Priority.HIGH, status=Status.DONE,
                             status_changed_at=start + timedelta(days=10))))
    for first, _ in history:
        put(store, first, now=first.status_changed_at)
    for _, second in history:
        put(store, second, now=second.status_changed_at)
    put(store,
        task("tight", priority=Priority.HIGH, due=date(2026, 11, 6)),  # 4 days left, median 10
        task("roomy", priority=Priority.HIGH, due=date(2026, 11, 30)),
        task("lowprio", priority=Priority.LOW, due=date(2026, 11, 3)),  # no history for low
        task("estimated", priority=Priority.LOW, due=date(2026, 11, 3), remaining_estimate_s=5 * 8 * 3600))
    found = run(store, "at_risk")
    assert set(found) == {"tight", "estimated"}
    assert found["tight"].startswith("due 2026-11-06 but similar tasks (6 in acme/api, high priority) take a median "
                                     "of 10.0 days")
    assert found["estimated"] == "due 2026-11-03 but 40h of work remain by its estimate; expected around 2026-11-07"
    assert set(run(store, "at_risk", min_samples=7)) == {"estimated"}


# -- the findings lifecycle ---------------------------------------------------------------------------
def test_one_open_finding_per_rule_and_task_and_who_acts(store: Store) -> None:
    with store.transaction() as s:
        sync_people(s, [PersonSpec("lena", "Lena", True, ())])
    put(store, task("owned", due=date(2026, 10, 1)), task("reported", due=date(2026, 10, 1), assignees=()),
        task("orphan", due=date(2026, 10, 1), assignees=(), reporter=None))
    run(store, "overdue")
    later = NOW + timedelta(hours=3)
    run(store, "overdue", now=later)
    with store.transaction() as s:
        rows = s.execute(select(Finding.task_id, Finding.first_seen, Finding.last_seen)).all()
        assert len(rows) == 3 and all(r.first_seen == NOW and r.last_seen == later for r in rows)
        acts = {v.task.external_id: v.act for v in open_findings(s)}
    assert acts == {"owned": "github:bob", "reported": "github:rita", "orphan": "lena"}


def test_snooze_hides_until_expiry_or_change(store: Store) -> None:
    put(store, task("a", due=date(2026, 10, 1)), task("b", due=date(2026, 10, 1)))
    run(store, "overdue")
    with store.transaction() as s:
        for ext in ("a", "b"):
            snooze(s, s.scalar(select(Task).where(Task.external_id == ext)), "overdue", NOW + timedelta(days=3))
    assert run(store, "overdue", now=NOW + timedelta(days=1)) == {}
    put(store, task("b", due=date(2026, 10, 1), title="b changed"))  # a changed task is re-evaluated
    assert set(run(store, "overdue", now=NOW + timedelta(days=1))) == {"b"}
    assert set(run(store, "overdue", now=NOW + timedelta(days=4))) == {"a", "b"}  # expired


def test_disabling_a_rule_resolves_its_findings(store: Store) -> None:
    put(store, task("late", due=date(2026, 10, 1)))
    assert run(store, "overdue")
    assert run(store, "overdue", enabled=False) == {}


# -- every rule: an exempt label keeps it quiet, and fixing the task resolves the finding --------
FIRING: dict[str, tuple[dict, dict]] = {
    # rule: (record that fires, changes that clear it)
    "missing_owner": (dict(assignees=()), dict()),
    "stale_status": (dict(status=Status.IN_PROGRESS, updated_at=NOW - timedelta(days=9)),
                     dict(status=Status.IN_PROGRESS, updated_at=NOW - timedelta(minutes=1))),
    "overdue": (dict(due=date(2026, 10, 20)), dict(due=date(2026, 12, 20))),
    "due_soon": (dict(due=date(2026, 11, 3), updated_at=NOW - timedelta(days=3)),
                 dict(due=date(2026, 11, 3), updated_at=NOW - timedelta(minutes=5))),
    "no_due_date": (dict(priority=Priority.HIGH), dict(priority=Priority.HIGH, due=date(2026, 12, 1))),
    "missing_context": (dict(body="fix", acceptance_criteria=None),
                        dict(body="fix", acceptance_criteria="done when X")),
    "done_unverified": (dict(status=Status.DONE, status_changed_at=NOW - timedelta(days=4)),
                        dict(status=Status.DONE, status_changed_at=NOW - timedelta(days=4), verified=True)),
    "at_risk": (dict(due=date(2026, 11, 4), remaining_estimate_s=10 * 8 * 3600),
                dict(due=date(2026, 11, 30), remaining_estimate_s=10 * 8 * 3600)),
}


def firing(rule_id: str, **extra) -> list[TaskRecord]:
    """Records that make `rule_id` flag the task "t" (dependency_at_risk needs its late blocker)."""
    if rule_id == "dependency_at_risk":
        return [task("t", due=date(2026, 12, 20), **extra),
                task("late", due=date(2026, 10, 28), links=blocks("t"), labels=("elsewhere-only",))]
    fires, _ = FIRING[rule_id]
    return [task("t", **fires, **extra)]


SCOPED_OUT = [("sources", ["nowhere"]), ("owners", ["nobody"]), ("labels", ["elsewhere"]),
              ("exclude_labels", ["team-a"])]


@pytest.mark.parametrize("rule_id", sorted(TYPES))
def test_every_rule_honours_its_scope(store: Store, rule_id: str) -> None:
    """Each rule fires on its fixture unscoped, and flags nothing once any scope key leaves it out."""
    assert set(TYPES) == {*FIRING, "dependency_at_risk"}  # a new rule needs a firing fixture here
    put(store, *firing(rule_id, labels=("team-a",)), now=NOW - timedelta(days=10))
    assert "t" in run(store, rule_id, exclude_labels=[])
    assert "t" in run(store, rule_id, sources=["gh"], labels=["team-a"])
    for key, value in SCOPED_OUT:
        assert "t" not in run(store, rule_id, **{key: value}), f"{rule_id} ignores {key} = {value}"


@pytest.mark.parametrize("rule_id", sorted(FIRING))
def test_exempt_label_and_resolve_path(store: Store, rule_id: str) -> None:
    fires, clears = FIRING[rule_id]
    put(store, task("t", **fires), task("held", labels=("On-Hold",), **fires), now=NOW - timedelta(days=10))
    assert set(run(store, rule_id)) == {"t"}
    put(store, task("t", **clears, title="fixed"), now=NOW)
    assert run(store, rule_id) == {}
    with store.transaction() as s:
        assert s.scalar(select(Finding.status).where(Finding.rule == rule_id)) == "resolved"


def test_dependency_at_risk_exempt_and_resolve(store: Store) -> None:
    put(store, task("top", due=date(2026, 12, 20)), task("late", due=date(2026, 10, 28), links=blocks("top")),
        task("paused", due=date(2026, 12, 20), labels=("wontfix",)),
        task("late2", due=date(2026, 10, 28), links=blocks("paused")))
    assert set(run(store, "dependency_at_risk")) == {"top"}
    put(store, task("late", due=date(2026, 10, 28), links=blocks("top"), status=Status.DONE))
    assert run(store, "dependency_at_risk") == {}


def test_parent_is_kept_fresh_by_active_children_not_the_reverse(store: Store) -> None:
    long_ago = NOW - timedelta(days=20)
    put(store, task("parent", status=Status.IN_PROGRESS, updated_at=long_ago),
        task("child", status=Status.IN_PROGRESS, updated_at=long_ago), now=long_ago)
    to_parent = (LinkRecord(LinkKind.PARENT, TaskRef("parent")),)
    put(store, task("kid", updated_at=NOW - timedelta(hours=1), links=to_parent),
        task("child", status=Status.IN_PROGRESS, updated_at=long_ago,
             links=(LinkRecord(LinkKind.PARENT, TaskRef("busy-parent")),)),
        task("busy-parent", updated_at=NOW - timedelta(hours=1)))
    found = run(store, "stale_status")
    assert "parent" not in found and "child" in found
