"""The `github` connector: pure mapping, config, the shared contract, and the issue's scenarios end to end.

End-to-end tests drive the real connector through real PyGithub, the loopback GitHub stand-in, the
SyncEngine and a real store (SQLite, and PostgreSQL when TRACKLOOP_TEST_DATABASE_URL is set). Time
never passes for real: the stand-in and the engine share an injected clock.
"""

from __future__ import annotations

import json
import re
import threading
import tomllib
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import requests
import responses
from sqlalchemy import select

from connectors.base import human_activity
from connectors.errors import AuthError, ConnectorError, PushError, RateLimited, TransientError
from connectors.github import (
    GithubConfig,
    GithubConnector,
    GithubCursor,
    MappingRules,
    acceptance_criteria,
    blocker_refs,
    cap_body,
    closing_refs,
    comment_trails,
    format_since,
    issue_record,
    marker_for,
    parse_external_id,
    pull_request_activities,
    task_list_refs,
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
from store.errors import ConfigError
from store.findings import open_findings
from store.models import Person, SyncStateRow, Task, TaskEvent, TaskLink
from sync.config import AppConfig, parse_config
from sync.engine import SyncEngine, SyncResult
from sync.standins.base import Request, Response
from sync.standins.github import GithubStandin
from tests.conftest import Clock
from tests.contract import ConnectorContract

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
API = "https://api.github.com"


# -- doc-shaped payloads ----------------------------------------------------------------------
def user(login: str, kind: str = "User") -> dict[str, Any]:
    return {
        "login": login,
        "id": 1,
        "node_id": "MDQ6VXNlcjE=",
        "type": kind,
        "site_admin": False,
        "url": f"{API}/users/{login}",
        "html_url": f"https://github.com/{login}",
    }


def issue_payload(number: int = 1347, **over: Any) -> dict[str, Any]:
    """Shaped like the "List repository issues" example in GitHub's REST docs."""
    base: dict[str, Any] = {
        "id": 1,
        "node_id": "MDU6SXNzdWUx",
        "url": f"{API}/repos/octocat/Hello-World/issues/{number}",
        "repository_url": f"{API}/repos/octocat/Hello-World",
        "html_url": f"https://github.com/octocat/Hello-World/issues/{number}",
        "number": number,
        "state": "open",
        "title": "Found a bug",
        "body": "I'm having a problem with this.",
        "user": user("octocat"),
        "labels": [
            {
                "id": 208045946,
                "name": "bug",
                "description": "Something isn't working",
                "color": "f29513",
                "default": True,
            }
        ],
        "assignee": user("octocat"),
        "assignees": [user("octocat")],
        "milestone": {
            "id": 1002604,
            "number": 1,
            "state": "open",
            "title": "v1.0",
            "due_on": "2012-10-09T23:39:01Z",
            "creator": user("octocat"),
        },
        "locked": True,
        "active_lock_reason": "too heated",
        "comments": 0,
        "closed_at": None,
        "created_at": "2011-04-22T13:33:48Z",
        "updated_at": "2011-04-22T13:33:48Z",
        "closed_by": None,
        "author_association": "COLLABORATOR",
        "state_reason": None,
    }
    base.update(over)
    return base


def pr_payload(number: int = 20, body: str = "Fixes #7", **over: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "body": body,
        "html_url": f"https://github.com/octocat/Hello-World/pull/{number}",
        "pull_request": {"url": f"{API}/repos/octocat/Hello-World/pulls/{number}", "merged_at": None},
        "updated_at": "2011-05-01T10:00:00Z",
    }
    return issue_payload(number, **{**fields, **over})


# -- mapping ---------------------------------------------------------------------------------
def test_doc_example_maps_to_the_canonical_task() -> None:
    rec = issue_record(issue_payload())
    assert rec.external_id == "octocat/hello-world#1347"
    assert rec.scope == "octocat/hello-world"
    assert rec.url == "https://github.com/octocat/Hello-World/issues/1347"
    assert (rec.title, rec.body, rec.status, rec.raw_status) == (
        "Found a bug",
        "I'm having a problem with this.",
        Status.TODO,
        "open",
    )
    assert rec.assignees == (IdentityRef(IdentityKind.GITHUB, "octocat"),)
    assert rec.reporter == IdentityRef(IdentityKind.GITHUB, "octocat")
    assert rec.labels == ("bug",)
    assert rec.due == date(2012, 10, 9)
    assert (
        rec.created_at
        == rec.updated_at
        == rec.last_activity_at
        == datetime(2011, 4, 22, 13, 33, 48, tzinfo=UTC)
    )
    assert rec.closed_at is None and rec.priority is Priority.NONE and not rec.verified
    assert rec.extra == {
        "repo": "octocat/hello-world",
        "number": 1347,
        "comments": 0,
        "milestone": "v1.0",
        "locked": True,
    }


def test_milestone_due_is_its_utc_date() -> None:
    late = {"title": "m", "due_on": "2026-03-01T23:30:00-05:00"}  # 04:30 UTC on March 2nd
    assert issue_record(issue_payload(milestone=late)).due == date(2026, 3, 2)
    assert issue_record(issue_payload(milestone={"title": "m", "due_on": None})).due is None


@pytest.mark.parametrize(
    ("state", "reason", "status", "raw"),
    [
        ("closed", "completed", Status.DONE, "closed/completed"),
        ("closed", "not_planned", Status.CANCELLED, "closed/not_planned"),
        ("closed", "duplicate", Status.CANCELLED, "closed/duplicate"),
        ("closed", None, Status.DONE, "closed"),
        ("open", "reopened", Status.TODO, "open/reopened"),
    ],
)
def test_state_and_state_reason(state: str, reason: str | None, status: Status, raw: str) -> None:
    closed = "2011-05-01T00:00:00Z" if state == "closed" else None
    rec = issue_record(issue_payload(state=state, state_reason=reason, closed_at=closed))
    assert (rec.status, rec.raw_status) == (status, raw)
    assert rec.closed_at == (datetime(2011, 5, 1, tzinfo=UTC) if closed else None)
    assert rec.status_changed_at == rec.closed_at


def test_labels_set_priority_status_and_verified_case_insensitively() -> None:
    def labels(*names: str) -> list[dict[str, Any]]:
        return [{"name": n} for n in names]

    rec = issue_record(issue_payload(labels=labels("P2", "Urgent", "In Progress")))
    assert rec.priority is Priority.HIGH and rec.status is Status.IN_PROGRESS  # the highest priority wins
    assert issue_record(issue_payload(labels=labels("doing", "BLOCKED"))).status is Status.BLOCKED
    assert issue_record(issue_payload(labels=labels("priority:low"))).priority is Priority.LOW
    closed = issue_record(issue_payload(state="closed", labels=labels("Verified", "blocked")))
    assert closed.verified and closed.status is Status.DONE  # status labels only shape open issues
    rules = MappingRules(priority_labels={"high": ["sev1"]}, status_labels={}, verified_labels=("qa-ok",))
    custom = issue_record(issue_payload(labels=labels("SEV1", "doing", "qa-ok")), rules)
    assert (custom.priority, custom.status, custom.verified) == (Priority.HIGH, Status.TODO, True)


def test_assignees_one_owner_or_shared() -> None:
    shared = issue_record(issue_payload(assignees=[user("alice"), user("bob")], assignee=user("alice")))
    assert [a.value for a in shared.assignees] == ["alice", "bob"]
    assert shared.extra["shared_owners"] == ["alice", "bob"]
    nobody = issue_record(issue_payload(assignees=[], assignee=None))
    assert nobody.assignees == () and "shared_owners" not in nobody.extra
    legacy = issue_record(issue_payload(assignees=None, assignee=user("carol")))  # only the old field
    assert [a.value for a in legacy.assignees] == ["carol"]


def test_ghost_and_null_users_empty_bodies_and_odd_labels_do_not_crash() -> None:
    rec = issue_record(
        issue_payload(
            user=user("ghost"),
            assignees=[user("ghost"), None, {"id": 3}],
            assignee=None,
            body=None,
            labels=[
                "plain-string",
                {"name": "🔥 hot, fix"},
                {"name": None},
                {"color": "fff"},
                {"name": "  "},
                7,
            ],
            milestone=None,
            comments=None,
        )
    )
    assert rec.reporter is None and rec.assignees == ()
    assert rec.body == "" and rec.acceptance_criteria is None
    assert rec.labels == ("plain-string", "🔥 hot, fix")
    assert issue_record(issue_payload(user=None)).reporter is None


def test_huge_bodies_are_capped_and_flagged_nul_characters_dropped() -> None:
    body = "## Acceptance criteria\n- works\n\nblocked by #9\n" + "é" * 40_000 + "\x00tail"
    rec = issue_record(issue_payload(body=body, title="nul\x00title"), MappingRules(max_body_bytes=2048))
    assert len(rec.body.encode()) <= 2048 and rec.extra["body_truncated"] is True
    assert "\x00" not in rec.body and rec.title == "nultitle"
    assert rec.acceptance_criteria == "- works\n\nblocked by #9\n" + "é" * 40_000 + "tail"
    assert LinkRecord(LinkKind.BLOCKS, TaskRef("octocat/hello-world#9"), inverse=True) in rec.links
    assert cap_body("aé", 2) == ("a", True) and cap_body("ab", 2) == ("ab", False)


def test_malformed_payloads_raise_so_the_page_can_skip_them() -> None:
    for bad in (
        issue_payload(title=None),
        issue_payload(number="7"),
        issue_payload(updated_at="yesterday"),
        issue_payload(repository_url=None, html_url=None),
    ):
        with pytest.raises((KeyError, TypeError, ValueError)):
            issue_record(bad)


def test_dependencies_parents_and_references() -> None:
    body = (
        "Blocked by #12 and #13, depends on acme/web#7\n"
        "Depends on: https://github.com/Acme/Infra/issues/4\n"
        "```\nblocked by #99\n```\n"
        "> blocked by #98 (quoted)\n"
        "see `depends on #97` and issue#96\n"
        "- [ ] #21\n- [x] acme/web#22 ship it\n* [ ] https://github.com/acme/api/issues/23\n"
        "- [ ] not a reference #24\n"
        "<!-- blocked by #95 -->\n"
    )
    assert blocker_refs(body, "acme/api") == ["acme/api#12", "acme/api#13", "acme/web#7", "acme/infra#4"]
    assert task_list_refs(body, "acme/api") == ["acme/api#21", "acme/web#22", "acme/api#23"]
    rec = issue_record(
        issue_payload(
            body=body,
            repository_url=f"{API}/repos/acme/api",
            html_url="https://github.com/acme/api/issues/1",
            number=1,
        )
    )
    assert LinkRecord(LinkKind.BLOCKS, TaskRef("acme/web#7"), inverse=True) in rec.links
    assert LinkRecord(LinkKind.PARENT, TaskRef("acme/api#21"), inverse=True) in rec.links
    assert not any(link.kind is LinkKind.RELATES for link in rec.links)  # only pull requests relate
    assert len(rec.links) == len(set(rec.links)) == 7


def test_closing_keywords() -> None:
    body = "Fixes #7, closes acme/web#8\nresolved: https://github.com/acme/api/issues/9\nfixing #10 prefix#11"
    assert closing_refs(body, "acme/api") == ["acme/api#7", "acme/web#8", "acme/api#9"]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("Intro\n## Acceptance criteria\n- [ ] a\n- [ ] b\n## Notes\nx", "- [ ] a\n- [ ] b"),
        (
            "### Acceptance Criteria:\nGiven X\n#### detail\nstill in\n## Next\nout",
            "Given X\n#### detail\nstill in",
        ),
        ("**Acceptance criteria**\nIt works.\n\n**Out of scope**\nno", "It works."),
        ("Acceptance criteria:\n- it works\n# Other", "- it works"),
        ("## Acceptance criteria\n```\n# not a heading\n```\nend", "```\n# not a heading\n```\nend"),
        ("## Acceptance criteria\n\n## Next", None),
        ("No criteria here", None),
    ],
)
def test_acceptance_criteria_section(body: str, expected: str | None) -> None:
    assert acceptance_criteria(body) == expected


def test_pull_requests_relate_and_count_as_activity_unless_a_bot_wrote_them() -> None:
    pr = pr_payload(body="Fixes #7 and closes acme/web#3")
    rec = issue_record(pr)
    assert rec.status is Status.IN_PROGRESS and rec.extra["pull_request"] is True
    assert LinkRecord(LinkKind.RELATES, TaskRef("octocat/hello-world#7")) in rec.links
    [first, second] = pull_request_activities(pr)
    assert first.target == TaskRef("octocat/hello-world#7") and second.target == TaskRef("acme/web#3")
    assert first.at == datetime(2011, 5, 1, 10, tzinfo=UTC)
    assert first.actor == IdentityRef(IdentityKind.GITHUB, "octocat")
    assert first.what == "pull request octocat/hello-world#20"
    assert pull_request_activities(pr_payload(user=user("dependabot[bot]", "Bot"))) == []
    assert pull_request_activities(pr, MappingRules(bots=frozenset({"octocat"}))) == []
    assert pull_request_activities(issue_payload(body="fixes #7")) == []  # issues do not close issues
    merged = pr_payload(
        state="closed",
        closed_at="2011-05-02T00:00:00Z",
        pull_request={"url": "x", "merged_at": "2011-05-02T00:00:00Z"},
    )
    assert issue_record(merged).status is Status.DONE
    assert (
        issue_record(pr_payload(state="closed", closed_at="2011-05-02T00:00:00Z")).status is Status.CANCELLED
    )


def test_comment_trails_tell_bots_and_trackloop_from_people() -> None:
    def comment(number: int, login: str, at: str, kind: str = "User", body: str = "hi") -> dict[str, Any]:
        return {"issue_url": f"https://api.github.com/repos/acme/api/issues/{number}", "body": body,
                "user": {"login": login, "type": kind}, "created_at": at, "updated_at": at}

    trails = comment_trails(
        [
            comment(1, "stale[bot]", "2026-11-02T10:00:00Z"),
            comment(1, "alice", "2026-11-01T10:00:00Z"),
            comment(2, "ci", "2026-11-02T10:00:00Z", kind="Bot"),
            comment(3, "bob", "2026-11-02T10:00:00Z", body="ping <!-- trackloop:stale:acme/api#3 -->"),
            comment(4, "alice", "2026-11-02T10:00:00Z"),
            comment(4, "renovate", "2026-11-02T09:00:00Z"),
            comment(5, "me", "2026-11-02T10:00:00Z"),
            {"issue_url": None},
        ],
        MappingRules(bots=frozenset({"renovate"})),
        own="ME",
    )
    at = datetime(2026, 11, 2, 10, tzinfo=UTC)
    assert trails[1].by_bot and trails[1].latest == at and trails[1].human == at - timedelta(days=1)
    assert trails[2].by_bot and trails[3].by_bot and trails[5].by_bot and trails[2].human is None
    assert not trails[4].by_bot and trails[4].human == at
    record = issue_record(issue_payload(updated_at="2026-11-02T10:00:02Z", created_at="2026-10-01T00:00:00Z"))
    assert human_activity(record, trails[1]).last_activity_at == at - timedelta(days=1)  # the human's comment
    assert human_activity(record, trails[2]).last_activity_at == datetime(2026, 10, 1, tzinfo=UTC)  # creation
    assert human_activity(record, trails[4]) is record  # a person wrote the newest comment
    later = issue_record(issue_payload(updated_at="2026-11-02T10:05:00Z"))
    assert human_activity(later, trails[1]) is later  # something after the bot's comment: not explained by it


def test_helpers() -> None:
    assert parse_external_id("Acme/API#42") == ("acme/api", 42)
    with pytest.raises(ValueError, match="owner/repo#N"):
        parse_external_id("OPS-12")
    assert marker_for("nudge:acme/api#4:2026-11-02") == "<!-- trackloop:nudge:acme/api#4:2026-11-02 -->"
    hashed = marker_for("evil --> <b>")
    assert hashed.startswith("<!-- trackloop:sha256-") and hashed.count("-->") == 1
    eastern = timezone(timedelta(hours=-5))
    assert format_since(datetime(2026, 11, 2, 4, 0, tzinfo=eastern)) == "2026-11-02T09:00:00Z"


# -- config ----------------------------------------------------------------------------------
def section(**over: Any) -> dict[str, Any]:
    return {"type": "github", "token": "${GITHUB_TOKEN}", "repos": ["acme/api"], **over}


def load(sec: dict[str, Any]) -> AppConfig:
    return parse_config(
        {"connectors": {"gh": sec}},
        env={"GITHUB_TOKEN": "s3cret"},
        connector_types={"github": GithubConnector},
    )


def test_config_defaults_and_secret() -> None:
    cfg = load(section(repos=["Acme/API", "acme/*", "acme/api"])).connectors["gh"]
    assert isinstance(cfg, GithubConfig)
    assert cfg.repos == ["acme/api", "acme/*"]
    assert cfg.token.get_secret_value() == "s3cret" and "s3cret" not in repr(cfg)
    assert cfg.base_url == "https://api.github.com" and not cfg.include_pull_requests
    assert cfg.priority_labels["high"] == ["priority:high", "p1", "urgent"]
    assert cfg.status_labels == {"in_progress": ["in progress", "doing"], "blocked": ["blocked"]}
    assert load(section(base_url="https://ghe.example.com/api/v3/")).connectors["gh"].base_url == (
        "https://ghe.example.com/api/v3"
    )


@pytest.mark.parametrize(
    ("over", "message"),
    [
        (
            {"repos": ["acme/api", "acme"]},
            'connectors.gh.repos[1]: expected "owner/name", got "acme"',
        ),
        ({"repos": []}, "connectors.gh.repos"),
        ({"base_url": "api.github.com"}, "connectors.gh.base_url: expected an http(s) URL"),
        ({"colour": 1}, "connectors.gh.colour"),
        ({"priority_labels": {"urgent": ["x"]}}, "connectors.gh.priority_labels.urgent"),
        ({"min_remaining": -1}, "connectors.gh.min_remaining"),
    ],
)
def test_config_errors_name_the_key(over: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(section(**over))
    assert message in str(info.value)


def test_example_config_shows_every_key() -> None:
    root = Path(__file__).resolve().parent.parent
    example = tomllib.loads((root / "config.example.toml").read_text())["connectors"]["gh"]
    assert set(GithubConfig.model_fields) == set(example)
    assert example["token"] == "${GITHUB_TOKEN}"
    shown = load(example).connectors["gh"]
    defaults = load(section(repos=["acme/api", "acme/web"], bots=["renovate-bot"])).connectors["gh"]
    assert shown == defaults  # the example shows the defaults


# -- the stand-in world ----------------------------------------------------------------------
def _stop_later(standin: GithubStandin) -> None:
    threading.Thread(target=standin.stop, daemon=True).start()  # stop() waits out a poll interval


class HookedStandin(GithubStandin):
    """The stand-in with a hook run before chosen requests are answered (a change made mid-crawl)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.hooks: list[tuple[Callable[[Request], bool], Callable[[], None]]] = []

    def handle(self, req: Request) -> Response:
        for when, action in list(self.hooks):
            if when(req):
                self.hooks.remove((when, action))
                action()
        return super().handle(req)


class Env:
    """A stand-in, a clock both sides share, a store and the engine, as a test needs them."""

    def __init__(self, gh: HookedStandin, clock: Clock, store: Store) -> None:
        self.gh, self.clock, self.store = gh, clock, store
        self.section: dict[str, Any] = {
            "type": "github",
            "token": "test-token",
            "base_url": gh.base_url,
            "repos": ["acme/api", "acme/web"],
            "retry": {"attempts": 3},
        }

    def config(self, **over: Any) -> AppConfig:
        people = {"alice": {"email": "alice@example.com", "github": "alice-k"}}
        return parse_config(
            {
                "store": {"url": self.store.url},
                "people": people,
                "connectors": {"gh": {**self.section, **over}},
            },
            env={},
            connector_types={"github": GithubConnector},
        )

    def run(self, *, full: bool = False, **over: Any) -> SyncResult:
        engine = SyncEngine(self.store, self.config(**over), {"github": GithubConnector}, clock=self.clock)
        [result] = engine.run(full=full)
        return result

    def connector(self, **over: Any) -> GithubConnector:
        return GithubConnector("gh", self.config(**over).connectors["gh"], clock=self.clock)  # type: ignore[arg-type]

    def tick(self, **kw: float) -> None:
        self.gh.set_now(self.clock.advance(**kw))

    def seed(self, repo: str, n: int, **kw: Any) -> None:
        for i in range(n):
            self.gh.add_issue(
                repo,
                title=f"{repo} task {i}",
                created_at=self.clock.now - timedelta(days=400 - i, seconds=-i),
                **kw,
            )

    def log(self, method: str = "GET", pattern: str = "") -> list[Any]:
        return self.gh.requests(method, pattern or None)

    def tasks(self) -> dict[str, Task]:
        with self.store.transaction() as s:
            rows = s.scalars(select(Task).where(Task.source == "gh")).all()
            s.expunge_all()
            return {t.external_id: t for t in rows}

    def cursor(self) -> tuple[GithubCursor | None, dict[str, str]]:
        with self.store.transaction() as s:
            row = s.get(SyncStateRow, "gh")
            if row is None:
                return None, {}
            return (GithubCursor.model_validate(row.cursor) if row.cursor else None), dict(
                row.validators or {}
            )


@pytest.fixture
def gh(clock: Clock) -> Iterator[HookedStandin]:
    standin = HookedStandin()
    standin.set_now(clock.now)
    standin.add_repo("acme/api")
    standin.add_repo("acme/web")
    standin.start()
    yield standin
    _stop_later(standin)


@pytest.fixture
def env(gh: HookedStandin, clock: Clock, store: Store) -> Env:
    return Env(gh, clock, store)


@pytest.fixture
def lite(gh: HookedStandin, clock: Clock, tmp_path: Any) -> Iterator[Env]:
    """SQLite only, for scenarios about the wire rather than the store."""
    store = Store(f"sqlite:///{tmp_path / 'lite.db'}")
    yield Env(gh, clock, store)
    store.close()


# -- the shared contract ---------------------------------------------------------------------
class GithubWorld:
    kind = "github"
    connector_type = GithubConnector
    page_size = 100

    def __init__(self, standin: GithubStandin) -> None:
        self.gh = standin
        self.created = 0

    def section(self) -> dict[str, Any]:
        return {"type": "github", "token": "test-token", "base_url": self.gh.base_url, "repos": ["acme/api"]}

    def seed(self, n: int) -> None:
        for _ in range(n):
            self.created += 1
            self.gh.add_issue("acme/api", title=f"task {self.created}")

    def modify(self, count: int) -> None:
        for number in range(1, count + 1):
            self.gh.update_issue("acme/api", number, title=f"task {number} (edited)")

    def break_auth(self) -> None:
        self.gh.token = "rotated-elsewhere"

    def inject_transient(self, times: int) -> None:
        self.gh.inject(r"/issues$", status=502, times=times, retry_after=0)

    def add_malformed(self) -> None:
        self.gh.add_issue("acme/api", title=None)  # type: ignore[arg-type]  # GitHub never sends a null title

    def request_count(self) -> int:
        return len(self.gh.requests())

    def push_action(self, key: str) -> Action:
        return Action(key=key, kind="comment", text="Still on track?", task_external_id="acme/api#1")

    def deliveries(self, key: str) -> int:
        return sum(marker_for(key) in c["body"] for c in self.gh.comments("acme/api", 1))

    def secret(self) -> str:
        return "test-token"


class TestGithubContract(ConnectorContract):
    @pytest.fixture
    def world(self) -> Iterator[GithubWorld]:
        standin = GithubStandin()
        standin.add_repo("acme/api")
        standin.start()
        yield GithubWorld(standin)
        _stop_later(standin)


# -- pull, end to end ------------------------------------------------------------------------
def test_first_sync_paginates_with_no_request_per_issue(env: Env) -> None:
    env.seed("acme/api", 250, labels=["p1"], assignees=["alice-k"])
    env.seed("acme/web", 3)
    result = env.run()
    assert result.ok, result.error
    assert result.upserts.inserted == 253 and len(env.tasks()) == 253
    api = env.log("GET", "/acme/api/issues$")
    assert [r.query.get("page") for r in api] == [None, ["2"], ["3"]]  # ceil(250 / 100), nothing more
    assert all(
        r.query["state"] == ["all"]
        and r.query["sort"] == ["updated"]
        and r.query["direction"] == ["desc"]
        and r.query["per_page"] == ["100"]
        and "since" not in r.query
        for r in api
    )
    assert len(env.log()) == 4 and not env.log("POST")  # 3 + 1 list pages, no per-issue, /user or get_repo
    assert result.requests.requests == 4 and result.requests.rate_limit_remaining == 4996
    task = env.tasks()["acme/api#1"]
    assert task.priority == "high" and task.scope == "acme/api"
    with env.store.transaction() as s:
        assert s.scalar(select(Person.key).where(Person.id == task.owner_id)) == "alice"
    cursor, validators = env.cursor()
    assert (
        cursor is not None and cursor.repos["acme/api"].since == T0 and cursor.repos["acme/api"].crawl is None
    )
    assert set(validators) == {"issues:acme/api", "issues:acme/web"}


def test_incremental_sync_reads_only_the_head_and_idle_sync_is_one_304_per_repo(env: Env) -> None:
    env.seed("acme/api", 150)
    env.seed("acme/web", 2)
    assert env.run().ok
    env.tick(minutes=10)
    env.gh.reset_log()

    idle = env.run()
    assert idle.ok and idle.pages == 0
    assert [(r.path, r.status) for r in env.log(None)] == [
        ("/repos/acme/api/issues", 304),
        ("/repos/acme/web/issues", 304),
    ]
    assert all(r.headers.get("if-none-match") for r in env.log())
    assert (idle.requests.requests, idle.requests.not_modified) == (2, 2)

    env.tick(minutes=10)
    env.gh.update_issue("acme/api", 7, title="renamed")
    env.gh.add_issue("acme/api", title="brand new")
    env.gh.reset_log()
    result = env.run()
    assert result.ok, result.error
    assert (result.upserts.inserted, result.upserts.updated) == (1, 1)
    assert [(r.path, r.status) for r in env.log(None)] == [
        ("/repos/acme/api/issues", 200),
        ("/repos/acme/api/issues/comments", 200),  # who wrote the new comments: one listing per changed repo
        ("/repos/acme/web/issues", 304),
    ]
    assert env.tasks()["acme/api#7"].title == "renamed"
    env.gh.reset_log()
    assert env.run().pages == 0 and [r.status for r in env.log()] == [304, 304]  # idle again at once


def test_many_changes_continue_with_since_in_utc(env: Env) -> None:
    env.seed("acme/api", 260)
    assert env.run().ok
    before = env.clock.now
    env.tick(hours=1)
    for number in range(1, 131):
        env.gh.update_issue("acme/api", number, body=f"edit {number}")
    env.tick(minutes=1)
    env.gh.reset_log()
    result = env.run(repos=["acme/api"])
    assert result.ok and result.upserts.updated == 130
    pages = env.log("GET", "/issues$")
    assert [r.query.get("page") for r in pages] == [None, ["2"]]
    assert "since" not in pages[0].query  # the head page keeps a stable URL for its ETag
    assert pages[1].query["since"] == [format_since(before - timedelta(minutes=5))]
    assert pages[1].query["since"][0].endswith("Z")


def test_since_is_sent_in_utc_whatever_the_clock_zone(lite: Env) -> None:
    lite.seed("acme/api", 120)
    eastern = timezone(timedelta(hours=-5))
    lite.clock.now = T0.astimezone(eastern)
    assert lite.run(repos=["acme/api"]).ok
    lite.clock.advance(hours=1)
    lite.gh.set_now(lite.clock.now.astimezone(UTC))  # the stand-in keeps UTC
    for number in range(1, 120):
        lite.gh.update_issue("acme/api", number, body="x")
    lite.gh.reset_log()
    assert lite.run(repos=["acme/api"]).ok
    assert lite.log("GET", "/issues$")[1].query["since"] == ["2026-11-02T08:55:00Z"]


def test_an_issue_updated_mid_crawl_is_repeated_or_left_to_the_next_crawl_never_lost(env: Env) -> None:
    env.seed("acme/api", 250)  # newest-first: page 1 holds #250..#151, page 3 holds #50..#1

    def edit_two() -> None:  # while page 2 is about to be read, someone edits #200 (read) and #1 (not yet)
        for number in (200, 1):
            env.gh.update_issue("acme/api", number, title=f"#{number} edited mid-crawl")

    env.gh.hooks.append((lambda r: r.query.get("page") == ["2"], edit_two))
    first = env.run()
    assert first.ok
    # both jumped to the front: two issues slid from page 1 onto page 2 and were read twice (upserts)
    assert (first.upserts.inserted, first.upserts.unchanged) == (249, 1) and len(env.tasks()) == 249
    assert "acme/api#1" not in env.tasks()  # updated after the crawl started: the next crawl's business
    env.tick(minutes=1)
    again = env.run()
    assert again.ok and (again.upserts.inserted, again.upserts.updated) == (1, 1) and len(env.tasks()) == 250
    assert env.tasks()["acme/api#1"].title == "#1 edited mid-crawl"
    assert env.tasks()["acme/api#200"].title == "#200 edited mid-crawl"


def test_overlap_repeats_are_upserts(env: Env) -> None:
    env.seed("acme/api", 30)
    assert env.run().ok
    env.tick(minutes=2)  # inside the 5-minute overlap: the whole head page is "recent"
    env.gh.update_issue("acme/api", 3, title="changed")
    result = env.run()
    assert result.ok and (result.upserts.inserted, result.upserts.updated, result.upserts.unchanged) == (
        0,
        1,
        29,
    )
    assert len(env.tasks()) == 30


def test_rate_limit_floor_stops_cleanly_and_the_next_run_resumes(env: Env) -> None:
    env.seed("acme/api", 350)
    env.seed("acme/web", 5)
    env.gh.rate_limit_remaining = 51  # floor 50: two pages leave 49, below the floor
    stopped = env.run()
    assert stopped.ok and stopped.note and "rate limit low (49 requests left, floor 50)" in stopped.note
    assert stopped.pages == 2 and len(env.tasks()) == 200
    assert len(env.log()) == 2
    cursor, _ = env.cursor()
    assert cursor is not None and cursor.repos["acme/api"].crawl is not None
    assert cursor.repos["acme/api"].crawl.page == 3

    env.gh.rate_limit_remaining = 5000
    env.tick(minutes=5)
    env.gh.reset_log()
    resumed = env.run()
    assert resumed.ok and resumed.note is None
    assert [r.query.get("page") for r in env.log("GET", "/acme/api/")] == [["3"], ["4"]]  # no page re-read
    assert len(env.tasks()) == 355
    cursor, validators = env.cursor()
    assert (
        cursor is not None and cursor.repos["acme/api"].since == T0 and cursor.repos["acme/api"].crawl is None
    )
    env.gh.reset_log()
    assert env.run().pages == 0 and [r.status for r in env.log()] == [304, 304]


def test_exhausted_rate_limit_403_stops_without_waiting(lite: Env) -> None:
    lite.seed("acme/api", 3)
    lite.gh.rate_limit_remaining = 0
    result = lite.run()
    assert result.ok and result.note and "rate limit exhausted (403 API rate limit exceeded" in result.note
    assert len(lite.log()) == 1 and result.requests.retries == 0


def test_secondary_rate_limits_and_5xx_are_retried_by_the_one_tenacity_layer(lite: Env) -> None:
    lite.seed("acme/api", 3)
    lite.gh.inject(r"/acme/api/issues$", status=403, retry_after=0)
    lite.gh.inject(r"/acme/api/issues$", status=429, retry_after=0)
    result = lite.run(repos=["acme/api"])
    assert result.ok, result.error
    assert result.requests.retries == 2 and len(lite.log()) == 3 and len(lite.tasks()) == 3


def test_a_secondary_limit_longer_than_max_wait_stops_cleanly_after_one_request(env: Env) -> None:
    env.seed("acme/api", 3)
    env.seed("acme/web", 3)
    assert env.run().ok
    before = env.cursor()
    env.tick(minutes=10)
    env.gh.update_issue("acme/web", 1, title="changed")
    env.gh.reset_log()
    env.gh.inject(r"/acme/api/issues$", status=403, retry_after=3600)
    stopped = env.run()
    assert stopped.ok and stopped.stopped_early and stopped.error is None
    assert stopped.note and "secondary rate limit" in stopped.note and "rate limited for 3600s" in stopped.note
    assert len(env.log(None)) == 1 and stopped.requests.retries == 0  # acme/web is not asked while limited
    assert env.cursor() == before and env.tasks()["acme/web#1"].title != "changed"
    with env.store.transaction() as s:
        assert s.get(SyncStateRow, "gh").last_error == stopped.note  # type: ignore[union-attr]
    env.gh.reset_log()
    resumed = env.run()
    assert resumed.ok and resumed.note is None and env.tasks()["acme/web#1"].title == "changed"


def test_a_502_storm_on_one_repo_does_not_stop_the_others(env: Env) -> None:
    env.seed("acme/api", 5)
    env.seed("acme/web", 5)
    env.gh.inject(r"/acme/api/issues$", status=502, times=-1, retry_after=0)
    result = env.run()
    assert not result.ok and result.error
    assert "1 of 2 GitHub listing(s) failed: acme/api: GitHub answered 502 Bad Gateway" in result.error
    assert sorted(env.tasks()) == [f"acme/web#{n}" for n in range(1, 6)]
    assert len(env.log("GET", "/acme/api/")) == 3  # retry.attempts, then on to the next repo
    cursor, validators = env.cursor()
    assert cursor is not None and "acme/api" not in cursor.repos and "issues:acme/api" not in validators

    env.gh.clear_faults()
    env.gh.reset_log()
    healed = env.run()
    assert healed.ok and len(env.tasks()) == 10
    assert [r.path for r in env.log()] == ["/repos/acme/api/issues", "/repos/acme/web/issues"]


def fail_from(env: Env, page: str, times: int) -> None:
    """Make acme/api's listing fail `times` times from page `page` on (armed as the page before is served)."""
    fault = env.gh.inject(r"/acme/api/issues$", status=502, times=0, retry_after=0)
    before = None if page == "2" else [str(int(page) - 1)]
    env.gh.hooks.append(
        (
            lambda r: r.path.endswith("/acme/api/issues") and r.query.get("page") == before,
            lambda: setattr(fault, "times", times),
        )
    )


def test_a_crawl_that_failed_half_way_resumes_and_cancels_nothing(env: Env) -> None:
    env.seed("acme/api", 250)
    fail_from(env, "3", 3)  # retry.attempts = 3: page 3 fails for good in this run
    broken = env.run(repos=["acme/api"])
    assert not broken.ok and len(env.tasks()) == 200
    env.tick(minutes=1)
    env.gh.reset_log()
    resumed = env.run(repos=["acme/api"])
    assert resumed.ok and len(env.tasks()) == 250
    assert [r.query.get("page") for r in env.log()] == [["3"]]
    assert resumed.upserts.cancelled == 0  # a resumed crawl did not see pages 1-2: it vouches for nothing
    env.gh.reset_log()
    assert env.run(repos=["acme/api"]).pages == 0 and [r.status for r in env.log()] == [304]


def test_full_sync_cancels_deleted_and_transferred_issues_and_keeps_them(env: Env) -> None:
    env.seed("acme/api", 6)
    assert env.run().ok
    env.tick(hours=1)
    env.gh.delete_issue("acme/api", 2)
    env.gh.transfer_issue("acme/api", 3, "acme/web")
    incremental = env.run()
    assert incremental.ok and incremental.upserts.cancelled == 0  # only a full listing vouches for absence
    env.gh.reset_log()
    full = env.run(full=True)
    assert full.ok and full.upserts.cancelled == 2
    tasks = env.tasks()
    assert tasks["acme/api#2"].status == "cancelled" and tasks["acme/api#3"].status == "cancelled"
    assert tasks["acme/web#1"].title == "acme/api task 2"  # the transferred issue, under its new name
    assert tasks["acme/api#1"].status == "todo"
    listings = env.log("GET", "/issues$")
    assert len(listings) == 2 and not any(r.headers.get("if-none-match") for r in listings)  # unconditional
    asked = [(r.path, r.status) for r in env.log("GET", r"/issues/\d+$")]
    assert asked == [  # only the two candidates: 410 deleted, 301 transferred (followed)
        ("/repos/acme/api/issues/2", 410),
        ("/repos/acme/api/issues/3", 301),
        (f"/repositories/{env.gh._repo('acme/web').id}/issues/1", 200),
    ]


def test_an_issue_deleted_off_an_earlier_page_mid_crawl_does_not_cancel_the_one_it_skipped(env: Env) -> None:
    env.seed("acme/api", 250)  # newest-first: page 1 holds #250..#151, page 2 #150..#51
    assert env.run(repos=["acme/api"]).ok
    env.tick(hours=1)
    env.gh.update_issue("acme/api", 150, title="edited before the full sync")
    env.tick(minutes=1)
    # #150 now leads page 1; when page 2 is asked for, #240 (read on page 1) is deleted, so the
    # listing shifts up by one and #151, the first issue of page 2 now, is never listed
    env.gh.hooks.append(
        (lambda r: r.query.get("page") == ["2"], lambda: env.gh.delete_issue("acme/api", 240))
    )
    env.gh.reset_log()
    full = env.run(repos=["acme/api"], full=True)
    assert full.ok and full.upserts.cancelled == 0  # #240 was listed before it went: not missing this run
    assert full.upserts.updated + full.upserts.unchanged == 250  # #151's record came from its own GET
    assert env.tasks()["acme/api#151"].status == "todo"  # absent from the listing, but GitHub still has it
    assert [(r.path, r.status) for r in env.log("GET", r"/issues/\d+$")] == [("/repos/acme/api/issues/151", 200)]
    env.tick(minutes=5)
    env.gh.reset_log()
    again = env.run(repos=["acme/api"], full=True)  # a listing that holds still: only #240 is missing
    assert again.upserts.cancelled == 1 and env.tasks()["acme/api#240"].status == "cancelled"
    assert [(r.path, r.status) for r in env.log("GET", r"/issues/\d+$")] == [("/repos/acme/api/issues/240", 410)]


def test_a_listing_with_an_unreadable_issue_cancels_nothing_in_that_repo(env: Env) -> None:
    env.seed("acme/api", 4)
    env.seed("acme/web", 2)
    assert env.run().ok
    env.gh.update_issue("acme/api", 2, title=None)  # unreadable from now on: skipped, so never "seen"
    env.gh.delete_issue("acme/api", 3)
    env.gh.delete_issue("acme/web", 1)
    env.gh.reset_log()
    full = env.run(full=True)
    assert full.ok and full.upserts.cancelled == 1  # acme/web's deletion only
    tasks = env.tasks()
    assert tasks["acme/api#2"].status == "todo" and tasks["acme/api#3"].status == "todo"
    assert tasks["acme/web#1"].status == "cancelled"
    assert [r.path for r in env.log("GET", r"/issues/\d+$")] == ["/repos/acme/web/issues/1"]


def test_full_sync_of_a_repo_failing_half_way_marks_nothing(env: Env) -> None:
    env.seed("acme/api", 150)
    assert env.run().ok
    env.gh.delete_issue("acme/api", 2)
    fail_from(env, "2", -1)
    result = env.run(full=True)
    assert not result.ok and result.upserts.cancelled == 0
    assert env.tasks()["acme/api#2"].status == "todo"
    env.gh.clear_faults()
    assert env.run(full=True).upserts.cancelled == 1


def test_repo_wildcard_lists_the_owner_once_an_hour_and_idles_at_one_304_per_repo(lite: Env) -> None:
    lite.gh.add_repo("acme/no-issues")
    lite.gh.add_repo("someone/else")
    lite.seed("acme/api", 2)
    lite.seed("acme/web", 1)
    lite.gh.add_issue("someone/else", title="not ours")
    first = lite.run(repos=["acme/*"])
    assert first.ok and sorted(lite.tasks()) == ["acme/api#1", "acme/api#2", "acme/web#1"]
    assert [r.path for r in lite.log()][0] == "/orgs/acme/repos"
    cursor, validators = lite.cursor()
    assert cursor is not None and cursor.owners["acme"].repos == ["acme/api", "acme/no-issues", "acme/web"]
    assert cursor.owners["acme"].listed_at == T0 and "repos:acme" in validators
    per_repo = [
        ("/repos/acme/api/issues", 304),
        ("/repos/acme/no-issues/issues", 304),
        ("/repos/acme/web/issues", 304),
    ]
    lite.gh.add_repo("acme/new")  # GitHub changes the org's listing (and its ETag) on any push as well
    lite.gh.add_issue("acme/new", title="fresh")
    for minutes in (10, 50):  # two idle syncs within the hour: no listing request at all
        lite.tick(minutes=minutes - (10 if minutes == 50 else 0))
        lite.gh.reset_log()
        idle = lite.run(repos=["acme/*"])
        assert idle.ok and idle.pages == 0 and [(r.path, r.status) for r in lite.log()] == per_repo
        assert idle.requests.not_modified == idle.requests.requests == 3
    assert "acme/new#1" not in lite.tasks()

    lite.tick(minutes=11)  # an hour after the listing: refreshed, and the new repository comes in
    lite.gh.reset_log()
    grown = lite.run(repos=["acme/*"])
    assert grown.ok and "acme/new#1" in lite.tasks()
    assert [(r.path, r.status) for r in lite.log()][0] == ("/orgs/acme/repos", 200)
    lite.tick(hours=1)
    lite.gh.reset_log()
    assert lite.run(repos=["acme/*"]).ok
    assert [r.status for r in lite.log()] == [304] * 5  # the listing's 304, then one per repository
    lite.gh.reset_log()
    assert lite.run(repos=["acme/*"]).pages == 0 and [r.status for r in lite.log()] == [304] * 4
    cursor, _ = lite.cursor()
    assert cursor is not None and cursor.owners["acme"].listed_at == lite.clock.now  # the 304 was saved


def test_full_sync_always_refreshes_the_owner_listing(lite: Env) -> None:
    lite.seed("acme/api", 1)
    assert lite.run(repos=["acme/*"]).ok
    lite.gh.add_repo("acme/new")
    lite.gh.add_issue("acme/new", title="fresh")
    lite.tick(minutes=5)
    lite.gh.reset_log()
    assert lite.run(repos=["acme/*"], full=True).ok and "acme/new#1" in lite.tasks()
    assert lite.log()[0].path == "/orgs/acme/repos" and not lite.log()[0].headers.get("if-none-match")


def test_user_wildcard_falls_back_to_the_users_listing_once(lite: Env) -> None:
    lite.gh.add_repo("dana/tools", owner_type="User")
    lite.gh.add_issue("dana/tools", title="sharpen")
    assert lite.run(repos=["dana/*"]).ok and list(lite.tasks()) == ["dana/tools#1"]
    assert [r.path for r in lite.log()] == [
        "/orgs/dana/repos",
        "/users/dana/repos",
        "/repos/dana/tools/issues",
    ]
    lite.tick(hours=2)
    lite.gh.reset_log()
    assert lite.run(repos=["dana/*"]).ok
    assert [(r.path, r.status) for r in lite.log()] == [
        ("/users/dana/repos", 304),
        ("/repos/dana/tools/issues", 304),
    ]


def test_pull_requests_are_skipped_but_their_fixes_count_as_activity(env: Env) -> None:
    env.seed("acme/api", 2)
    env.gh.add_issue(
        "acme/api",
        title="Fix login",
        pull_request=True,
        body="Fixes #1",
        user="bob",
        updated_at=T0 + timedelta(hours=2),
        created_at=T0 - timedelta(days=1),
    )
    env.gh.add_issue(
        "acme/api",
        title="Bump deps",
        pull_request=True,
        body="fixes #2",
        user="dependabot[bot]",
        updated_at=T0 + timedelta(hours=3),
        created_at=T0 - timedelta(days=1),
    )
    result = env.run()
    assert result.ok and sorted(env.tasks()) == ["acme/api#1", "acme/api#2"]
    tasks = env.tasks()
    assert tasks["acme/api#1"].last_activity_at == T0 + timedelta(hours=2)
    assert (
        tasks["acme/api#2"].last_activity_at == tasks["acme/api#2"].updated_at
    )  # a bot's PR is not activity
    with env.store.transaction() as s:
        events = s.execute(select(TaskEvent.new, TaskEvent.actor).where(TaskEvent.field == "activity")).all()
    assert events == [("pull request acme/api#3", "bob")]
    again = env.run(full=True)
    assert again.ok
    with env.store.transaction() as s:
        assert len(s.scalars(select(TaskEvent).where(TaskEvent.field == "activity")).all()) == 1


def test_comments_by_bots_or_trackloop_are_not_activity_and_cost_one_listing_per_changed_repo(env: Env) -> None:
    old = T0 - timedelta(days=20)
    for n in range(1, 6):
        env.gh.add_issue("acme/api", title=f"task {n}", labels=["in progress"], created_at=old - timedelta(days=9))
        env.gh.add_comment("acme/api", n, "on it", user="alice-k", created_at=old)
    env.gh.add_issue("acme/api", title="Speed up login", pull_request=True, body="Fixes #5", user="bob",
                     created_at=old, updated_at=old)
    assert env.run(bots=["ci-runner"]).ok  # first crawl: ages from GitHub's own timestamps
    assert {t.last_activity_at for t in env.tasks().values()} == {old}
    env.tick(hours=1)
    env.gh.add_comment("acme/api", 1, "This issue is stale.", user="stale[bot]")
    env.gh.add_comment("acme/api", 2, "Still on track? <!-- trackloop:stale:acme/api#2 -->", user="trackloop-bot")
    env.gh.add_comment("acme/api", 3, "build passed", user="ci-runner")
    env.gh.add_comment("acme/api", 4, "done tomorrow", user="alice-k")
    env.gh.add_comment("acme/api", 6, "Deploy preview ready", user="netlify[bot]")  # on the PR that fixes #5
    env.gh.reset_log()
    result = env.run(bots=["ci-runner"])
    assert result.ok, result.error and result.upserts.updated == 4
    [listing, comments, web] = env.log()
    assert (listing.path, comments.path, web.status) == ("/repos/acme/api/issues", "/repos/acme/api/issues/comments",
                                                         304)
    assert comments.query == {"since": [format_since(T0 - timedelta(minutes=5))], "sort": ["updated"],
                              "direction": ["desc"], "per_page": ["100"]}
    tasks = env.tasks()
    assert tasks["acme/api#4"].last_activity_at == env.clock.now  # a person's comment is activity
    for quiet in ("acme/api#1", "acme/api#2", "acme/api#3", "acme/api#5"):
        assert tasks[quiet].last_activity_at == old, quiet  # #5 through its pull request's bot comment
    assert all(tasks[f"acme/api#{n}"].updated_at > old for n in (1, 2, 3))  # GitHub did move their update time
    types = rule_types()
    config = {rid: cls.config_model(enabled=False) for rid, cls in types.items()}
    config["stale_status"] = types["stale_status"].config_model()
    with env.store.transaction() as s:
        RulesEngine(build_rules(types, config), clock=lambda: env.clock.now).run(s)
    with env.store.transaction() as s:
        stale = {v.task.external_id for v in open_findings(s, rule="stale_status")}
    assert stale == {"acme/api#1", "acme/api#2", "acme/api#3", "acme/api#5"}
    env.tick(hours=1)
    env.gh.add_comment("acme/api", 1, "picking this up", user="bob")
    assert env.run(bots=["ci-runner"]).ok
    assert env.tasks()["acme/api#1"].last_activity_at == env.clock.now


def test_included_pull_requests_relate_to_the_issues_they_fix(lite: Env) -> None:
    lite.seed("acme/api", 1)
    lite.gh.add_issue("acme/api", title="Fix it", pull_request=True, body="closes #1")
    assert lite.run(repos=["acme/api"], include_pull_requests=True).ok
    pr = lite.tasks()["acme/api#2"]
    assert pr.status == "in_progress" and pr.extra["pull_request"] is True
    with lite.store.transaction() as s:
        link = s.execute(select(TaskLink.kind, TaskLink.src_external_id, TaskLink.dst_external_id)).one()
    assert tuple(link) == ("relates", "acme/api#2", "acme/api#1")


def test_links_owners_and_odd_payloads_reach_the_store(env: Env) -> None:
    env.gh.add_issue("acme/api", title="Tracking", body="- [ ] #2\n- [ ] acme/web#1\nblocked by #3")
    env.gh.add_issue("acme/api", title="Child", assignees=["alice-k", "bob"], user="ghost")
    env.gh.add_issue("acme/api", title="Blocker", body="\x00" + "x" * 70_000, labels=["🚧 wip, maybe", "P2"])
    env.gh.add_issue("acme/web", title="Web child", body=None, milestone_due="2026-11-20")
    result = env.run()
    assert result.ok, result.error
    tasks = env.tasks()
    assert tasks["acme/api#2"].owner_id is None and tasks["acme/api#2"].assignee_count == 2
    assert (
        tasks["acme/api#2"].extra["shared_owners"] == ["alice-k", "bob"]
        and tasks["acme/api#2"].reporter_id is None
    )
    assert tasks["acme/api#3"].extra["body_truncated"] is True and len(tasks["acme/api#3"].body) == 65536
    assert tasks["acme/api#3"].labels == ["🚧 wip, maybe", "P2"] and tasks["acme/api#3"].priority == "medium"
    assert tasks["acme/web#1"].due == date(2026, 11, 20) and tasks["acme/web#1"].body == ""
    with env.store.transaction() as s:
        links = {
            tuple(r)
            for r in s.execute(select(TaskLink.kind, TaskLink.src_external_id, TaskLink.dst_external_id))
        }
    assert links == {
        ("parent", "acme/api#2", "acme/api#1"),
        ("parent", "acme/web#1", "acme/api#1"),
        ("blocks", "acme/api#3", "acme/api#1"),
    }


def test_malformed_page_fails_that_repo_only(lite: Env) -> None:
    lite.seed("acme/api", 2)
    lite.seed("acme/web", 2)
    lite.gh.inject(r"/acme/api/issues$", kind="malformed", times=1)
    result = lite.run()
    assert not result.ok and "acme/api: GitHub sent unreadable JSON" in (result.error or "")
    assert sorted(lite.tasks()) == ["acme/web#1", "acme/web#2"]


def test_settings_that_shape_records_re_read_everything_once(lite: Env) -> None:
    lite.seed("acme/api", 3, labels=["sev1"])
    assert lite.run(repos=["acme/api"]).ok
    assert lite.tasks()["acme/api#1"].priority == "none"
    lite.gh.reset_log()
    result = lite.run(repos=["acme/api"], priority_labels={"high": ["SEV1"]})
    assert result.ok and result.upserts.updated == 3 and lite.tasks()["acme/api#1"].priority == "high"
    assert not lite.log()[0].headers.get("if-none-match")


def test_github_enterprise_prefix(clock: Clock, tmp_path: Any) -> None:
    standin = GithubStandin(api_prefix="/api/v3")
    standin.set_now(clock.now)
    standin.add_repo("corp/ops")
    standin.add_issue("corp/ops", title="patch the VPN")
    standin.start()
    store = Store(f"sqlite:///{tmp_path / 'ghe.db'}")
    try:
        env = Env(standin, clock, store)  # type: ignore[arg-type]
        result = env.run(repos=["corp/ops"])
        assert result.ok and list(env.tasks()) == ["corp/ops#1"]
        assert [r.path for r in standin.requests()] == ["/api/v3/repos/corp/ops/issues"]
    finally:
        store.close()
        _stop_later(standin)


# -- errors ----------------------------------------------------------------------------------
def test_bad_token_is_one_clear_line_and_not_retried(lite: Env) -> None:
    lite.gh.token = "other"
    result = lite.run()
    assert not result.ok
    assert result.error == (
        "GitHub refused the token of connector 'gh' (401 Bad credentials); check connectors.gh.token"
    )
    assert len(lite.log()) == 1


ISSUES_URL = re.compile(r"https://api\.github\.com(:443)?/repos/acme/api/issues")


def offline(**over: Any) -> GithubConnector:
    """A connector aimed at api.github.com, for tests where `responses` answers instead of GitHub."""
    config = GithubConfig(type="github", token="t0ken", repos=["acme/api"], retry={"attempts": 2}, **over)
    return GithubConnector("gh", config, clock=lambda: T0, sleep=lambda s: None)


@responses.activate
def test_dropped_connections_and_timeouts_are_transient() -> None:
    responses.get(ISSUES_URL, body=requests.exceptions.ReadTimeout("slow"))
    responses.get(ISSUES_URL, body=requests.exceptions.ConnectionError("reset by peer"))
    responses.get(ISSUES_URL, body=requests.exceptions.ConnectionError("reset by peer"))
    connector = offline()
    with pytest.raises(TransientError, match="did not answer within 30s"):
        connector.once(connector._get, "/repos/acme/api/issues")
    with pytest.raises(TransientError, match=r"connection to api.github.com failed \(ConnectionError\)"):
        connector.call(connector._get, "/repos/acme/api/issues")
    assert connector.stats.retries == 1 and connector.stats.requests == 3


@responses.activate
def test_forbidden_without_rate_limit_is_an_auth_error() -> None:
    body = {"message": "Resource not accessible by personal access token", "status": "403"}
    responses.get(ISSUES_URL, status=403, json=body)
    with pytest.raises(
        AuthError, match="403 Resource not accessible .*token may lack a scope or SSO approval"
    ):
        list(offline().pull(SyncState()))
    assert len(responses.calls) == 1


@responses.activate
def test_renamed_repository_is_reported_not_mixed_in() -> None:
    moved = issue_payload(
        1, repository_url=f"{API}/repos/acme/api-v2", html_url="https://github.com/acme/api-v2/issues/1"
    )
    responses.get(ISSUES_URL, json=[moved])
    with pytest.raises(
        ConnectorError, match="acme/api answered with issues of acme/api-v2: .* update connectors.gh.repos"
    ):
        list(offline().pull(SyncState()))


@responses.activate
def test_primary_limit_on_429_is_rate_limited_and_unreadable_error_bodies_still_translate() -> None:
    reset = str(int(T0.timestamp()) + 600)
    responses.get(
        ISSUES_URL,
        status=429,
        json={"message": "API rate limit exceeded for installation ID 1."},
        headers={"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": reset},
    )
    responses.get(ISSUES_URL, status=500, body="<html>oops</html>")
    connector = offline()
    with pytest.raises(RateLimited) as info:
        connector.once(connector._get, "/repos/acme/api/issues")
    assert info.value.reset_at == T0 + timedelta(minutes=10) and info.value.retry_after == 600
    with pytest.raises(TransientError, match="500 <html>oops</html>"):
        connector.once(connector._get, "/repos/acme/api/issues")


def test_check_is_one_free_call(lite: Env) -> None:
    verdict = lite.connector().check()
    assert verdict.ok and "token accepted; 5000/5000 requests left" in verdict.detail
    assert [r.path for r in lite.log()] == ["/rate_limit"]
    lite.gh.token = "nope"
    bad = lite.connector().check()
    assert not bad.ok and "401 Bad credentials" in bad.detail and "test-token" not in bad.detail


# -- push ------------------------------------------------------------------------------------
def comment(key: str, target: str = "acme/api#1", text: str = "Is this still on track?") -> Action:
    return Action(key=key, kind="comment", text=text, task_external_id=target)


def test_push_posts_once_with_an_invisible_marker(lite: Env) -> None:
    lite.seed("acme/api", 1)
    connector = lite.connector()
    result = connector.push(comment("nudge:1"))
    [posted] = lite.gh.comments("acme/api", 1)
    assert result.remote_id == str(posted["id"]) and not result.already_delivered
    assert posted["body"] == "Is this still on track?\n\n<!-- trackloop:nudge:1 -->"
    assert [(r.method, r.path) for r in lite.log(None)] == [
        ("GET", "/repos/acme/api/issues/1/comments"),
        ("POST", "/repos/acme/api/issues/1/comments"),
    ]
    assert lite.log("GET")[0].query["since"] == ["2026-10-03T09:00:00Z"]  # comment_lookback = 30 days


def test_comment_posted_once_across_a_crash_after_posting(lite: Env) -> None:
    lite.seed("acme/api", 1)
    lite.gh.add_comment("acme/api", 1, "quoting <!-- trackloop:nudge:2 --> by hand", user="mallory")
    lite.gh.inject(r"/comments$", method="POST", status=502, kind="after")  # posted, then the reply is lost
    with pytest.raises(PushError) as info:
        lite.connector().push(comment("nudge:2"))
    assert not info.value.permanent
    assert len(lite.log("POST")) == 1  # neither PyGithub nor tenacity retried the write

    retried = lite.connector().push(comment("nudge:2"))  # the outbox's retry, store lost or not
    ours = [c for c in lite.gh.comments("acme/api", 1) if c["user"] == "trackloop-bot"]
    assert len(ours) == 1 and retried.already_delivered and retried.remote_id == str(ours[0]["id"])
    assert len(lite.log("POST")) == 1
    assert len(lite.log("GET", "^/user$")) == 2  # once per connector, only because a marker turned up


def test_push_refuses_what_it_cannot_deliver(lite: Env) -> None:
    connector = lite.connector()
    with pytest.raises(PushError) as info:
        connector.push(Action(key="k", kind="dm", text="hi", target="alice"))
    assert info.value.permanent
    with pytest.raises(PushError, match="owner/repo#N") as info:
        connector.push(comment("k", target="OPS-1"))
    assert info.value.permanent
    with pytest.raises(PushError, match="acme/api#404: GitHub answered 404") as info:
        connector.push(comment("k", target="acme/api#404"))
    assert info.value.permanent


def test_push_to_a_transferred_issue_follows_it_and_pages_by_link(lite: Env) -> None:
    lite.seed("acme/api", 1)
    for i in range(45):
        lite.gh.add_comment("acme/api", 1, f"comment {i}", user="bob")
    lite.gh.transfer_issue("acme/api", 1, "acme/web")
    result = lite.connector().push(comment("moved"))
    assert not result.already_delivered
    assert lite.gh.comments("acme/web", 1)[-1]["body"].endswith("<!-- trackloop:moved -->")
    lite.gh.reset_log()
    again = lite.connector().push(comment("moved"))
    assert again.already_delivered and again.remote_id == result.remote_id
    # PyGithub follows the 301 but drops the query (30 per page): the scan pages by Link, not numbers
    assert [r.query.get("page") for r in lite.log("GET", "/comments$")] == [None, None, ["2"]]
    assert len(lite.gh.comments("acme/web", 1)) == 46


@responses.activate
def test_a_locked_issue_is_a_permanent_push_failure() -> None:
    comments = re.compile(r"https://api\.github\.com(:443)?/repos/acme/api/issues/9/comments.*")
    responses.get(comments, json=[])
    locked = {"message": "Unable to create comment because issue is locked."}
    responses.post(comments, status=403, json=locked)
    with pytest.raises(PushError, match="acme/api#9: GitHub answered 403 Unable to create comment") as info:
        offline().push(comment("k", target="acme/api#9"))
    assert info.value.permanent and len(responses.calls) == 2


def test_nothing_logged_or_raised_contains_the_token(lite: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    lite.seed("acme/api", 1)
    lite.gh.inject(r"/issues$", status=502, times=1, retry_after=0)
    assert lite.run().ok
    lite.gh.token = "other"
    assert not lite.run().ok
    assert "test-token" not in caplog.text
    assert json.dumps([r.getMessage() for r in caplog.records]).count("test-token") == 0


# -- demo ------------------------------------------------------------------------------------
def test_demo_github_source_syncs_the_team(tmp_path: Any) -> None:
    from sync.demo import run_demo

    rows = {t["external_id"]: t for t in run_demo(tmp_path / "demo.db").tasks if t["kind"] == "github"}

    assert sorted(rows) == sorted([*(f"acme/api#{n}" for n in range(1, 8)), *(f"acme/web#{n}" for n in (1, 2, 3))])
    assert "acme/api#8" not in rows  # the pull request is not a task ...
    assert rows["acme/api#2"]["last_activity_at"] > rows["acme/api#2"]["updated_at"]  # ... but its "Fixes #2" is
    assert (rows["acme/api#1"]["owner"], rows["acme/api#1"]["status"], rows["acme/api#1"]["priority"]) == (
        "bob", "in_progress", "high",
    )
    assert (rows["acme/api#2"]["owner"], rows["acme/api#2"]["status"]) == ("carol", "blocked")
    assert rows["acme/api#7"]["owner"] is None  # two assignees: shared, no single owner
    assert (rows["acme/api#6"]["status"], rows["acme/api#6"]["raw_status"]) == ("cancelled", "closed/not_planned")
    assert rows["acme/api#5"]["status"] == "done" and rows["acme/web#3"]["priority"] == "medium"
    assert rows["acme/web#2"]["url"] == "https://github.com/acme/web/issues/2"
