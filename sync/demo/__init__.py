"""`trackloop demo`: a small, realistic team, synced offline through the real pipeline.

Each source is a real connector talking to a local stand-in of its service (a CSV file for
the spreadsheet), so the demo exercises the same code as production, with no network and no
config. Dates are relative to today so the picture is the same whenever it runs.

A demo source is a module in this package with
`source(stack, folder, today) -> (connector name, config section)`: it starts whatever stand-in
it needs on `stack` (stopped when the demo ends), seeds it, and points a connector at it.
"""

from __future__ import annotations

import tempfile
from contextlib import ExitStack
from datetime import date
from pathlib import Path
from typing import Any

from connectors.registry import connector_types
from store.db import Store
from store.errors import TrackloopError
from store.queries import TaskFilter, list_tasks, task_json
from sync.config import AppConfig, parse_config
from sync.demo import imap, sheet

PEOPLE: dict[str, dict[str, Any]] = {
    "alice": {"name": "Alice Kim", "email": "alice@example.com", "lead": True},
    "bob": {"name": "Bob Otieno", "email": "bob@example.com"},
    "carol": {"name": "Carol Diaz", "email": "carol@example.com"},
    "dan": {"name": "Dan Weber", "email": "dan@example.com"},
}

SOURCES = [sheet, imap]


def demo_config(db_path: Path, connectors: dict[str, dict[str, Any]]) -> AppConfig:
    data = {"store": {"url": f"sqlite:///{db_path}"}, "people": PEOPLE, "connectors": connectors}
    return parse_config(data, file="(demo)", env={}, connector_types=connector_types())


def run_demo(db_path: Path) -> list[dict[str, Any]]:
    """Build the demo store from scratch and return every task as `tasks --json` objects."""
    from sync.engine import SyncEngine

    for suffix in ("", "-wal", "-shm"):
        Path(f"{db_path}{suffix}").unlink(missing_ok=True)
    with ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="trackloop-demo-")))
        today = date.today()
        connectors = dict(module.source(stack, folder, today) for module in SOURCES)
        config = demo_config(db_path, connectors)
        store = Store(config.store.url)
        stack.callback(store.close)
        results = SyncEngine(store, config, connector_types()).run()
        failed = [r for r in results if not r.ok]
        if failed:
            raise TrackloopError(f"demo sync failed: {failed[0].connector}: {failed[0].error}")
        with store.transaction() as session:
            return [task_json(t, key) for t, key in list_tasks(session, TaskFilter(include_closed=True))]
