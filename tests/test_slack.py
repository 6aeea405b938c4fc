"""The `slack` connector: mapping units, then scenarios through slack-sdk, the stand-in, the engine, a store.

The stand-in (sync/standins/slack.py) is driven by the real `WebClient`; nothing is monkeypatched.
Both clocks (the stand-in's and the engine's) are the test's `Clock`, so no test sleeps.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from connectors.errors import AuthError, PushError, TransientError
from connectors.slack import (
    CaptureRules,
    SlackConfig,
    SlackConnector,
    SlackCursor,
    capture_reason,
    datetime_ts,
    escape_mrkdwn,
    fit_block,
    malformed,
    message_to_task,
    parse_due,
    render_text,
    split_digest,
    ts_datetime,
)
from store.canonical import Action, IdentityKind, Status, SyncState
from store.db import Store
from store.errors import ConfigError
from store.models import Task, TaskEvent
from store.queries import TaskFilter, list_tasks, task_json
from sync.config import parse_config
from sync.engine import SyncEngine, SyncResult
from sync.standins.slack import SlackStandin
from tests.conftest import Clock
from tests.contract import ConnectorContract

OPS, MIG = "C0OPS", "C0MIG"
ALICE, BOB, CAROL, DEPLOYBOT = "U01ALICE", "U02BOB", "U03CAROL", "U09DEPLOY"
RULES = CaptureRules(
    capture=frozenset({"task", "eyes"}),
    prefixes=("TODO:", "action item:"),
    done=frozenset({"white_check_mark"}),
    assign=("raising_hand",),
)
USERS = {
    ALICE: {"id": ALICE, "name": "alice", "tz": "America/New_York",
            "profile": {"display_name": "alice", "real_name": "Alice Kim", "email": "alice@example.com"}},
    BOB: {"id": BOB, "name": "bob", "profile": {"display_name": "", "real_name": "Bob Otieno",
                                                "email": "bob@example.com"}},
    CAROL: {"id": CAROL, "name": "carol", "profile": {"real_name": "Carol Diaz"}},
}


# -- mapping units: doc-shaped payloads (docs.slack.dev/reference/methods/conversations.history) --------
def message(**fields: Any) -> dict[str, Any]:
    base = {"type": "message", "user": ALICE, "text": "hello", "ts": "1793602800.000100"}
    return {**base, **fields}


def test_render_text_names_mentions_channels_links_and_entities() -> None:
    names = {ALICE: "alice", BOB: "Bob Otieno"}
    text = ("<@U02BOB> and <@U404|old> see <#C0OPS|ops>, <#C0MIG>, <https://x.example/a?b=1|the doc>, "
            "<mailto:a@b.c|a@b.c>, <https://plain.example> &lt;tag&gt; &amp; <!here> <!subteam^S1|@sre>")
    assert render_text(text, names) == (
        "@Bob Otieno and @old see #ops, #C0MIG, the doc, a@b.c, https://plain.example <tag> & @here @sre"
    )
    assert render_text("", names) == ""


def test_escape_mrkdwn_defuses_markup_and_broadcasts() -> None:
    escaped = escape_mrkdwn("a <!channel> & <@U1> > b @here")
    assert escaped == "a &lt;!channel&gt; &amp; &lt;@U1&gt; &gt; b @\u2060here"
    assert "<" not in escape_mrkdwn("<https://evil|click>")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("please fix by Friday", date(2026, 11, 6)),  # 2026-11-02 is a Monday
        ("by monday", date(2026, 11, 2)),  # the same day counts
        ("by next Monday", date(2026, 11, 9)),
        ("by next fri", date(2026, 11, 13)),
        ("due 2026-12-03", date(2026, 12, 3)),
        ("Deadline: 2026-12-03.", date(2026, 12, 3)),
        ("by tomorrow please", date(2026, 11, 3)),
        ("by end of week", date(2026, 11, 6)),
        ("by the end of the week", date(2026, 11, 6)),
        ("by EOW", date(2026, 11, 6)),
        ("by EOD", date(2026, 11, 2)),
        ("by EOD Thursday", date(2026, 11, 5)),
        ("by end of month", date(2026, 11, 30)),
        ("by Dec 3rd", date(2026, 12, 3)),
        ("due on 3 December 2027", date(2027, 12, 3)),
        ("by the 15th of January", date(2027, 1, 15)),  # half a year gone this year: next year's
        ("by Oct 30", date(2026, 10, 30)),  # just past: overdue, not next year
        ("by next week", date(2026, 11, 9)),
        ("reviewed by alice, due 2026-11-20", date(2026, 11, 20)),  # "by alice" is no date
        ("by the way, nothing due", None),
        ("by 2026-02-30", None),  # no such day
        ("by 3pm", None),
        ("standby mode on the monitor", None),
        ("", None),
    ],
)
def test_parse_due(text: str, expected: date | None) -> None:
    assert parse_due(text, date(2026, 11, 2)) == expected


def test_capture_reason_prefix_reaction_and_what_never_counts() -> None:
    assert capture_reason(message(text="  todo: rotate certs"), RULES) == "prefix:TODO:"
    assert capture_reason(message(text="Action item: write notes"), RULES) == "prefix:action item:"
    assert capture_reason(message(text="no todo: here"), RULES) is None
    reacted = message(text="DNS cutover?", reactions=[{"name": "eyes", "users": [BOB], "count": 1}])
    assert capture_reason(reacted, RULES) == "reaction:eyes"
    assert capture_reason(reacted, RULES, bots={BOB}) is None  # only a bot reacted
    bot_post = message(subtype="bot_message", bot_id="B1", user=None, text="TODO: from a bot")
    assert capture_reason(bot_post, RULES) is None  # bots are captured only by a person's reaction
    bot_post["reactions"] = [{"name": "task", "users": [ALICE], "count": 1}]
    assert capture_reason(bot_post, RULES) == "reaction:task"
    own = message(text="TODO: x", bot_id="B0",
                  metadata={"event_type": "trackloop_action", "event_payload": {}})
    assert capture_reason(own, RULES) is None
    assert capture_reason(message(subtype="channel_join", text="TODO: joined"), RULES) is None


def test_malformed_names_the_fault() -> None:
    assert malformed(message()) is None
    assert malformed(message(ts="yesterday")) == "bad ts 'yesterday'"
    assert malformed(message(text=["x"])) == "text is not a string"
    assert malformed(message(reactions={"name": "x"})) == "reactions are malformed"
    assert malformed(message(edited={"user": ALICE})) == "edited is malformed"
    assert malformed("not a message") == "not an object"


def test_message_to_task_maps_a_prefixed_message_with_thread() -> None:
    msg = message(
        text="TODO: rotate the certs for <@U02BOB> by Friday\nsee <#C0OPS|ops>",
        edited={"user": ALICE, "ts": "1793606400.000000"},
        thread_ts="1793602800.000100", reply_count=2, latest_reply="1793610000.000300",
        reactions=[{"name": "thumbsup", "users": [CAROL], "count": 1}],
        client_msg_id="ab12", team="T0ACME", blocks=[{"type": "rich_text", "elements": []}],  # odd extras
    )
    thread = [
        {"type": "message", "user": BOB, "text": "on it, <@U01ALICE>", "ts": "1793606000.000200",
         "thread_ts": "1793602800.000100"},
        {"type": "message", "subtype": "bot_message", "bot_id": "B9", "text": "deploy done",
         "ts": "1793610000.000300", "thread_ts": "1793602800.000100"},
    ]
    task = message_to_task(OPS, msg, rules=RULES, users=USERS, thread=thread, url="https://acme/p1")
    assert task.external_id == "C0OPS:1793602800.000100" and task.scope == OPS
    assert task.title == "Rotate the certs for @Bob Otieno by Friday"
    assert task.body == (
        "TODO: rotate the certs for @Bob Otieno by Friday\nsee #ops\n\n"
        "Bob Otieno: on it, @alice\nbot: deploy done"
    )
    assert [a.value for a in task.assignees] == [BOB]  # the first person mentioned
    assert task.assignees[0].email == "bob@example.com" and task.assignees[0].kind is IdentityKind.SLACK
    assert task.reporter is not None and task.reporter.display_name == "alice"
    # Friday after Monday 2026-11-02 in alice's zone (the message is 07:00 UTC = 02:00 in New York)
    assert task.due == date(2026, 11, 6)
    assert (task.status, task.raw_status, task.verified) == (Status.TODO, "open", False)
    assert task.created_at == datetime(2026, 11, 2, 7, 0, 0, 100, tzinfo=UTC)
    # the bot's reply moved updated_at, not last_activity_at (bob's reply is the latest human act)
    assert task.updated_at == ts_datetime("1793610000.000300")
    assert task.last_activity_at == max(ts_datetime("1793606400.000000"), ts_datetime("1793606000.000200"))
    assert task.extra == {"channel": OPS, "ts": "1793602800.000100", "thread_ts": "1793602800.000100",
                          "captured_by": "prefix:TODO:", "reply_count": 2, "done_by": []}


def test_message_to_task_done_verified_and_assign_reaction() -> None:
    msg = message(text="DNS cutover, <@U03CAROL>?", reactions=[
        {"name": "task", "users": [BOB], "count": 1},
        {"name": "raising_hand", "users": [BOB], "count": 1},
        {"name": "white_check_mark", "users": [BOB], "count": 1},
    ])
    done_at = datetime(2026, 11, 3, tzinfo=UTC)
    own = message_to_task(OPS, msg, rules=RULES, users=USERS, reactions_at=done_at, done_at=done_at)
    assert [a.value for a in own.assignees] == [BOB]  # a claim beats a mention
    assert (own.status, own.verified, own.closed_at) == (Status.DONE, False, done_at)  # the owner ticked it
    msg["reactions"][2]["users"] = [BOB, ALICE]
    other = message_to_task(OPS, msg, rules=RULES, users=USERS, reactions_at=done_at, done_at=done_at)
    assert other.verified is True and other.extra["done_by"] == [BOB, ALICE]
    assert other.last_activity_at == done_at
    gone = message_to_task(OPS, msg, rules=RULES, users=USERS, captured=False)
    assert (gone.status, gone.raw_status) == (Status.CANCELLED, "no longer captured")


def test_message_to_task_odd_messages() -> None:
    files_only = message(text="", subtype="file_share",
                         files=[{"id": "F1", "name": "runbook.pdf", "title": ""}])
    assert message_to_task(OPS, files_only, rules=RULES, users={}).title == "File: runbook.pdf"
    unknown_author = message(user="U0GONE", text="TODO: " + "x" * 300)
    task = message_to_task(OPS, unknown_author, rules=RULES, users={})
    assert len(task.title) == 200 and task.title.endswith("…")
    assert task.reporter is not None and task.reporter.email is None
    bot = message(user=None, subtype="bot_message", bot_id="B1", text="disk full on db-2")
    task = message_to_task(OPS, bot, rules=RULES, users={})
    assert task.reporter is None and task.last_activity_at is None  # a bot is not human activity
    alert = message(user=None, subtype="bot_message", bot_id="B2", text="", attachments=[
        {"id": 1, "color": "danger", "fallback": "[FIRING] disk 91% on db-2", "text": "details"}])
    assert message_to_task(OPS, alert, rules=RULES, users={}).title == "[FIRING] disk 91% on db-2"
    mentions_only_bots = message(text="TODO: ask <@U09DEPLOY>", user=ALICE)
    assert message_to_task(OPS, mentions_only_bots, rules=RULES, users={}, bots={DEPLOYBOT}).assignees == ()
    empty = message(text="   \n")
    assert message_to_task(OPS, empty, rules=RULES, users={}).title == "(no text)"
    reply = message(ts="1793602900.000100", thread_ts="1793602800.000100", parent_user_id=BOB, text="TODO: x")
    assert message_to_task(OPS, reply, rules=RULES, users={}).extra["thread_ts"] == "1793602800.000100"


def test_ts_round_trip() -> None:
    when = datetime(2026, 11, 2, 7, 0, 0, 100, tzinfo=UTC)
    assert datetime_ts(when) == "1793602800.000100"
    assert ts_datetime("1793602800.000100") == when


def test_fit_block_respects_every_limit() -> None:
    long_section = {"type": "section", "block_id": "s1",
                    "text": {"type": "mrkdwn", "text": ("line\n" * 1400)},
                    "accessory": {"type": "button", "text": {"type": "plain_text", "text": "Go"}}}
    parts = fit_block(long_section)
    assert len(parts) == 3 and all(len(p["text"]["text"]) <= 3000 for p in parts)
    assert parts[0]["block_id"] == "s1" and "accessory" in parts[0]
    assert all("block_id" not in p and "accessory" not in p for p in parts[1:])  # ids stay unique
    header = fit_block({"type": "header", "text": {"type": "plain_text", "text": "H" * 200}})[0]
    assert len(header["text"]["text"]) == 150
    fields = fit_block({"type": "section", "fields": [{"type": "mrkdwn", "text": "f" * 2500}] * 23})
    assert [len(p["fields"]) for p in fields] == [10, 10, 3]
    assert all(len(f["text"]) <= 2000 for p in fields for f in p["fields"])
    one_line = fit_block({"type": "section", "text": {"type": "plain_text", "text": "y" * 7000}})
    assert [len(p["text"]["text"]) for p in one_line] == [3000, 3000, 1000]
    loud = fit_block({"type": "section",
                      "text": {"type": "mrkdwn", "text": "hey <!channel> and <!here|here>"}})
    assert "<!" not in loud[0]["text"]["text"]
    context = fit_block({"type": "context", "elements": [{"type": "mrkdwn", "text": "c"}] * 12})
    assert [len(p["elements"]) for p in context] == [10, 2]


def test_split_digest_never_ends_a_part_on_a_header() -> None:
    blocks = [{"type": "section", "text": {"type": "mrkdwn", "text": f"s{i}"}} for i in range(49)]
    blocks += [{"type": "header", "text": {"type": "plain_text", "text": "Next"}}]
    blocks += [{"type": "section", "text": {"type": "mrkdwn", "text": "after"}}]
    parts = split_digest(blocks)
    assert [len(p) for p in parts] == [49, 2] and parts[1][0]["type"] == "header"
    assert [len(p) for p in split_digest([{"type": "divider"}] * 120)] == [50, 50, 20]


# -- config ------------------------------------------------------------------------------------------
def config_problems(section: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config({"connectors": {"team": section}}, env={}, connector_types={"slack": SlackConnector})
    return [str(p) for p in info.value.problems]


def test_config_rejects_bad_values_with_readable_messages() -> None:
    base = {"type": "slack", "token": "xoxb-1", "channels": ["C0OPS"]}
    assert config_problems({**base, "channels": ["ops"]}) == [
        'connectors.team.channels: expected a channel id like "C0123ABCD" or a name like "#ops", got \'ops\''
    ]
    assert config_problems({**base, "capture": {"reactions": ["white check"]}}) == [
        "connectors.team.capture.reactions: "
        "expected an emoji name like \"white_check_mark\", got 'white check'"
    ]
    assert config_problems({**base, "lookback": "14d"}) == [
        "connectors.team: backfill must be at least as long as lookback"
    ]
    assert config_problems({**base, "chanels": []}) == ["connectors.team.chanels: unknown key"]
    no_token = config_problems({"type": "slack", "channels": ["C0OPS"]})
    assert no_token == ["connectors.team.token: required key is missing"]
    bad_url = config_problems({**base, "base_url": "slack.com"})
    assert bad_url[0].startswith("connectors.team.base_url: expected")


def test_config_accepts_the_issue_example_and_keeps_the_token_secret() -> None:
    config = parse_config(
        {"connectors": {"slack": {
            "type": "slack", "token": "${SLACK_BOT_TOKEN}", "base_url": "https://slack.com/api",
            "channels": ["C0OPS", "#migrations"], "capture": {"reactions": [":task:", "eyes"],
                                                              "prefixes": ["TODO:", "action item:"]},
            "done": {"reactions": ["white_check_mark"]}, "interval": "2m"}}},
        env={"SLACK_BOT_TOKEN": "xoxb-very-secret"},
        connector_types={"slack": SlackConnector},
    )
    section = config.connectors["slack"]
    assert isinstance(section, SlackConfig)
    assert section.capture.reactions == ["task", "eyes"] and section.base_url == "https://slack.com/api/"
    assert section.lookback == timedelta(days=7) and section.interval == timedelta(minutes=2)
    assert "xoxb-very-secret" not in repr(section) and "xoxb-very-secret" in config.secrets()


# -- the stand-in world ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server() -> Iterator[SlackStandin]:
    with SlackStandin() as standin:
        yield standin


@pytest.fixture
def slack(server: SlackStandin, clock: Clock) -> SlackStandin:
    server.reset()
    server.set_now(clock.now)
    server.add_user(ALICE, "alice", email="alice@example.com", real_name="Alice Kim")
    server.add_user(BOB, "bob", email="bob@example.com", real_name="Bob Otieno")
    server.add_user(CAROL, "carol", email="carol@example.com", real_name="Carol Diaz")
    server.add_user(DEPLOYBOT, "deploybot", is_bot=True)
    server.add_channel(OPS, "ops")
    server.add_channel(MIG, "migrations")
    return server


PEOPLE = {"alice": {"email": "alice@example.com"}, "bob": {"email": "bob@example.com"},
          "carol": {"email": "carol@example.com", "slack": CAROL}}


def section(slack: SlackStandin, **overrides: Any) -> dict[str, Any]:
    return {"type": "slack", "token": slack.token, "base_url": slack.base_url + "/api/",
            "channels": [OPS], "capture": {"reactions": ["task", "eyes"]}, "retry": {"max_wait": "60s"},
            **overrides}


def engine(store: Store, slack: SlackStandin, clock: Clock, **overrides: Any) -> SyncEngine:
    config = parse_config(
        {"store": {"url": store.url}, "people": PEOPLE, "connectors": {"team": section(slack, **overrides)}},
        env={}, connector_types={"slack": SlackConnector},
    )
    return SyncEngine(store, config, {"slack": SlackConnector}, clock=clock)


def sync(
    store: Store, slack: SlackStandin, clock: Clock, *, full: bool = False, **overrides: Any
) -> SyncResult:
    [result] = engine(store, slack, clock, **overrides).run(full=full)
    assert result.ok, result.error
    return result


def later(slack: SlackStandin, clock: Clock, **delta: float) -> datetime:
    """Move both clocks: the stand-in's (message timestamps) and the engine's."""
    clock.advance(**delta)
    slack.set_now(clock.now)
    return clock.now


def tasks(store: Store) -> dict[str, dict[str, Any]]:
    with store.transaction() as session:
        found = list_tasks(session, TaskFilter(include_closed=True))
        return {t.external_id: task_json(t, key) | {"verified": t.verified, "extra": t.extra, "body": t.body}
                for t, key in found}


def at(iso: str | None) -> datetime | None:
    return datetime.fromisoformat(iso).astimezone(UTC).replace(tzinfo=UTC) if iso else None


def requests_by_method(slack: SlackStandin) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in slack.requests():
        counts[r.path.removeprefix("/api/")] = counts.get(r.path.removeprefix("/api/"), 0) + 1
    return counts


# -- scenarios ---------------------------------------------------------------------------------------
def test_capture_by_reaction_and_by_prefix(store: Store, slack: SlackStandin, clock: Clock) -> None:
    todo = slack.post(OPS, ALICE, "TODO: rotate the wildcard cert, <@U02BOB> by Friday")
    asked = slack.post(OPS, BOB, "can someone look at the DNS cutover?")
    slack.react(OPS, asked, "eyes", CAROL)
    slack.post(OPS, BOB, "lunch?")  # chatter stays chatter
    slack.post(OPS, CAROL, None, subtype="channel_join")  # type: ignore[arg-type]
    slack.post(OPS, None, "", files=[{"id": "F1", "name": "graph.png"}])  # files only, no user
    bot_alert = slack.post(OPS, None, "TODO: disk 91% on db-2", subtype="bot_message", bot_id="B9")
    by_bot = slack.post(OPS, BOB, "is the backup job green?")
    slack.react(OPS, by_bot, "task", DEPLOYBOT)  # a bot's capture reaction does not count
    parent = slack.post(OPS, CAROL, "migration plan for the reporting db")
    inner = slack.reply(OPS, parent, BOB, "action item: snapshot the replica first")

    sync(store, slack, clock)
    found = tasks(store)
    assert set(found) == {f"{OPS}:{todo}", f"{OPS}:{asked}", f"{OPS}:{inner}"}
    assert bot_alert not in {k.split(":")[1] for k in found}
    cert = found[f"{OPS}:{todo}"]
    assert cert["title"] == "Rotate the wildcard cert, @bob by Friday"
    assert (cert["owner"], cert["due"], cert["status"]) == ("bob", "2026-11-06", "todo")
    assert cert["url"] == f"https://acme.slack.com/archives/{OPS}/p{todo.replace('.', '')}"
    dns = found[f"{OPS}:{asked}"]
    assert (dns["owner"], dns["extra"]["captured_by"]) == (None, "reaction:eyes")
    snapshot = found[f"{OPS}:{inner}"]
    assert snapshot["title"] == "Snapshot the replica first"
    assert snapshot["extra"]["thread_ts"] == parent and "?thread_ts=" in snapshot["url"]
    with store.transaction() as session:
        reporters = {t.external_id: t.reporter_id for t in session.scalars(select(Task))}
    assert all(reporters.values())


def test_a_bot_user_cannot_capture_by_prefix(store: Store, slack: SlackStandin, clock: Clock) -> None:
    slack.add_user("U08CIBOT", "cibot")
    slack.post(OPS, DEPLOYBOT, "TODO: x")  # users.info says is_bot, though the post has no bot_id
    slack.post(OPS, "U08CIBOT", "TODO: rerun the nightly build")  # `bots` names it
    flagged = slack.post(OPS, DEPLOYBOT, "TODO: restart the canary")
    slack.react(OPS, flagged, "task", ALICE)  # a person's capture reaction still counts
    sync(store, slack, clock, bots=["cibot"])
    found = tasks(store)
    assert list(found) == [f"{OPS}:{flagged}"] and found[f"{OPS}:{flagged}"]["extra"]["captured_by"] == "reaction:task"


def test_reaction_added_later_inside_the_lookback_window_is_seen(
    store: Store, slack: SlackStandin, clock: Clock
) -> None:
    old = slack.post(OPS, BOB, "who owns the VPN certificate renewal?")
    recent = slack.post(OPS, BOB, "the NAS is beeping")
    sync(store, slack, clock, lookback="3d", backfill="10d")
    assert tasks(store) == {}

    later(slack, clock, days=2)
    slack.react(OPS, recent, "task", ALICE)
    seen_at = later(slack, clock, hours=1)
    sync(store, slack, clock, lookback="3d", backfill="10d")
    found = tasks(store)
    assert list(found) == [f"{OPS}:{recent}"]
    # Slack does not date reactions: the sync that first saw it does.
    assert at(found[f"{OPS}:{recent}"]["last_activity_at"]) == seen_at

    later(slack, clock, days=2)  # `old` is now 4 days old, outside the 3-day window
    slack.react(OPS, old, "task", ALICE)
    sync(store, slack, clock, lookback="3d", backfill="10d")
    assert list(tasks(store)) == [f"{OPS}:{recent}"], "the look-back window bounds what is re-read"


def test_thread_activity_resets_staleness(store: Store, slack: SlackStandin, clock: Clock) -> None:
    ts = slack.post(OPS, ALICE, "TODO: decommission the old build server")
    sync(store, slack, clock)
    key = f"{OPS}:{ts}"
    assert at(tasks(store)[key]["last_activity_at"]) == ts_datetime(ts)

    later(slack, clock, days=5)
    reply = slack.reply(OPS, ts, BOB, "blocked on the license export, will do Thursday")
    later(slack, clock, minutes=10)
    sync(store, slack, clock)
    task = tasks(store)[key]
    assert at(task["last_activity_at"]) == ts_datetime(reply)
    assert "bob: blocked on the license export" in task["body"]
    with store.transaction() as session:
        events = session.execute(select(TaskEvent.field, TaskEvent.new, TaskEvent.actor)
                                 .where(TaskEvent.field == "activity")).all()
    assert [tuple(e) for e in events] == [("activity", "reply", BOB)]

    later(slack, clock, days=1)
    slack.post(OPS, DEPLOYBOT, "build server drained", thread_ts=ts, bot_id="B9")
    slack.reply(OPS, ts, DEPLOYBOT, "and powered off")  # a bot user without bot_id: users.info says is_bot
    sync(store, slack, clock)
    task = tasks(store)[key]
    assert at(task["last_activity_at"]) == ts_datetime(reply), "bots never count as activity"
    assert "and powered off" in task["body"]


def test_captured_reply_reactions_and_edits_are_seen_while_the_thread_is_quiet(
    store: Store, slack: SlackStandin, clock: Clock
) -> None:
    parent = slack.post(OPS, CAROL, "migration plan for the reporting db")
    reply = slack.reply(OPS, parent, BOB, "action item: snapshot the replica first")
    sync(store, slack, clock, lookback="3d", backfill="3d")
    key = f"{OPS}:{reply}"
    assert tasks(store)[key]["status"] == "todo"

    slack.reset_log()
    later(slack, clock, hours=1)  # the thread does not move: a reaction and an edit on the reply
    slack.react(OPS, reply, "white_check_mark", ALICE)
    slack.edit(OPS, reply, "action item: snapshot the replica first, then the primary")
    sync(store, slack, clock, lookback="3d", backfill="3d")
    task = tasks(store)[key]
    assert (task["status"], task["title"]) == ("done", "Snapshot the replica first, then the primary")
    assert requests_by_method(slack)["conversations.replies"] == 1  # the one thread holding a captured reply

    # The parent leaves the window, the captured reply (posted 2 days later) is still inside it.
    later(slack, clock, days=2)
    late = slack.reply(OPS, parent, ALICE, "action item: drop the old replica")
    sync(store, slack, clock, lookback="3d", backfill="3d")
    later(slack, clock, days=2)
    slack.react(OPS, late, "white_check_mark", BOB)
    slack.reset_log()
    result = sync(store, slack, clock, lookback="3d", backfill="3d")
    assert tasks(store)[f"{OPS}:{late}"]["status"] == "done"
    assert result.upserts.updated == 1  # the first reply, now outside the window, is frozen as last seen
    assert requests_by_method(slack) == {"conversations.history": 1, "conversations.replies": 1,
                                         "users.info": 2}

    later(slack, clock, days=2)  # no captured reply is in the window any more: back to one call
    slack.reset_log()
    sync(store, slack, clock, lookback="3d", backfill="3d")
    assert requests_by_method(slack) == {"conversations.history": 1}


def test_done_reaction_by_someone_else_is_verified(store: Store, slack: SlackStandin, clock: Clock) -> None:
    ts = slack.post(OPS, ALICE, "TODO: <@U02BOB> renew the support contract")
    sync(store, slack, clock)
    key = f"{OPS}:{ts}"

    done_at = later(slack, clock, hours=3)
    slack.react(OPS, ts, "white_check_mark", BOB)  # the owner ticks it
    sync(store, slack, clock)
    task = tasks(store)[key]
    assert (task["status"], task["verified"], at(task["closed_at"])) == ("done", False, done_at)

    later(slack, clock, hours=1)
    slack.react(OPS, ts, "white_check_mark", CAROL)
    slack.react(OPS, ts, "tada", ALICE)
    sync(store, slack, clock)
    task = tasks(store)[key]
    assert task["verified"] is True and at(task["closed_at"]) == done_at  # still done since then

    later(slack, clock, hours=1)
    slack.unreact(OPS, ts, "white_check_mark", BOB)
    slack.unreact(OPS, ts, "white_check_mark", CAROL)
    sync(store, slack, clock)
    assert tasks(store)[key]["status"] == "todo"


def test_assign_reaction_makes_the_owner(store: Store, slack: SlackStandin, clock: Clock) -> None:
    ts = slack.post(OPS, ALICE, "TODO: ask <@U02BOB> about the printer lease")
    slack.react(OPS, ts, "raising_hand", CAROL)
    sync(store, slack, clock)
    assert tasks(store)[f"{OPS}:{ts}"]["owner"] == "carol"  # carol is configured by her Slack id
    later(slack, clock, minutes=5)
    slack.react(OPS, ts, "raising_hand", BOB)
    sync(store, slack, clock)
    assert tasks(store)[f"{OPS}:{ts}"]["owner"] is None  # two claimants: shared, no single owner


def test_uncaptured_is_cancelled_and_full_sync_cancels_deleted(
    store: Store, slack: SlackStandin, clock: Clock
) -> None:
    keep = slack.post(OPS, ALICE, "TODO: order disks")
    flagged = slack.post(OPS, BOB, "printer on 3rd floor jammed")
    slack.react(OPS, flagged, "task", ALICE)
    doomed = slack.post(OPS, ALICE, "TODO: remove me")
    sync(store, slack, clock)
    assert len(tasks(store)) == 3

    later(slack, clock, hours=1)
    slack.unreact(OPS, flagged, "task", ALICE)
    slack.delete(OPS, doomed)
    result = sync(store, slack, clock)
    found = tasks(store)
    assert found[f"{OPS}:{flagged}"]["status"] == "cancelled"
    assert found[f"{OPS}:{doomed}"]["status"] == "todo"  # a plain sync cannot tell deleted from old
    assert result.upserts.cancelled == 0

    full = sync(store, slack, clock, full=True)
    assert full.upserts.cancelled == 1
    found = tasks(store)
    assert found[f"{OPS}:{doomed}"]["status"] == "cancelled" and found[f"{OPS}:{keep}"]["status"] == "todo"


def test_odd_history_items_never_crash(store: Store, slack: SlackStandin, clock: Clock) -> None:
    threaded = slack.post(OPS, ALICE, "TODO: retire the old jump host")
    slack.reply(OPS, threaded, BOB, "ok")
    slack.post(OPS, None, "", subtype="message_changed")  # an edit event: no user, no task
    slack.post(OPS, None, "", subtype="message_deleted")
    slack.post(OPS, BOB, "/giphy", subtype="me_message")
    slack.post(OPS, BOB, "TODO: ping", subtype="channel_topic")
    sync(store, slack, clock)
    assert [t["title"] for t in tasks(store).values()] == ["Retire the old jump host"]
    later(slack, clock, hours=1)
    slack.delete(OPS, threaded)  # a parent with replies stays as a tombstone
    sync(store, slack, clock)
    task = tasks(store)[f"{OPS}:{threaded}"]
    assert (task["title"], task["status"]) == ("Retire the old jump host", "todo")  # not overwritten
    assert sync(store, slack, clock, full=True).upserts.cancelled == 1


def test_full_listing_vouches_only_for_channels_read_before(slack: SlackStandin, clock: Clock) -> None:
    slack.post(OPS, ALICE, "TODO: one")
    config = SlackConfig(**section(slack))
    cold = list(SlackConnector("team", config, clock=clock).pull(SyncState(full=True)))
    assert [p.completed_scopes for p in cold] == [()]  # no cursor: a lost one may hide older tasks
    cursor = cold[-1].cursor
    assert cursor is not None and cursor.channels[OPS].floor == datetime_ts(clock.now - timedelta(days=7))
    full = list(SlackConnector("team", config, clock=clock).pull(SyncState(cursor=cursor, full=True)))
    assert [p.completed_scopes for p in full] == [[OPS]] and len(full[0].tasks) == 1


def test_request_counts_cold_incremental_idle(store: Store, slack: SlackStandin, clock: Clock) -> None:
    for i in range(30):
        slack.post(OPS, ALICE if i % 2 else BOB, f"message {i}")
    todos = [slack.post(OPS, ALICE, f"TODO: task {i} <@U02BOB>") for i in range(5)]
    slack.react(MIG, slack.post(MIG, CAROL, "cut over the mail relay"), "task", ALICE)
    thread = slack.post(MIG, CAROL, "plan for Friday")
    slack.reply(MIG, thread, BOB, "sounds good")

    cold = sync(store, slack, clock, channels=["#ops", "#migrations"], page_size=20)
    # list 1 + history ops 2 pages + history mig 1 + replies 1 + one permalink per channel (the
    # other top-level links follow its form) + users alice, bob, carol
    assert requests_by_method(slack) == {"conversations.list": 1, "conversations.history": 3,
                                         "conversations.replies": 1, "chat.getPermalink": 2, "users.info": 3}
    assert cold.requests.requests == len(slack.requests()) == 10
    assert cold.upserts.inserted == 6
    for key, task in tasks(store).items():  # every link is the one the server would have given
        channel, ts = key.split(":")
        assert task["url"] == slack._chat_get_permalink({"channel": channel, "message_ts": ts})["permalink"]

    slack.reset_log()
    later(slack, clock, minutes=5)
    idle = sync(store, slack, clock, channels=["#ops", "#migrations"], page_size=20)
    assert requests_by_method(slack) == {"conversations.history": 3}  # names cached; nothing moved
    assert (idle.requests.requests, idle.upserts.updated, idle.upserts.inserted) == (3, 0, 0)

    slack.reset_log()
    later(slack, clock, minutes=5)
    slack.reply(OPS, todos[0], CAROL, "done?")  # a thread moved
    slack.react(OPS, todos[1], "white_check_mark", BOB)  # a reaction came
    slack.post(OPS, BOB, "TODO: one more")  # a new task
    incremental = sync(store, slack, clock, channels=["#ops", "#migrations"], page_size=20)
    # history ops 2 + mig 1, replies of the moved thread 1, one new permalink, users alice/bob/carol once
    assert requests_by_method(slack) == {"conversations.history": 3, "conversations.replies": 1,
                                         "chat.getPermalink": 1, "users.info": 3}
    assert (incremental.upserts.inserted, incremental.upserts.updated) == (1, 2)


def test_a_quiet_channel_costs_one_call_once_its_newest_message_leaves_the_window(
    store: Store, slack: SlackStandin, clock: Clock
) -> None:
    ts = slack.post(OPS, ALICE, "TODO: archive the 2025 tickets")
    slack.reply(OPS, ts, BOB, "on it")
    sync(store, slack, clock)
    later(slack, clock, days=8)  # nothing posted since: the read starts at that (now old) message
    slack.reset_log()
    idle = sync(store, slack, clock)
    assert requests_by_method(slack) == {"conversations.history": 1}
    assert (idle.upserts.inserted, idle.upserts.updated) == (0, 0)


def test_rate_limit_storm_is_ridden_out(store: Store, slack: SlackStandin, clock: Clock) -> None:
    parent = slack.post(OPS, ALICE, "TODO: patch the hypervisors")
    slack.reply(OPS, parent, BOB, "tonight?")
    slack.inject(r"/api/conversations\.(history|replies)$", status=429, retry_after=0, times=4)
    result = sync(store, slack, clock)
    assert result.requests.retries == 4 and result.note is None
    assert [r.status for r in slack.requests(path_pattern="history")] == [429, 429, 429, 429, 200]
    assert len(tasks(store)) == 1

    # A Retry-After beyond retry.max_wait stops the sync cleanly; the next run resumes.
    later(slack, clock, minutes=2)
    slack.post(OPS, ALICE, "TODO: second")
    slack.inject(r"/api/conversations\.history$", status=429, retry_after=600, times=1)
    stopped = sync(store, slack, clock, channels=[MIG, OPS])
    assert stopped.note is not None and "rate limited for 600s" in stopped.note
    assert len(tasks(store)) == 1
    resumed = sync(store, slack, clock, channels=[MIG, OPS])
    assert resumed.upserts.inserted == 1 and len(tasks(store)) == 2


def test_one_unreadable_channel_does_not_stop_the_others(
    store: Store, slack: SlackStandin, clock: Clock
) -> None:
    slack.add_channel("C0PRIV", "private", is_member=False)
    slack.post(OPS, ALICE, "TODO: still captured")
    [result] = engine(store, slack, clock, channels=["C0PRIV", OPS, "#nope"]).run()
    assert not result.ok
    assert result.error == ("slack team: cannot read C0PRIV: not_in_channel; "
                            "#nope: no such channel, or the bot cannot see it")
    assert len(tasks(store)) == 1


def test_auth_failure_is_one_line_and_not_retried(store: Store, slack: SlackStandin, clock: Clock) -> None:
    [result] = engine(store, slack, clock, token="xoxb-not-the-token").run()
    assert not result.ok
    assert result.error == "slack connector 'team': token refused (invalid_auth); check `token`"
    assert len(slack.requests()) == 1
    config = SlackConfig(**section(slack, token="xoxb-not-the-token"))
    check = SlackConnector("team", config).check()
    assert not check.ok and "xoxb-not-the-token" not in check.detail
    good = SlackConnector("team", SlackConfig(**section(slack))).check()
    assert good.ok and good.detail == "authenticated as @trackloop in Acme (T0ACME); 1 channel(s) configured"


def test_malformed_message_is_skipped_with_a_warning(
    store: Store, slack: SlackStandin, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    slack.post(OPS, ALICE, "TODO: fine")
    bad = slack.post(OPS, ALICE, ["not", "text"])  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="trackloop.connector.team"):
        sync(store, slack, clock)
    assert len(tasks(store)) == 1
    assert f"skipped an unreadable message {OPS}:{bad} (text is not a string)" in caplog.text


def test_server_errors_and_dropped_connections_are_retried(slack: SlackStandin, clock: Clock) -> None:
    slack.post(OPS, ALICE, "TODO: fine")
    slack.inject(r"/api/conversations\.history$", status=503, times=1)
    slack.inject(r"/api/chat\.getPermalink$", status=502, times=1)
    waits: list[float] = []
    config = SlackConfig(**section(slack))
    pulled = SlackConnector("team", config, clock=clock, sleep=waits.append)
    [page] = list(pulled.pull(SyncState()))
    assert len(page.tasks) == 1 and pulled.stats.retries == 2 and len(waits) == 2
    dead = SlackConfig(**section(slack, base_url="http://127.0.0.1:9/api/", retry={"attempts": 2}))
    with pytest.raises(TransientError, match="conversations.history failed"):
        list(SlackConnector("team", dead, clock=clock, sleep=waits.append).pull(SyncState()))


def test_capture_rules_change_re_evaluates_the_window(
    store: Store, slack: SlackStandin, clock: Clock
) -> None:
    ts = slack.post(OPS, ALICE, "FIXME: drain node 3")
    parent = slack.post(OPS, BOB, "node 4 too?")
    reply = slack.reply(OPS, parent, ALICE, "fixme: drain node 4")
    sync(store, slack, clock)
    assert tasks(store) == {}
    sync(store, slack, clock, capture={"prefixes": ["FIXME:"]})
    assert list(tasks(store)) == [f"{OPS}:{ts}", f"{OPS}:{reply}"]  # replies of quiet threads too


def test_pacing_keeps_tier3_calls_per_minute(slack: SlackStandin, clock: Clock) -> None:
    for channel in ("C0A", "C0B", "C0C", "C0D", "C0E"):
        slack.add_channel(channel, channel.lower())
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.advance(seconds=seconds)

    channels = ["C0A", "C0B", "C0C", "C0D", "C0E"]
    config = SlackConfig(**section(slack, channels=channels, history_calls_per_minute=2))
    connector = SlackConnector("team", config, clock=clock, sleep=sleep)
    list(connector.pull(SyncState()))
    assert slept == [60.0, 60.0]  # 5 calls at 2 per minute
    assert connector.stats.requests == 5


# -- push --------------------------------------------------------------------------------------------
def connector(slack: SlackStandin, clock: Clock, **overrides: Any) -> SlackConnector:
    return SlackConnector("team", SlackConfig(**section(slack, **overrides)), clock=clock)


def test_dm_is_delivered_once_across_a_crash(slack: SlackStandin, clock: Clock) -> None:
    action = Action(key="nudge:C0OPS:1:2026-11-02", kind="dm", target=BOB,
                    text="Is <!channel> *done*? <@U01ALICE> said so & more",
                    task_url="https://acme.slack.com/archives/C0OPS/p1")
    # The post lands, but the answer is lost (the process dies before it records the delivery).
    slack.inject(r"/api/chat\.postMessage$", status=500, kind="after")
    with pytest.raises(PushError) as info:
        connector(slack, clock).push(action)
    assert info.value.permanent is False
    again = connector(slack, clock).push(action)  # the outbox's retry, in a new process
    assert again.already_delivered
    [sent] = slack.sent()
    assert again.remote_id == f"{sent['channel']}:{sent['ts']}" and sent["channel"].startswith("D")
    assert sent["text"] == ("Is &lt;!channel&gt; *done*? &lt;@U01ALICE&gt; said so &amp; more\n"
                            "<https://acme.slack.com/archives/C0OPS/p1|Open the task>")
    assert sent["metadata"] == {"event_type": "trackloop_action", "event_payload": {
        "key": action.key, "kind": "dm", "part": 1, "parts": 1}}
    third = connector(slack, clock).push(action)
    assert third.already_delivered and len(slack.sent()) == 1


def test_a_late_retry_in_a_busy_channel_still_finds_the_earlier_post(slack: SlackStandin, clock: Clock) -> None:
    for i in range(60):
        slack.post(OPS, BOB, f"older chatter {i}")
    action = Action(key="weekly:ops", kind="channel", target=OPS, text="weekly: 3 open")
    connector(slack, clock, push_search=50).push(action)
    later(slack, clock, hours=6)
    for i in range(120):  # a busy channel buries the post under more than one search page
        slack.post(OPS, BOB, f"chatter {i}")
    slack.reset_log()
    retry = connector(slack, clock, push_search=50).push(action)
    assert retry.already_delivered and len(slack.sent(OPS)) == 1
    assert requests_by_method(slack) == {"conversations.history": 3}  # paged back, stopped once found

    later(slack, clock, days=2)  # the documented bound: a retry later than push_lookback posts again
    assert not connector(slack, clock, push_search=50).push(action).already_delivered


def test_reply_goes_into_the_task_thread_and_channel_by_name(slack: SlackStandin, clock: Clock) -> None:
    parent = slack.post(OPS, ALICE, "migration plan")
    reply = slack.reply(OPS, parent, BOB, "TODO: snapshot first")
    push = connector(slack, clock)
    first = push.push(Action(key="r1", kind="reply", text="Still open after 5 days.",
                             task_external_id=f"{OPS}:{reply}", task_extra={"thread_ts": parent}))
    assert not first.already_delivered
    assert slack.sent()[0]["thread_ts"] == parent
    repeat = push.push(Action(key="r1", kind="reply", text="Still open after 5 days.",
                              task_external_id=f"{OPS}:{reply}", task_extra={"thread_ts": parent}))
    assert repeat.already_delivered and repeat.remote_id == first.remote_id
    posted = push.push(Action(key="c1", kind="channel", target="#migrations", text="weekly: 3 open"))
    assert posted.remote_id.startswith(f"{MIG}:") and slack.sent(MIG)[0]["text"] == "weekly: 3 open"
    with pytest.raises(PushError) as info:
        push.push(Action(key="x", kind="dm", target="alice", text="hi"))
    assert info.value.permanent
    with pytest.raises(PushError):
        push.push(Action(key="x", kind="comment", text="hi"))


def test_digest_is_split_within_limits_and_a_retry_posts_only_missing_parts(
    slack: SlackStandin, clock: Clock
) -> None:
    header = {"type": "header", "text": {"type": "plain_text", "text": "Weekly " * 40}}
    blocks: list[dict[str, Any]] = [header]
    for i in range(70):
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": f"*OPS-{i}* <!here> overdue"}})
        if i % 10 == 0:
            blocks.append({"type": "divider"})
    blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": "tail line\n" * 700}})
    action = Action(key="digest:2026-W45", kind="digest", target="#ops", text="Weekly digest: 70 tasks",
                    payload={"blocks": blocks})
    result = connector(slack, clock).push(action)
    sent = slack.sent(OPS)
    assert len(sent) == 2 and all(len(s["blocks"]) <= 50 for s in sent)  # the stand-in enforced every limit
    assert [s["metadata"]["event_payload"]["part"] for s in sent] == [1, 2]
    assert result.remote_id == f"{OPS}:{sent[0]['ts']}" and sent[1]["text"] == "Weekly digest: 70 tasks (2/2)"
    assert all("<!here>" not in b.get("text", {}).get("text", "") for s in sent for b in s["blocks"])

    slack.delete(OPS, sent[1]["ts"])  # as if the process died before posting part 2
    retry = connector(slack, clock).push(action)
    assert not retry.already_delivered and retry.remote_id == result.remote_id
    assert len(slack.sent(OPS)) == 3 and slack.sent(OPS)[2]["metadata"]["event_payload"]["part"] == 2
    assert connector(slack, clock).push(action).already_delivered
    dm = connector(slack, clock).push(Action(key="digest:dm", kind="digest", target=ALICE, text="for you",
                                             payload={"blocks": blocks[:3]}))
    assert dm.remote_id.startswith("D")
    with pytest.raises(PushError):
        connector(slack, clock).push(Action(key="d0", kind="digest", target="#ops", text="x", payload={}))


def test_push_failure_types(slack: SlackStandin, clock: Clock) -> None:
    slack.add_channel("C0ARCH", "archive", is_archived=True)
    with pytest.raises(PushError) as info:
        connector(slack, clock).push(Action(key="a", kind="channel", target="C0ARCH", text="x"))
    assert info.value.permanent and "is_archived" in str(info.value)
    slack.inject(r"/api/chat\.postMessage$", status=429, retry_after=30)
    with pytest.raises(PushError) as info:
        connector(slack, clock).push(Action(key="b", kind="channel", target=OPS, text="x"))
    assert not info.value.permanent
    with pytest.raises(AuthError):
        list(connector(slack, clock, token="xoxb-wrong").pull(SyncState()))


def test_cursor_stays_small_and_bounded(store: Store, slack: SlackStandin, clock: Clock) -> None:
    for i in range(40):
        ts = slack.post(OPS, ALICE, f"TODO: item {i}")
        slack.reply(OPS, ts, BOB, "ack")
    sync(store, slack, clock, lookback="1d", backfill="1d")
    later(slack, clock, days=2)
    slack.post(OPS, ALICE, "TODO: fresh")
    sync(store, slack, clock, lookback="1d", backfill="1d")
    with store.transaction() as session:
        from store.sync_state import load_state

        raw = load_state(session, "team").cursor
    cursor = SlackCursor.model_validate(raw)
    assert len(cursor.channels[OPS].seen) == 1 and cursor.channels[OPS].threads == {}


def test_own_thread_reply_is_neither_body_nor_activity(
    store: Store, slack: SlackStandin, clock: Clock
) -> None:
    ts = slack.post(OPS, ALICE, "TODO: <@U02BOB> clean up the old VPN accounts")
    sync(store, slack, clock)
    before = tasks(store)[f"{OPS}:{ts}"]
    later(slack, clock, days=3)
    connector(slack, clock).push(Action(key="nudge-1", kind="reply", text="Still open after 3 days?",
                                        task_external_id=f"{OPS}:{ts}"))
    later(slack, clock, minutes=1)
    sync(store, slack, clock)
    after = tasks(store)[f"{OPS}:{ts}"]
    assert after["last_activity_at"] == before["last_activity_at"]
    assert "Still open" not in after["body"]


def test_demo_source_captures_three_ways() -> None:
    from contextlib import ExitStack
    from pathlib import Path

    from sync.demo import slack as demo

    with ExitStack() as stack:
        name, demo_section = demo.source(stack, Path("."), date.today())
        config = SlackConfig(**demo_section)
        [page] = list(SlackConnector(name, config).pull(SyncState()))
    by_reason = {t.extra["captured_by"]: t for t in page.tasks}
    assert set(by_reason) == {"prefix:TODO:", "reaction:task", "prefix:action item:"}
    assert len(page.tasks) == 4
    threaded = {t.title for t in page.tasks if "bob:" in t.body}
    assert threaded == {"Move the wiki backups to the new storage bucket"}
    assert [a.what for a in page.activities] == ["reply"]


def test_registered_and_documented() -> None:
    import tomllib
    from pathlib import Path

    from connectors.registry import connector_types

    assert connector_types()["slack"] is SlackConnector
    root = Path(__file__).resolve().parent.parent
    example = tomllib.loads((root / "config.example.toml").read_text())["connectors"]["slack"]
    assert set(SlackConfig.model_fields) <= set(example), "config.example.toml must show every key"
    config = parse_config({"connectors": {"slack": example}}, env={"SLACK_BOT_TOKEN": "xoxb-example"},
                          connector_types={"slack": SlackConnector})
    assert config.connectors["slack"].type == "slack"
    readme = (root / "README.md").read_text()
    assert "### slack" in readme and "internal (custom) app" in readme


# -- the shared contract -----------------------------------------------------------------------------
class SlackWorld:
    kind = "slack"
    connector_type = SlackConnector
    page_size = 5

    def __init__(self, standin: SlackStandin) -> None:
        self.standin = standin
        self.token = standin.token
        self.posted: list[str] = []

    def section(self) -> dict[str, Any]:
        return {"type": "slack", "token": self.token, "base_url": self.standin.base_url + "/api/",
                "channels": [OPS], "page_size": self.page_size}

    def seed(self, n: int) -> None:
        for i in range(n):
            self.posted.append(self.standin.post(OPS, ALICE, f"TODO: contract task {i}"))
            if i % 3 == 0:
                self.standin.post(OPS, BOB, f"chatter {i}")

    def modify(self, count: int) -> None:
        for ts in self.posted[:count]:
            self.standin.edit(OPS, ts, f"TODO: contract task {ts} (renamed)")

    def break_auth(self) -> None:
        self.token = "xoxb-revoked"

    def inject_transient(self, times: int) -> None:
        self.standin.inject(r"/api/conversations\.history$", status=429, retry_after=0, times=times)

    def add_malformed(self) -> None:
        ts = self.standin.post(OPS, ALICE, {"rich": "text"})  # type: ignore[arg-type]
        self.standin.react(OPS, ts, "task", BOB)

    def request_count(self) -> int:
        return len(self.standin.requests())

    def push_action(self, key: str) -> Action:
        return Action(key=key, kind="reply", text="Any news?", task_external_id=f"{OPS}:{self.posted[0]}")

    def deliveries(self, key: str) -> int:
        keys = [(s["metadata"] or {}).get("event_payload", {}).get("key") for s in self.standin.sent()]
        return keys.count(key)

    def secret(self) -> str:
        return self.standin.token


class TestSlackContract(ConnectorContract):
    @pytest.fixture
    def world(self, server: SlackStandin) -> SlackWorld:
        server.reset()
        server.add_user(ALICE, "alice", email="alice@example.com")
        server.add_user(BOB, "bob", email="bob@example.com")
        server.add_channel(OPS, "ops")
        return SlackWorld(server)
