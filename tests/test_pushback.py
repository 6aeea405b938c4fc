"""Push-back end to end: findings -> outbox -> GitHub/Jira comments and Slack DMs, each exactly once.

Real connectors talk to the loopback stand-ins; time is moved by a clock.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from connectors.registry import connector_types
from store.db import Store
from store.models import Finding, OutboxAction
from store.outbox import action_json
from sync.config import parse_config
from sync.pipeline import Pipeline
from sync.standins.github import GithubStandin
from sync.standins.jira import JiraStandin
from sync.standins.slack import SlackStandin

NOW = datetime(2026, 11, 3, 10, 0, tzinfo=UTC)  # a Tuesday, 11:00 in Berlin
BOB_SLACK, ALICE_SLACK = "U0BOB", "U0ALICE"


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def world() -> Iterator[dict[str, Any]]:
    gh, slack, jira = GithubStandin(), SlackStandin(), JiraStandin("cloud")
    for standin in (gh, slack, jira):
        standin.start()
        standin.set_now(NOW - timedelta(hours=1))
    gh.add_repo("acme/api")
    slack.add_channel("C0OPS", "ops")
    slack.add_channel("C0TRIAGE", "triage")
    slack.add_user(BOB_SLACK, "bob", email="bob@example.com")
    slack.add_user(ALICE_SLACK, "alice", email="alice@example.com")
    jira.add_user("acc-bob", name="bob", display_name="Bob", email="bob@example.com")
    jira.add_issue("OPS-100", summary="Keep the lights on", assignee="acc-bob")
    yield {"gh": gh, "slack": slack, "jira": jira}
    for standin in (gh, slack, jira):
        standin.stop()


def make(world: dict[str, Any], store: Store, clock: Clock, notify: dict[str, Any] | None,
         digests: dict[str, Any] | None = None, rules: dict[str, Any] | None = None, **top: Any) -> Pipeline:
    data: dict[str, Any] = {
        "store": {"url": store.url},
        "people": {
            "alice": {"email": "alice@example.com", "github": "alice-k", "slack": ALICE_SLACK, "lead": True},
            "bob": {"email": "bob@example.com", "github": "bob-o", "slack": BOB_SLACK, "jira": "acc-bob"},
        },
        "connectors": {
            "gh": {"type": "github", "token": "test-token", "base_url": world["gh"].base_url, "repos": ["acme/api"]},
            "slack": {"type": "slack", "token": world["slack"].token, "base_url": world["slack"].base_url + "/api/",
                      "channels": ["C0OPS"]},
            "jira": {"type": "jira", "url": world["jira"].base_url, "auth": "basic", "email": world["jira"].email,
                     "token": world["jira"].token, "jql": "project = OPS", "deployment": "cloud"},
        },
        "rules": {rid: {"enabled": False} for rid in ("missing_context", "no_due_date", "stale_status", "due_soon",
                                                       "at_risk", "dependency_at_risk", "done_unverified")},
    }
    data["rules"].update(rules or {})
    data.update(top)
    if notify is not None:
        data["notify"] = notify
    if digests is not None:
        data["digests"] = digests
    config = parse_config(data, env={}, connector_types=connector_types())
    return Pipeline(store, config, connector_types(), clock=clock, worker="test-worker")


def cycle(pipeline: Pipeline) -> Any:
    """What `trackloop sync` does: pull, rules, plan, then deliver what is due."""
    report = pipeline.sync()
    pipeline.deliver_outbox()
    return report


def overdue_issue(gh: GithubStandin, title: str = "Rotate the keys", assignee: str = "bob-o", **kw: Any) -> int:
    issue = gh.add_issue("acme/api", title=title, assignees=(assignee,) if assignee else (),
                         milestone_due=datetime(2026, 10, 30, tzinfo=UTC), **kw)
    return issue["number"]


def comments_by_bot(gh: GithubStandin, number: int) -> list[str]:
    return [c["body"] for c in gh.comments("acme/api", number) if c["user"] == "trackloop-bot"]


def dms(slack: SlackStandin, user: str) -> list[dict[str, Any]]:
    return slack.sent(slack.open_im(user))


def outbox(store: Store) -> list[tuple[str, str]]:
    with store.transaction() as s:
        return [(r.key, r.status) for r in s.scalars(select(OutboxAction).order_by(OutboxAction.id))]


def test_without_notify_nothing_is_queued_or_posted(world, store: Store) -> None:
    clock = Clock()
    n = overdue_issue(world["gh"])
    report = make(world, store, clock, None).sync()
    assert report.ok and report.plan is None
    assert outbox(store) == [] and comments_by_bot(world["gh"], n) == []


def test_comment_and_dm_each_delivered_once_across_a_crash_after_the_post(world, store: Store) -> None:
    gh, slack, clock = world["gh"], world["slack"], Clock()
    n = overdue_issue(gh)
    pipeline = make(world, store, clock, {"comment_on_source": ["overdue"], "dm_owner": ["overdue"]})
    # the remote accepts each post, then the reply is lost: trackloop believes it failed
    gh.inject(r"/issues/\d+/comments$", method="POST", status=502, kind="after")
    slack.inject(r"chat\.postMessage", method="POST", status=502, kind="after")
    cycle(pipeline)
    pipeline.deliver_outbox()
    assert {status for _, status in outbox(store)} == {"pending"}  # both failed, both will retry
    assert len(comments_by_bot(gh, n)) == 1 and len(dms(slack, BOB_SLACK)) == 1
    clock.now += timedelta(minutes=10)  # past the back-off
    report = pipeline.deliver_outbox()
    assert report.already_delivered == 2 and report.sent == 0
    assert outbox(store) == [(f"overdue:gh:acme/api#{n}:comment:task:0", "sent"),
                             (f"overdue:gh:acme/api#{n}:dm:bob:0", "sent")]
    assert len(comments_by_bot(gh, n)) == 1 and len(dms(slack, BOB_SLACK)) == 1
    body = comments_by_bot(gh, n)[0]
    assert "overdue by 4 days (due 2026-10-30)." in body and "<!-- trackloop:overdue:gh:acme/api#" in body
    dm = dms(slack, BOB_SLACK)[0]
    assert dm["metadata"]["event_payload"]["key"] == f"overdue:gh:acme/api#{n}:dm:bob:0"
    assert f"gh:acme/api#{n}" in dm["text"]


def test_jira_comment_once_even_when_the_store_is_lost(world, store: Store, tmp_path) -> None:
    jira, clock = world["jira"], Clock()
    jira.add_issue("OPS-1", summary="Renew the certificate", assignee="acc-bob", duedate="2026-10-28")
    cycle(make(world, store, clock, {"comment_on_source": ["overdue"]}))
    assert len(jira.comments("OPS-1")) == 1
    fresh = Store(f"sqlite:///{tmp_path / 'rebuilt.db'}")  # the store is lost: same keys are planned again
    cycle(make(world, fresh, clock, {"comment_on_source": ["overdue"]}))
    assert outbox(fresh) == [("overdue:jira:OPS-1:comment:task:0", "sent")]
    assert len(jira.comments("OPS-1")) == 1
    fresh.close()


def test_dry_run_prints_actions_and_changes_nothing(world, store: Store) -> None:
    gh, clock = world["gh"], Clock()
    n = overdue_issue(gh)
    pipeline = make(world, store, clock, {"comment_on_source": ["overdue"], "dm_owner": ["overdue"]})
    report = pipeline.sync(dry_run=True)
    assert [p.action.key for p in report.plan.actions] == [
        f"overdue:gh:acme/api#{n}:comment:task:0", f"overdue:gh:acme/api#{n}:dm:bob:0"]
    assert report.plan.actions[1].action.target == BOB_SLACK
    with store.transaction() as s:
        assert s.scalar(select(Finding.id)) is None
    assert outbox(store) == [] and comments_by_bot(gh, n) == [] and world["slack"].sent() == []
    again = pipeline.sync(dry_run=True)  # repeatable
    assert [p.action.key for p in again.plan.actions] == [p.action.key for p in report.plan.actions]


def test_caps_hold_back_and_the_oldest_go_first_next_run(world, store: Store) -> None:
    gh, clock = world["gh"], Clock()
    numbers = []
    for i in range(5):
        numbers.append(overdue_issue(gh, title=f"task {i}"))
    pipeline = make(world, store, clock, {"comment_on_source": ["overdue", "missing_owner"],
                                          "max_actions_per_run": 2})
    first = cycle(pipeline)
    assert len(first.plan.actions) == 2 and first.plan.held_back == 3
    clock.now += timedelta(hours=1)
    second = cycle(pipeline)
    assert len(second.plan.actions) == 2 and second.plan.held_back == 1
    clock.now += timedelta(hours=1)
    cycle(pipeline)
    keys = [k for k, _ in outbox(store)]
    assert sorted(keys) == sorted(f"overdue:gh:acme/api#{n}:comment:task:0" for n in numbers)
    assert all(len(comments_by_bot(gh, n)) == 1 for n in numbers)


def test_one_action_per_task_and_target_per_day(world, store: Store) -> None:
    gh, clock = world["gh"], Clock()
    n = overdue_issue(gh, assignee="", created_at=NOW - timedelta(days=1))  # overdue and unowned: one target
    pipeline = make(world, store, clock, {"comment_on_source": ["overdue", "missing_owner"]})
    first = cycle(pipeline)
    assert len(first.plan.actions) == 1 and first.plan.held_back == 1
    clock.now += timedelta(hours=3)
    assert len(cycle(pipeline).plan.actions) == 0  # same day
    clock.now += timedelta(days=1)
    assert len(cycle(pipeline).plan.actions) == 1  # the other one, next day
    assert len(comments_by_bot(gh, n)) == 2


def test_quiet_hours_and_working_days(world, store: Store) -> None:
    gh, clock = world["gh"], Clock()
    overdue_issue(gh)
    clock.now = datetime(2026, 11, 3, 20, 30, tzinfo=UTC)  # 21:30 in Berlin
    notify = {"comment_on_source": ["overdue"], "quiet_hours": "20:00-08:00", "timezone": "Europe/Berlin",
              "working_days": ["mon", "tue", "wed", "thu", "fri"]}
    report = make(world, store, clock, notify).sync()
    assert report.plan.paused == "quiet hours (20:00-08:00 Europe/Berlin)" and outbox(store) == []
    clock.now = datetime(2026, 11, 7, 12, 0, tzinfo=UTC)  # Saturday
    assert make(world, store, clock, notify).sync().plan.paused == "sat is not a working day"
    clock.now = datetime(2026, 11, 9, 7, 30, tzinfo=UTC)  # Monday 08:30 in Berlin
    assert len(make(world, store, clock, notify).sync().plan.actions) == 1


def test_retries_wait_out_quiet_hours(world, store: Store) -> None:
    """A failed attempt's retry, or `outbox retry`, is no follow-up at 21:30 or on a Saturday."""
    from store.outbox import retry_failed

    gh, clock = world["gh"], Clock()
    n = overdue_issue(gh)
    notify = {"comment_on_source": ["overdue"], "quiet_hours": "20:00-08:00", "timezone": "Europe/Berlin",
              "working_days": ["mon", "tue", "wed", "thu", "fri"], "max_attempts": 1}
    pipeline = make(world, store, clock, notify)
    gh.inject(r"/issues/\d+/comments$", method="POST", status=502, times=1)
    cycle(pipeline)
    assert [status for _, status in outbox(store)] == ["failed"]
    clock.now = datetime(2026, 11, 3, 20, 30, tzinfo=UTC)  # 21:30 in Berlin
    with store.transaction() as s:
        assert retry_failed(s, clock.now) == 1
    report = pipeline.deliver_outbox()
    assert report.sent == 0 and report.paused == "quiet hours (20:00-08:00 Europe/Berlin)"
    clock.now = datetime(2026, 11, 7, 12, 0, tzinfo=UTC)  # Saturday
    assert pipeline.deliver_outbox().sent == 0 and comments_by_bot(gh, n) == []
    clock.now = datetime(2026, 11, 9, 7, 30, tzinfo=UTC)  # Monday 08:30 in Berlin
    assert pipeline.deliver_outbox().sent == 1 and len(comments_by_bot(gh, n)) == 1


def test_action_whose_finding_resolved_is_cancelled_not_sent(world, store: Store) -> None:
    gh, clock = world["gh"], Clock()
    n = overdue_issue(gh)
    pipeline = make(world, store, clock, {"comment_on_source": ["overdue"], "max_attempts": 3})
    gh.inject(r"/issues/\d+/comments$", method="POST", status=502, times=1)
    cycle(pipeline)
    key = f"overdue:gh:acme/api#{n}:comment:task:0"
    assert outbox(store) == [(key, "pending")]  # waiting for its retry
    gh.set_now(NOW + timedelta(minutes=1))
    gh.update_issue("acme/api", n, state="closed")  # done meanwhile: nothing is overdue any more
    clock.now += timedelta(minutes=10)
    pipeline.sync()
    report = pipeline.deliver_outbox()
    assert report.cancelled == 1 and report.sent == 0
    assert outbox(store) == [(key, "cancelled")] and comments_by_bot(gh, n) == []
    with store.transaction() as s:
        row = s.scalar(select(OutboxAction))
        assert action_json(row)["status"] == "cancelled" and "resolved" in row.last_error
    gh.update_issue("acme/api", n, state="open")  # it reopens, still late: a new finding is followed up
    clock.now += timedelta(minutes=10)
    cycle(pipeline)
    assert outbox(store)[-1] == (f"overdue:gh:acme/api#{n}:comment:task:1", "sent")


def test_reminders_follow_remind_every_and_escalation_goes_to_the_lead(world, store: Store) -> None:
    gh, slack, clock = world["gh"], world["slack"], Clock()
    n = overdue_issue(gh)
    pipeline = make(world, store, clock, {"dm_owner": ["overdue"], "remind_every": "3d", "escalate_after": "5d"})
    cycle(pipeline)
    clock.now += timedelta(days=2)
    cycle(pipeline)
    assert len(dms(slack, BOB_SLACK)) == 1
    clock.now += timedelta(days=1, minutes=5)
    cycle(pipeline)
    texts = [m["text"] for m in dms(slack, BOB_SLACK)]
    assert len(texts) == 2 and texts[1].startswith("Reminder: ")
    assert dms(slack, ALICE_SLACK) == []
    clock.now += timedelta(days=2)
    cycle(pipeline)
    escalations = dms(slack, ALICE_SLACK)
    assert len(escalations) == 1 and "Still open after 5d (owner: bob)" in escalations[0]["text"]
    assert f"overdue:gh:acme/api#{n}:escalate:alice:0" in [k for k, _ in outbox(store)]


def test_verification_is_asked_once_and_only_for_observed_transitions(world, store: Store) -> None:
    gh, clock = world["gh"], Clock()
    already = gh.add_issue("acme/api", title="Closed long ago", state="closed", user="rita")["number"]
    open_one = gh.add_issue("acme/api", title="Ship the fix", body="## Acceptance criteria\n- the page loads",
                            user="rita")["number"]
    pipeline = make(world, store, clock, {"comment_on_source": []})
    cycle(pipeline)
    gh.set_now(NOW + timedelta(minutes=30))
    gh.update_issue("acme/api", open_one, state="closed")
    clock.now += timedelta(hours=1)
    cycle(pipeline)
    clock.now += timedelta(days=1)
    cycle(pipeline)
    asks = comments_by_bot(gh, open_one)
    assert len(asks) == 1 and "was marked done" in asks[0] and "the page loads" in asks[0]
    plain = asks[0].replace("\\`", "`")  # GitHub Markdown escapes the plain text's backticks
    assert f"Add the `verified` label or run `trackloop verify gh:acme/api#{open_one}`." in plain
    assert "reply" not in asks[0]  # a reply is no verification signal
    assert comments_by_bot(gh, already) == []


def test_verification_asks_name_the_sources_own_signals(world, store: Store) -> None:
    """Labels only where tasks have labels (with the configured names), ✅ in Slack, the CLI always."""
    from dataclasses import asdict

    from sync.messages import how_to_verify

    gh, slack, clock = world["gh"], world["slack"], Clock()
    n = gh.add_issue("acme/api", title="Shipped", state="closed", assignees=("bob-o",),
                     closed_at=NOW - timedelta(days=3))["number"]
    pipeline = make(world, store, clock, {"comment_on_source": ["done_unverified"], "dm_owner": ["done_unverified"]},
                    rules={"done_unverified": {"verified_labels": ["qa-ok"]}})
    cycle(pipeline)
    [comment] = comments_by_bot(gh, n)
    plain = comment.replace("\\`", "`")
    assert f"Add the `verified` or `qa-ok` label or run `trackloop verify gh:acme/api#{n}`." in plain
    [dm] = dms(slack, BOB_SLACK)
    assert "`qa-ok`" in dm["text"] and "reply" not in dm["text"]
    signals = pipeline.planner.signals
    assert how_to_verify("jira:OPS-1", **asdict(signals["jira"])) == (
        "Add the `qa-ok` label, move it to “Verified”, or run `trackloop verify jira:OPS-1`.")
    assert how_to_verify("slack:C1/1.2", **asdict(signals["slack"])) == (
        "React with ✅ (someone other than the owner) or run `trackloop verify slack:C1/1.2`.")


HOSTILE = "<!channel> @here <script>alert(1)</script> [x](https://evil.example) " + "A" * 10_000


def test_hostile_titles_cannot_ping_or_inject(world, store: Store) -> None:
    """The title travels in DMs, triage notes and digests (Slack, Markdown, HTML); none of them
    lets it ping, link or inject markup. (Comments on the task itself do not repeat its title.)"""
    from sync.digests import render_html, render_markdown

    gh, slack, clock = world["gh"], world["slack"], Clock()
    overdue_issue(gh, title=HOSTILE)
    overdue_issue(gh, title=HOSTILE, assignee="")
    pipeline = make(world, store, clock, {"dm_owner": ["overdue"],
                                          "triage_channel": {"connector": "slack", "channel": "C0TRIAGE"}},
                    digests={"leads": {"to": ["alice"], "schedule": "0 9 * * *", "sources": ["gh"]}},
                    rules={"missing_owner": {"grace": "0s"}})
    cycle(pipeline)
    [dm] = dms(slack, BOB_SLACK)
    [note] = slack.sent("C0TRIAGE")
    for text in (dm["text"], note["text"]):
        assert "<!channel>" not in text and "<script>" not in text and "@here" not in text
        assert "<https://evil" not in text and len(text) < 1000  # mrkdwn links are <url|text>
    pipeline.send_digest("leads")
    [digest] = dms(slack, ALICE_SLACK)
    blocks = json.dumps(digest["blocks"], ensure_ascii=False)
    assert "<!channel>" not in blocks and "@here" not in blocks and "<script>" not in blocks
    assert "&lt;!channel&gt;" in blocks  # the title is there, as text
    assert "<https://evil.example" not in blocks and "<https://github.com/acme/api/issues/1|" in blocks
    content = pipeline.digest("leads").content
    md = render_markdown(content)
    assert "](https://evil.example)" not in md and "\\[x\\]\\(https://evil.example\\)" in md
    assert "<script>" not in md and "@here" not in md
    page = render_html(content)
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert all(len(line) < 2000 for line in page.splitlines())  # 10 kB titles are cut short


@pytest.mark.parametrize("url", ["javascript:alert(1)", "JaVaScRiPt:alert(1)", "data:text/html,<b>x</b>",
                                 "ftp://files.example/x", "//evil.example/x", "not a url", ""])
def test_digest_links_only_http_urls(url: str) -> None:
    """A CSV source's URL is free text: anything but http(s) shows no link in any renderer."""
    from sync.digests import render_blocks, render_html, render_markdown, render_text

    content = one_item_digest(url)
    assert "href" not in render_html(content) and "](" not in render_markdown(content)
    assert "|gh:1>" not in json.dumps(render_blocks(content)) and " <" not in render_text(content)


def test_digest_links_percent_encode_what_would_end_them() -> None:
    from sync.digests import render_blocks, render_html, render_markdown, render_text

    content = one_item_digest('https://x.example/a|b>c<d (e)"f\'g h')
    encoded = "https://x.example/a%7Cb%3Ec%3Cd%20%28e%29%22f%27g%20h"
    assert f"[gh:1]({encoded})" in render_markdown(content)
    assert f'<a href="{encoded}">gh:1</a>' in render_html(content)
    assert f"<{encoded}|gh:1>" in json.dumps(render_blocks(content))
    assert f"<{encoded}>" in render_text(content)


def one_item_digest(url: str, *, items: int = 1, max_items: int = 200) -> Any:
    from sync.digests import DigestContent, Item, Section

    section = Section("Overdue", total=items)
    section.by_owner["bob"] = [Item(f"gh:{n}", f"task {n}", url, "overdue by 1 day")
                               for n in range(1, min(items, max_items) + 1)]
    return DigestContent("leads", NOW, None, [("Open", items), ("Overdue", items)], [section], [])


def test_every_renderer_counts_what_max_items_leaves_out() -> None:
    from sync.digests import render_blocks, render_html, render_markdown, render_text

    content = one_item_digest("https://x.example/1", items=5, max_items=2)
    assert "  … and 3 more" in render_text(content).splitlines()
    assert "… and 3 more" in render_markdown(content).splitlines()
    assert "<p>… and 3 more</p>" in render_html(content)
    assert "… and 3 more" in json.dumps(render_blocks(content), ensure_ascii=False)


def test_triage_channel_gets_unowned_work(world, store: Store) -> None:
    gh, slack, clock = world["gh"], world["slack"], Clock()
    n = overdue_issue(gh, title="Nobody's job", assignee="", created_at=NOW - timedelta(days=2))
    cycle(make(world, store, clock, {"triage_channel": {"connector": "slack", "channel": "C0TRIAGE"}}))
    [note] = slack.sent("C0TRIAGE")
    assert note["text"].startswith(f"Needs an owner: gh:acme/api#{n}")


def test_failed_actions_park_and_can_be_retried(world, store: Store) -> None:
    from store.outbox import retry_failed

    gh, clock = world["gh"], Clock()
    n = overdue_issue(gh)
    pipeline = make(world, store, clock, {"comment_on_source": ["overdue"], "max_attempts": 2})
    gh.inject(r"/issues/\d+/comments$", method="POST", status=502, times=2)
    cycle(pipeline)
    clock.now += timedelta(minutes=10)
    pipeline.deliver_outbox()
    assert outbox(store) == [(f"overdue:gh:acme/api#{n}:comment:task:0", "failed")]
    with store.transaction() as s:
        assert retry_failed(s, clock.now) == 1
    assert pipeline.deliver_outbox().sent == 1
    assert len(comments_by_bot(gh, n)) == 1


# -- digests -----------------------------------------------------------------------------------
def test_digest_sections_and_changes(world, store: Store) -> None:
    gh, clock = world["gh"], Clock()
    overdue_issue(gh, title="Late work")
    gh.add_issue("acme/api", title="Unowned work", created_at=NOW - timedelta(days=2))
    gh.add_issue("acme/api", title="Waiting on vendor", labels=("blocked",), assignees=("bob-o",))
    pipeline = make(world, store, clock, {"comment_on_source": []},
                    digests={"leads": {"to": ["alice"], "schedule": "0 9 * * *", "via": ["slack"],
                                       "sources": ["gh"]}})
    cycle(pipeline)
    text = pipeline.digest("leads").content
    from sync.digests import render_markdown, render_text

    out = render_text(text)
    lines = out.splitlines()
    assert "Open: 3" in lines and "Unowned: 1" in lines and "Overdue: 1" in lines and "Blocked: 1" in lines
    assert lines.index("Overdue (1)") < lines.index("Unowned (1)") < lines.index("Blocked (1)")
    assert "  bob" in lines and "  no owner" in lines
    assert any(line.startswith("    - gh:acme/api#1 Late work: overdue by 4 days") for line in lines)
    assert not any(line.startswith(("Stale (", "At risk (", "Done, not verified (")) for line in lines)  # empty
    assert "Since" not in out  # a first digest has nothing to compare with
    md = render_markdown(text)
    assert "## Overdue (1)" in md and "[gh:acme/api\\#1](https://github.com/acme/api/issues/1)" in md
    from sync.digests import render_html

    page = render_html(text)
    assert '<a href="https://github.com/acme/api/issues/1">gh:acme/api#1</a> Late work' in page

    pipeline.send_digest("leads")  # what changed is counted from here
    gh.set_now(NOW + timedelta(hours=2))
    gh.add_issue("acme/api", title="Fresh request", assignees=("bob-o",))
    gh.update_issue("acme/api", 3, state="closed")
    clock.now = datetime(2026, 11, 4, 9, 5, tzinfo=UTC)
    cycle(pipeline)
    later = render_text(pipeline.digest("leads").content)
    since = later[later.index("Since Tue 03 Nov"):].splitlines()
    assert since[1:5] == ["  New (1)", "    - gh:acme/api#4 Fresh request", "  Closed (1)",
                          "    - gh:acme/api#3 Waiting on vendor"]


def test_digest_owners_match_auto_created_keys_as_printed(store: Store) -> None:
    from store.canonical import IdentityKind, IdentityRef, Status, TaskRecord
    from store.people import IdentityResolver
    from store.tasks import TaskWriter
    from sync.digests import DigestConfig, build

    with store.transaction() as s:
        TaskWriter(source="chat", kind="slack", resolver=IdentityResolver(), now=NOW).upsert(s, [
            TaskRecord(external_id=str(i), title="t", status=Status.TODO, raw_status="open",
                       assignees=(IdentityRef(IdentityKind.SLACK, who),))
            for i, who in enumerate(["U01BOB", "U02EVE", "U02EVE"])])
    with store.transaction() as s:
        for owner, n in (("slack:U01BOB", 1), ("slack:U02EVE", 2)):
            content = build(s, "d", DigestConfig(to=["#ops"], owners=[owner]), NOW, None)
            assert ("Open", n) in content.counts


def test_digest_all_clear_is_one_line(world, store: Store) -> None:
    clock = Clock()
    pipeline = make(world, store, clock, None, digests={"leads": {"to": ["alice"], "sources": ["gh"]}})
    cycle(pipeline)
    from sync.digests import render_text

    out = render_text(pipeline.digest("leads").content).splitlines()
    assert out[1] == "All clear: 0 open tasks, nothing needs follow-up." and len(out) == 2


def test_digest_sent_once_per_slot_and_block_kit_limits_for_2000_tasks(world, store: Store) -> None:
    gh, slack, clock = world["gh"], world["slack"], Clock()
    for i in range(2000):
        gh.add_issue("acme/api", title=f"Overdue task {i} " + "x" * 60, assignees=("bob-o",),
                     milestone_due=datetime(2026, 10, 1, tzinfo=UTC))
    pipeline = make(world, store, clock, None,
                    digests={"leads": {"to": ["alice", "C0OPS"], "schedule": "0 9 * * *", "max_items": 2000}})
    cycle(pipeline)
    sent = pipeline.send_due_digests()
    assert [r.name for r in sent] == ["leads"]
    parts = dms(slack, ALICE_SLACK)
    assert len(parts) > 1 and all(len(p["blocks"]) <= 50 for p in parts)  # the stand-in enforces limits too
    assert all(p["metadata"]["event_payload"]["key"].startswith("digest:leads:2026-11-03T09:00:00+00:00:slack")
               for p in parts)
    assert len(slack.sent("C0OPS")) == len(parts)
    clock.now += timedelta(hours=2)  # same slot: a restart does not send again
    assert pipeline.send_due_digests() == []
    assert len(dms(slack, ALICE_SLACK)) == len(parts)
    clock.now = datetime(2026, 11, 4, 9, 1, tzinfo=UTC)
    assert [r.name for r in pipeline.send_due_digests()] == ["leads"]
    assert date(2026, 11, 4) == clock.now.date()


def test_email_digest_goes_through_smtp_without_an_imap_connector(world, store: Store, smtp_sink: Any) -> None:
    gh, clock = world["gh"], Clock()
    overdue_issue(gh, title="Late work")
    smtp = {"host": smtp_sink.host, "port": smtp_sink.port, "starttls": False, "sender": "trackloop@example.com"}
    pipeline = make(world, store, clock, None, smtp=smtp,
                    digests={"leads": {"to": ["alice"], "via": ["email"], "schedule": "0 9 * * *"}})
    cycle(pipeline)
    [run] = pipeline.send_due_digests()
    assert run.missed == [] and [a.connector for a in run.actions] == ["[smtp]"]
    [mail] = smtp_sink.messages
    assert mail["From"] == "trackloop@example.com" and mail["To"] == "alice@example.com"
    assert mail["Subject"].startswith("trackloop digest “leads”") and mail["Message-ID"].endswith("@example.com>")
    assert "Late work" in mail.get_body(("plain",)).get_content()
    assert "Late work" in mail.get_body(("html",)).get_content()
    assert outbox(store) == [(run.actions[0].key, "sent")]
    assert pipeline.send_due_digests() == [] and len(smtp_sink.messages) == 1  # once per slot


@pytest.mark.parametrize(("smtp", "why"), [
    (None, "there is neither an imap connector nor [smtp]"),
    ({"host": "smtp.example.com", "username": "bot"}, "[smtp] sets no sender"),
])
def test_email_digest_with_no_way_to_send_fails_at_config_load(smtp: dict[str, Any] | None, why: str) -> None:
    from store.errors import ConfigError

    data: dict[str, Any] = {"people": {"alice": {"email": "alice@example.com"}},
                            "digests": {"leads": {"to": ["alice"], "via": ["email"]}}}
    if smtp:
        data["smtp"] = smtp
    with pytest.raises(ConfigError) as caught:
        parse_config(data, env={}, connector_types=connector_types())
    [problem] = caught.value.problems
    assert problem.path == "digests.leads.via" and problem.message == f"cannot email 'alice': {why}"
    data["smtp"] = {"host": "smtp.example.com", "username": "bot@example.com"}  # a login that is an address
    assert parse_config(data, env={}, connector_types=connector_types()).smtp.from_address == "bot@example.com"
