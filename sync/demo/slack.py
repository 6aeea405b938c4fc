"""The demo's Slack source: an #ops channel on a loopback Slack stand-in, read by the real `slack` connector.

Tasks are captured the three ways a team does it: a "TODO:" prefix, a :task: reaction on a
question, and a task whose thread carries the latest news. Messages are dated relative to now.
"""

from __future__ import annotations

from contextlib import ExitStack
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from sync.standins.slack import SlackStandin

ALICE, BOB, CAROL, DAN = "U01ALICE", "U02BOB", "U03CAROL", "U04DAN"
OPS = "C0OPS"


def source(stack: ExitStack, folder: Path, today: date) -> tuple[str, dict[str, Any]]:
    """Start and seed the stand-in on `stack`; return the connector name and its config section."""
    del folder, today  # Slack's clock is the stand-in's: messages are placed relative to now
    slack = stack.enter_context(SlackStandin())
    for user, name, real in ((ALICE, "alice", "Alice Kim"), (BOB, "bob", "Bob Otieno"),
                             (CAROL, "carol", "Carol Diaz"), (DAN, "dan", "Dan Weber")):
        slack.add_user(user, name, email=f"{name}@example.com", real_name=real)
    slack.add_channel(OPS, "ops")
    now = datetime.now(UTC).replace(microsecond=0)

    def at(days: float) -> None:
        slack.set_now(now - timedelta(days=days))

    at(4)
    wiki = slack.post(OPS, ALICE, "TODO: move the wiki backups to the new storage bucket")
    at(3.5)
    dns = slack.post(OPS, CAROL, "can someone look at the DNS cutover checklist? the TTLs still look long")
    slack.react(OPS, dns, "task", ALICE)
    slack.react(OPS, dns, "raising_hand", DAN)
    at(3)
    slack.post(OPS, BOB, "coffee machine on 2 is fixed")
    at(2)
    slack.post(OPS, ALICE, "TODO: renew the VPN gateway licence, <@U02BOB> by Friday")
    grafana = slack.post(OPS, DAN, "action item: rotate the Grafana admin password")
    at(1.5)
    slack.react(OPS, grafana, "white_check_mark", ALICE)
    at(1)
    slack.reply(OPS, wiki, BOB, "half of them copied; the rest tonight")
    slack.set_now(None)
    return "slack", {
        "type": "slack",
        "token": slack.token,
        "base_url": slack.base_url + "/api/",
        "channels": ["#ops"],
    }
