"""`trackloop demo`: a small, realistic team, synced offline through the real pipeline.

Each source is a real connector talking to a local stand-in of its service (a CSV file for
the spreadsheet), so the demo exercises the same code as production, with no network and no
config. Dates are relative to today so the picture is the same whenever it runs.
"""

from __future__ import annotations

import csv
import tempfile
from contextlib import ExitStack
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from connectors.registry import connector_types
from store.db import Store
from store.queries import TaskFilter, list_tasks, task_json
from sync.config import AppConfig, parse_config

PEOPLE: dict[str, dict[str, Any]] = {
    "alice": {"name": "Alice Kim", "email": "alice@example.com", "lead": True},
    "bob": {"name": "Bob Otieno", "email": "bob@example.com"},
    "carol": {"name": "Carol Diaz", "email": "carol@example.com"},
    "dan": {"name": "Dan Weber", "email": "dan@example.com"},
}

# id, task, status, owner, due (days from today, or None), priority, labels
SHEET_ROWS: list[tuple[str, str, str, str, int | None, str, str]] = [
    ("OPS-101", "Renew the wildcard TLS certificate for *.example.com", "In progress", "bob", 3, "high", "security"),
    ("OPS-102", "Move DNS for example.com to the new provider", "Blocked", "carol", -2, "high", "dns,migration"),
    ("OPS-103", "Decommission the old build server", "Todo", "", 10, "medium", "cleanup"),
    ("OPS-104", "Rotate the backup encryption keys", "Todo", "team", None, "high", "security"),
    ("OPS-105", "Write the on-call runbook for the payment API", "Doing", "dan", 7, "medium", "docs"),
    ("OPS-106", "Upgrade PostgreSQL 13 to 16 on the reporting replica", "Todo", "carol@example.com", -5, "medium",
     "database"),
    ("OPS-107", "Set up SSO for the VPN", "Done", "bob", -1, "medium", "security"),
    ("OPS-108", "Order replacement disks for the NAS", "Todo", "", None, "low", "hardware"),
    ("OPS-109", "Quarterly access review for the finance share", "Todo", "alice", 1, "high", "compliance"),
    ("OPS-110", "Archive last year's ticket exports", "Cancelled", "dan", None, "low", "cleanup"),
]


def write_sheet(folder: Path, today: date) -> Path:
    path = folder / "team-tasks.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["ID", "Task", "Status", "Owner", "Due", "Priority", "Labels"])
        for ident, title, status, owner, due_in, priority, labels in SHEET_ROWS:
            due = (today + timedelta(days=due_in)).isoformat() if due_in is not None else ""
            writer.writerow([ident, title, status, owner, due, priority, labels])
    return path


def demo_config(db_path: Path, sheet: Path) -> AppConfig:
    data: dict[str, Any] = {
        "store": {"url": f"sqlite:///{db_path}"},
        "people": PEOPLE,
        "connectors": {
            "sheet": {
                "type": "csv",
                "path": str(sheet),
                "id_column": "ID",
                "columns": {"title": "Task", "status": "Status", "owner": "Owner", "due": "Due",
                            "priority": "Priority", "labels": "Labels"},
            },
        },
    }
    return parse_config(data, file="(demo)", env={}, connector_types=connector_types())


def run_demo(db_path: Path) -> list[dict[str, Any]]:
    """Build the demo store from scratch and return every task as `tasks --json` objects."""
    from sync.engine import SyncEngine

    for suffix in ("", "-wal", "-shm"):
        Path(f"{db_path}{suffix}").unlink(missing_ok=True)
    with ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="trackloop-demo-")))
        sheet = write_sheet(folder, date.today())
        config = demo_config(db_path, sheet)
        store = Store(config.store.url)
        stack.callback(store.close)
        results = SyncEngine(store, config, connector_types()).run()
        failed = [r for r in results if not r.ok]
        if failed:
            raise RuntimeError(f"demo sync failed: {failed[0].connector}: {failed[0].error}")
        with store.transaction() as session:
            return [task_json(t, key) for t, key in list_tasks(session, TaskFilter(include_closed=True))]
