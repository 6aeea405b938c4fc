"""Rules throughput: every built-in rule over 100,000 tasks, 300,000 history events and
50,000 dependency links.

    python bench/bench_rules.py [--tasks 100000] [--url sqlite:///PATH]

Seeds the store through the real sync engine (bench_store's synthetic connector: 100,000 tasks,
a `blocks` link on every other one, one initial status event each), adds two more status
events per task (to in_progress, then to done or blocked), then runs the rules engine twice:
cold (every finding new) and warm (findings exist: the steady state of a daemon).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_store import T0, Synthetic, scratch  # noqa: E402
from sqlalchemy import func, insert, select  # noqa: E402

from rules.engine import RulesEngine, build_rules  # noqa: E402
from rules.registry import rule_types  # noqa: E402
from store.db import Store  # noqa: E402
from store.models import Finding, Task, TaskEvent, TaskLink  # noqa: E402
from sync.config import parse_config  # noqa: E402
from sync.engine import SyncEngine  # noqa: E402

NOW = datetime(2026, 3, 16, 9, 0, tzinfo=UTC)


def seed(url: str, tasks: int) -> None:
    types = {"synthetic": Synthetic}
    config = parse_config({"store": {"url": url}, "connectors": {"s": {"type": "synthetic", "tasks": tasks}}},
                          env={}, connector_types=types)
    store = Store(url)
    SyncEngine(store, config, types, clock=lambda: T0 + timedelta(days=1)).run()
    with store.transaction() as s:
        rows = s.execute(select(Task.id, Task.status, Task.created_at)).all()
        events = []
        for tid, status, created in rows:
            started = created + timedelta(days=1)
            events.append({"task_id": tid, "at": started, "field": "status", "old": "todo", "new": "in_progress",
                           "actor": None, "origin": "sync"})
            final = "done" if status == "done" else "blocked"
            events.append({"task_id": tid, "at": started + timedelta(days=3 + tid % 9), "field": "status",
                           "old": "in_progress", "new": final, "actor": None, "origin": "sync"})
        for i in range(0, len(events), 20_000):
            s.execute(insert(TaskEvent.__table__), events[i : i + 20_000])
    store.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=100_000)
    ap.add_argument("--url", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, scratch(args.url or f"sqlite:///{Path(tmp) / 'rules.db'}") as url:
        seed(url, args.tasks)
        store = Store(url)
        with store.transaction() as s:
            counts = {name: s.scalar(select(func.count()).select_from(model))
                      for name, model in (("tasks", Task), ("events", TaskEvent), ("links", TaskLink))}
        engine = RulesEngine(build_rules(rule_types(), {}), clock=lambda: NOW)
        timings = []
        for label in ("cold", "warm"):
            started, cpu = time.perf_counter(), time.process_time()
            with store.transaction() as s:
                outcomes = engine.run(s)
            timings.append((label, time.perf_counter() - started, outcomes, time.process_time() - cpu))
        with store.transaction() as s:
            open_findings = s.scalar(select(func.count()).select_from(Finding).where(Finding.status == "open"))
        store.close()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"store: {counts['tasks']:,} tasks, {counts['events']:,} events, {counts['links']:,} links; "
          f"{open_findings:,} open findings; peak RSS {peak_mb:.0f} MB")
    print("| rule | flagged | cold | warm |")
    print("|---|---|---|---|")
    cold, warm = timings[0][2], timings[1][2]
    for c, w in zip(cold, warm, strict=True):
        print(f"| {c.rule} | {c.flagged:,} | {c.seconds:.2f} s | {w.seconds:.2f} s |")
    print(f"| **all rules (wall)** | | **{timings[0][1]:.2f} s** | **{timings[1][1]:.2f} s** |")
    print(f"| all rules (CPU of this process) | | {timings[0][3]:.2f} s | {timings[1][3]:.2f} s |")


if __name__ == "__main__":
    main()
