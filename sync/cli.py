"""The `trackloop` command line. The only module that prints: data to stdout, messages to stderr."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import select

from connectors.registry import connector_plugins, connector_types
from rules.engine import RuleOutcome, build_rules
from rules.registry import rule_plugins, rule_types
from store import db as store_db
from store.canonical import Status
from store.db import Store
from store.durations import parse_duration
from store.errors import ConfigError, TrackloopError
from store.findings import finding_json, open_findings
from store.findings import snooze as snooze_finding
from store.models import OutboxAction, TaskEvent
from store.outbox import action_json, retry_failed
from store.queries import TaskFilter, find_task, list_tasks, task_json
from store.sync_state import all_states, failures_of
from sync.config import AppConfig, config_schema, load_config, parse_address
from sync.delivery import DeliveryReport
from sync.digests import render_html, render_markdown, render_text
from sync.engine import SyncResult, build_connector
from sync.logs import REDACT, setup_logging
from sync.notify import Plan
from sync.pipeline import CycleReport, Pipeline

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="trackloop",
    help="One source of truth for your team's tasks, from the tools you already use.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
config_app = typer.Typer(help="Check and describe the configuration file.", no_args_is_help=True)
db_app = typer.Typer(help="Manage the store's schema.", no_args_is_help=True)
rules_app = typer.Typer(help="Run and inspect the rules that flag tasks.", no_args_is_help=True)
outbox_app = typer.Typer(help="Actions queued for delivery: list them, retry failed ones.")
app.add_typer(config_app, name="config")
app.add_typer(db_app, name="db")
app.add_typer(rules_app, name="rules")
app.add_typer(outbox_app, name="outbox")

EXIT_CONNECTOR_FAILED = 1
EXIT_CONFIG = 2
EXIT_ALREADY_RUNNING = 3


class UsageError(TrackloopError):
    """The command line named something that does not exist; exit status 2."""


class Settings:
    """Global options, shared by every command through typer's context."""

    config_path: Path = Path("trackloop.toml")
    debug: bool = False
    verbose: int = 0


SETTINGS = Settings()


@app.callback()
def _global(
    config: Annotated[
        Path,
        typer.Option("--config", "-c", envvar="TRACKLOOP_CONFIG", metavar="PATH", help="Config file.",
                     show_default=True),
    ] = Path("trackloop.toml"),
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, show_default=False, help="More log output (-vv: debug).")
    ] = 0,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    log_format: Annotated[
        str, typer.Option("--log-format", metavar="FORMAT", help="Log format: text or json.")
    ] = "text",
) -> None:
    SETTINGS.config_path, SETTINGS.debug, SETTINGS.verbose = config, debug, verbose
    level = logging.DEBUG if verbose > 1 or debug else logging.INFO if verbose else logging.WARNING
    setup_logging(level=level, fmt=log_format)


def guarded(fn: F) -> F:
    """Turn trackloop errors into one redacted line on stderr and the documented exit status."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            for problem in exc.problems:
                err.print(REDACT(str(problem)), markup=False)
            raise typer.Exit(EXIT_CONFIG) from None
        except UsageError as exc:
            err.print(f"error: {REDACT(str(exc))}", markup=False)
            raise typer.Exit(EXIT_CONFIG) from None
        except TrackloopError as exc:
            if SETTINGS.debug:
                raise
            err.print(f"error: {REDACT(str(exc))}", markup=False)
            raise typer.Exit(EXIT_CONNECTOR_FAILED) from None

    return wrapper  # type: ignore[return-value]


def load() -> AppConfig:
    config = load_config(SETTINGS.config_path, connector_types=connector_types())
    REDACT.add(config.secrets())
    return config


@contextmanager
def opened(config: AppConfig) -> Iterator[Store]:
    store = Store(config.store.url)
    try:
        yield store
    finally:
        store.close()


def on_terminal() -> bool:
    return sys.stdout.isatty()


def print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    """A rich table on a terminal; tab-separated lines with a header when piped."""
    if on_terminal():
        table = Table(title=title, title_justify="left")
        for col in columns:
            table.add_column(col, overflow="fold")
        for row in rows:
            table.add_row(*row)
        out.print(table)
        return
    print("\t".join(columns))
    for row in rows:
        print("\t".join(cell.replace("\t", " ").replace("\n", " ") for cell in row))


def print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2, ensure_ascii=False))


# -- init / config / db --------------------------------------------------------------------
STARTER = """\
# trackloop configuration; every key is documented in config.example.toml.
[store]
url = "sqlite:///trackloop.db"

[people.alice]
name = "Alice Kim"
email = "alice@example.com"
lead = true

[connectors.sheet]
type = "csv"
path = "tasks.csv"
id_column = "ID"
columns = { title = "Task", status = "Status", owner = "Owner", due = "Due" }
"""


@app.command()
@guarded
def init(
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a starter config file (to --config, default ./trackloop.toml)."""
    path = SETTINGS.config_path
    if path.exists() and not force:
        err.print(f"{path} exists; use --force to overwrite", markup=False)
        raise typer.Exit(EXIT_CONFIG)
    path.write_text(STARTER, encoding="utf-8")
    os.chmod(path, 0o600)  # it will hold or reference credentials
    err.print(f"wrote {path}; edit it, then run `trackloop config validate`", markup=False)


@config_app.command("validate")
@guarded
def config_validate() -> None:
    """Check the config file; print one line per problem and exit 2 if there are any."""
    config = load()
    err.print(f"{SETTINGS.config_path}: ok ({len(config.connectors)} connectors, {len(config.people)} people)",
              markup=False)


@config_app.command("schema")
@guarded
def config_schema_cmd() -> None:
    """Print the JSON Schema of the config file, including every installed connector type."""
    print_json(config_schema(connector_types()))


@db_app.command("upgrade")
@guarded
def db_upgrade() -> None:
    """Migrate the store's schema to this version of trackloop."""
    config = load()
    store = Store(config.store.url, migrate=False)
    try:
        store_db.upgrade(store.engine)
        err.print(f"store at {store_db.redact_url(config.store.url)} is at {store_db.head_revision()}",
                  markup=False)
    finally:
        store.close()


# -- doctor / sync / status / tasks -----------------------------------------------------------
@app.command()
@guarded
def doctor() -> None:
    """List installed plugins (connector types, rules) and check each configured connector with one cheap call."""
    plugins = [("connector", p) for p in connector_plugins().values()] + [("rule", p) for p in rule_plugins().values()]
    print_table("plugins", ["name", "kind", "class", "distribution", "version"],
                [[p.name, kind, f"{p.cls.__module__}.{p.cls.__name__}", p.distribution, p.version]
                 for kind, p in plugins])
    config = load()
    types = connector_types()
    rows, failed = [], False
    for name, cfg in config.connectors.items():
        connector = None
        try:
            connector = build_connector(config, types, name)
            verdict = connector.check()
            ok, detail = verdict.ok, verdict.detail
        except TrackloopError as exc:
            ok, detail = False, str(exc)
        except Exception as exc:  # a plugin's bug fails its own row, not the whole report
            ok, detail = False, f"unexpected {exc.__class__.__name__}: {exc}"
        finally:
            if connector is not None:
                connector.close()
        failed |= not ok
        rows.append([name, cfg.type, "ok" if ok else "FAIL", REDACT(detail)])
    print_table("connectors", ["connector", "type", "check", "detail"], rows)
    if failed:
        raise typer.Exit(EXIT_CONNECTOR_FAILED)


@app.command()
@guarded
def sync(
    connector: Annotated[
        list[str] | None, typer.Option("--connector", metavar="NAME", help="Only this connector (repeatable).")
    ] = None,
    full: Annotated[bool, typer.Option("--full", help="Re-list everything and cancel what is gone.")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Do everything, print the actions it would take, write nothing.")
    ] = False,
) -> None:
    """Pull connectors into the store, run the rules, then queue and deliver follow-ups ([notify])."""
    config = load()
    for name in connector or []:
        if name not in config.connectors:
            raise ConfigError([_unknown_connector(config, name)])
    with opened(config) as store:
        report = _run_sync(store, config, connector, full=full, dry_run=dry_run)
        delivered = None if dry_run else Pipeline(store, config, connector_types()).deliver_outbox()
    _print_results(report.syncs, dry_run=dry_run)
    if report.rules:
        err.print(_rules_summary(report.rules), markup=False)
    _print_plan(report.plan, dry_run=dry_run, delivered=delivered)
    if any(not r.ok for r in report.syncs):
        raise typer.Exit(EXIT_CONNECTOR_FAILED)


def _print_plan(plan: Plan | None, *, dry_run: bool, delivered: DeliveryReport | None) -> None:
    if plan is None:
        err.print("notify: no [notify] table, so nothing is posted (observing only)", markup=False)
        return
    if plan.paused:
        err.print(f"notify: paused: {plan.paused}", markup=False)
    if dry_run:
        print_table("actions it would take", ["key", "via", "kind", "target", "text"],
                    [[p.action.key, p.action.connector, p.action.kind, p.action.target or p.ref,
                      p.action.text] for p in plan.actions])
    for reason, count in sorted(plan.skipped.items()):
        err.print(f"notify: {count} follow-up(s) skipped: {reason}", markup=False)
    summary = f"notify: {len(plan.actions)} {'would be ' if dry_run else ''}queued"
    if plan.held_back:
        summary += f", {plan.held_back} held back by caps (they go first next run)"
    if delivered is not None:
        summary += (f"; delivered {delivered.sent}, found already delivered {delivered.already_delivered}, "
                    f"retrying {delivered.retrying}, failed {delivered.failed}")
    err.print(summary, markup=False)


@app.command()
@guarded
def notify(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print what would be sent; change nothing.")] = False,
) -> None:
    """Queue follow-ups for open findings and deliver due ones (without pulling)."""
    config = load()
    with opened(config) as store:
        pipeline = Pipeline(store, config, connector_types())
        plan = pipeline.plan_followups(dry_run=dry_run)
        delivered = None if dry_run or plan is None else pipeline.deliver_outbox()
    _print_plan(plan, dry_run=dry_run, delivered=delivered)


@outbox_app.callback(invoke_without_command=True)
@guarded
def outbox(
    ctx: typer.Context,
    show_all: Annotated[bool, typer.Option("--all", help="Include sent actions.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON array (see README).")] = False,
) -> None:
    """List queued and failed actions (with --all, sent ones too)."""
    if ctx.invoked_subcommand is not None:
        return
    config = load()
    with opened(config) as store, store.transaction() as session:
        stmt = select(OutboxAction).order_by(OutboxAction.id)
        if not show_all:
            stmt = stmt.where(OutboxAction.status != "sent")
        docs = [action_json(row) for row in session.scalars(stmt)]
    if as_json:
        print_json(docs)
        return
    print_table(f"outbox ({len(docs)})", ["key", "via", "status", "attempts", "last error"],
                [[d["key"], d["connector"], d["status"], str(d["attempts"]), d["last_error"] or ""] for d in docs])


@outbox_app.command("retry")
@guarded
def outbox_retry(
    keys: Annotated[
        list[str] | None, typer.Argument(metavar="KEY", help="Keys to retry (default: every failed action).")
    ] = None,
) -> None:
    """Put failed actions back in the queue and deliver them now."""
    config = load()
    with opened(config) as store:
        with store.transaction() as session:
            count = retry_failed(session, datetime.now(UTC), keys or [])
        delivered = Pipeline(store, config, connector_types()).deliver_outbox(limit=max(count, 1))
    err.print(f"outbox: {count} requeued; delivered {delivered.sent}, found already delivered "
              f"{delivered.already_delivered}, retrying {delivered.retrying}, failed {delivered.failed}, "
              f"cancelled {delivered.cancelled}", markup=False)
    if delivered.paused:
        err.print(f"outbox: follow-ups wait: {delivered.paused}", markup=False)


@app.command()
@guarded
def digest(
    name: Annotated[str, typer.Argument(help="A [digests.NAME] from the config.")],
    out_file: Annotated[Path | None, typer.Option("--out", help="Write Markdown (.md) or HTML (.html).")] = None,
    send: Annotated[bool, typer.Option("--send", help="Deliver it (once per scheduled slot).")] = False,
) -> None:
    """Show a lead digest (terminal), write it to a file, or send it."""
    config = load()
    if name not in config.digests:
        known = ", ".join(config.digests) or "none configured"
        raise UsageError(f"no digest {name!r} (configured: {known})")
    with opened(config) as store:
        pipeline = Pipeline(store, config, connector_types())
        run = pipeline.send_digest(name) if send else pipeline.digest(name)
    if out_file is not None:
        as_html = out_file.suffix.lower() in (".html", ".htm")
        text = render_html(run.content) if as_html else render_markdown(run.content)
        out_file.write_text(text, encoding="utf-8")
        err.print(f"wrote {out_file}", markup=False)
    elif not send:
        print(render_text(run.content), end="")
    if send and run.queued:
        err.print(f"digest {name}: {run.queued} deliveries queued for slot {run.slot.isoformat()}", markup=False)
    elif send and run.actions:
        err.print(f"digest {name}: already queued for slot {run.slot.isoformat()}; nothing new to send "
                  "(see `trackloop outbox --all`)", markup=False)
    for missed in run.missed:
        err.print(f"digest {name}: cannot reach {missed}", markup=False)


def _unknown_connector(config: AppConfig, name: str) -> Any:
    from store.errors import ConfigProblem

    known = ", ".join(config.connectors) or "none configured"
    return ConfigProblem(config.file, f"connectors.{name}", f"no such connector (configured: {known})")


def _run_sync(
    store: Store, config: AppConfig, only: list[str] | None, *, full: bool, dry_run: bool
) -> CycleReport:
    if not on_terminal():
        return Pipeline(store, config, connector_types()).sync(only or None, full=full, dry_run=dry_run)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=err, transient=True) as progress:
        bar = progress.add_task("syncing", total=None)

        def on_page(name: str, result: SyncResult) -> None:
            seen = result.upserts.inserted + result.upserts.updated + result.upserts.unchanged
            progress.update(bar, description=f"{name}: {result.pages} pages, {seen} tasks")

        return Pipeline(store, config, connector_types(), on_page=on_page).sync(
            only or None, full=full, dry_run=dry_run
        )


def _print_results(results: list[SyncResult], *, dry_run: bool) -> None:
    rows = []
    for r in results:
        u = r.upserts
        outcome = "ok" if r.ok else "FAILED"
        rows.append([r.connector, r.kind, outcome, str(u.inserted), str(u.updated), str(u.unchanged),
                     str(u.cancelled), str(r.requests.requests), f"{r.seconds:.2f}s",
                     REDACT(r.error or r.note or "")])
    if dry_run:
        err.print("dry run: nothing was written", markup=False)
    columns = ["connector", "type", "result", "new", "changed", "unchanged", "cancelled", "requests", "time", "detail"]
    print_table("sync (dry run)" if dry_run else "sync", columns, rows)
    for r in results:
        if not r.ok:
            err.print(f"error: {r.connector}: {REDACT(r.error or '')}", markup=False)


def _rules_summary(outcomes: list[RuleOutcome]) -> str:
    opened = sum(o.stats.opened for o in outcomes)
    resolved = sum(o.stats.resolved for o in outcomes)
    flagged = sum(o.flagged for o in outcomes)
    return f"rules: {flagged} open findings ({opened} new, {resolved} resolved); see `trackloop flags`"


@rules_app.command("run")
@guarded
def rules_run() -> None:
    """Evaluate every enabled rule against the store (without pulling)."""
    config = load()
    with opened(config) as store:
        outcomes = Pipeline(store, config, connector_types()).run_rules()
    print_table("rules", ["rule", "enabled", "flagged", "new", "resolved", "time"],
                [[o.rule, "yes" if o.enabled else "no", str(o.flagged), str(o.stats.opened),
                  str(o.stats.resolved), f"{o.seconds:.2f}s"] for o in outcomes])


@rules_app.command("list")
@guarded
def rules_list() -> None:
    """Show every installed rule with its effective settings."""
    config = load()
    rows = []
    for rule in build_rules(rule_types(), config.rules):
        settings = rule.config.model_dump(mode="json", exclude={"enabled", "severity"})
        rows.append([rule.id, "yes" if rule.config.enabled else "no", rule.config.severity,
                     json.dumps(settings, ensure_ascii=False)])
    print_table("rules", ["rule", "enabled", "severity", "settings"], rows)


@app.command()
@guarded
def flags(
    rule: Annotated[str | None, typer.Option("--rule", help="Only this rule.")] = None,
    owner: Annotated[str | None, typer.Option("--owner", help='Person key; "none" for unowned tasks.')] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON array (see README).")] = False,
) -> None:
    """List open findings: what needs follow-up, why, and who should act."""
    config = load()
    with opened(config) as store, store.transaction() as session:
        docs = [finding_json(v) for v in open_findings(session, rule=rule, owner=owner)]
    if as_json:
        print_json(docs)
        return
    render_flags(docs)


def render_flags(docs: list[dict[str, Any]], title: str = "flags") -> None:
    print_table(f"{title} ({len(docs)})", ["task", "rule", "severity", "act", "message"],
                [[f"{d['source']}:{d['external_id']}", d["rule"], d["severity"], d["act"] or "-", d["message"]]
                 for d in docs])


def _task_or_fail(session: Any, ref: str) -> Any:
    task = find_task(session, ref)
    if task is None:
        raise UsageError(f"no task {ref!r}; name it SOURCE:EXTERNAL_ID (e.g. gh:acme/api#42) or by its URL")
    return task


@app.command()
@guarded
def snooze(
    task: Annotated[str, typer.Argument(help="SOURCE:EXTERNAL_ID or the task's URL.")],
    rule: Annotated[str, typer.Argument(help="The rule whose finding to hide.")],
    for_: Annotated[str, typer.Option("--for", help='How long, e.g. "3d".')] = "1d",
) -> None:
    """Hide a finding until then; it comes back earlier if the task changes."""
    try:
        span = parse_duration(for_)
    except ValueError as exc:
        raise UsageError(f"--for: {exc}") from None
    config = load()
    with opened(config) as store, store.transaction() as session:
        found = _task_or_fail(session, task)
        until = datetime.now(UTC) + span
        if snooze_finding(session, found, rule, until) is None:
            raise UsageError(f"{task} has no open {rule!r} finding")
    err.print(f"snoozed {rule} on {task} until {until.isoformat(timespec='minutes')}", markup=False)


@app.command()
@guarded
def verify(task: Annotated[str, typer.Argument(help="SOURCE:EXTERNAL_ID or the task's URL.")]) -> None:
    """Record that a done task's outcome was checked (clears done_unverified)."""
    config = load()
    with opened(config) as store, store.transaction() as session:
        found = _task_or_fail(session, task)
        session.add(TaskEvent(task_id=found.id, at=datetime.now(UTC), field="verified", old=None,
                              new=os.environ.get("USER") or "cli", origin="user"))
        Pipeline(store, config, connector_types()).rules_in(session)
    err.print(f"recorded verification of {task}", markup=False)


@app.command()
@guarded
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON array (see README).")] = False,
) -> None:
    """Show each configured connector's last sync: success, error and cursor."""
    config = load()
    now = datetime.now(UTC)
    with opened(config) as store, store.transaction() as session:
        states = all_states(session)
        doc = []
        for name, cfg in config.connectors.items():
            row = states.get(name)
            doc.append({
                "connector": name,
                "type": cfg.type,
                "enabled": cfg.enabled,
                "interval": int(cfg.interval.total_seconds()),
                "last_success": row.last_success.isoformat() if row and row.last_success else None,
                "last_attempt": row.last_attempt.isoformat() if row and row.last_attempt else None,
                "last_error": REDACT(row.last_error) if row and row.last_error else None,
                "last_error_at": row.last_error_at.isoformat() if row and row.last_error_at else None,
                "cursor": row.cursor if row else None,
                "last_stats": row.last_stats if row else {},
                "failures": failures_of(row.last_stats) if row and row.last_error else 0,
                "syncing_on": row.lease_owner if row and row.lease_expires and row.lease_expires > now else None,
            })
    if as_json:
        print_json(doc)
        return
    print_table("connectors", ["connector", "type", "enabled", "last success", "failures", "last error"],
                [[d["connector"], d["type"], "yes" if d["enabled"] else "no", d["last_success"] or "never",
                  str(d["failures"]), d["last_error"] or ""] for d in doc])


@app.command()
@guarded
def tasks(
    owner: Annotated[
        str | None, typer.Option("--owner", metavar="PERSON", help='Person key; "none" for unowned.')
    ] = None,
    source: Annotated[str | None, typer.Option("--source", metavar="NAME", help="Connector name.")] = None,
    status_: Annotated[
        list[Status] | None,
        typer.Option("--status", metavar="STATUS",
                     help="Only this status (repeatable): todo, in_progress, blocked, done, cancelled."),
    ] = None,
    show_all: Annotated[bool, typer.Option("--all", help="Include done and cancelled tasks.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON array (see README).")] = False,
) -> None:
    """List tasks (default: open ones: todo, in_progress, blocked)."""
    config = load()
    flt = TaskFilter(owner=owner, source=source, statuses=[s.value for s in status_ or []], include_closed=show_all)
    with opened(config) as store, store.transaction() as session:
        found = list_tasks(session, flt)
        docs = [task_json(task, key) for task, key in found]
    if as_json:
        print_json(docs)
        return
    render_tasks(docs)


def render_tasks(docs: list[dict[str, Any]], title: str = "tasks") -> None:
    print_table(f"{title} ({len(docs)})", ["task", "title", "status", "owner", "due", "priority"],
                [[f"{d['source']}:{d['external_id']}", d["title"][:80], d["status"], d["owner"] or "-",
                  d["due"] or "-", d["priority"]] for d in docs])


@app.command()
@guarded
def run(
    http: Annotated[
        str | None,
        typer.Option("--http", metavar="HOST:PORT",
                     help="Serve /healthz, /metrics and webhooks here, e.g. 127.0.0.1:9464 (overrides daemon.http)."),
    ] = None,
    worker_id: Annotated[
        str | None,
        typer.Option("--worker-id", metavar="ID", help="This replica's name in leases and logs (default HOST:PID)."),
    ] = None,
) -> None:
    """Run as a daemon: syncs on schedule, rules, follow-ups and digests, health, metrics, webhooks.

    Each connector is synced every `interval`; the rules run after each sync that changed
    something, follow-ups are delivered as they fall due and digests on their `schedule`.
    SIGTERM/SIGINT finish the current page and exit within 10 s; SIGHUP reloads the config (a bad
    one is logged and the running config kept). On SQLite one replica runs (a second exits with
    status 3); on PostgreSQL run as many as you like: they share the work through leases.
    """
    from sync.daemon import AlreadyRunning, Daemon

    config = load()
    if SETTINGS.verbose == 0 and not SETTINGS.debug:
        logging.getLogger().setLevel(logging.INFO)  # a daemon logs a line per sync by default,
        for chatty in ("alembic", "trackloop.rules"):  # and one per rules run (not one per rule)
            logging.getLogger(chatty).setLevel(logging.WARNING)
    if http is not None:
        try:
            parse_address(http)
        except ValueError as exc:
            raise UsageError(f"--http: {exc}") from None
    daemon = Daemon(config, connector_types=connector_types(), load_config=load, worker=worker_id, http=http)
    try:
        report = daemon.run()
    except AlreadyRunning as exc:
        err.print(f"error: {REDACT(str(exc))}", markup=False)
        raise typer.Exit(EXIT_ALREADY_RUNNING) from None
    if report.abandoned:  # threads stuck in a request: do not wait for them
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


@app.command()
@guarded
def demo(
    path: Annotated[
        Path, typer.Option("--db", help="Where the demo store goes; replaces only an earlier demo store.")
    ] = Path("trackloop-demo.db"),
) -> None:
    """Seed a small team offline, run the whole pipeline and show the result (no config needed)."""
    from sync.demo import NotADemoStore, run_demo

    try:
        result = run_demo(path)
    except NotADemoStore as exc:
        raise UsageError(str(exc)) from None
    render_tasks(result.tasks, title=f"demo tasks in {path}")
    print()
    render_flags(result.flags, title="what needs follow-up")
    print()
    print_table(f"Slack DMs it would send ({len(result.dms)})", ["to", "message"],
                [[person, text.replace(chr(10), " / ")] for person, text in result.dms])
    print()
    print(result.digest, end="")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
