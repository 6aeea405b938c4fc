"""The demo's Jira source: a Jira Cloud stand-in holding the team's datacenter move, read by the
real `jira` connector (deployment detected, ADF descriptions, links, sub-tasks, time tracking)."""

from __future__ import annotations

from contextlib import ExitStack
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from sync.standins.jira import JiraStandin

# The demo team as Jira Cloud knows them; the emails match sync/demo PEOPLE, so owners resolve.
USERS = {
    "alice": ("5b10a2844c20165700ede21a", "Alice Kim"),
    "bob": ("5b10a2844c20165700ede21b", "Bob Otieno"),
    "carol": ("5b10a2844c20165700ede21c", "Carol Diaz"),
    "dan": ("5b10a2844c20165700ede21d", "Dan Weber"),
}
HOUR = 3600
# MIG-1 has used most of its estimate with most of the work left: what `at_risk` looks for.
TIME_TRACKING = {
    "MIG-1": {
        "originalEstimateSeconds": 16 * HOUR,
        "remainingEstimateSeconds": 12 * HOUR,
        "timeSpentSeconds": 10 * HOUR,
    },
}

# key, summary, status, assignee, due (days from today), priority, labels, days since the last update
ISSUES: list[tuple[str, str, str, str | None, int | None, str, list[str], int]] = [
    ("MIG-1", "Migrate the file shares to the new NAS", "In Progress", "bob", 5, "High", ["migration"], 1),
    ("MIG-2", "Cut over DNS for intranet.example.com", "Blocked", "carol", -1, "Highest", ["dns"], 6),
    ("MIG-3", "Order power distribution units for rack B", "To Do", None, 2, "High", ["hardware"], 9),
    ("MIG-4", "Document the new backup schedule", "To Do", "dan", None, "Low", ["docs"], 3),
    ("MIG-5", "Decommission the old hypervisors", "Done", "alice", -3, "Medium", ["cleanup"], 2),
    ("MIG-6", "Copy the finance share", "In Progress", "bob", 3, "High", ["migration"], 0),
    ("MIG-7", "Test a restore from the new backup target", "Verified", "carol", -2, "Medium", ["backup"], 1),
]


def source(stack: ExitStack, folder: Path, today: date) -> tuple[str, dict[str, Any]]:
    """Start and seed the stand-in on `stack`; return the connector name and its config section."""
    del folder  # nothing to write: the service is the stand-in
    standin = JiraStandin("cloud", email="trackloop-bot@example.com", token="demo-api-token")
    standin.start()
    stack.callback(standin.stop)
    for person, (account_id, display_name) in USERS.items():
        standin.add_user(account_id, name=person, display_name=display_name, email=f"{person}@example.com")
    now = datetime.now(UTC).replace(microsecond=0)
    descriptions = {
        "MIG-1": "Shares: finance, projects, scans.\n\nAcceptance criteria:\nEvery share opens on the NAS.",
        "MIG-2": "Waiting for the new load balancer's address.",
    }
    for key, summary, status, who, due_in, priority, labels, idle_days in ISSUES:
        standin.add_issue(
            key,
            summary=summary,
            description=descriptions.get(key),
            status=status,
            category="done" if status == "Verified" else ("indeterminate" if status == "Blocked" else None),
            assignee=USERS[who][0] if who else None,
            reporter=USERS["alice"][0],
            priority=priority,
            duedate=today + timedelta(days=due_in) if due_in is not None else None,
            labels=labels,
            parent="MIG-1" if key == "MIG-6" else None,
            acceptance="The schedule is on the wiki and the on-call knows it." if key == "MIG-4" else None,
            timetracking=TIME_TRACKING.get(key),
            created=now - timedelta(days=20),
            updated=now - timedelta(days=idle_days, hours=1),
        )
    standin.add_link("MIG-3", "Blocks", "MIG-2")  # no PDUs, no new rack, no cut-over
    return "jira", {
        "type": "jira",
        "url": standin.base_url,
        "auth": "basic",
        "email": standin.email,
        "token": standin.token,
        "jql": "project = MIG",
        "deployment": "auto",
        "status_map": {"Blocked": "blocked"},
        "acceptance_field": "customfield_10042",
    }
