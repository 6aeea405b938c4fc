"""A small world on the loopback stand-ins: GitHub, Jira and Slack holding a team's tasks, and
a steady stream of changes to them, for the daemon's tests and soak benchmarks.

    world = World(seed=1, github_issues=30, jira_issues=30, slack_tasks=10)
    world.start()
    config_sections = world.connectors(interval="1s")   # [connectors.*] tables for trackloop.toml
    world.change()                                       # one random edit, as a person would make it
    world.deliveries()                                   # what trackloop posted back, by marker
    world.stop()

Every change is dated by the stand-ins' clock (real time), so a daemon polling them sees a
world that keeps moving. `PEOPLE` maps the team's identities so owners resolve to person keys.
"""

from __future__ import annotations

import random
import re
import threading
from collections import Counter
from typing import Any

from sync.standins.github import GithubStandin
from sync.standins.jira import JiraStandin
from sync.standins.slack import SlackStandin

TEAM = ["alice", "bob", "carol", "dan"]
JIRA_IDS = {p: f"5b10a2844c20165700ede2{i:02d}" for i, p in enumerate(TEAM)}
SLACK_IDS = {p: f"U0{i}{p.upper()}" for i, p in enumerate(TEAM)}
PEOPLE: dict[str, dict[str, Any]] = {
    p: {"email": f"{p}@example.com", "github": f"{p}-gh", "jira": JIRA_IDS[p], "slack": SLACK_IDS[p],
        "lead": p == "alice"}
    for p in TEAM
}
# Follow-ups that fire in this world: comments on unowned tasks (GitHub, Jira, Slack thread
# replies), DMs to owners about tasks without a due date, verification DMs when a task is done,
# and the lead's digest every minute (a new slot each minute).
NOTIFY: dict[str, Any] = {"comment_on_source": ["missing_owner"], "dm_owner": ["no_due_date"],
                          "max_actions_per_run": 40}
DIGESTS: dict[str, dict[str, Any]] = {"leads": {"to": ["alice"], "schedule": "* * * * *"}}
GITHUB_MARKER = re.compile(r"<!-- trackloop:(.+?) -->")
JIRA_MARKER = re.compile(r"trackloop:[^\s{}\[\]()]+")
GITHUB_REPOS = ["acme/api", "acme/web"]
JIRA_STATUSES = ["To Do", "In Progress", "Done"]
CHANNEL = "C0OPS"


class World:
    """GitHub + Jira + Slack stand-ins, seeded; `change()` makes one random edit."""

    def __init__(
        self, *, seed: int = 0, github_issues: int = 20, jira_issues: int = 20, slack_tasks: int = 10,
        github: GithubStandin | None = None,
    ) -> None:
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.github = github or GithubStandin()
        self.jira = JiraStandin("cloud", email="bot@acme.io", token="jira-test-token")
        self.slack = SlackStandin()
        self.changes = 0
        self._gh_numbers: dict[str, int] = {repo: 0 for repo in GITHUB_REPOS}
        self._jira_keys: list[str] = []
        self._slack_ts: list[str] = []
        self._plain_ts: list[str] = []
        self._seed(github_issues, jira_issues, slack_tasks)

    # -- setup ---------------------------------------------------------------------------------
    def _seed(self, github_issues: int, jira_issues: int, slack_tasks: int) -> None:
        for repo in GITHUB_REPOS:
            self.github.add_repo(repo, members=[f"{p}-gh" for p in TEAM])
        for i in range(github_issues):
            self._new_github_issue(GITHUB_REPOS[i % len(GITHUB_REPOS)])
        for p in TEAM:
            self.jira.add_user(JIRA_IDS[p], name=p, display_name=p.title(), email=f"{p}@example.com")
        for _ in range(jira_issues):
            self._new_jira_issue()
        for p in TEAM:
            self.slack.add_user(SLACK_IDS[p], p, email=f"{p}@example.com", real_name=p.title())
        self.slack.add_channel(CHANNEL, "ops")
        for _ in range(slack_tasks):
            self._new_slack_task()

    def start(self) -> None:
        for standin in (self.github, self.jira, self.slack):
            standin.start()

    def stop(self) -> None:
        for standin in (self.github, self.jira, self.slack):
            standin.stop()

    def connectors(self, interval: str = "1s", *, retry_wait: str = "1s") -> dict[str, dict[str, Any]]:
        """Config sections for one connector per stand-in (`gh`, `jira`, `slack`)."""
        retry = {"attempts": 2, "max_wait": retry_wait}
        return {
            "gh": {"type": "github", "token": self.github.token, "base_url": self.github.base_url,
                   "repos": list(GITHUB_REPOS), "interval": interval, "retry": retry, "timeout": "5s"},
            "jira": {"type": "jira", "url": self.jira.base_url, "auth": "basic", "email": self.jira.email,
                     "token": self.jira.token, "jql": "project = OPS", "interval": interval, "retry": retry,
                     "timeout": "5s"},
            "slack": {"type": "slack", "token": self.slack.token, "base_url": self.slack.base_url + "/api/",
                      "channels": [CHANNEL], "interval": interval, "retry": retry, "timeout": "5s",
                      "history_calls_per_minute": 100000},
        }

    def deliveries(self) -> Counter[tuple[Any, ...]]:
        """Every post trackloop made, by its marker: ("github", key), ("jira", marker),
        ("slack", key, part). A count above 1 is a double delivery."""
        found: Counter[tuple[Any, ...]] = Counter()
        with self.lock:
            for repo, last in self._gh_numbers.items():
                for number in range(1, last + 1):
                    for comment in self.github.comments(repo, number):
                        for key in GITHUB_MARKER.findall(comment["body"]):
                            found["github", key] += 1
            for key in self._jira_keys:
                for comment in self.jira.comments(key):
                    for marker in set(JIRA_MARKER.findall(comment["body"])):
                        found["jira", marker] += 1
        for message in self.slack.sent():
            payload = (message.get("metadata") or {}).get("event_payload") or {}
            if payload.get("key"):
                found["slack", payload["key"], payload.get("part", 1)] += 1
        return found

    # -- changes -------------------------------------------------------------------------------
    def change(self) -> str:
        """One random edit somewhere; returns what it did."""
        with self.lock:
            self.changes += 1
            what = self.rng.choice([self._github_change, self._jira_change, self._slack_change])
            return what()

    def _person(self) -> str:
        return self.rng.choice(TEAM)

    def _new_github_issue(self, repo: str) -> str:
        self._gh_numbers[repo] += 1
        n = self._gh_numbers[repo]
        self.github.add_issue(repo, title=f"{repo} issue {n}", body=f"Details of {n}.",
                              labels=self.rng.choice([[], ["bug"], ["p1"], ["blocked"]]),
                              assignees=[f"{self._person()}-gh"] if self.rng.random() < 0.7 else [],
                              user=f"{self._person()}-gh")
        return f"github: new {repo}#{n}"

    def _github_change(self) -> str:
        repo = self.rng.choice(GITHUB_REPOS)
        if self.rng.random() < 0.2 or not self._gh_numbers[repo]:
            return self._new_github_issue(repo)
        n = self.rng.randint(1, self._gh_numbers[repo])
        kind = self.rng.choice(["title", "state", "labels", "assignees"])
        if kind == "title":
            self.github.update_issue(repo, n, title=f"{repo} issue {n} (edit {self.changes})")
        elif kind == "state":
            state = self.github.issue(repo, n)["state"]
            self.github.update_issue(repo, n, state="open" if state == "closed" else "closed")
        elif kind == "labels":
            self.github.update_issue(repo, n, labels=self.rng.choice([[], ["bug"], ["p1", "in progress"]]))
        else:
            self.github.update_issue(repo, n, assignees=[f"{self._person()}-gh"])
        return f"github: {kind} of {repo}#{n}"

    def _new_jira_issue(self) -> str:
        key = f"OPS-{len(self._jira_keys) + 1}"
        self.jira.add_issue(key, summary=f"Ops task {key}", status=self.rng.choice(JIRA_STATUSES),
                            assignee=JIRA_IDS[self._person()] if self.rng.random() < 0.7 else None,
                            reporter=JIRA_IDS[self._person()], priority=self.rng.choice(["High", "Medium", "Low"]),
                            labels=self.rng.choice([[], ["infra"]]))
        self._jira_keys.append(key)
        return f"jira: new {key}"

    def _jira_change(self) -> str:
        if self.rng.random() < 0.2 or not self._jira_keys:
            return self._new_jira_issue()
        key = self.rng.choice(self._jira_keys)
        kind = self.rng.choice(["summary", "status", "assignee", "priority"])
        if kind == "summary":
            self.jira.update_issue(key, summary=f"Ops task {key} (edit {self.changes})")
        elif kind == "status":
            self.jira.update_issue(key, status=self.rng.choice(JIRA_STATUSES))
        elif kind == "assignee":
            self.jira.update_issue(key, assignee=JIRA_IDS[self._person()])
        else:
            self.jira.update_issue(key, priority=self.rng.choice(["High", "Medium", "Low"]))
        return f"jira: {kind} of {key}"

    def _new_slack_task(self) -> str:
        who = self._person()
        ts = self.slack.post(CHANNEL, SLACK_IDS[who], f"TODO: slack task {len(self._slack_ts) + 1} from {who}")
        self._slack_ts.append(ts)
        return f"slack: new task {ts}"

    def _slack_change(self) -> str:
        roll = self.rng.random()
        if roll < 0.25 or not self._slack_ts:
            return self._new_slack_task()
        if roll < 0.4:  # a plain message, captured later by a reaction
            ts = self.slack.post(CHANNEL, SLACK_IDS[self._person()], f"can someone look at thing {self.changes}?")
            self._plain_ts.append(ts)
            return f"slack: message {ts}"
        if roll < 0.5 and self._plain_ts:
            ts = self._plain_ts.pop(0)
            self.slack.react(CHANNEL, ts, "task", SLACK_IDS[self._person()])
            self._slack_ts.append(ts)
            return f"slack: captured {ts}"
        ts = self.rng.choice(self._slack_ts)
        if roll < 0.7:
            self.slack.reply(CHANNEL, ts, SLACK_IDS[self._person()], f"update {self.changes}")
            return f"slack: reply to {ts}"
        if roll < 0.85:
            self.slack.react(CHANNEL, ts, "raising_hand", SLACK_IDS[self._person()])
            return f"slack: assigned {ts}"
        self.slack.react(CHANNEL, ts, "white_check_mark", SLACK_IDS[self._person()])
        return f"slack: done {ts}"
