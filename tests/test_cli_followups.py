"""The follow-up commands as users run them, against loopback GitHub and Slack stand-ins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from sync.standins.github import GithubStandin
from sync.standins.slack import SlackStandin

TRACKLOOP = [sys.executable, "-m", "sync.cli"]


@pytest.fixture(scope="module")
def services() -> Iterator[tuple[GithubStandin, SlackStandin]]:
    gh, slack = GithubStandin(), SlackStandin()
    gh.start()
    slack.start()
    gh.add_repo("acme/api")
    slack.add_channel("C0OPS", "ops")
    slack.add_user("U0BOB", "bob", email="bob@example.com")
    slack.add_user("U0ALICE", "alice", email="alice@example.com")
    long_ago = datetime.now(UTC) - timedelta(days=40)
    gh.add_issue("acme/api", title="Renew the certificate <!channel>", assignees=("bob-o",),
                 milestone_due=datetime.now(UTC) - timedelta(days=3), created_at=long_ago, updated_at=long_ago)
    gh.add_issue("acme/api", title="Nobody owns me", created_at=long_ago, updated_at=long_ago)
    yield gh, slack
    gh.stop()
    slack.stop()


@pytest.fixture
def project(tmp_path: Path, services: tuple[GithubStandin, SlackStandin]) -> Path:
    gh, slack = services
    (tmp_path / "trackloop.toml").write_text(f"""
[store]
url = "sqlite:///store.db"
[people.alice]
email = "alice@example.com"
slack = "U0ALICE"
lead = true
[people.bob]
email = "bob@example.com"
github = "bob-o"
slack = "U0BOB"
[connectors.gh]
type = "github"
token = "${{GH_TOKEN}}"
base_url = "{gh.base_url}"
repos = ["acme/api"]
[connectors.slack]
type = "slack"
token = "{slack.token}"
base_url = "{slack.base_url}/api/"
channels = ["C0OPS"]
[notify]
comment_on_source = ["overdue"]
dm_owner = ["overdue"]
[digests.leads]
to = ["alice"]
sources = ["gh"]
""")
    return tmp_path


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKLOOP_")}
    env["GH_TOKEN"] = "test-token"
    return subprocess.run([*TRACKLOOP, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_dry_run_then_sync_then_the_outbox_and_flags(project: Path, services) -> None:
    gh, slack = services
    dry = run("sync", "--dry-run", cwd=project)
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    header = lines.index("key\tvia\tkind\ttarget\ttext")
    planned = [line.split("\t") for line in lines[header + 1 :] if line.startswith("overdue:")]
    assert [(p[0], p[1], p[2], p[3]) for p in planned] == [
        ("overdue:gh:acme/api#1:comment:task:0", "gh", "comment", "gh:acme/api#1"),
        ("overdue:gh:acme/api#1:dm:bob:0", "slack", "dm", "U0BOB"),
    ]
    assert "notify: 2 would be queued" in dry.stderr
    assert json.loads(run("outbox", "--json", "--all", cwd=project).stdout) == []
    assert slack.sent() == [] and not [c for c in gh.comments("acme/api", 1) if c["user"] == "trackloop-bot"]

    real = run("sync", cwd=project)
    assert real.returncode == 0, real.stderr
    assert "delivered 2" in real.stderr
    sent = json.loads(run("outbox", "--json", "--all", cwd=project).stdout)
    assert [(a["key"], a["status"]) for a in sent] == [
        ("overdue:gh:acme/api#1:comment:task:0", "sent"), ("overdue:gh:acme/api#1:dm:bob:0", "sent")]
    assert all(a["remote_id"] for a in sent)
    flags = json.loads(run("flags", "--json", "--rule", "overdue", cwd=project).stdout)
    [flag] = flags
    for key in ("rule", "severity", "source", "external_id", "url", "title", "owner", "message", "since"):
        assert key in flag
    assert (flag["external_id"], flag["owner"], flag["act"]) == ("acme/api#1", "bob", "bob")
    again = run("sync", cwd=project)  # nothing new is due: nothing is posted twice
    assert "notify: 0 queued" in again.stderr
    assert len([c for c in gh.comments("acme/api", 1) if c["user"] == "trackloop-bot"]) == 1

    snoozed = run("snooze", "gh:acme/api#1", "overdue", "--for", "2d", cwd=project)
    assert snoozed.returncode == 0, snoozed.stderr
    assert json.loads(run("flags", "--json", "--rule", "overdue", cwd=project).stdout) == []
    missing = run("snooze", "gh:acme/api#9", "overdue", cwd=project)
    assert missing.returncode == 2 and "no task 'gh:acme/api#9'" in missing.stderr


def test_digest_terminal_markdown_and_html(project: Path) -> None:
    assert run("sync", cwd=project).returncode == 0
    text = run("digest", "leads", cwd=project)
    assert text.returncode == 0 and "Overdue: 1" in text.stdout.splitlines()
    assert "Renew the certificate <!channel>" in text.stdout  # the terminal shows text as it is
    assert run("digest", "leads", "--out", "d.md", cwd=project).returncode == 0
    md = (project / "d.md").read_text()
    assert md.startswith("# trackloop digest") and "Renew the certificate \\<\\!channel\\>" in md
    assert run("digest", "leads", "--out", "d.html", cwd=project).returncode == 0
    html = (project / "d.html").read_text()
    assert "Renew the certificate &lt;!channel&gt;" in html and "<!channel>" not in html
    unknown = run("digest", "nope", cwd=project)
    assert unknown.returncode == 2 and "no digest 'nope' (configured: leads)" in unknown.stderr


def test_rules_run_notify_dry_run_and_verify(project: Path, services) -> None:
    gh, slack = services
    shipped = gh.add_issue("acme/api", title="Shipped last week", state="closed", assignees=("bob-o",),
                           closed_at=datetime.now(UTC) - timedelta(days=5))["number"]
    config = project / "trackloop.toml"
    with_notify = config.read_text()
    config.write_text(with_notify.replace('[notify]\ncomment_on_source = ["overdue"]\ndm_owner = ["overdue"]\n', ""))
    assert run("sync", cwd=project).returncode == 0  # no [notify]: findings, no follow-ups

    rules = run("rules", "run", cwd=project)
    assert rules.returncode == 0, rules.stderr
    flagged = {row.split("\t")[0]: row.split("\t")[2] for row in rules.stdout.splitlines()[1:]}
    assert flagged["overdue"] == "1" and flagged["done_unverified"] == "1"

    config.write_text(with_notify)
    dry = run("notify", "--dry-run", cwd=project)
    assert dry.returncode == 0, dry.stderr
    assert "overdue:gh:acme/api#1:dm:bob:0" in dry.stdout and "notify: 2 would be queued" in dry.stderr
    assert json.loads(run("outbox", "--json", "--all", cwd=project).stdout) == []

    ref = f"gh:acme/api#{shipped}"
    assert [f["external_id"] for f in json.loads(run("flags", "--json", "--rule", "done_unverified",
                                                     cwd=project).stdout)] == [f"acme/api#{shipped}"]
    verified = run("verify", ref, cwd=project)
    assert verified.returncode == 0 and f"recorded verification of {ref}" in verified.stderr
    assert json.loads(run("flags", "--json", "--rule", "done_unverified", cwd=project).stdout) == []
    unknown = run("verify", "gh:acme/api#999", cwd=project)
    assert unknown.returncode == 2 and "no task 'gh:acme/api#999'" in unknown.stderr


def test_digest_send_says_what_it_queued(project: Path, services) -> None:
    gh, slack = services
    assert run("sync", cwd=project).returncode == 0
    first = run("digest", "leads", "--send", cwd=project)
    assert first.returncode == 0 and "digest leads: 1 deliveries queued for slot" in first.stderr
    again = run("digest", "leads", "--send", cwd=project)
    assert again.returncode == 0 and "deliveries queued" not in again.stderr
    assert "already queued for slot" in again.stderr
