"""The jira connector at 10,000 issues, on Jira Cloud and on Server/Data Center.

    python bench/bench_jira.py [--issues 10000] [--changed 50] [--url sqlite:///PATH]

For each deployment: a Jira stand-in on loopback is seeded with the issues (one updated a
minute, the newest an hour old, people, links, ADF or wiki descriptions), then the real
connector, through the real `jira` library and sync engine, runs a first sync into a fresh
store, an incremental sync after `--changed` issues were edited, and an idle re-sync. Prints
wall time, the HTTP requests by endpoint (checked against the connector's own count), the
largest search page, and the issues read and written for each run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from connectors.jira import JiraConnector  # noqa: E402
from store.db import Store  # noqa: E402
from sync.config import parse_config  # noqa: E402
from sync.engine import SyncEngine  # noqa: E402
from sync.standins.jira import JiraStandin  # noqa: E402

NOW = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
STATUSES = ["To Do", "In Progress", "Done", "Blocked"]
PRIORITIES = ["Highest", "High", "Medium", "Low", "Lowest"]
USERS = [f"5b10a2844c20165700ede{n:03d}" for n in range(40)]


def seed(standin: JiraStandin, issues: int) -> None:
    for n, account in enumerate(USERS):
        standin.add_user(account, name=f"user{n}", display_name=f"User {n}", email=f"user{n}@example.com")
    oldest = NOW - timedelta(hours=1) - timedelta(minutes=issues)
    for n in range(1, issues + 1):
        standin.add_issue(
            f"OPS-{n}",
            summary=f"Task {n}: keep the lights on",
            description=f"Context for task {n}.\n\nAcceptance criteria:\nIt works and is documented.",
            status=STATUSES[n % 4],
            assignee=USERS[n % len(USERS)] if n % 7 else None,
            reporter=USERS[(n * 3) % len(USERS)],
            priority=PRIORITIES[n % 5],
            labels=["ops", f"area-{n % 12}"],
            links=[("Blocks", f"OPS-{n - 1}")] if n % 10 == 0 else (),
            timetracking={"originalEstimateSeconds": 8 * 3600, "timeSpentSeconds": (n % 9) * 3600},
            created=oldest - timedelta(days=30),
            updated=oldest + timedelta(minutes=n),
        )


def run(engine: SyncEngine, standin: JiraStandin, label: str) -> dict[str, object]:
    standin.reset_log()
    started = time.perf_counter()
    [result] = engine.run()
    seconds = time.perf_counter() - started
    if not result.ok:
        raise SystemExit(f"{label}: {result.error}")
    log = standin.requests()
    kinds = Counter(r.path.rsplit("/", 1)[-1] for r in log)
    searches = [r for r in log if r.path.endswith(("/search", "/search/jql"))]
    pages = [int(r.query.get("maxResults", ["0"])[0]) for r in searches]
    return {
        "run": label,
        "seconds": seconds,
        "requests": len(log),
        "counted": result.requests.requests,
        "serverInfo": kinds["serverInfo"],
        "field": kinds["field"],
        "search": len(searches),
        "page": max(pages, default=0),
        "read": result.upserts.inserted + result.upserts.updated + result.upserts.unchanged,
        "written": result.upserts.inserted + result.upserts.updated,
    }


def bench(deployment: str, issues: int, changed: int, url: str | None) -> list[dict[str, object]]:
    standin = JiraStandin(deployment, token="bench-token")
    standin.set_now(NOW)
    seed(standin, issues)
    standin.start()
    folder = tempfile.mkdtemp(prefix="trackloop-bench-jira-")
    store = Store(url or f"sqlite:///{folder}/{deployment}.db")
    name = f"jira_{deployment}"  # one source per deployment, so a shared --url store keeps them apart
    section = {
        "type": "jira", "url": standin.base_url, "auth": "basic" if deployment == "cloud" else "bearer",
        "email": standin.email, "token": standin.token, "jql": "project = OPS", "deployment": "auto",
    }  # fmt: skip
    types = {"jira": JiraConnector}
    data = {"store": {"url": store.url}, "connectors": {name: section}}
    config = parse_config(data, env={}, connector_types=types)
    engine = SyncEngine(store, config, types, clock=lambda: NOW)
    rows = [run(engine, standin, "first sync")]
    for n in range(1, changed + 1):
        standin.update_issue(f"OPS-{n * (issues // changed)}", summary=f"Task {n}: reworded", updated=NOW)
    rows.append(run(engine, standin, f"{changed} changed"))
    rows.append(run(engine, standin, "idle re-sync"))
    store.close()
    standin.stop()
    return [{"deployment": deployment, **row} for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--issues", type=int, default=10_000)
    parser.add_argument("--changed", type=int, default=50)
    parser.add_argument("--url", help="store URL (default: a fresh SQLite file per deployment)")
    args = parser.parse_args()
    rows = [row for dep in ("cloud", "server") for row in bench(dep, args.issues, args.changed, args.url)]
    header = ("deployment", "run", "wall", "requests", "serverInfo", "field", "search", "page size", "read",
              "written")  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        mismatch = "" if r["requests"] == r["counted"] else f" (connector counted {r['counted']})"
        requests = f"{r['requests']}{mismatch}"
        cells = (r["deployment"], r["run"], f"{r['seconds']:.2f} s", requests, r["serverInfo"], r["field"],
                 r["search"], r["page"], f"{r['read']:,}", f"{r['written']:,}")  # fmt: skip
        print("| " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
