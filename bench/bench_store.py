"""Upsert throughput: 100,000 synthetic tasks through the real sync engine into a fresh store.

    python bench/bench_store.py [--tasks 100000] [--url sqlite:///PATH]

Runs a cold sync and then a re-sync of the same unchanged tasks, and prints tasks/s, the
rows written by the re-sync, their time ratio and the peak RSS of this process.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import create_engine, func, select, text  # noqa: E402

from connectors.base import Connector, ConnectorConfig  # noqa: E402
from store.canonical import (  # noqa: E402
    CheckResult,
    Cursor,
    IdentityKind,
    IdentityRef,
    LinkKind,
    LinkRecord,
    Page,
    Priority,
    Status,
    SyncState,
    TaskRecord,
    TaskRef,
)
from store.db import Store  # noqa: E402
from store.models import Task  # noqa: E402
from sync.config import parse_config  # noqa: E402
from sync.engine import SyncEngine  # noqa: E402

T0 = datetime(2026, 1, 1, tzinfo=UTC)
STATUSES = [Status.TODO, Status.IN_PROGRESS, Status.BLOCKED, Status.DONE]
RAW = [str(s) for s in STATUSES]
PRIORITIES = [Priority.HIGH, Priority.MEDIUM, Priority.LOW, Priority.NONE]
USERS = [IdentityRef(IdentityKind.GITHUB, f"user{u}") for u in range(200)]
SCOPES = [f"acme/repo{r}" for r in range(10)]
LABELS = [("bench", f"area-{a}") for a in range(12)]
DUES = [date(2026, 3, 1) + timedelta(days=d) for d in range(90)]
BODY = "Some context about the task. " * 8


class SynthConfig(ConnectorConfig):
    tasks: int = 100_000
    page: int = 1000


class SynthCursor(Cursor):
    offset: int = 0


class Synthetic(Connector[SynthConfig, SynthCursor]):
    """Generates realistic-sized records lazily, a page at a time (never all in memory)."""

    kind = "synthetic"
    config_model = SynthConfig
    cursor_model = SynthCursor

    def check(self) -> CheckResult:
        return CheckResult(True, "synthetic")

    def pull(self, state: SyncState[SynthCursor]) -> Iterator[Page[SynthCursor]]:
        n, size = self.config.tasks, self.config.page
        for start in range(0, n, size):
            end = min(start + size, n)
            yield Page(tasks=[self.record(i) for i in range(start, end)], cursor=SynthCursor(offset=end))

    @staticmethod
    def record(i: int) -> TaskRecord:
        # Shared values come from small tables, as a real connector's parsed payloads share them;
        # the generator should cost little next to the store it measures.
        return TaskRecord(
            external_id=f"acme/repo{i % 10}#{i}",
            title=f"Synthetic task {i}: upgrade component {i % 97} on host-{i % 500}",
            body=BODY,
            status=STATUSES[i % 4],
            raw_status=RAW[i % 4],
            url=f"https://example.invalid/t/{i}",
            scope=SCOPES[i % 10],
            assignees=(USERS[i % 200],) if i % 5 else (),
            reporter=USERS[(i + 7) % 200],
            due=DUES[i % 90] if i % 3 else None,
            priority=PRIORITIES[i % 4],
            labels=LABELS[i % 12],
            created_at=T0 + timedelta(minutes=i),
            updated_at=T0 + timedelta(minutes=i, seconds=30),
            links=(LinkRecord(LinkKind.BLOCKS, TaskRef(f"acme/repo{(i + 1) % 10}#{i + 1}")),) if i % 2 == 0 else (),
        )


@contextmanager
def scratch(url: str) -> Iterator[str]:
    """`url` itself for SQLite (a fresh file); on PostgreSQL a throwaway schema of that server,
    so every run starts from an empty store whatever an earlier run left behind."""
    if not url.startswith("postgresql"):
        yield url
        return
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT", pool_pre_ping=True)  # survives a server restart
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=100_000)
    ap.add_argument("--url", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, scratch(args.url or f"sqlite:///{Path(tmp) / 'bench.db'}") as url:
        types = {"synthetic": Synthetic}
        config = parse_config({"store": {"url": url}, "connectors": {"s": {"type": "synthetic", "tasks": args.tasks}}},
                              env={}, connector_types=types)
        store = Store(url)
        engine = SyncEngine(store, config, types)

        started, cpu = time.perf_counter(), time.process_time()
        [cold] = engine.run()
        cold_s, cold_cpu = time.perf_counter() - started, time.process_time() - cpu
        started, cpu = time.perf_counter(), time.process_time()
        [warm] = engine.run()
        warm_s, warm_cpu = time.perf_counter() - started, time.process_time() - cpu
        with store.transaction() as s:
            stored = s.scalar(select(func.count()).select_from(Task))
        store.close()
    assert cold.ok and warm.ok, (cold.error, warm.error)
    assert stored == args.tasks
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("| tasks | cold sync | tasks/s | re-sync | rows written by re-sync | re-sync / cold | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {args.tasks:,} | {cold_s:.1f} s ({cold_cpu:.1f} s CPU) | {args.tasks / cold_s:,.0f} | "
          f"{warm_s:.1f} s ({warm_cpu:.1f} s CPU) | {warm.upserts.inserted + warm.upserts.updated} | "
          f"{warm_s / cold_s:.2f} ({warm_cpu / cold_cpu:.2f} CPU) | {peak_mb:.0f} MB |")


if __name__ == "__main__":
    main()
