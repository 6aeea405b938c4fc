"""The demo's GitHub source: two repositories on the loopback GitHub stand-in, read by the real connector."""

from __future__ import annotations

from contextlib import ExitStack
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

from sync.standins.github import GithubStandin

TOKEN = "demo-token"
LOGINS = {"alice": "alice-kim", "bob": "bob-otieno", "carol": "carol-diaz", "dan": "dan-weber"}

# repo, title, assignees, labels, due (days from today), state/reason, days since the last update, body
ISSUES: list[tuple[str, str, list[str], list[str], int | None, str, int, str]] = [
    ("acme/api", "Rate-limit the public login endpoint", ["bob"], ["security", "p1", "in progress"], 5,
     "open", 1, "## Acceptance criteria\n- 10 failed logins per minute per IP get a 429\n- alerts on bursts"),
    ("acme/api", "Intermittent 502s from the payments webhook", ["carol"], ["bug", "blocked"], -3,
     "open", 2, "Blocked by acme/web#2: the iframe change has to ship first."),
    ("acme/api", "Rotate the staging database credentials", [], ["security", "priority:high"], None,
     "open", 20, "The old credentials were shared in a chat channel."),
    ("acme/api", "Tracking: Q4 API hardening", ["alice"], ["epic"], 30,
     "open", 3, "- [ ] #1\n- [ ] #2\n- [x] #5\n- [ ] acme/web#1"),
    ("acme/api", "Upgrade Python to 3.12 in CI", ["dan"], ["ci"], None, "closed/completed", 4, ""),
    ("acme/api", "Drop the v1 export endpoint", [], ["wontfix"], None, "closed/not_planned", 9, ""),
    ("acme/api", "Document the retry policy", ["alice", "dan"], ["docs", "p3"], 12, "open", 6, ""),
    ("acme/web", "Dark mode for the status page", ["dan"], ["doing"], 14, "open", 0, ""),
    ("acme/web", "Fix CSP headers blocking the payments iframe", ["bob"], ["p1"], 2, "open", 8,
     "## Acceptance criteria\n- the payments iframe loads on Chrome, Firefox and Safari"),
    ("acme/web", "Review the cookie banner copy", [], ["p2"], None, "open", 16, ""),
]  # fmt: skip


def source(stack: ExitStack, folder: Path, today: date) -> tuple[str, dict[str, Any]]:
    """Start the GitHub stand-in on `stack`, seed it, and return the connector name and config section."""
    del folder  # everything lives in the stand-in's memory
    standin = GithubStandin(TOKEN)
    standin.start()
    stack.callback(standin.stop)
    midnight = datetime.combine(today, time(0), tzinfo=UTC)  # in the past whenever the demo runs
    for repo in ("acme/api", "acme/web"):
        standin.add_repo(repo, members=LOGINS.values())
    for repo, title, people, labels, due_in, state, idle_days, body in ISSUES:
        status, _, reason = state.partition("/")
        updated = midnight - timedelta(days=idle_days)
        standin.add_issue(
            repo,
            title=title,
            body=body or None,
            state=status,
            state_reason=reason or None,
            labels=labels,
            assignees=[LOGINS[p] for p in people],
            milestone_due=midnight + timedelta(days=due_in) if due_in is not None else None,
            user=LOGINS["alice"],
            created_at=updated - timedelta(days=10),
            updated_at=updated,
        )
    standin.add_issue(
        "acme/api",
        title="Retry webhook deliveries with back-off",
        body="Fixes #2",
        pull_request=True,
        user=LOGINS["carol"],
        created_at=midnight - timedelta(days=1),
        updated_at=midnight - timedelta(hours=2),
    )
    return "gh", {
        "type": "github",
        "token": TOKEN,
        "base_url": standin.base_url,
        "repos": ["acme/*"],
    }
