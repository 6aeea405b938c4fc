"""The `jira` connector: mapping, ADF rendering, config, and end-to-end runs through the real `jira`
library against the Jira stand-in (Cloud and Server/DC), the sync engine and a real store."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
import responses
from sqlalchemy import func, select

from connectors.errors import AuthError, ConnectorError, PayloadError, PushError, RateLimited, TransientError
from connectors.jira import (
    JiraConfig,
    JiraConnector,
    JiraCursor,
    acceptance_criteria,
    adf_to_text,
    comment_body,
    comment_trail_of,
    floor_minute,
    has_marker,
    issue_to_record,
    marker_for,
    search_jql,
    to_ms,
)
from rules.engine import RulesEngine, build_rules
from rules.registry import rule_types
from store.canonical import (
    Action,
    IdentityKind,
    IdentityRef,
    LinkKind,
    LinkRecord,
    Priority,
    Status,
    SyncState,
    TaskRef,
)
from store.db import Store
from store.findings import open_findings
from store.models import Task, TaskLink
from sync.config import AppConfig, parse_config
from sync.engine import SyncEngine, SyncResult
from sync.standins.jira import JiraStandin
from tests.contract import ConnectorContract

T0 = datetime(2024, 1, 15, 15, 30, 0, tzinfo=UTC)  # 10:30 in New York
TYPES = {"jira": JiraConnector}
NAME = "jira"


# -- helpers -----------------------------------------------------------------------------------------


@pytest.fixture(params=["cloud", "server"])
def standin(request: pytest.FixtureRequest) -> Iterator[JiraStandin]:
    s = JiraStandin(request.param, token="cloud-token-123" if request.param == "cloud" else "pat-123")
    s.set_now(T0 + timedelta(days=1))
    s.start()
    yield s
    s.stop()


@pytest.fixture
def cloud() -> Iterator[JiraStandin]:
    s = JiraStandin("cloud", token="cloud-token-123", timezone="America/New_York")
    s.set_now(T0 + timedelta(days=1))
    s.start()
    yield s
    s.stop()


@pytest.fixture
def server() -> Iterator[JiraStandin]:
    s = JiraStandin("server", token="pat-123")
    s.set_now(T0 + timedelta(days=1))
    s.start()
    yield s
    s.stop()


def section(s: JiraStandin, **overrides: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": "jira",
        "url": s.base_url,
        "auth": "basic" if s.cloud else "bearer",
        "email": s.email,
        "token": s.token,
        "jql": "project = ENG",
        "deployment": s.deployment,
        "retry": {"attempts": 3, "max_wait": "5s"},
    }
    out.update(overrides)
    return out


def app_config(s: JiraStandin, db_url: str = "sqlite://", **overrides: Any) -> AppConfig:
    return parse_config(
        {"store": {"url": db_url}, "connectors": {NAME: section(s, **overrides)}},
        env={},
        connector_types=TYPES,
    )


def connector(s: JiraStandin, **overrides: Any) -> JiraConnector:
    cfg = app_config(s, **overrides).connectors[NAME]
    return JiraConnector(NAME, cfg)  # type: ignore[arg-type]


def sync(
    s: JiraStandin,
    store: Store,
    *,
    full: bool = False,
    on_page: Callable[..., None] | None = None,
    clock: Callable[[], datetime] | None = None,
    **overrides: Any,
) -> SyncResult:
    engine = SyncEngine(store, app_config(s, store.url, **overrides), TYPES, on_page=on_page, clock=clock)
    return engine.sync_one(NAME, full=full)


def seed(
    s: JiraStandin, count: int, *, start: int = 1, step: timedelta = timedelta(minutes=1), **kw: Any
) -> None:
    for n in range(start, start + count):
        s.add_issue(f"ENG-{n}", summary=f"Task {n}", updated=T0 + (n - 1) * step, **kw)


def searches(s: JiraStandin) -> list[Any]:
    return s.requests("GET", r"/search(/jql)?$")


def paths(s: JiraStandin) -> list[str]:
    return [r.path for r in s.requests()]


def tasks(store: Store) -> dict[str, Task]:
    with store.transaction() as session:
        rows = session.scalars(select(Task).where(Task.source == NAME)).all()
        session.expunge_all()
        return {t.external_id: t for t in rows}


class Crash(Exception):
    """Stands for the process dying between two pages."""


def crash_after(pages: int) -> Callable[[str, SyncResult], None]:
    def hook(name: str, result: SyncResult) -> None:
        if result.pages >= pages:
            raise Crash(f"killed after {pages} page(s)")

    return hook


# -- the shared contract -----------------------------------------------------------------------------


class JiraWorld:
    kind = "jira"
    connector_type = JiraConnector
    page_size = 5

    def __init__(self, standin: JiraStandin) -> None:
        self.s = standin
        self.count = 0
        self.token = standin.token
        self.latest = T0

    def section(self) -> dict[str, Any]:
        return section(
            self.s, token=self.token, page_size=self.page_size, retry={"attempts": 3, "max_wait": "1s"}
        )

    def seed(self, n: int) -> None:
        for _ in range(n):
            self.count += 1
            self.latest = T0 + timedelta(minutes=self.count)
            self.s.add_issue(f"ENG-{self.count}", summary=f"Task {self.count}", updated=self.latest)

    def modify(self, count: int) -> None:
        self.latest += timedelta(minutes=10)
        for n in range(1, count + 1):
            self.s.update_issue(f"ENG-{n}", summary=f"Task {n}, reworded", updated=self.latest)

    def break_auth(self) -> None:
        self.s.token = "rotated-elsewhere"

    def inject_transient(self, times: int) -> None:
        self.s.inject(r"/search", status=503, times=times, retry_after=0)

    def add_malformed(self) -> None:
        self.count += 1
        self.s.add_issue(f"ENG-{self.count}", summary=None, updated=self.latest)  # type: ignore[arg-type]

    def request_count(self) -> int:
        return len(self.s.requests())

    def push_action(self, key: str) -> Action:
        return Action(key=key, kind="comment", text="Who owns this?", task_external_id="ENG-1")

    def deliveries(self, key: str) -> int:
        return sum(marker_for(key) in c["body"] for c in self.s.comments("ENG-1"))

    def secret(self) -> str:
        return self.token


class TestJiraContract(ConnectorContract):
    @pytest.fixture
    def world(self, standin: JiraStandin) -> JiraWorld:
        return JiraWorld(standin)


# -- mapping -----------------------------------------------------------------------------------------


def config(**overrides: Any) -> JiraConfig:
    base: dict[str, Any] = {
        "type": "jira", "url": "https://acme.atlassian.net/", "email": "bot@acme.io", "token": "t",
        "jql": "project in (OPS, MIG)",
    }  # fmt: skip
    base.update(overrides)
    return JiraConfig.model_validate(base)


def adf(*blocks: dict[str, Any]) -> dict[str, Any]:
    return {"type": "doc", "version": 1, "content": list(blocks)}


def para(*inline: dict[str, Any]) -> dict[str, Any]:
    return {"type": "paragraph", "content": list(inline)}


def text(value: str, *marks: dict[str, Any]) -> dict[str, Any]:
    node: dict[str, Any] = {"type": "text", "text": value}
    if marks:
        node["marks"] = list(marks)
    return node


def heading(value: str, level: int = 2) -> dict[str, Any]:
    return {"type": "heading", "attrs": {"level": level}, "content": [text(value)]}


def bullets(*items: str) -> dict[str, Any]:
    return {
        "type": "bulletList",
        "content": [{"type": "listItem", "content": [para(text(i))]} for i in items],
    }


CLOUD_ISSUE: dict[str, Any] = {  # shaped like the search/jql example in Atlassian's REST v3 docs
    "expand": "renderedFields,names,schema,operations,editmeta,changelog,versionedRepresentations",
    "id": "10068",
    "self": "https://acme.atlassian.net/rest/api/3/issue/10068",
    "key": "OPS-12",
    "fields": {
        "summary": "  Rotate the backup keys ",
        "description": adf(
            para(text("Keys expire on Friday; see "), text("the runbook", {"type": "link", "attrs": {"href": "https://wiki/rb"}})),
            heading("Acceptance criteria"),
            bullets("old keys revoked", "restore tested"),
            heading("Notes"),
            para(text("ping "), {"type": "mention", "attrs": {"id": "acc-bob", "text": "@Bob"}}),
        ),
        "status": {
            "name": "In Review", "id": "10100",
            "statusCategory": {"id": 4, "key": "indeterminate", "colorName": "yellow", "name": "In Progress"},
        },
        "statuscategorychangedate": "2024-01-10T08:00:00.000+0000",
        "resolution": None,
        "resolutiondate": None,
        "issuetype": {"id": "10001", "name": "Task", "subtask": False},
        "assignee": {
            "accountId": "5b10a2844c20165700ede21g", "displayName": "Alice Kim",
            "emailAddress": "alice@example.com", "active": True, "timeZone": "Europe/Berlin",
        },
        "reporter": {"accountId": "5b10ac8d82e05b22cc7d4ef5", "displayName": "Bob Otieno", "active": True},
        "priority": {"id": "1", "name": "Highest"},
        "duedate": "2024-02-01",
        "labels": ["security", "backup"],
        "parent": {"id": "10050", "key": "OPS-1", "fields": {"summary": "Security hardening"}},
        "subtasks": [{"id": "10070", "key": "OPS-13"}, {"id": "10071", "key": "OPS-14"}],
        "issuelinks": [
            {"id": "1", "type": {"name": "Blocks", "inward": "is blocked by", "outward": "blocks"},
             "outwardIssue": {"key": "OPS-20"}},
            {"id": "2", "type": {"name": "Blocks", "inward": "is blocked by", "outward": "blocks"},
             "inwardIssue": {"key": "MIG-3"}},
            {"id": "3", "type": {"name": "Duplicate", "inward": "is duplicated by", "outward": "duplicates"},
             "inwardIssue": {"key": "OPS-9"}},
            {"id": "4", "type": {"name": "Cloners", "inward": "is cloned by", "outward": "clones"},
             "outwardIssue": {"key": "OPS-30"}},
            {"id": "5", "type": {"name": "Blocks"}},  # a link to an issue we may not see: no side at all
        ],
        "timeoriginalestimate": 28800,
        "timeestimate": 7200,
        "timespent": 21600,
        "created": "2024-01-02T09:00:00.000+0100",
        "updated": "2024-01-12T17:45:12.345+0000",
        "customfield_10042": None,
    },
}  # fmt: skip


def test_cloud_issue_maps_every_field() -> None:
    record = issue_to_record(CLOUD_ISSUE, config(), cloud=True)

    assert (record.external_id, record.scope, record.title) == ("OPS-12", "OPS", "Rotate the backup keys")
    assert record.url == "https://acme.atlassian.net/browse/OPS-12"
    assert (record.status, record.raw_status) == (Status.IN_PROGRESS, "In Review")
    assert record.assignees == (
        IdentityRef(IdentityKind.JIRA, "5b10a2844c20165700ede21g", "Alice Kim", email="alice@example.com"),
    )
    assert record.reporter == IdentityRef(IdentityKind.JIRA, "5b10ac8d82e05b22cc7d4ef5", "Bob Otieno")
    assert (record.priority, record.due, record.labels) == (
        Priority.HIGH,
        date(2024, 2, 1),
        ("security", "backup"),
    )
    assert record.created_at == datetime(2024, 1, 2, 8, 0, tzinfo=UTC)
    assert record.updated_at == datetime(2024, 1, 12, 17, 45, 12, 345000, tzinfo=UTC)
    assert record.status_changed_at == datetime(2024, 1, 10, 8, 0, tzinfo=UTC)
    assert record.closed_at is None and not record.verified
    assert (record.original_estimate_s, record.remaining_estimate_s, record.time_spent_s) == (
        28800,
        7200,
        21600,
    )
    assert record.body.startswith(
        "Keys expire on Friday; see the runbook (https://wiki/rb)\n\nAcceptance criteria"
    )
    assert "ping @Bob" in record.body
    assert record.acceptance_criteria == "- old keys revoked\n- restore tested"
    assert record.links == (
        LinkRecord(LinkKind.BLOCKS, TaskRef("OPS-20")),
        LinkRecord(LinkKind.BLOCKS, TaskRef("MIG-3"), inverse=True),
        LinkRecord(LinkKind.DUPLICATE, TaskRef("OPS-9"), inverse=True),
        LinkRecord(LinkKind.PARENT, TaskRef("OPS-1")),
        LinkRecord(LinkKind.PARENT, TaskRef("OPS-13"), inverse=True),
        LinkRecord(LinkKind.PARENT, TaskRef("OPS-14"), inverse=True),
    )
    assert record.extra == {"id": "10068", "status_category": "indeterminate", "issuetype": "Task"}
    json.dumps(dict(record.extra))  # JSON-safe


SERVER_ISSUE: dict[str, Any] = {  # REST v2 on Server/DC: wiki markup, users by name/key
    "id": "20001",
    "key": "MIG-7",
    "fields": {
        "summary": "Move the file share",
        "description": (
            "h2. Context\nOld NAS.\n\nh3. Acceptance Criteria\n* data copied\n* old share read-only\n\n"
            "h3. Risks\nNone"
        ),
        "status": {"name": "Blocked", "statusCategory": {"key": "indeterminate"}},
        "assignee": {
            "name": "carol", "key": "JIRAUSER10100", "displayName": "Carol Diaz",
            "emailAddress": "carol@example.com",
        },
        "reporter": {"key": "JIRAUSER10000", "displayName": "Dan"},  # no name: falls back to the key
        "priority": {"name": "Major"},
        "labels": [],
        "timetracking": {"originalEstimateSeconds": 3600, "timeSpentSeconds": 60},
        "created": "2024-01-03T10:00:00.000+0000",
        "updated": "2024-01-04T10:00:00.000+0000",
    },
}  # fmt: skip


def test_server_issue_maps_names_wiki_and_status_map() -> None:
    record = issue_to_record(SERVER_ISSUE, config(status_map={"blocked": "blocked"}), cloud=False)

    assert (record.status, record.raw_status) == (Status.BLOCKED, "Blocked")
    assert record.assignees[0].value == "carol" and record.assignees[0].email == "carol@example.com"
    assert record.reporter is not None and record.reporter.value == "JIRAUSER10000"
    assert record.priority == Priority.MEDIUM
    assert record.body.startswith("h2. Context\nOld NAS.")  # wiki markup kept as written
    assert record.acceptance_criteria == "* data copied\n* old share read-only"
    assert (record.original_estimate_s, record.remaining_estimate_s, record.time_spent_s) == (3600, None, 60)
    assert record.links == () and record.due is None and record.status_changed_at is None


def test_odd_fields_status_overrides_and_verification() -> None:
    raw = {
        "key": "OPS-3",
        "fields": {
            "summary": "x",
            "status": {"name": "Won't Do", "statusCategory": {"key": "done"}},
            "resolutiondate": "2024-01-05T00:00:00.000+0000",
            "assignee": None, "reporter": None, "priority": None, "labels": None, "issuelinks": None,
            "subtasks": None, "description": None, "duedate": None,
        },
    }  # fmt: skip
    cfg = config(
        status_map={"Won't Do": "cancelled"}, priority_map={"P1": "high"}, verified_statuses=["Verified"]
    )

    record = issue_to_record(raw, cfg, cloud=True)
    assert (record.status, record.closed_at) == (Status.CANCELLED, datetime(2024, 1, 5, tzinfo=UTC))
    assert record.assignees == () and record.reporter is None and record.priority == Priority.NONE
    assert record.labels == () and record.body == "" and record.acceptance_criteria is None

    raw["fields"]["status"] = {"name": "VERIFIED", "statusCategory": {"key": "done"}}
    raw["fields"]["priority"] = {"name": "p1"}
    verified = issue_to_record(raw, cfg, cloud=True)
    assert (verified.status, verified.verified, verified.priority) == (Status.DONE, True, Priority.HIGH)

    raw["fields"]["status"] = {"name": "Triage", "statusCategory": {"key": "undefined"}}
    assert issue_to_record(raw, cfg, cloud=True).status == Status.TODO


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"key": "OPS-1", "fields": {"summary": None}}, "no summary"),
        ({"key": "OPS-1", "fields": {"summary": "   "}}, "no summary"),
        ({"key": "OPS-1"}, "no fields"),
        ({"fields": {"summary": "x"}}, "usable key"),
        ({"key": "OPS-1", "fields": {"summary": "x", "updated": "yesterday"}}, "unreadable timestamp"),
        ({"key": "OPS-1", "fields": {"summary": "x", "duedate": "soon"}}, "unreadable due date"),
        ({"key": "OPS-1", "fields": {"summary": "x", "timespent": "1h"}}, "expected seconds"),
    ],
)
def test_malformed_payloads_raise_payload_error(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        issue_to_record(raw, config(), cloud=True)


def test_adf_renders_every_common_node_and_survives_unknown_ones() -> None:
    doc = adf(
        heading("Plan", 1),
        para(text("Line one"), {"type": "hardBreak"}, text("line two "),
             {"type": "emoji", "attrs": {"shortName": ":ok:", "text": "👍"}}),
        {"type": "orderedList", "attrs": {"order": 3}, "content": [
            {"type": "listItem", "content": [para(text("third")), bullets("nested a", "nested b")]},
            {"type": "listItem", "content": [para(text("fourth"))]},
        ]},
        {"type": "codeBlock", "attrs": {"language": "sh"}, "content": [text("make\nmake install")]},
        {"type": "blockquote", "content": [para(text("quoted"))]},
        {"type": "rule"},
        {"type": "panel", "attrs": {"panelType": "info"}, "content": [para(text("in a panel"))]},
        {"type": "table", "content": [
            {"type": "tableRow", "content": [{"type": "tableHeader", "content": [para(text("k"))]},
                                             {"type": "tableHeader", "content": [para(text("v"))]}]},
            {"type": "tableRow", "content": [{"type": "tableCell", "content": [para(text("a"))]},
                                             {"type": "tableCell", "content": [para(text("1"))]}]},
        ]},
        {"type": "taskList", "content": [
            {"type": "taskItem", "attrs": {"state": "DONE"}, "content": [text("backup taken")]},
            {"type": "taskItem", "attrs": {"state": "TODO"}, "content": [text("restore")]},
        ]},
        para(text("see "), {"type": "inlineCard", "attrs": {"url": "https://x/y"}}, text(" by "),
             {"type": "date", "attrs": {"timestamp": "1706745600000"}}, text(" "),
             {"type": "status", "attrs": {"text": "AT RISK"}}),
        {"type": "mediaSingle", "content": [{"type": "media", "attrs": {"id": "m1"}}]},
        {"type": "futureContainer", "content": [para(text("kept"))]},
        {"type": "futureLeaf", "attrs": {"x": 1}},
        "not a node",
        {"type": "paragraph", "content": "not a list"},
        {"type": "paragraph", "content": [None, 5, text("survivor")]},
    )  # fmt: skip

    assert adf_to_text(doc) == (
        "Plan\n\n"
        "Line one\nline two 👍\n\n"
        "3. third\n   - nested a\n   - nested b\n4. fourth\n\n"
        "make\nmake install\n\n"
        "> quoted\n\n"
        "---\n\n"
        "in a panel\n\n"
        "k | v\na | 1\n\n"
        "[x] backup taken\n[ ] restore\n\n"
        "see https://x/y by 2024-02-01 AT RISK\n\n"
        "kept\n\n"
        "survivor"
    )
    assert adf_to_text(None) == "" and adf_to_text({"type": "doc"}) == ""
    assert adf_to_text(para(text("link", {"type": "link", "attrs": {"href": "link"}}))) == "link"


@pytest.mark.parametrize(
    ("description", "expected"),
    [
        ("Intro\n\nAcceptance criteria:\n* a\n* b", "* a\n* b"),
        ("h3. Acceptance criteria\n# one\n# two\nh3. Out of scope\nthree", "# one\n# two"),
        ("## Acceptance Criteria\n- works offline\n\nh2. Notes\nx", "- works offline"),
        ("*Acceptance criteria*\nGiven a user\n*Notes:*\nx", "Given a user"),
        ("Acceptance criteria: loads in 2s", "loads in 2s"),
        ("No such section here", None),
        ("Acceptance criteria:\n\n", None),
        (adf(para(text("Intro")), heading("Acceptance criteria"), bullets("a"), heading("Later"),
             para(text("x"))), "- a"),
        (adf(para(text("Acceptance criteria", {"type": "strong"})), para(text("must pass")),
             para(text("and this"))),
         "must pass\n\nand this"),
        (adf(para(text("Acceptance criteria:"), {"type": "hardBreak"}, text("inline in ADF"))),
         "inline in ADF"),
    ],
)  # fmt: skip
def test_acceptance_criteria_from_a_description_section(description: Any, expected: str | None) -> None:
    assert acceptance_criteria({"description": description}, None, "Acceptance criteria") == expected


def test_acceptance_criteria_field_wins_in_any_shape() -> None:
    fields = {"description": "Acceptance criteria: from the description", "customfield_10042": None}
    assert acceptance_criteria(fields, "customfield_10042", "Acceptance criteria") == "from the description"
    for value, expected in [
        (adf(para(text("Given X")), para(text("then Y"))), "Given X\n\nthen Y"),
        ("  plain wiki ", "plain wiki"),
        ([{"value": "one"}, "two", None], "- one\n- two"),
        ({"value": "an option"}, "an option"),
    ]:
        fields["customfield_10042"] = value
        assert acceptance_criteria(fields, "customfield_10042", "Acceptance criteria") == expected


def test_marker_and_comment_bodies() -> None:
    assert marker_for("stale:jira:OPS-12:2026-11-02") == "trackloop:stale:jira:OPS-12:2026-11-02"
    odd = marker_for("nag *bold* {macro} [link]")
    assert odd.startswith("trackloop:k-") and len(odd) == len("trackloop:k-") + 24
    assert odd == marker_for("nag *bold* {macro} [link]") != marker_for("nag *bold* {macro} [link!]")

    wiki = comment_body("Who owns this?\nPlease assign.", "trackloop:k1", cloud=False)
    assert wiki == "Who owns this?\nPlease assign.\n\n{{trackloop:k1}}"
    assert has_marker(wiki, "trackloop:k1") and not has_marker(wiki, "trackloop:k")

    doc = comment_body("Who owns this?\n\nPlease assign.", "trackloop:k1", cloud=True)
    assert doc["type"] == "doc" and len(doc["content"]) == 3
    assert doc["content"][-1] == {
        "type": "paragraph",
        "content": [{"type": "text", "text": "trackloop:k1", "marks": [{"type": "code"}]}],
    }  # fmt: skip
    assert adf_to_text(doc).splitlines()[-1] == "trackloop:k1"
    assert comment_body("", "trackloop:k1", cloud=False) == "{{trackloop:k1}}"
    assert has_marker("quoted [trackloop:k1]", "trackloop:k1") is False  # must be a line of its own


def test_comment_trail_tells_apps_bots_and_trackloop_from_people() -> None:
    def comment(at: str, body: Any = "ok", **author: Any) -> dict[str, Any]:
        return {"id": at, "author": author, "body": body, "created": at, "updated": at}

    def trail(*comments: dict[str, Any], total: int | None = None) -> Any:
        page = {"comments": list(comments), "maxResults": 5000, "startAt": 0,
                "total": len(comments) if total is None else total}
        return comment_trail_of({"comment": page}, frozenset({"acc-ci", "bot@acme.io", "jenkins"}))

    ann = comment("2024-01-10T09:00:00.000+0000", accountId="acc-ann", accountType="atlassian")
    at = datetime(2024, 1, 15, 9, tzinfo=UTC)
    for bot in (
        comment("2024-01-15T09:00:00.000+0000", accountId="acc-auto", accountType="app"),  # Automation for Jira
        comment("2024-01-15T09:00:00.000+0000", accountId="ACC-CI", accountType="atlassian"),  # configured
        comment("2024-01-15T09:00:00.000+0000", accountId="acc-me", emailAddress="Bot@acme.io"),  # own sign-in
        comment("2024-01-15T09:00:00.000+0000", name="jenkins", key="JIRAUSER1"),  # Server: by name
        comment("2024-01-15T09:00:00.000+0000", adf(para(text("Still on track?")), para(text("trackloop:k-1"))),
                accountId="acc-other-bot"),  # trackloop's marker, from another install
    ):
        found = trail(ann, bot)
        assert found is not None and found.by_bot and found.latest == at
        assert found.human == datetime(2024, 1, 10, 9, tzinfo=UTC)
    person = trail(ann, comment("2024-01-15T09:00:00.000+0000", "{quote}trackloop:k-1{quote} why?", name="bob"))
    assert person is not None and not person.by_bot and person.human == at
    edited = dict(ann, updated="2024-01-15T09:00:00.000+0000", updateAuthor={"name": "jenkins"})
    assert trail(edited).by_bot  # the editor wrote the change
    assert trail(ann, total=40) is None  # the newest comments were cut off: nothing can be said
    assert comment_trail_of({}, frozenset()) is None and trail() is None


def test_search_jql_wraps_the_scope_so_or_cannot_escape_the_bound() -> None:
    assert search_jql("project = A OR labels = x", 1705332000000) == (
        "(project = A OR labels = x) AND updated >= 1705332000000 ORDER BY updated ASC, key ASC"
    )
    assert search_jql("project = A", None) == "(project = A) ORDER BY updated ASC, key ASC"
    assert floor_minute(to_ms(datetime(2024, 1, 15, 15, 30, 59, 999000, tzinfo=UTC))) == to_ms(T0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"url": "acme"}, "expected a URL like \"https://acme.atlassian.net\", got 'acme'"),
        ({"jql": "project = OPS ORDER BY created DESC"}, "remove ORDER BY"),
        ({"jql": "  "}, "expected a JQL restriction"),
        ({"acceptance_field": "Acceptance"}, 'expected a custom field id like "customfield_10042"'),
        ({"email": None}, 'auth = "basic" needs email'),
        ({"auth": "bearer", "deployment": "cloud"}, 'Jira Cloud needs auth = "basic"'),
        ({"deployment": "datacenter"}, "'auto', 'cloud' or 'server'"),
        ({"overlap": "2d"}, "between"),
        ({"page_size": 5000}, "less than or equal to 1000"),
        ({"colour": "blue"}, "Extra inputs are not permitted"),
    ],
)
def test_config_validation_messages(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        config(**overrides)


def test_config_normalises_and_hides_the_token() -> None:
    cfg = config(
        jql='summary ~ "order by" AND project = OPS', token="s3cret", status_map={" Blocked ": "blocked"}
    )
    assert cfg.url == "https://acme.atlassian.net" and cfg.status_map == {"blocked": Status.BLOCKED}
    assert "s3cret" not in repr(cfg) and cfg.overlap == timedelta(minutes=2)
    assert "customfield" not in str(cfg.model_json_schema()["properties"]["jql"])
    assert all("description" in spec for spec in cfg.model_json_schema()["properties"].values())


@responses.activate
def test_doc_shaped_cloud_reply_through_the_real_library() -> None:
    """A recorded-style reply (fields the stand-in does not model) read by pull() through `jira`."""
    base = "https://acme.atlassian.net"
    responses.get(
        f"{base}/rest/api/3/serverInfo", json={"versionNumbers": [1001, 0, 0], "deploymentType": "Cloud"}
    )
    responses.get(f"{base}/rest/api/3/field", json=[{"id": "summary", "clauseNames": ["summary"]}])
    responses.get(
        f"{base}/rest/api/3/search/jql", json={"issues": [CLOUD_ISSUE, {"key": "OPS-13"}], "isLast": True}
    )
    conn = JiraConnector(NAME, config(url=base, deployment="auto"))

    [page] = list(conn.pull(SyncState()))

    assert [t.external_id for t in page.tasks] == ["OPS-12"]  # OPS-13 has no fields: skipped
    assert page.completed_scopes == []  # OPS held an unreadable issue, so it is not vouched for
    assert page.cursor == JiraCursor(
        deployment="cloud", scope=page.cursor.scope,
        updated_ms=to_ms(datetime(2024, 1, 12, 17, 45, 12, 345000, tzinfo=UTC)),
        projects=("OPS",),
    )  # fmt: skip
    search = responses.calls[-1].request
    assert "nextPageToken" not in search.url and "maxResults=100" in search.url
    assert conn.stats.requests == 3


# -- end to end: pagination and request counts -------------------------------------------------------


def test_cloud_pages_with_next_page_token_and_counts_requests(cloud: JiraStandin, tmp_path: Any) -> None:
    seed(cloud, 250)
    store = Store(f"sqlite:///{tmp_path / 'c.db'}")

    cold = sync(cloud, store)
    assert cold.ok, cold.error
    assert (cold.upserts.inserted, cold.pages) == (250, 3)
    assert paths(cloud) == ["/rest/api/3/serverInfo", "/rest/api/3/field"] + ["/rest/api/3/search/jql"] * 3
    first, *rest = searches(cloud)
    assert first.query["jql"] == ["(project = ENG) ORDER BY updated ASC, key ASC"]
    assert first.query["maxResults"] == ["100"] and "nextPageToken" not in first.query
    assert all("nextPageToken" in r.query for r in rest)
    assert "description" in first.query["fields"] and "*all" not in first.query["fields"]
    assert cold.requests.requests == 5

    cloud.reset_log()
    cloud.update_issue("ENG-7", summary="Task 7, edited", updated=T0 + timedelta(days=1))
    cloud.update_issue("ENG-8", status="Done", updated=T0 + timedelta(days=1, seconds=5))
    incremental = sync(cloud, store)
    assert (incremental.upserts.inserted, incremental.upserts.updated) == (0, 2)
    [search] = searches(cloud)
    last_seen = to_ms(T0 + timedelta(minutes=249))
    bound = floor_minute(last_seen - 120_000)
    assert search.query["jql"] == [f"(project = ENG) AND updated >= {bound} ORDER BY updated ASC, key ASC"]
    assert incremental.requests.requests == len(cloud.requests()) == 3

    cloud.reset_log()
    idle = sync(cloud, store)
    assert (idle.upserts.inserted, idle.upserts.updated, idle.pages) == (0, 0, 1)
    assert paths(cloud) == ["/rest/api/3/serverInfo", "/rest/api/3/field", "/rest/api/3/search/jql"]
    assert idle.requests.requests == 3
    assert tasks(store)["ENG-8"].status == "done"
    store.close()


def test_server_pages_with_start_at_and_counts_requests(server: JiraStandin, tmp_path: Any) -> None:
    seed(server, 25)
    store = Store(f"sqlite:///{tmp_path / 's.db'}")

    cold = sync(server, store, page_size=10)
    assert cold.ok, cold.error
    assert (cold.upserts.inserted, cold.pages) == (25, 3)
    assert paths(server) == ["/rest/api/2/field"] + ["/rest/api/2/search"] * 3  # no handshake on Server
    assert [r.query["startAt"] for r in searches(server)] == [["0"], ["10"], ["20"]]
    assert cold.requests.requests == 4

    server.reset_log()
    server.update_issue("ENG-4", assignee="acc-ann", updated=T0 + timedelta(days=1))
    incremental = sync(server, store, page_size=10)
    assert (incremental.upserts.inserted, incremental.upserts.updated) == (0, 1)
    bound = floor_minute(to_ms(T0 + timedelta(minutes=24)) - 120_000)
    assert [r.query["jql"] for r in searches(server)] == [
        [f"(project = ENG) AND updated >= {bound} ORDER BY updated ASC, key ASC"]
    ]
    assert incremental.requests.requests == len(server.requests()) == 2
    assert tasks(store)["ENG-4"].owner_id is not None

    server.reset_log()
    idle = sync(server, store)  # default page size: the Server maximum
    assert (idle.upserts.inserted, idle.upserts.updated) == (0, 0)
    assert paths(server) == ["/rest/api/2/field", "/rest/api/2/search"]
    assert searches(server)[0].query["maxResults"] == ["1000"]
    assert idle.requests.requests == 2
    assert (
        tasks(store)["ENG-1"].owner_id is None
        and tasks(store)["ENG-1"].url == f"{server.base_url}/browse/ENG-1"
    )
    store.close()


def test_auto_deployment_is_detected_once_and_stored(standin: JiraStandin, tmp_path: Any) -> None:
    seed(standin, 3)
    store = Store(f"sqlite:///{tmp_path / 'a.db'}")

    assert sync(standin, store, deployment="auto").ok
    with store.transaction() as session:
        from store.sync_state import load_state

        saved = load_state(session, NAME).cursor
    assert saved["deployment"] == standin.deployment
    handshake = [p for p in paths(standin) if p.endswith("/serverInfo")]
    if standin.cloud:
        assert handshake == ["/rest/api/3/serverInfo"]
    else:  # v3 is Cloud-only: its 404 tells Server/DC apart, v2 confirms
        assert handshake == ["/rest/api/3/serverInfo", "/rest/api/2/serverInfo"]

    standin.reset_log()
    assert sync(standin, store, deployment="auto").ok
    again = [p for p in paths(standin) if p.endswith("/serverInfo")]
    assert again == (
        ["/rest/api/3/serverInfo"] if standin.cloud else []
    )  # Cloud's library needs its handshake
    store.close()


def test_configured_deployment_that_does_not_match_the_site_is_a_clear_error(server: JiraStandin) -> None:
    conn = connector(server, deployment="cloud", auth="basic")
    with pytest.raises(ConnectorError) as caught:
        list(conn.pull(SyncState()))
    assert str(caught.value) == (
        f"jira connector 'jira': deployment = \"cloud\" but {server.base_url} does not report itself as "
        'Jira Cloud; set deployment = "server" or "auto"'
    )
    assert paths(server) == ["/rest/api/3/serverInfo"]


# -- end to end: the minute-precision boundary ---------------------------------------------------------


def same_minute(s: JiraStandin, count: int, spacing: int) -> None:
    """`count` issues inside 10:30-10:31 New York time, `spacing` seconds apart (0: one stamp)."""
    for n in range(1, count + 1):
        s.add_issue(f"ENG-{n}", summary=f"Task {n}", updated=T0 + timedelta(seconds=n * spacing))


@pytest.mark.parametrize("spacing", [1, 0], ids=["seconds-apart", "one-stamp"])
def test_a_page_edge_inside_one_minute_neither_skips_nor_doubles(standin: JiraStandin, spacing: int) -> None:
    same_minute(standin, 30, spacing)

    pages = list(connector(standin, page_size=20).pull(SyncState()))

    keys = [t.external_id for p in pages for t in p.tasks]
    assert [len(p.tasks) for p in pages] == [20, 10]
    assert sorted(keys) == sorted(f"ENG-{n}" for n in range(1, 31)) and len(keys) == len(set(keys))
    first = pages[0].cursor
    assert first is not None and first.updated_ms == to_ms(T0 + timedelta(seconds=20 * spacing))
    assert list(pages[0].completed_scopes) == [] and list(pages[1].completed_scopes) == ["ENG"]


@pytest.mark.parametrize("spacing", [1, 0], ids=["seconds-apart", "one-stamp"])
def test_a_crash_at_a_page_edge_inside_one_minute_resumes_without_gap(
    standin: JiraStandin, db_url: str, spacing: int
) -> None:
    same_minute(standin, 30, spacing)
    store = Store(db_url)

    crashed = sync(standin, store, page_size=20, on_page=crash_after(1))
    assert not crashed.ok and "killed after 1 page" in (crashed.error or "")
    assert len(tasks(store)) == 20

    standin.reset_log()
    resumed = sync(standin, store, page_size=20)
    assert resumed.ok, resumed.error
    resumed_from = floor_minute(to_ms(T0 + timedelta(seconds=20 * spacing)) - 120_000)
    assert f"updated >= {resumed_from} " in searches(standin)[0].query["jql"][0]
    assert (resumed.upserts.inserted, resumed.upserts.updated, resumed.upserts.unchanged) == (10, 0, 20)
    stored = tasks(store)
    assert sorted(stored) == sorted(f"ENG-{n}" for n in range(1, 31))
    with store.transaction() as session:
        assert session.scalar(select(func.count()).select_from(Task)) == 30
    store.close()


def test_an_edit_during_offset_paging_never_loses_an_issue(server: JiraStandin, tmp_path: Any) -> None:
    seed(server, 25)
    store = Store(f"sqlite:///{tmp_path / 'shift.db'}")

    def edit_listed_issue(name: str, result: SyncResult) -> None:
        if result.pages == 1:  # ENG-3 moves to the end of the listing: offsets shift back by one
            server.update_issue("ENG-3", summary="edited mid-sync", updated=T0 + timedelta(hours=5))

    first = sync(server, store, page_size=10, on_page=edit_listed_issue)
    assert first.ok, first.error
    assert "ENG-11" not in tasks(store)  # the offset skipped it in this run ...
    with store.transaction() as session:
        from store.sync_state import load_state

        held = load_state(session, NAME).cursor["updated_ms"]
    assert held == to_ms(T0 + timedelta(minutes=9))  # ... so the cursor held back to the first page

    second = sync(server, store, page_size=10)
    assert second.ok and second.upserts.inserted == 1
    assert len(tasks(store)) == 25 and tasks(store)["ENG-3"].title == "edited mid-sync"
    store.close()


@pytest.mark.parametrize("change", ["edit", "delete"])
def test_a_full_listing_that_shifts_under_offset_paging_cancels_nothing(
    server: JiraStandin, tmp_path: Any, change: str
) -> None:
    seed(server, 25)
    store = Store(f"sqlite:///{tmp_path / 'full-shift.db'}")
    assert sync(server, store, page_size=10).upserts.inserted == 25

    def shift_after_page_one(name: str, result: SyncResult) -> None:
        if result.pages == 1:  # ENG-3 leaves its offset: ENG-11, at the next page edge, is skipped
            if change == "edit":
                server.update_issue("ENG-3", summary="edited mid-sync", updated=T0 + timedelta(hours=5))
            else:
                server.delete_issue("ENG-3")

    server.reset_log()
    full = sync(server, store, full=True, page_size=10, on_page=shift_after_page_one)
    assert full.ok and full.upserts.cancelled == 0
    assert all(t.status == "todo" for k, t in tasks(store).items() if k != "ENG-3")
    assert tasks(store)["ENG-11"].status == "todo"

    steady = sync(server, store, full=True, page_size=10)  # the next full listing holds still
    assert steady.upserts.cancelled == (1 if change == "delete" else 0)
    assert tasks(store)["ENG-3"].status == ("cancelled" if change == "delete" else "todo")
    store.close()


def test_an_issue_edited_mid_run_never_carries_the_cursor_past_uncommitted_ones(
    cloud: JiraStandin, tmp_path: Any
) -> None:
    seed(cloud, 25)
    store = Store(f"sqlite:///{tmp_path / 'mid.db'}")
    began = T0 + timedelta(days=1)  # the stand-in's clock and the engine's agree

    def edit_then_die(name: str, result: SyncResult) -> None:
        if result.pages == 1:  # ENG-15 is edited a minute later, before the page that lists it
            cloud.set_now(began + timedelta(minutes=1))
            cloud.update_issue("ENG-15", summary="edited mid-sync")
        elif result.pages == 2:
            raise Crash("killed after the page that listed ENG-15")

    crashed = sync(cloud, store, page_size=10, on_page=edit_then_die, clock=lambda: began)
    assert not crashed.ok and tasks(store)["ENG-15"].title == "edited mid-sync"  # listed, out of order
    with store.transaction() as session:
        from store.sync_state import load_state

        assert load_state(session, NAME).cursor["updated_ms"] == to_ms(T0 + timedelta(minutes=19))

    resumed = sync(cloud, store, page_size=10, clock=lambda: began + timedelta(minutes=2))
    assert resumed.ok and resumed.upserts.inserted == 5
    assert len(tasks(store)) == 25


# -- end to end: time zones, links, deletions ----------------------------------------------------------


def test_comments_by_bots_or_trackloop_are_not_activity(standin: JiraStandin, tmp_path: Any) -> None:
    old = T0 - timedelta(days=20)
    for n in range(1, 4):
        standin.add_issue(f"ENG-{n}", summary=f"Task {n}", status="In Progress", created=old - timedelta(days=5),
                          updated=old)
        standin.add_comment(f"ENG-{n}", "on it", author="acc-ann", created=old)
    store = Store(f"sqlite:///{tmp_path / 'bots.db'}")
    assert sync(standin, store, bots=["ACC-CI"]).ok
    assert {t.last_activity_at for t in tasks(store).values()} == {old}
    now = T0 + timedelta(days=1)
    standin.add_comment("ENG-1", "build passed", author="acc-ci", created=now)
    standin.add_comment("ENG-2", f"Still on track?\n\n{{{{{marker_for('stale:ENG-2')}}}}}", created=now)  # the bot
    standin.add_comment("ENG-3", "done tomorrow", author="acc-bob", created=now)
    standin.reset_log()
    result = sync(standin, store, bots=["ACC-CI"])
    assert result.ok, result.error
    assert result.upserts.updated == 3 and not standin.requests("GET", r"/comment$|/myself$")  # no request per issue
    assert "comment" in searches(standin)[0].query["fields"]
    found = tasks(store)
    assert found["ENG-1"].last_activity_at == found["ENG-2"].last_activity_at == old
    assert found["ENG-1"].updated_at == found["ENG-2"].updated_at == now  # Jira did move them
    assert found["ENG-3"].last_activity_at == now  # a person's comment is activity
    types = rule_types()
    config = {rid: cls.config_model(enabled=False) for rid, cls in types.items()}
    config["stale_status"] = types["stale_status"].config_model()
    with store.transaction() as s:
        RulesEngine(build_rules(types, config), clock=lambda: now).run(s)
    with store.transaction() as s:
        assert {v.task.external_id for v in open_findings(s, rule="stale_status")} == {"ENG-1", "ENG-2"}
    store.close()


def test_account_time_zone_other_than_utc_does_not_hide_changes(cloud: JiraStandin, tmp_path: Any) -> None:
    """The account reads date strings in New York time (UTC-5); the epoch-ms bound is immune."""
    seed(cloud, 3)
    store = Store(f"sqlite:///{tmp_path / 'tz.db'}")
    assert sync(cloud, store).ok
    assert connector(cloud).check().detail.endswith("time zone America/New_York")

    cloud.update_issue("ENG-1", summary="changed a minute later", updated=T0 + timedelta(minutes=3))
    cloud.reset_log()
    result = sync(cloud, store)

    assert result.upserts.updated == 1 and tasks(store)["ENG-1"].title == "changed a minute later"
    jql = searches(cloud)[0].query["jql"][0]
    assert f"updated >= {floor_minute(to_ms(T0 + timedelta(minutes=2)) - 120_000)} " in jql
    assert '"' not in jql and "'" not in jql  # no date string the account's zone could misread


def test_link_directions_land_in_the_store(standin: JiraStandin, db_url: str) -> None:
    for n in (1, 2, 3):
        standin.add_issue(f"ENG-{n}", summary=f"Task {n}", updated=T0)
    standin.add_link("ENG-1", "Blocks", "ENG-2")  # ENG-1 blocks ENG-2
    standin.add_issue(
        "ENG-4", summary="dup", updated=T0, links=[("Duplicate", "ENG-1")]
    )  # ENG-4 duplicates ENG-1
    standin.add_issue("ENG-5", summary="sub-task", updated=T0, parent="ENG-1")
    standin.add_issue(
        "ENG-6", summary="related", updated=T0, links=[("Relates", "ENG-3"), ("Cloners", "ENG-3")]
    )
    store = Store(db_url)

    assert sync(standin, store).ok

    with store.transaction() as session:
        links = {
            (row.kind, row.src_external_id, row.dst_external_id) for row in session.scalars(select(TaskLink))
        }
    assert links == {
        ("blocks", "ENG-1", "ENG-2"),
        ("duplicate", "ENG-4", "ENG-1"),
        ("parent", "ENG-5", "ENG-1"),
        ("relates", "ENG-6", "ENG-3"),  # declared by both ends, one direction
    }
    store.close()


def test_full_sync_cancels_deleted_and_out_of_scope_issues(standin: JiraStandin, db_url: str) -> None:
    for key in ("ENG-1", "ENG-2", "ENG-3", "OPS-1", "OPS-2"):
        standin.add_issue(key, summary=key, labels=["sync"], updated=T0)
    store = Store(db_url)
    scope = {"jql": "project in (ENG, OPS) AND labels = sync"}
    assert sync(standin, store, **scope).upserts.inserted == 5

    standin.delete_issue("ENG-2")
    standin.update_issue("ENG-3", labels=["elsewhere"], updated=T0 + timedelta(hours=1))  # leaves the JQL
    standin.delete_issue("OPS-1")
    standin.delete_issue("OPS-2")  # the whole project is gone from the listing
    incremental = sync(standin, store, **scope)
    assert incremental.upserts.cancelled == 0  # an incremental listing vouches for nothing

    full = sync(standin, store, full=True, **scope)
    assert full.ok and full.upserts.cancelled == 4
    stored = tasks(store)
    assert {k for k, t in stored.items() if t.status == "cancelled"} == {"ENG-2", "ENG-3", "OPS-1", "OPS-2"}
    assert stored["ENG-1"].status == "todo" and len(stored) == 5  # kept, not deleted
    assert sync(standin, store, full=True, **scope).upserts.cancelled == 0
    store.close()


def test_a_changed_jql_relists_completely(standin: JiraStandin, tmp_path: Any) -> None:
    for key in ("ENG-1", "OPS-1"):
        standin.add_issue(key, summary=key, updated=T0)
    store = Store(f"sqlite:///{tmp_path / 'jql.db'}")
    assert sync(standin, store, jql="project in (ENG, OPS)").upserts.inserted == 2

    standin.reset_log()
    narrowed = sync(standin, store, jql="project = ENG")
    assert "updated >=" not in searches(standin)[0].query["jql"][0]
    assert narrowed.upserts.cancelled == 1 and tasks(store)["OPS-1"].status == "cancelled"
    store.close()


def test_malformed_issue_is_skipped_and_its_project_not_vouched_for(standin: JiraStandin) -> None:
    standin.add_issue("ENG-1", summary="fine", updated=T0)
    standin.add_issue("ENG-2", summary=None, updated=T0 + timedelta(minutes=1))  # type: ignore[arg-type]
    standin.add_issue("APP-1", summary="fine", updated=T0)

    [page] = list(connector(standin, jql="project in (ENG, APP)").pull(SyncState()))

    assert sorted(t.external_id for t in page.tasks) == ["APP-1", "ENG-1"]
    assert page.completed_scopes == ["APP"]
    assert page.cursor is not None and page.cursor.updated_ms == to_ms(T0 + timedelta(minutes=1))


# -- errors --------------------------------------------------------------------------------------------


def test_429_retry_after_is_honoured_by_the_single_retry_layer(cloud: JiraStandin) -> None:
    seed(cloud, 2)
    waits: list[float] = []
    cfg = app_config(cloud).connectors[NAME]
    conn = JiraConnector(NAME, cfg, sleep=waits.append)  # type: ignore[arg-type]
    cloud.inject(r"/search/jql$", status=429, retry_after=1)
    cloud.inject(r"/search/jql$", status=500)  # the library never retries a 500; the base does

    [page] = list(conn.pull(SyncState()))

    assert len(page.tasks) == 2 and conn.stats.retries == 2
    assert waits[0] == 1.0 and len(waits) == 2
    assert [r.status for r in searches(cloud)] == [429, 500, 200]


def test_a_long_retry_after_stops_the_sync_cleanly(cloud: JiraStandin, tmp_path: Any) -> None:
    seed(cloud, 3)
    store = Store(f"sqlite:///{tmp_path / 'rl.db'}")
    cloud.inject(r"/search/jql$", status=429, retry_after=3600)

    result = sync(cloud, store)

    assert result.ok and result.note is not None and "rate limited for 3600s" in result.note
    assert len(searches(cloud)) == 1
    conn = connector(cloud)
    cloud.inject(r"/search/jql$", status=429, retry_after=3600)
    with pytest.raises(RateLimited) as caught:
        list(conn.pull(SyncState()))
    assert caught.value.retry_after == 3600
    store.close()


@pytest.mark.parametrize("fault", ["bad token", "forbidden"])
def test_auth_failures_are_one_line_naming_the_connector(standin: JiraStandin, fault: str) -> None:
    seed(standin, 1)
    secret = standin.token
    if fault == "bad token":
        standin.token = "rotated"
    else:
        standin.forbid("/search")
    conn = connector(standin, token=secret)

    with pytest.raises(AuthError) as caught:
        list(conn.pull(SyncState()))

    message = str(caught.value)
    assert message.startswith("jira connector 'jira': ") and "\n" not in message and secret not in message
    assert ("401" if fault == "bad token" else "403") in message
    assert [r.status for r in standin.requests()][-1] in (401, 403)
    assert len([r for r in standin.requests() if r.status in (401, 403)]) == 1  # never retried
    check = connector(standin, token=secret).check()
    assert check.ok is (fault == "forbidden") and secret not in check.detail  # check() reads /myself only


def test_rejected_jql_is_reported_not_retried(cloud: JiraStandin) -> None:
    seed(cloud, 1)
    with pytest.raises(ConnectorError) as caught:
        list(connector(cloud, jql="project = NOPE").pull(SyncState()))
    assert "The value 'NOPE' does not exist for the field 'project'" in str(caught.value)
    assert not isinstance(caught.value, TransientError) and len(searches(cloud)) == 1


def test_truncated_json_is_transient(cloud: JiraStandin) -> None:
    seed(cloud, 1)
    cloud.inject(r"/search/jql$", kind="malformed")
    conn = connector(cloud)
    [page] = list(conn.pull(SyncState()))
    assert len(page.tasks) == 1 and conn.stats.retries == 1


def test_check_reports_deployment_account_and_time_zone(standin: JiraStandin) -> None:
    result = connector(standin, deployment="auto").check()
    assert result.ok
    kind = "Jira Cloud" if standin.cloud else "Jira Server/Data Center"
    assert (
        result.detail
        == f"{kind} at {standin.base_url}: signed in as Trackloop Bot (bot@acme.io), time zone UTC"
    )


# -- push ----------------------------------------------------------------------------------------------


def test_comment_is_posted_once_across_a_crash(standin: JiraStandin) -> None:
    standin.add_issue("ENG-1", summary="Unowned", updated=T0)
    action = Action(key="missing_owner:ENG-1:2024-01-16", kind="comment",
                    text="Who owns this?\nPlease assign someone.",
                    task_external_id="ENG-1")  # fmt: skip
    standin.inject(r"/comment$", method="POST", status=502, kind="after")  # posted, then the reply is lost

    with pytest.raises(PushError) as lost:
        connector(standin).push(action)
    assert lost.value.permanent is False and len(standin.comments("ENG-1")) == 1

    again = connector(standin).push(action)  # the outbox retries with a fresh connector

    [comment] = standin.comments("ENG-1")
    assert again.already_delivered and again.remote_id == comment["id"]
    assert comment["body"].splitlines()[0] == "Who owns this?"
    assert comment["body"].splitlines()[-1] in ("{{trackloop:missing_owner:ENG-1:2024-01-16}}",
                                                 "trackloop:missing_owner:ENG-1:2024-01-16")  # fmt: skip
    posts = standin.requests("POST", r"/comment$")
    assert len(posts) == 1 and posts[0].path == f"/rest/api/{3 if standin.cloud else 2}/issue/ENG-1/comment"


def test_push_finds_its_marker_among_many_comments(server: JiraStandin) -> None:
    server.add_issue("ENG-1", summary="Busy", updated=T0)
    for n in range(150):
        server.add_comment("ENG-1", f"chatter {n}", author="acc-ann")
    first = connector(server).push(Action(key="k1", kind="comment", text="nudge", task_external_id="ENG-1"))
    for n in range(120):
        server.add_comment("ENG-1", f"more chatter {n}", author="acc-ann")

    again = connector(server).push(Action(key="k1", kind="comment", text="nudge", task_external_id="ENG-1"))

    assert again == type(again)(first.remote_id, already_delivered=True)
    assert len(server.requests("GET", r"/comment$")) == 2 + 2  # newest first, 100 a page: the marker is
    # the 151st comment the first time and the 121st the second


def test_a_marker_quoted_by_someone_else_does_not_suppress_the_delivery(standin: JiraStandin) -> None:
    standin.add_issue("ENG-1", summary="Unowned", updated=T0)
    action = Action(key="k-quoted", kind="comment", text="Who owns this?", task_external_id="ENG-1")
    standin.add_comment("ENG-1", f"Quoting the bot:\n\n{marker_for(action.key)}", author="acc-ann")
    standin.reset_log()

    result = connector(standin).push(action)

    assert not result.already_delivered
    assert [c["author"] for c in standin.comments("ENG-1")] == ["acc-ann", standin.bot]
    assert len(standin.requests("GET", r"/myself$")) == 1
    assert connector(standin).push(action).already_delivered  # the bot's own comment does count


def test_pushes_reuse_the_deployment_the_last_sync_stored(standin: JiraStandin, tmp_path: Any) -> None:
    from sync.delivery import Deliverer

    standin.add_issue("ENG-1", summary="Unowned", updated=T0)
    store = Store(f"sqlite:///{tmp_path / 'push.db'}")
    assert sync(standin, store, deployment="auto").ok
    config = app_config(standin, store.url, deployment="auto")
    standin.reset_log()

    deliverer = Deliverer(store, config, TYPES, worker="w")
    for key in ("k1", "k2"):
        deliverer.connector(NAME).push(Action(key=key, kind="comment", text="hi", task_external_id="ENG-1"))
    deliverer.close()

    handshakes = standin.requests("GET", r"/serverInfo$")
    assert len(handshakes) == (1 if standin.cloud else 0)  # Cloud's library needs its own; Server needs none
    assert len(standin.comments("ENG-1")) == 2
    store.close()


def test_push_refuses_what_it_cannot_deliver(cloud: JiraStandin) -> None:
    cloud.add_issue("ENG-1", summary="x", updated=T0)
    conn = connector(cloud)
    for action in (
        Action(key="a", kind="dm", text="hi", target="acc-ann"),
        Action(key="b", kind="comment", text="hi", task_external_id="acme/api#4"),
    ):
        with pytest.raises(PushError) as caught:
            conn.push(action)
        assert caught.value.permanent
    with pytest.raises(PushError) as missing:
        conn.push(Action(key="c", kind="comment", text="hi", task_external_id="ENG-404"))
    assert missing.value.permanent and "404" in str(missing.value)
    cloud.forbid("/comment")
    with pytest.raises(PushError) as forbidden:
        conn.push(Action(key="d", kind="comment", text="hi", task_external_id="ENG-1"))
    assert forbidden.value.permanent and "403" in str(forbidden.value)


# -- demo ----------------------------------------------------------------------------------------------


def test_demo_jira_source_syncs_the_team(tmp_path: Any) -> None:
    from sync.demo import run_demo

    rows = {t["external_id"]: t for t in run_demo(tmp_path / "demo.db").tasks if t["kind"] == "jira"}

    assert sorted(rows) == [f"MIG-{n}" for n in range(1, 8)]
    assert (rows["MIG-1"]["owner"], rows["MIG-1"]["status"]) == ("bob", "in_progress")
    assert (rows["MIG-2"]["status"], rows["MIG-2"]["raw_status"]) == ("blocked", "Blocked")
    assert rows["MIG-3"]["owner"] is None and rows["MIG-7"]["status"] == "done"
    assert rows["MIG-1"]["url"].endswith("/browse/MIG-1")
