"""`trackloop run` as a real process against the stand-in world: config files, starting,
killing and stopping replicas, waiting for convergence, and the store snapshot that compares a
killed-and-restarted run with a clean one. Used by tests/test_daemon_process.py and by the soak
in bench/soak_daemon.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from connectors.jira import marker_for
from store.db import Store
from store.models import OutboxAction, Person, SyncStateRow, Task, TaskLink

ROOT = Path(__file__).resolve().parent.parent
TRACKLOOP = [sys.executable, "-m", "sync.cli"]

# What a source says about a task. Left out on purpose: ids, first_seen_at/synced_at (when this
# store saw it), status_changed_at where the source does not report it (when this store saw the
# change), content_hash (it covers the times below), and for Slack the times a reaction moves
# (updated_at, closed_at, last_activity_at): Slack does not date reactions, the sync that sees
# one dates it (README, "### slack").
FIELDS = ("kind", "scope", "url", "title", "body", "status", "raw_status", "assignee_count", "due", "priority",
          "labels", "acceptance_criteria", "created_at", "original_estimate_s", "remaining_estimate_s",
          "time_spent_s", "verified", "extra")
DATED = ("updated_at", "closed_at", "last_activity_at")  # compared except for Slack


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML for {value!r}")


def write_config(path: Path, doc: dict[str, Any]) -> Path:
    """A trackloop.toml from {"store": {...}, "daemon": {...}, "notify": {...}, "people": {k: {...}},
    "digests": {k: {...}}, "connectors": {k: {...}}}."""
    lines = []
    for section in ("store", "daemon", "notify"):
        if doc.get(section):
            lines.append(f"[{section}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in doc[section].items()]
    for section in ("people", "digests", "connectors"):
        for name, body in (doc.get(section) or {}).items():
            lines.append(f"[{section}.{name}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in body.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKLOOP_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra or {})
    return env


class Replica:
    """One `trackloop run` process; its JSON log goes to `log`."""

    def __init__(self, config: Path, *, worker: str, log: Path, http: str | None = None) -> None:
        self.config, self.worker, self.log_path, self.http = config, worker, log, http
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        args = [*TRACKLOOP, "--config", str(self.config), "--log-format", "json", "run", "--worker-id", self.worker]
        if self.http:
            args += ["--http", self.http]
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(args, stdout=log, stderr=log, cwd=self.config.parent, env=clean_env())
        log.close()
        self.starts += 1

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 15) -> tuple[int, float]:
        """SIGTERM; returns (exit status, seconds it took)."""
        assert self.proc is not None
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        return code, time.monotonic() - started

    def started(self) -> bool:
        """This process (the latest start) logged that it is running."""
        return sum(1 for line in self.lines() if line.get("event") == "start") >= self.starts

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for raw in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(raw))
            except ValueError:
                out.append({"message": raw, "level": "raw"})
        return out


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _states(url: str) -> dict[str, SyncStateRow]:
    """The sync_state rows; none while no replica has created the schema yet."""
    store = Store(url, migrate=False)
    try:
        with store.transaction() as s:
            return {r.connector: r for r in s.scalars(select(SyncStateRow))}
    except SQLAlchemyError:
        return {}
    finally:
        store.close()


def synced_since(url: str, names: Iterable[str], since: datetime) -> bool:
    """Every connector finished a successful sync that started after `since`."""
    rows = _states(url)
    for name in names:
        row = rows.get(name)
        if row is None or row.last_attempt is None or row.last_success is None:
            return False
        if row.last_attempt <= since or row.last_success < row.last_attempt:
            return False
    return True


def succeeded_since(url: str, names: Iterable[str], since: datetime) -> bool:
    """Every connector has a successful sync that ended after `since`."""
    rows = {name: row.last_success for name, row in _states(url).items()}
    return all(rows.get(name) is not None and rows[name] > since for name in names)  # type: ignore[operator]


def snapshot(url: str) -> dict[tuple[str, str], dict[str, Any]]:
    """Every task as its source describes it (see FIELDS), with owner/reporter keys and links."""
    store = Store(url, migrate=False)
    out: dict[tuple[str, str], dict[str, Any]] = {}
    try:
        with store.transaction() as s:
            keys = dict(s.execute(select(Person.id, Person.key)).all())  # type: ignore[arg-type]
            links: dict[int, set[tuple[str, ...]]] = {}
            for link in s.scalars(select(TaskLink)):
                links.setdefault(link.declared_by, set()).add(
                    (link.kind, link.src_source, link.src_external_id, link.dst_source, link.dst_external_id))
            for task in s.scalars(select(Task)):
                doc = {f: getattr(task, f) for f in FIELDS}
                doc["owner"] = keys.get(task.owner_id) if task.owner_id else None
                doc["reporter"] = keys.get(task.reporter_id) if task.reporter_id else None
                doc["links"] = sorted(links.get(task.id, set()))
                if task.kind != "slack":
                    doc.update({f: getattr(task, f) for f in DATED})
                out[(task.source, task.external_id)] = doc
    finally:
        store.close()
    return out


def posted_on(url: str) -> set[tuple[str, str]]:
    """Tasks trackloop commented on. Its comment bumps the source's update time; the store that
    sent it does not count that as activity, a clean store that did not cannot tell."""
    store = Store(url, migrate=False)
    try:
        with store.transaction() as s:
            stmt = (select(Task.source, Task.external_id).join(OutboxAction, OutboxAction.task_id == Task.id)
                    .where(OutboxAction.status == "sent"))
            return set(s.execute(stmt).all())  # type: ignore[arg-type]
    finally:
        store.close()


def differences(got: dict[tuple[str, str], dict[str, Any]], want: dict[tuple[str, str], dict[str, Any]],
                *, own_posts: set[tuple[str, str]] = frozenset()) -> list[str]:  # type: ignore[assignment]
    out = [f"missing {k}" for k in sorted(want.keys() - got.keys())]
    out += [f"extra {k}" for k in sorted(got.keys() - want.keys())]
    for key in sorted(want.keys() & got.keys()):
        for name, value in want[key].items():
            if name == "last_activity_at" and key in own_posts:
                continue
            if got[key].get(name) != value:
                out.append(f"{key}.{name}: {got[key].get(name)!r} != clean {value!r}")
    return out


def outbox_rows(url: str) -> list[OutboxAction]:
    store = Store(url, migrate=False)
    try:
        with store.transaction() as s:
            return list(s.scalars(select(OutboxAction)))
    except SQLAlchemyError:
        return []
    finally:
        store.close()


def outbox_settled(url: str, now: datetime) -> bool:
    """Nothing due is waiting: every action is sent, failed, or not due yet."""
    return all(r.status != "pending" or r.next_attempt_at > now for r in outbox_rows(url))


def delivery_problems(posted: dict[tuple[Any, ...], int], url: str, kinds: dict[str, str]) -> list[str]:
    """Compare what the stand-ins received (World.deliveries()) with the outbox: no post twice, a
    post for every action recorded as sent, no post without an action, nothing left failed.
    `kinds` maps connector name -> type."""
    problems = [f"delivered {count} times: {marker}" for marker, count in sorted(posted.items()) if count > 1]
    expected = set()
    for row in outbox_rows(url):
        kind = kinds.get(row.connector)
        marker: tuple[Any, ...] = ("jira", marker_for(row.key)) if kind == "jira" else (kind or "?", row.key)
        if kind == "slack":
            parts = sorted(m[2] for m in posted if m[:2] == ("slack", row.key))
            marker = ("slack", row.key, 1)
            expected.update(("slack", row.key, part) for part in parts)
        expected.add(marker)
        if row.status == "sent" and marker not in posted:
            problems.append(f"recorded as sent but never posted: {row.key}")
        if row.status == "failed":
            problems.append(f"failed: {row.key}: {row.last_error}")
    problems += [f"posted without an outbox action: {m}" for m in sorted(posted.keys() - expected)]
    return problems
