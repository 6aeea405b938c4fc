"""The daemon in-process: schedules, back-off, leases between replicas, stop between pages,
reload, health, metrics, webhooks. The clock is injected: nothing here waits for an interval."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, select, text

from connectors.base import Connector, ConnectorConfig
from connectors.errors import TransientError
from connectors.registry import connector_types
from store.canonical import (
    Action,
    CheckResult,
    Cursor,
    IdentityKind,
    IdentityRef,
    Page,
    PushResult,
    Status,
    SyncState,
    TaskRecord,
)
from store.db import Store
from store.errors import ConfigError, ConfigProblem
from store.models import Person, SyncStateRow, Task
from store.people import IdentityResolver
from store.sync_state import Schedule
from sync.config import AppConfig, parse_config
from sync.daemon import AlreadyRunning, Daemon, StoreLock, due_at
from tests.conftest import PG_SKIP, PG_URL, Clock

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)


class FakeCursor(Cursor):
    version: int = 1
    page: int = 0


@dataclass
class Knobs:
    pages: int = 2
    fail: str | None = None
    gate: threading.Event | None = None  # the first pull waits here before its second page
    entered: threading.Event | None = None
    pulls: int = 0
    title: str = "v1"


KNOBS: dict[str, Knobs] = {}


class FakeConnector(Connector[ConnectorConfig, FakeCursor]):
    kind = "fake"
    config_model = ConnectorConfig
    cursor_model = FakeCursor

    def check(self) -> CheckResult:
        return CheckResult(True, "fine")

    def push(self, action: Action) -> PushResult:
        return PushResult(f"posted-{action.key}")

    def pull(self, state: SyncState[FakeCursor]) -> Iterator[Page[FakeCursor]]:
        knobs = KNOBS.setdefault(self.name, Knobs())
        knobs.pulls += 1
        first = knobs.pulls == 1
        if knobs.fail:
            raise TransientError(knobs.fail)
        start = state.cursor.page if state.cursor else 0
        for page in range(start, knobs.pages):
            if page > start and first and knobs.gate is not None:
                assert knobs.entered is not None
                knobs.entered.set()
                knobs.gate.wait(10)
            yield Page(tasks=[TaskRecord(external_id=f"{page}", title=f"{self.name} {page} {knobs.title}",
                                         status=Status.TODO, raw_status="open", scope="all")],
                       cursor=FakeCursor(page=page + 1))


TYPES = {"fake": FakeConnector}


@pytest.fixture(autouse=True)
def _knobs() -> Iterator[None]:
    KNOBS.clear()
    yield
    for knobs in KNOBS.values():
        if knobs.gate is not None:
            knobs.gate.set()


def make_config(db_url: str, connectors: dict[str, dict[str, Any]], **daemon: Any) -> AppConfig:
    return parse_config({"store": {"url": db_url}, "daemon": daemon, "connectors": connectors},
                        env={}, connector_types=TYPES)


def make_daemon(db_url: str, clock: Clock, connectors: dict[str, dict[str, Any]], *, worker: str = "w1",
                store: Store | None = None, **daemon: Any) -> Daemon:
    config = make_config(db_url, connectors, **daemon)
    return Daemon(config, connector_types=TYPES, worker=worker, clock=clock, store=store)


def fakes(*names: str, interval: str = "1m") -> dict[str, dict[str, Any]]:
    return {n: {"type": "fake", "interval": interval} for n in names}


def pulls() -> dict[str, int]:
    return {name: k.pulls for name, k in sorted(KNOBS.items())}


def step(daemon: Daemon) -> float:
    delay = daemon.tick()
    daemon.join()
    return delay


def state_of(store: Store, name: str) -> SyncStateRow:
    with store.transaction() as s:
        row = s.get(SyncStateRow, name)
        assert row is not None
        return row


# -- when is a connector due ----------------------------------------------------------------------
def sched(**kw: Any) -> Schedule:
    base = dict(connector="c", last_attempt=None, last_success=None, last_error=None, last_error_at=None,
                failures=0, lease_owner=None, lease_expires=None)
    return Schedule(**{**base, **kw})


def test_due_at_interval_backoff_and_interrupted_syncs() -> None:
    minute, cap = timedelta(minutes=1), timedelta(minutes=5)
    assert due_at(None, minute, cap) is None
    ok = sched(last_attempt=T0, last_success=T0 + timedelta(seconds=20))
    assert due_at(ok, minute, cap) == T0 + minute  # counted from the start of the last sync
    for failures, pause in [(1, 1), (2, 2), (3, 4), (4, 5), (40, 5)]:
        failed = sched(last_attempt=T0, last_error_at=T0 + timedelta(seconds=10), last_error="502", failures=failures)
        assert due_at(failed, minute, cap) == T0 + timedelta(seconds=10, minutes=pause)
    interrupted = sched(last_attempt=T0 + timedelta(minutes=3), last_success=T0)
    assert due_at(interrupted, minute, cap) is None


# -- scheduling -----------------------------------------------------------------------------------
def test_each_connector_syncs_on_its_own_interval(db_url: str, clock: Clock) -> None:
    daemon = make_daemon(db_url, clock, {**fakes("a", interval="1m"), **fakes("b", interval="5m")})
    daemon.start()
    try:
        step(daemon)
        assert pulls() == {"a": 1, "b": 1}
        clock.advance(seconds=30)
        assert step(daemon) == pytest.approx(5.0)  # nothing due: sleep until the next look
        assert pulls() == {"a": 1, "b": 1}
        clock.advance(seconds=31)
        step(daemon)
        assert pulls() == {"a": 2, "b": 1}
        clock.advance(minutes=4)
        step(daemon)
        assert pulls() == {"a": 3, "b": 2}
        with daemon.store.transaction() as s:
            assert s.scalar(select(SyncStateRow.lease_owner).where(SyncStateRow.lease_owner.is_not(None))) is None
            assert {t.title for t in s.scalars(select(Task))} >= {"a 0 v1", "b 1 v1"}
        assert daemon.report.syncs == 5
    finally:
        daemon.shutdown()


def test_a_failing_connector_backs_off_shows_in_health_and_recovers(db_url: str, clock: Clock) -> None:
    daemon = make_daemon(db_url, clock, fakes("good", "bad"), max_backoff="4m")
    KNOBS["bad"] = Knobs(fail="502 Bad Gateway from the source")
    daemon.start()
    try:
        seen = []
        for _ in range(8):  # eight minutes, one look a minute
            step(daemon)
            seen.append((KNOBS["good"].pulls, KNOBS["bad"].pulls))
            clock.advance(minutes=1)
        assert [g for g, _ in seen] == [1, 2, 3, 4, 5, 6, 7, 8]  # the healthy one never waits
        assert [b for _, b in seen] == [1, 2, 2, 3, 3, 3, 3, 4]  # 1, 2, 4, 4 minutes apart
        assert state_of(daemon.store, "bad").last_stats["failures"] == 4
        ok, doc = daemon.health()
        assert not ok and doc["status"] == "failing"
        [reason] = doc["reasons"]
        assert reason.startswith("bad: no success since the daemon started 8m ago, more than 3 intervals (3m)")
        assert "502 Bad Gateway from the source" in reason
        assert doc["connectors"]["good"]["healthy"] and doc["connectors"]["bad"]["failures"] == 4
        KNOBS["bad"].fail = None
        clock.advance(minutes=3)
        step(daemon)
        ok, doc = daemon.health()
        assert ok and doc["reasons"] == [] and doc["faults"] == []
        assert state_of(daemon.store, "bad").last_error is None
    finally:
        daemon.shutdown()


def test_health_reports_a_fault_before_it_turns_503(db_url: str, clock: Clock) -> None:
    daemon = make_daemon(db_url, clock, fakes("src"))
    daemon.start()
    try:
        step(daemon)
        KNOBS["src"].fail = "429 Too Many Requests"
        clock.advance(minutes=1)
        step(daemon)
        ok, doc = daemon.health()
        assert ok and doc["faults"] == ["src: failing (1 in a row): 429 Too Many Requests"]
        clock.advance(minutes=3)
        ok, doc = daemon.health()
        assert not ok and doc["reasons"][0].startswith("src: last success 4m ago, more than 3 intervals (3m)")
    finally:
        daemon.shutdown()


# -- replicas -----------------------------------------------------------------------------------
def test_two_replicas_never_take_the_same_connector(db_url: str, clock: Clock) -> None:
    names = [f"c{i}" for i in range(10)]
    stores = [Store(db_url), Store(db_url, migrate=False)]
    replicas = [make_daemon(db_url, clock, fakes(*names), worker=f"r{i}", store=stores[i], workers=3)
                for i in range(2)]
    for r in replicas:
        r.start()
    try:
        barrier = threading.Barrier(2)

        def look(r: Daemon) -> None:
            barrier.wait()
            r.tick()

        threads = [threading.Thread(target=look, args=(r,)) for r in replicas]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for r in replicas:
            r.join()
        assert sum(pulls().values()) == 6 and set(pulls().values()) == {1}
        for _ in range(2):
            for r in replicas:
                step(r)
        assert pulls() == dict.fromkeys(sorted(names), 1)  # all synced once, none twice
    finally:
        for r in replicas:
            r.shutdown()


def test_a_dead_replicas_connector_is_taken_over_after_its_lease(db_url: str, clock: Clock) -> None:
    KNOBS["src"] = Knobs(pages=3, gate=threading.Event(), entered=threading.Event())
    first = make_daemon(db_url, clock, fakes("src"), worker="r1", store=Store(db_url), lease="30s")
    second = make_daemon(db_url, clock, fakes("src"), worker="r2", store=Store(db_url, migrate=False), lease="30s")
    first.start()
    second.start()
    try:
        first.tick()  # r1 takes src and hangs after its first page, as if its machine froze
        assert KNOBS["src"].entered.wait(5)
        step(second)
        assert KNOBS["src"].pulls == 1  # held: r2 leaves it alone
        clock.advance(seconds=31)  # r1 never renewed: its lease runs out
        step(second)
        assert KNOBS["src"].pulls == 2
        row = state_of(second.store, "src")
        assert row.last_success is not None and row.cursor == {"version": 1, "page": 3} and row.lease_owner is None
        KNOBS["src"].gate.set()  # r1 wakes up and tries to commit its second page: refused
        first.join()
        after = state_of(second.store, "src")
        assert (after.last_success, after.last_error, after.cursor) == (row.last_success, None, row.cursor)
        with second.store.transaction() as s:
            assert s.scalar(select(Task.title).where(Task.external_id == "1")) == "src 1 v1"
    finally:
        first.shutdown()
        second.shutdown()


def test_stop_finishes_the_current_page_and_the_next_run_resumes(db_url: str, clock: Clock) -> None:
    KNOBS["src"] = Knobs(pages=4, gate=threading.Event(), entered=threading.Event())
    daemon = make_daemon(db_url, clock, fakes("src"))
    daemon.start()
    daemon.tick()
    assert KNOBS["src"].entered.wait(5)
    daemon.stopping.set()
    KNOBS["src"].gate.set()
    started = time.monotonic()
    daemon.shutdown()
    assert time.monotonic() - started < 5 and daemon.report.abandoned == []
    row = state_of(Store(db_url), "src")
    assert row.cursor == {"version": 1, "page": 2}  # the page it was on was committed, then it stopped
    assert row.last_success is None and row.last_error is None and row.lease_owner is None

    again = make_daemon(db_url, clock, fakes("src"))
    again.start()
    try:
        clock.advance(seconds=1)
        step(again)  # interrupted: due at once, not an interval later
        row = state_of(again.store, "src")
        assert row.cursor == {"version": 1, "page": 4} and row.last_success is not None
    finally:
        again.shutdown()


def test_stuck_work_is_abandoned_after_the_grace_period(tmp_path, clock: Clock) -> None:
    KNOBS["src"] = Knobs(pages=3, gate=threading.Event(), entered=threading.Event())
    daemon = make_daemon(f"sqlite:///{tmp_path / 's.db'}", clock, fakes("src"))
    daemon.start()
    daemon.tick()
    assert KNOBS["src"].entered.wait(5)
    started = time.monotonic()
    daemon.shutdown(grace=0.3)
    assert time.monotonic() - started < 2 and daemon.report.abandoned == ["src"]


# -- reload ---------------------------------------------------------------------------------------
def test_reload_applies_a_good_config_and_keeps_the_old_one_on_a_bad_one(
    db_url: str, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    configs: list[Any] = []

    def load() -> AppConfig:
        found = configs.pop(0)
        if isinstance(found, Exception):
            raise found
        return found

    daemon = make_daemon(db_url, clock, fakes("a"))
    daemon.load_config = load
    daemon.start()
    try:
        step(daemon)
        configs.append(ConfigError([ConfigProblem("trackloop.toml", "connectors.b.interval", "expected a duration")]))
        with caplog.at_level(logging.ERROR, logger="trackloop.daemon"):
            assert daemon.reload() is False
        assert "still running the previous config: trackloop.toml: connectors.b.interval: expected a duration" \
            in caplog.text
        assert list(daemon.config.connectors) == ["a"]
        configs.append(make_config(db_url, {**fakes("a"), **fakes("b")}))
        assert daemon.reload() is True
        step(daemon)
        assert pulls() == {"a": 1, "b": 1}
    finally:
        daemon.shutdown()


# -- the single-replica lock of SQLite ------------------------------------------------------------
def test_sqlite_store_lock_names_the_holder(tmp_path) -> None:
    lock = StoreLock.for_url(f"sqlite:///{tmp_path / 'x.db'}")
    assert lock is not None and lock.path == tmp_path / "x.db.lock"
    assert StoreLock.for_url("postgresql+psycopg://u@h/db") is None
    lock.acquire()
    try:
        other = StoreLock(lock.path)
        with pytest.raises(AlreadyRunning, match=rf"another `trackloop run` \(pid {__import__('os').getpid()}\)"):
            other.acquire()
    finally:
        lock.release()
    again = StoreLock(lock.path)
    again.acquire()
    again.release()


# -- people created by two replicas at once -------------------------------------------------------
def test_two_writers_meeting_the_same_stranger_share_one_person(db_url: str) -> None:
    store = Store(db_url)
    ref = IdentityRef(IdentityKind.GITHUB, "newcomer", email="newcomer@example.com")
    ids: list[int] = []
    created = threading.Event()
    commit = threading.Event()

    def first() -> None:
        with store.transaction() as s:
            ids.append(IdentityResolver().resolve(s, ref) or 0)
            created.set()
            commit.wait(5)

    def second() -> None:
        created.wait(5)
        with store.transaction() as s:
            ids.append(IdentityResolver().resolve(s, ref) or 0)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    time.sleep(0.3)  # the second writer is now waiting on the first (index or write lock)
    commit.set()
    for t in threads:
        t.join(10)
    assert len(ids) == 2 and ids[0] == ids[1]
    with store.transaction() as s:
        assert s.scalars(select(Person.key)).all() == ["github:newcomer"]
    store.close()


# -- PostgreSQL restarts: the store drops our connections mid-run ---------------------------------
@pytest.mark.postgres
def test_the_daemon_reconnects_when_its_database_connections_are_killed(clock: Clock) -> None:
    if not PG_URL:
        pytest.skip(PG_SKIP)
    schema, app = f"t_{uuid.uuid4().hex[:12]}", f"trackloop-test-{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in PG_URL else "?"
    url = f"{PG_URL}{sep}options=-csearch_path%3D{schema}&application_name={app}"

    def kill_our_connections() -> int:
        with admin.connect() as conn:
            return len(conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                         "WHERE application_name = :app"), {"app": app}).all())

    KNOBS["src"] = Knobs(pages=3, gate=threading.Event(), entered=threading.Event())
    daemon = make_daemon(url, clock, {**fakes("src"), **fakes("other")})
    daemon.start()
    try:
        daemon.tick()
        assert KNOBS["src"].entered.wait(5)
        daemon.join(0.5)
        assert kill_our_connections() >= 1  # a "restart" in the middle of src's sync
        KNOBS["src"].gate.set()
        daemon.join()
        clock.advance(minutes=2)
        step(daemon)  # reconnects; src resumes from its last committed page
        row = state_of(daemon.store, "src")
        assert row.last_success is not None and row.cursor == {"version": 1, "page": 3}
        assert kill_our_connections() >= 1
        clock.advance(minutes=2)
        step(daemon)
        assert state_of(daemon.store, "other").last_error is None and KNOBS["other"].pulls == 3
        assert daemon.health()[0]
    finally:
        daemon.shutdown()
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


# -- config ---------------------------------------------------------------------------------------
def test_daemon_config_is_validated_and_its_secrets_are_known(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    config = parse_config(
        {"store": {"url": url}, "connectors": {"a": {"type": "fake", "interval": "1s"}},
         "daemon": {"http": "127.0.0.1:9464", "webhooks": {"github_secret": "${HOOK}"}}},
        env={"HOOK": "s3cret-hook"}, connector_types=TYPES)
    assert config.daemon.http == "127.0.0.1:9464" and config.daemon.lease == timedelta(seconds=60)
    assert "s3cret-hook" in config.secrets()
    with pytest.raises(ConfigError) as caught:
        parse_config({"store": {"url": url}, "connectors": {"a": {"type": "fake", "interval": "0.5s"}}},
                     env={}, connector_types=TYPES)
    assert [str(p) for p in caught.value.problems] == ['connectors.a.interval: must be at least "1s", got 0.5s']
    with pytest.raises(ConfigError) as caught:
        parse_config({"store": {"url": url}, "daemon": {"http": "localhost", "lease": "1s", "worker": 2}},
                     env={}, connector_types=TYPES)
    found = [str(p) for p in caught.value.problems]
    assert any(p.startswith('daemon.http: expected "HOST:PORT"') for p in found)
    assert 'daemon.lease: must be at least "2s", got 1s' in found
    assert "daemon.worker: unknown key" in found


# -- HTTP: health, metrics, webhooks ---------------------------------------------------------------
SECRETS = {"github_secret": "gh-hook-secret", "jira_secret": "jira-hook-secret", "slack_signing_secret": "slk-sign"}


@pytest.fixture
def served(tmp_path, clock: Clock) -> Iterator[Daemon]:
    """A daemon with real connector types (never synced here) and its HTTP server on a free port."""
    connectors = {
        "gh": {"type": "github", "token": "t", "repos": ["acme/api", "tools/*"]},
        "jira": {"type": "jira", "url": "https://acme.atlassian.net", "auth": "basic", "email": "b@acme.io",
                 "token": "t", "jql": "project = OPS"},
        "slack": {"type": "slack", "token": "xoxb-1", "channels": ["C0OPS"]},
    }
    config = parse_config({"store": {"url": f"sqlite:///{tmp_path / 's.db'}"}, "connectors": connectors,
                           "daemon": {"webhooks": SECRETS}}, env={}, connector_types=connector_types())
    daemon = Daemon(config, connector_types=connector_types(), http="127.0.0.1:0", clock=clock, worker="w")
    daemon.start()
    yield daemon
    daemon.shutdown()


def call(daemon: Daemon, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
         ) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://{daemon.http_address}{path}", data=body if method == "POST" else None,
                                 method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_healthz_and_metrics_over_http(served: Daemon, clock: Clock) -> None:
    status, body = call(served, "GET", "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"  # just started: within 3 intervals
    with served.store.transaction() as s:
        s.add(Task(source="gh", kind="github", external_id="acme/api#1", title="x", status="todo",
                   raw_status="open", content_hash="h", first_seen_at=clock(), synced_at=clock()))
    clock.advance(minutes=16)
    status, body = call(served, "GET", "/healthz")
    doc = json.loads(body)
    assert status == 503 and len(doc["reasons"]) == 3
    assert doc["reasons"][0] == "gh: no success since the daemon started 16m ago, more than 3 intervals (15m)"
    status, body = call(served, "GET", "/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert all(name.startswith("trackloop_") for name in families), sorted(families)
    for name in ("trackloop_tasks", "trackloop_findings_open", "trackloop_sync_duration_seconds",
                 "trackloop_sync_errors", "trackloop_api_requests", "trackloop_rate_limit_remaining",
                 "trackloop_outbox_pending", "trackloop_outbox_failed", "trackloop_digests_sent"):
        assert name in families, name
    [sample] = families["trackloop_tasks"].samples
    assert sample.labels == {"source": "gh", "status": "todo"} and sample.value == 1
    assert call(served, "GET", "/nope")[0] == 404
    assert call(served, "GET", "/webhooks/github")[0] == 405


def github_post(daemon: Daemon, payload: dict[str, Any], *, secret: str = SECRETS["github_secret"],
                delivery: str = "d-1", event: str = "issues") -> tuple[int, dict[str, Any]]:
    body = json.dumps(payload).encode()
    signature = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    status, raw = call(daemon, "POST", "/webhooks/github", body, {
        "X-Hub-Signature-256": signature, "X-GitHub-Delivery": delivery, "X-GitHub-Event": event,
        "Content-Type": "application/json"})
    return status, json.loads(raw)


def test_github_webhook_is_verified_deduplicated_and_refreshes_the_connector(served: Daemon) -> None:
    issue = {"action": "edited", "issue": {"number": 7}, "repository": {"full_name": "acme/api"}}
    status, doc = github_post(served, issue, secret="wrong")
    assert status == 401 and served.wanted == {}
    status, doc = github_post(served, issue)
    assert status == 202 and doc["connectors"] == ["gh"] and set(served.wanted) == {"gh"}
    served.wanted.clear()
    status, doc = github_post(served, issue)  # GitHub redelivers with the same id
    assert status == 200 and doc["result"] == "duplicate delivery" and served.wanted == {}
    status, doc = github_post(served, {**issue, "repository": {"full_name": "tools/cli"}}, delivery="d-2")
    assert status == 202 and doc["connectors"] == ["gh"]  # owner/* matches
    status, doc = github_post(served, {**issue, "repository": {"full_name": "other/x"}}, delivery="d-3")
    assert status == 202 and "no connector" in doc["result"]
    assert github_post(served, {"zen": "hi"}, delivery="d-4", event="ping") == (200, {"result": "pong"})
    text_ = call(served, "GET", "/metrics")[1].decode()
    assert 'trackloop_webhooks_total{outcome="refused",source="github"} 1.0' in text_
    assert 'trackloop_webhooks_total{outcome="duplicate",source="github"} 1.0' in text_


def test_jira_webhook_needs_the_secret_and_ignores_stale_events(served: Daemon, clock: Clock) -> None:
    with served.store.transaction() as s:
        s.add(Task(source="jira", kind="jira", external_id="OPS-1", title="x", status="todo", raw_status="To Do",
                   content_hash="h", first_seen_at=clock(), synced_at=clock(), updated_at=T0))

    def post(updated: datetime, query: str = "?secret=jira-hook-secret") -> tuple[int, dict[str, Any]]:
        payload = {"webhookEvent": "jira:issue_updated", "issue": {
            "key": "OPS-1", "self": "https://acme.atlassian.net/rest/api/2/issue/10001",
            "fields": {"updated": updated.strftime("%Y-%m-%dT%H:%M:%S.000+0000")}}}
        status, raw = call(served, "POST", f"/webhooks/jira{query}", json.dumps(payload).encode())
        return status, json.loads(raw)

    assert post(T0 + timedelta(minutes=1), "?secret=nope")[0] == 401
    assert post(T0 + timedelta(minutes=1), "")[0] == 401
    assert served.wanted == {}
    status, doc = post(T0 - timedelta(minutes=5))  # a late delivery of an older change
    assert status == 200 and doc["result"] == "OPS-1 is not newer than the stored copy" and served.wanted == {}
    status, doc = post(T0)
    assert status == 200 and served.wanted == {}
    status, doc = post(T0 + timedelta(minutes=1))
    assert status == 202 and doc["connectors"] == ["jira"] and set(served.wanted) == {"jira"}
    body = json.dumps({"webhookEvent": "jira:issue_created", "issue": {"key": "OPS-2"}}).encode()
    signed = "sha256=" + hmac.new(b"jira-hook-secret", body, hashlib.sha256).hexdigest()
    assert call(served, "POST", "/webhooks/jira", body, {"X-Hub-Signature": signed})[0] == 202


def slack_post(daemon: Daemon, payload: dict[str, Any], *, at: float, secret: str = "slk-sign"
               ) -> tuple[int, dict[str, Any]]:
    body = json.dumps(payload).encode()
    stamp = str(int(at))
    sig = "v0=" + hmac.new(secret.encode(), f"v0:{stamp}:".encode() + body, hashlib.sha256).hexdigest()
    status, raw = call(daemon, "POST", "/webhooks/slack", body,
                       {"X-Slack-Request-Timestamp": stamp, "X-Slack-Signature": sig})
    return status, json.loads(raw)


def test_slack_events_are_verified_with_a_time_window(served: Daemon, clock: Clock) -> None:
    now = clock().timestamp()
    challenge = {"type": "url_verification", "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"}
    assert slack_post(served, challenge, at=now) == (200, {"challenge": challenge["challenge"]})
    assert slack_post(served, challenge, at=now, secret="other")[0] == 401
    reaction = {"type": "event_callback", "event_id": "Ev1", "event": {
        "type": "reaction_added", "user": "U1", "reaction": "task",
        "item": {"type": "message", "channel": "C0OPS", "ts": "1700000000.000100"}}}
    assert slack_post(served, reaction, at=now - 600)[0] == 401  # a replay from ten minutes ago
    assert served.wanted == {}
    status, doc = slack_post(served, reaction, at=now)
    assert status == 200 and doc["connectors"] == ["slack"] and set(served.wanted) == {"slack"}
    served.wanted.clear()
    assert slack_post(served, reaction, at=now)[1]["result"] == "duplicate event"
    message = {"type": "event_callback", "event_id": "Ev2", "event": {"type": "message", "channel": "C0ELSE"}}
    assert slack_post(served, message, at=now)[1]["result"] == "no connector reads channel C0ELSE"
    assert served.wanted == {}


def test_a_webhook_refresh_makes_the_connector_due_now(db_url: str, clock: Clock) -> None:
    daemon = make_daemon(db_url, clock, fakes("a", "b", interval="1h"))
    daemon.start()
    try:
        step(daemon)
        clock.advance(minutes=1)
        daemon.refresh(["b"], "test")
        step(daemon)
        assert pulls() == {"a": 1, "b": 2} and daemon.wanted == {}
    finally:
        daemon.shutdown()


# -- docs and deployment files stay true ----------------------------------------------------------
ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def test_every_metric_is_documented_in_the_readme(tmp_path) -> None:
    from sync.metrics import Metrics

    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    families = {f.name for f in Metrics(lambda: store).registry.collect()}
    store.close()
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Running the daemon", 1)[1].split("\n## ", 1)[0]
    assert families and all(name.startswith("trackloop_") for name in families)
    documented = {name for name in families if f"`{name}" in section or name.startswith("trackloop_process_")}
    counters = {name for name in families if f"`{name}_total" in section}
    assert families - documented - counters == set()


@pytest.mark.parametrize("unit", ["trackloop.service", "trackloop@.service"])
def test_the_systemd_units_run_options_that_exist(unit: str) -> None:
    import shlex

    from typer.testing import CliRunner

    from sync.cli import app

    text_ = (ROOT / "deploy" / unit).read_text()
    [exec_start] = [line.split("=", 1)[1] for line in text_.splitlines() if line.startswith("ExecStart=")]
    args = shlex.split(exec_start.replace("%i", "2").replace("%H", "host"))
    assert args[0].endswith("/trackloop") and "run" in args
    result = CliRunner().invoke(app, [*args[1:], "--help"])
    assert result.exit_code == 0, result.output
    assert "--worker-id" in result.output and "Run as a daemon" in result.output
    assert "ExecReload=/bin/kill -HUP $MAINPID" in text_ and "RestartPreventExitStatus=2 3" in text_


def test_a_lease_this_replica_could_not_release_does_not_block_it(db_url: str, clock: Clock) -> None:
    daemon = make_daemon(db_url, clock, fakes("src"), lease="60s")
    daemon.start()
    try:
        with daemon.store.transaction() as s:  # as if the release failed while the database restarted
            s.get(SyncStateRow, "src").lease_owner = "w1"
            s.get(SyncStateRow, "src").lease_expires = clock() + timedelta(seconds=60)
        step(daemon)
        assert KNOBS["src"].pulls == 1 and state_of(daemon.store, "src").lease_owner is None
    finally:
        daemon.shutdown()


def test_claims_a_failed_outbox_run_left_behind_are_taken_back(db_url: str, clock: Clock) -> None:
    from store.models import OutboxAction

    daemon = make_daemon(db_url, clock, fakes("src"))
    daemon.start()
    try:
        with daemon.store.transaction() as s:  # claimed, then the store went away before its outcome was saved
            s.add(OutboxAction(key="k1", connector="src", kind="comment", text="hi", payload={}, status="pending",
                               attempts=0, created_at=clock(), next_attempt_at=clock(), claimed_by="w1",
                               claim_expires=datetime.now(UTC) + timedelta(minutes=5)))
        daemon._run_outbox()
        with daemon.store.transaction() as s:
            assert s.scalar(select(OutboxAction.status)) == "pending"  # held: not ours to take yet
        daemon._claims_dirty = True
        daemon._run_outbox()
        with daemon.store.transaction() as s:
            row = s.scalar(select(OutboxAction))
            assert (row.status, row.remote_id, row.claimed_by) == ("sent", "posted-k1", None)
    finally:
        daemon.shutdown()
