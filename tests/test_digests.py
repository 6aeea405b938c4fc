"""Digest content section by section, from real rule runs over a store (SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from rules.engine import RulesEngine, build_rules
from rules.registry import rule_types
from store.canonical import IdentityKind, IdentityRef, LinkKind, LinkRecord, Status, TaskRecord, TaskRef
from store.db import Store
from store.people import IdentityResolver
from store.tasks import TaskWriter
from sync.digests import DigestConfig, build, render_blocks, render_html, render_markdown, render_text

NOW = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)  # a Monday
CONFIG = DigestConfig(to=["alice"], schedule="0 9 * * *")


def task(ext: str, **kw) -> TaskRecord:
    base = dict(external_id=ext, title=f"task {ext}", status=Status.TODO, raw_status="open",
                body="Context: " + "enough words to be clear about it. " * 3, acceptance_criteria="works",
                created_at=NOW - timedelta(days=20), updated_at=NOW - timedelta(hours=1),
                assignees=(IdentityRef(IdentityKind.GITHUB, "bob"),), scope="acme/api")
    base.update(kw)
    return TaskRecord(**base)


def put(store: Store, *records: TaskRecord, now: datetime) -> None:
    with store.transaction() as s:
        TaskWriter(source="gh", kind="github", resolver=IdentityResolver(), now=now).upsert(s, list(records))


def rules(store: Store, now: datetime) -> None:
    with store.transaction() as s:
        RulesEngine(build_rules(rule_types(), {}), clock=lambda: now).run(s)


def section(text: str, title: str) -> list[str]:
    """The lines of one section of the text digest, without its heading."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{title} ("))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith("  ")), len(lines))
    return lines[start + 1 : end]


def test_every_section_and_what_was_newly_flagged(store: Store) -> None:
    earlier = NOW - timedelta(days=1)
    put(store,
        task("stale", status=Status.IN_PROGRESS, updated_at=NOW - timedelta(days=9)),
        task("soon", due=date(2026, 11, 3), updated_at=NOW - timedelta(days=3)),
        task("shipped", status=Status.DONE, status_changed_at=NOW - timedelta(days=4)),
        task("top", due=date(2026, 12, 20)),
        task("late", due=date(2026, 10, 28), links=(LinkRecord(LinkKind.BLOCKS, TaskRef("top")),)),
        task("big", due=date(2026, 11, 4), remaining_estimate_s=10 * 8 * 3600),
        now=NOW - timedelta(days=10))
    rules(store, earlier)
    put(store, task("fresh", due=date(2026, 10, 30)), now=NOW)  # overdue, flagged only in today's run
    rules(store, NOW)
    with store.transaction() as s:
        content = build(s, "leads", CONFIG, NOW, since=NOW - timedelta(hours=2))
    text = render_text(content)
    counts = text.splitlines()[2:9]
    assert counts == ["Open: 6", "Unowned: 0", "Stale: 1", "Overdue: 2", "At risk: 2", "Done, not verified: 1",
                      "Blocked: 0"]
    assert section(text, "At risk") == [  # grouped by owner: bob is known by his GitHub login only
        "  github:bob",
        "    - gh:top task top: blocked by gh:late, which is overdue by 5 days",
        "    - gh:big task big: due 2026-11-04 but 80h of work remain by its estimate; expected around 2026-11-14",
    ]
    assert section(text, "Due soon") == [
        "  github:bob", "    - gh:soon task soon: due in 1 day (2026-11-03) with no activity for 3 days"]
    assert section(text, "Stale") == [
        "  github:bob", "    - gh:stale task stale: in progress with no activity for 5 business days; threshold 3d"]
    assert section(text, "Done, not verified") == [
        "  github:bob", "    - gh:shipped task shipped: done for 4 days with no verification (threshold 2d)"]
    assert [line for line in section(text, "Overdue") if line.startswith("    - ")] == [
        "    - gh:late task late: overdue by 5 days (due 2026-10-28)",
        "    - gh:fresh task fresh: overdue by 3 days (due 2026-10-30)",
    ]
    changes = text[text.index("Since "):].splitlines()
    assert changes[1:] == ["  New (1)", "    - gh:fresh task fresh",
                           "  Newly flagged (1)", "    - gh:fresh task fresh: overdue by 3 days (due 2026-10-30)"]
    md, page = render_markdown(content), render_html(content)
    for title in ("At risk (2)", "Due soon (1)", "Stale (1)", "Done, not verified (1)"):
        assert f"## {title}" in md and f"<h2>{title}</h2>" in page
        assert any(block.get("text", {}).get("text") == title for block in render_blocks(content))
    assert "**Newly flagged (1)**" in md and "<h3>Newly flagged (1)</h3>" in page
