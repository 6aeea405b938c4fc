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
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

from connectors.registry import connector_types
from store.db import Store
from store.errors import TrackloopError
from store.findings import finding_json, open_findings
from store.queries import TaskFilter, list_tasks, task_json
from sync.config import AppConfig, parse_config
from sync.demo import github, imap, jira, sheet, slack
from sync.digests import render_text

PEOPLE: dict[str, dict[str, Any]] = {
    "alice": {"name": "Alice Kim", "email": "alice@example.com", "github": "alice-kim", "slack": slack.ALICE,
              "lead": True},
    "bob": {"name": "Bob Otieno", "email": "bob@example.com", "github": "bob-otieno", "slack": slack.BOB},
    "carol": {"name": "Carol Diaz", "email": "carol@example.com", "github": "carol-diaz", "slack": slack.CAROL},
    "dan": {"name": "Dan Weber", "email": "dan@example.com", "github": "dan-weber", "slack": slack.DAN},
}

SOURCES = [sheet, github, jira, slack, imap]

# The follow-up policy a team might start with: comments where the work lives, DMs for what is
# slipping, and a morning digest for the lead. The demo only prints what it would send.
NOTIFY: dict[str, Any] = {
    "comment_on_source": ["missing_owner", "overdue", "done_unverified"],
    "dm_owner": ["stale_status", "overdue", "due_soon", "dependency_at_risk"],
}
DIGESTS: dict[str, Any] = {"leads": {"to": ["alice"], "schedule": "0 9 * * mon-fri"}}


# Written into the SQLite header of every demo store, so a rerun only ever replaces a demo store.
APPLICATION_ID = 0x746C646D  # "tldm"
DEFAULT_PATH = Path("trackloop-demo.db")


class NotADemoStore(TrackloopError):
    """`--db` names a file the demo did not make: it is never deleted."""


def _clear(db_path: Path) -> None:
    """Remove an earlier demo store (and its -wal/-shm) at `db_path`; refuse any other file."""
    if db_path.exists() and db_path.name != DEFAULT_PATH.name and not _is_demo_store(db_path):
        raise NotADemoStore(f"{db_path} exists and is not a trackloop demo store; "
                            "choose another --db (the demo replaces only a store it made)")
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db_path}{suffix}").unlink(missing_ok=True)


def _is_demo_store(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            header = fh.read(100)
    except OSError:
        return False
    return header.startswith(b"SQLite format 3\x00") and int.from_bytes(header[68:72], "big") == APPLICATION_ID


@dataclass(frozen=True, slots=True)
class DemoResult:
    tasks: list[dict[str, Any]]
    flags: list[dict[str, Any]]
    dms: list[tuple[str, str]]  # (person, text) of the DMs it would send
    digest: str


def demo_config(db_path: Path, connectors: dict[str, dict[str, Any]]) -> AppConfig:
    data = {"store": {"url": f"sqlite:///{db_path}"}, "people": PEOPLE, "connectors": connectors,
            "notify": NOTIFY, "digests": DIGESTS}
    return parse_config(data, file="(demo)", env={}, connector_types=connector_types())


def run_demo(db_path: Path) -> DemoResult:
    """Build the demo store from scratch: pull every source, run the rules, plan follow-ups (dry)."""
    from sync.pipeline import Pipeline

    _clear(db_path)
    with ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="trackloop-demo-")))
        today = date.today()
        connectors = dict(module.source(stack, folder, today) for module in SOURCES)
        config = demo_config(db_path, connectors)
        store = Store(config.store.url)
        stack.callback(store.close)
        with store.engine.begin() as conn:
            conn.exec_driver_sql(f"PRAGMA application_id = {APPLICATION_ID}")
        pipeline = Pipeline(store, config, connector_types())
        report = pipeline.engine.run()
        failed = [r for r in report if not r.ok]
        if failed:
            raise TrackloopError(f"demo sync failed: {failed[0].connector}: {failed[0].error}")
        pipeline.run_rules()
        plan = pipeline.plan_followups(dry_run=True)
        dms = [(p.action.payload.get("person", p.action.target or ""), p.action.text)
               for p in (plan.actions if plan else []) if p.action.kind == "dm"]
        digest = render_text(pipeline.digest("leads").content)
        with store.transaction() as session:
            tasks = [task_json(t, key) for t, key in list_tasks(session, TaskFilter(include_closed=True))]
            flags = [finding_json(v) for v in open_findings(session)]
        return DemoResult(tasks, flags, dms, digest)
