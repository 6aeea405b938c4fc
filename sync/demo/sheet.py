"""The demo's spreadsheet source: a CSV export, read by the real `csv` connector."""

from __future__ import annotations

import csv
from contextlib import ExitStack
from datetime import date, timedelta
from pathlib import Path
from typing import Any

# id, task, status, owner, due (days from today, or None), priority, labels
ROWS: list[tuple[str, str, str, str, int | None, str, str]] = [
    ("OPS-101", "Renew the wildcard TLS certificate for *.example.com", "In progress", "bob", 3, "high", "security"),
    ("OPS-102", "Move DNS for example.com to the new provider", "Blocked", "carol", -2, "high", "dns,migration"),
    ("OPS-103", "Decommission the old build server", "Todo", "", 10, "medium", "cleanup"),
    ("OPS-104", "Rotate the backup encryption keys", "Todo", "team", None, "high", "security"),
    ("OPS-105", "Write the on-call runbook for the payment API", "Doing", "dan", 7, "medium", "docs"),
    ("OPS-106", "Upgrade PostgreSQL 13 to 16 on the reporting replica", "Todo", "carol@example.com", -5,
     "medium", "database"),
    ("OPS-107", "Set up SSO for the VPN", "Done", "bob", -1, "medium", "security"),
    ("OPS-108", "Order replacement disks for the NAS", "Todo", "", None, "low", "hardware"),
    ("OPS-109", "Quarterly access review for the finance share", "Todo", "alice", 1, "high", "compliance"),
    ("OPS-110", "Archive last year's ticket exports", "Cancelled", "dan", None, "low", "cleanup"),
]


def source(stack: ExitStack, folder: Path, today: date) -> tuple[str, dict[str, Any]]:
    """Write the sheet into `folder`; return the connector name and its config section."""
    del stack  # a file needs no service to stop
    path = folder / "team-tasks.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["ID", "Task", "Status", "Owner", "Due", "Priority", "Labels"])
        for ident, title, status, owner, due_in, priority, labels in ROWS:
            due = (today + timedelta(days=due_in)).isoformat() if due_in is not None else ""
            writer.writerow([ident, title, status, owner, due, priority, labels])
    return "sheet", {
        "type": "csv",
        "path": str(path),
        "id_column": "ID",
        "columns": {"title": "Task", "status": "Status", "owner": "Owner", "due": "Due",
                    "priority": "Priority", "labels": "Labels"},
    }
