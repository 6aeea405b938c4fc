"""Benchmark of the `slack` connector against the loopback Slack stand-in, through the real engine.

    python bench/bench_slack.py [--channels 5] [--per-day 200] [--days 7]

A workspace of busy channels (every message in the 7-day look-back window; 5% of them tasks, 15%
with a 3-reply thread) is synced cold, then idle, then after a little activity. It prints the
wall time and the Slack requests of each sync by method: the look-back window's cost is the
history pages of the window plus `conversations.replies` only for threads whose `latest_reply`
moved (and for the thread of a captured message that changed, and threads holding a captured
reply; this workspace captures no replies). Pacing (`history_calls_per_minute`) is lifted so the
figures show work, not waiting; the "paced" column says how long Tier 3 pacing at the default 45
calls a minute would add.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from connectors.slack import SlackConfig, SlackConnector
from store.canonical import Action
from store.db import Store
from sync.config import parse_config
from sync.engine import SyncEngine
from sync.standins.slack import SlackStandin

NOW = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
PEOPLE = [("U01ALICE", "alice"), ("U02BOB", "bob"), ("U03CAROL", "carol"), ("U04DAN", "dan")]


def seed(slack: SlackStandin, channels: int, per_day: int, days: int) -> dict[str, list[str]]:
    for user, name in PEOPLE:
        slack.add_user(user, name, email=f"{name}@example.com")
    posted: dict[str, list[str]] = {}
    for c in range(channels):
        channel = f"C0CHAN{c:03d}"
        slack.add_channel(channel, f"team-{c}")
        total = per_day * days
        step = timedelta(days=days) / total
        posted[channel] = []
        for i in range(total):
            slack.set_now(NOW - timedelta(days=days) + step * (i + 1) - timedelta(minutes=5))
            user = PEOPLE[i % 4][0]
            if i % 40 == 0:
                text = f"TODO: follow up on item {i} with <@{PEOPLE[(i + 1) % 4][0]}> by Friday"
            else:
                text = f"status update {i}: all green"
            ts = slack.post(channel, user, text)
            if i % 40 == 20:
                slack.react(channel, ts, "task", PEOPLE[(i + 2) % 4][0])
            if i % 7 == 0:
                for r in range(3):
                    slack.reply(channel, ts, PEOPLE[(i + r + 1) % 4][0], f"reply {r}")
            posted[channel].append(ts)
    slack.set_now(NOW)
    return posted


def run(store: Store, slack: SlackStandin, section: dict[str, Any]) -> tuple[float, Counter[str], Any]:
    config = parse_config(
        {"store": {"url": store.url}, "connectors": {"slack": section}},
        env={}, connector_types={"slack": SlackConnector},
    )
    engine = SyncEngine(store, config, {"slack": SlackConnector}, clock=lambda: NOW)
    slack.reset_log()
    started = time.perf_counter()
    [result] = engine.run()
    elapsed = time.perf_counter() - started
    assert result.ok, result.error
    return elapsed, Counter(r.path.removeprefix("/api/") for r in slack.requests()), result


def row(label: str, seconds: float, calls: Counter[str], result: Any = None) -> str:
    tier3 = calls["conversations.history"] + calls["conversations.replies"]
    paced = max(0, math.ceil(tier3 / 45) - 1)
    written = f"{result.upserts.inserted}/{result.upserts.updated}" if result is not None else "-"
    return (f"| {label} | {seconds:.2f} | {sum(calls.values())} | {calls['conversations.history']} | "
            f"{calls['conversations.replies']} | {calls['users.info']} | {calls['chat.getPermalink']} | "
            f"{calls['conversations.list']} | {calls['conversations.open']} | {calls['chat.postMessage']} | "
            f"{written} | {paced} min |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=5)
    parser.add_argument("--per-day", type=int, default=200)
    parser.add_argument("--days", type=int, default=7)
    args = parser.parse_args()

    with SlackStandin() as slack, tempfile.TemporaryDirectory() as folder:
        posted = seed(slack, args.channels, args.per_day, args.days)
        store = Store(f"sqlite:///{Path(folder) / 'bench.db'}")
        names = [f"#team-{c}" for c in range(args.channels)]
        section = {"type": "slack", "token": slack.token, "base_url": slack.base_url + "/api/",
                   "channels": names, "history_calls_per_minute": 100_000}
        messages = args.channels * args.per_day * args.days
        print(f"{args.channels} channels x {args.per_day} messages/day x {args.days} days = {messages} "
              f"messages in the window ({messages // 40 * 2} tasks, {messages // 7} threads)\n")
        print("| sync | wall s | requests | history | replies | users.info | permalink | conv.list | "
              "conv.open | postMessage | new/updated | paced |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        print(row("cold", *run(store, slack, section)))
        print(row("idle", *run(store, slack, section)))
        for channel, stamps in posted.items():  # a little activity on every channel
            middle = len(stamps) // 2
            slack.react(channel, stamps[middle + 1], "task", "U01ALICE")  # a late reaction, 3.5 days old
            slack.reply(channel, stamps[280], "U02BOB", "any news?")  # a task's thread moves
            slack.post(channel, "U03CAROL", "TODO: one more thing")
        label = "incremental (per channel: 1 late reaction, 1 reply, 1 new task)"
        print(row(label, *run(store, slack, section)))
        print(row("idle, page_size 200", *run(store, slack, {**section, "page_size": 200})))
        store.close()

        connector = SlackConnector("slack", SlackConfig(**section), clock=lambda: NOW)
        blocks = [{"type": "section", "text": {"type": "mrkdwn", "text": f"*OPS-{i}* overdue {i % 9} days"}}
                  for i in range(150)]
        pushes = [
            ("push dm", Action(key="bench-dm", kind="dm", target="U02BOB", text="Is OPS-1 still on?")),
            ("push dm again (duplicate found)",
             Action(key="bench-dm", kind="dm", target="U02BOB", text="Is OPS-1 still on?")),
            ("push reply", Action(key="bench-reply", kind="reply", text="Still open after 5 days.",
                                  task_external_id=f"C0CHAN000:{posted['C0CHAN000'][0]}")),
            ("push digest, 150 blocks", Action(key="bench-digest", kind="digest", target="C0CHAN000",
                                               text="Weekly digest", payload={"blocks": blocks})),
            ("push digest again", Action(key="bench-digest", kind="digest", target="C0CHAN000",
                                         text="Weekly digest", payload={"blocks": blocks})),
        ]
        for label, action in pushes:
            slack.reset_log()
            started = time.perf_counter()
            connector.push(action)
            calls = Counter(r.path.removeprefix("/api/") for r in slack.requests())
            print(row(label, time.perf_counter() - started, calls))


if __name__ == "__main__":
    main()
