"""`trackloop run`: the long-running process.

One scheduler loop (the main thread) decides what is due and claims it; the work runs on
threads, at most `daemon.workers` connector syncs at a time:

- each enabled connector is synced every `interval` (counted from the start of its last
  sync); after a failure it waits `interval`, doubling per consecutive failure up to
  `daemon.max_backoff`, so a source that is down is not hammered and others go on;
- the rules run after every sync that changed something, and at least every
  `daemon.rules_interval` (time alone makes tasks overdue or stale); the follow-ups `[notify]`
  asks for are planned right after;
- the outbox worker delivers due actions every `daemon.outbox_interval` and right after a plan
  queued some; digests go out when their cron `schedule` reaches a new slot (checked every 30 s,
  on the outbox worker's thread: one thread per replica claims actions, so after a failed run it
  can safely take back the claims it left);
- webhooks ask for a connector's sync now instead of at its next turn.

Replicas share the work through leases on the `sync_state` rows (see `store.sync_state`): a
replica claims a due connector, renews the claim every third of `daemon.lease` while it works,
and every page it commits checks that the claim is still its own. A replica that dies is
replaced once its lease expires, and the next one resumes from the cursor saved with the last
committed page. Outbox actions are claimed the same way (`store.outbox.claim_due`), one at a
time right before their push, for long enough to outlast any push (`sync.delivery.CLAIM_LEASE`);
the connectors' own markers make a delivery repeated after a crash find the first one instead of
posting twice. A restarted replica with the same worker id takes its claims back at once.

On SQLite one replica runs: a lock file next to the database (an `fcntl` lock, which the kernel
drops when the holder dies, `kill -9` included) refuses a second one.

SIGTERM and SIGINT stop taking work; the syncs running finish the page they are on (each page
is committed with its cursor) and the process exits within `SHUTDOWN_GRACE`, abandoning work
that has not finished by then (an uncommitted page is simply pulled again next time). SIGHUP
reloads the config; a config that does not validate is logged and the running one kept.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from connectors.base import Connector
from store.db import Store
from store.errors import ConfigError, StoreError, TrackloopError
from store.locks import exclusive
from store.outbox import release_claims
from store.sync_state import Schedule, check_lease, claim, ensure_states, release, release_all, renew, schedules
from sync.config import AppConfig, parse_address
from sync.delivery import DeliveryReport
from sync.engine import SyncResult
from sync.httpd import HttpServer, Routes
from sync.logs import CONTEXT, REDACT
from sync.metrics import Metrics
from sync.pipeline import Pipeline
from sync.webhooks import Reply, Webhooks

log = logging.getLogger("trackloop.daemon")

Clock = Callable[[], datetime]

SHUTDOWN_GRACE = 8.0  # seconds the running work gets after SIGTERM; the process is gone within 10 s
MAX_SLEEP = 5.0  # the loop looks at the store at least this often (other replicas change it)
DIGEST_CHECK = 30.0  # seconds between looks at the digests' schedules (cron has minutes)
OUTBOX_BATCH = 50  # actions delivered per outbox run before the loop looks again
JOB_RETRY = 10.0  # seconds before a failed rules, outbox or digests run is tried again
STORE_RETRY = 2.0  # seconds between attempts while the store is unreachable


class AlreadyRunning(TrackloopError):
    """Another `trackloop run` holds this SQLite store (exit status 3)."""


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class StoreLock:
    """One daemon per SQLite file: an exclusive `fcntl` lock on `<database>.lock` holding the pid.

    The kernel releases the lock when its holder exits in any way, so a `kill -9` never leaves a
    stale lock behind; the file itself stays (removing it would race with the next opener).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    @classmethod
    def for_url(cls, url: str) -> StoreLock | None:
        parsed = make_url(url)
        if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
            return None
        database = Path(parsed.database).resolve()
        return cls(database.with_name(database.name + ".lock"))

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            raise AlreadyRunning(
                f"another `trackloop run` (pid {holder}) is using this SQLite store (lock {self.path}); "
                "SQLite runs one replica, PostgreSQL several"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    @staticmethod
    def _holder(fd: int) -> str:
        for _ in range(20):  # the holder writes its pid right after locking
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            if text:
                return text
            time.sleep(0.01)
        return "unknown"

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def due_at(state: Schedule | None, interval: timedelta, max_backoff: timedelta) -> datetime | None:
    """When a connector is next due; None means now (never synced, or its last sync never ended)."""
    if state is None or state.last_attempt is None:
        return None
    ended = max((t for t in (state.last_success, state.last_error_at) if t is not None), default=None)
    if ended is None or ended < state.last_attempt:
        return None  # interrupted (shutdown, crash, lost lease): resume from the saved cursor now
    if state.failures:
        pause = min(interval * 2 ** min(state.failures - 1, 30), max(max_backoff, interval))
        return ended + pause
    return state.last_attempt + interval


def _fmt(span: timedelta) -> str:
    seconds = int(span.total_seconds())
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@dataclass(slots=True)
class _Job:
    name: str
    thread: threading.Thread | None = None
    lost: bool = False  # the lease was found taken by another replica


@dataclass(slots=True)
class _Lease:
    """The engine's `SyncControl` for a sync this replica holds the lease of."""

    daemon: Daemon
    job: _Job

    def check(self, session: Session, connector: str) -> None:
        check_lease(session, connector, self.daemon.worker)

    def stop_requested(self) -> bool:
        return self.daemon.stopping.is_set() or self.job.lost


@dataclass(slots=True)
class _Periodic:
    """A job that runs on its own thread now and then: rules, the outbox, digests."""

    name: str
    rest: float = 0.0  # after a run, wait this many times its length before the next one
    last: float | None = None  # time.monotonic() of the last start
    wanted: bool = False
    retry_at: float | None = None  # after a failure: time.monotonic() to try again
    rest_until: float = 0.0  # time.monotonic() before which the job does not start again
    thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


@dataclass
class DaemonReport:
    syncs: int = 0
    abandoned: list[str] = field(default_factory=list)  # work still running when the grace period ended


class Daemon:
    """Schedules syncs and rules against one store; `run()` blocks until stopped."""

    def __init__(
        self,
        config: AppConfig,
        *,
        connector_types: Mapping[str, type[Connector]],  # type: ignore[type-arg]
        load_config: Callable[[], AppConfig] | None = None,
        worker: str | None = None,
        http: str | None = None,
        clock: Clock | None = None,
        store: Store | None = None,
    ) -> None:
        self.config = config
        self.types = connector_types
        self.load_config = load_config
        self.worker = worker or default_worker_id()
        self.http_address = http if http is not None else config.daemon.http
        if self.http_address:
            parse_address(self.http_address)
        self.clock = clock or (lambda: datetime.now(UTC))
        self.store_lock = StoreLock.for_url(config.store.url) if store is None else None
        self._store = store
        self.pipeline: Pipeline | None = None
        self.metrics = Metrics(lambda: self.store)
        self.webhooks = Webhooks(config=lambda: self.config, store=lambda: self.store, refresh=self.refresh,
                                 clock=self.clock)
        self.server: HttpServer | None = None
        self.started_at = self.clock()
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self.reload_requested = threading.Event()
        self.report = DaemonReport()
        self._lock = threading.Lock()
        self.syncing: dict[str, _Job] = {}
        self.wanted: dict[str, datetime] = {}  # connector -> when a webhook asked for a sync
        # A rules run writes findings in one transaction; on SQLite that holds the only write
        # lock, so it rests as long as it ran and syncs finishing meanwhile get their turn.
        self.rules = _Periodic("rules", rest=1.0)
        self.outbox = _Periodic("outbox")  # digests are sent from the same thread: see _run_outbox
        self._last_digest_check: float | None = None
        self._claims_dirty = False  # an outbox run failed: claims of ours may be left behind
        self._last_renewal = 0.0
        self._store_down_since: float | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def store(self) -> Store:
        if self._store is None:
            raise StoreError("the daemon has not opened its store yet")
        return self._store

    def start(self) -> None:
        """Take the SQLite lock, open the store, prepare rows and leases, start the HTTP server."""
        CONTEXT["worker"] = self.worker
        if self.store_lock is not None:
            self.store_lock.acquire()
        try:
            if self._store is None:
                self._store = Store(self.config.store.url)
            self.pipeline = self._pipeline(self.config)
            with self.store.transaction() as session:
                exclusive(session, "people")
                self.pipeline.engine.apply_people(session)
                ensure_states(session, {n: c.type for n, c in self.config.connectors.items()})
                # Leases under this worker id are a previous incarnation's; on SQLite, every
                # lease is (this process holds the store's only lock).
                dropped = release_all(session, None if self.store_lock is not None else self.worker)
                dropped += release_claims(session, None if self.store_lock is not None else self.worker)
            if dropped:
                log.info("dropped %d leases and claims left by a previous run", dropped)
            self.metrics.connectors(self.config.connectors)
            if self.http_address:
                host, port = parse_address(self.http_address)
                self.server = HttpServer(host, port, Routes(health=self.health, metrics=self.metrics.render,
                                                            webhook=self.webhook))
                self.server.start()
                self.http_address = self.server.address
        except BaseException:
            self._close()
            raise
        enabled = [n for n, c in self.config.connectors.items() if c.enabled]
        log.info("trackloop run: %d connectors, worker %s, store %s", len(enabled), self.worker,
                 self.store.dialect, extra={"fields": {"event": "start", "connectors": enabled}})

    def run(self, *, install_signals: bool = True) -> DaemonReport:
        """Start, loop until SIGTERM/SIGINT (or `stop()`), shut down within the grace period."""
        if install_signals:
            self._install_signals()
        self.start()
        try:
            while not self.stopping.is_set():
                if self.reload_requested.is_set():
                    self.reload_requested.clear()
                    self.reload()
                delay = self.tick()
                self.wake.wait(delay)
                self.wake.clear()
        finally:
            self.shutdown()
        return self.report

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    def request_reload(self) -> None:
        self.reload_requested.set()
        self.wake.set()

    def _install_signals(self) -> None:
        def on_stop(signum: int, _frame: FrameType | None) -> None:
            log.info("%s: finishing the current work, then exiting", signal.Signals(signum).name)
            self.stop()

        def on_hup(_signum: int, _frame: FrameType | None) -> None:
            self.request_reload()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)

    def shutdown(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Let running work finish its current page, release what was finished, stop serving."""
        self.stopping.set()
        deadline = time.monotonic() + grace
        for thread in self._threads():
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self.report.abandoned = sorted(j.name for j in self.syncing.values())
        self.report.abandoned += [job.name for job in self._periodic() if job.running]
        if self.report.abandoned:
            log.warning("exiting with work unfinished after %.0fs: %s (its leases expire; it resumes next run)",
                        grace, ", ".join(self.report.abandoned))
        log.info("trackloop run stopped", extra={"fields": {"event": "stop"}})
        self._close()

    def _close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self._store is not None and not self.report.abandoned:
            self._store.close()
        if self.store_lock is not None:
            self.store_lock.release()

    def _threads(self) -> list[threading.Thread]:
        with self._lock:
            threads = [j.thread for j in self.syncing.values() if j.thread is not None]
        return threads + [job.thread for job in self._periodic() if job.thread is not None]

    def _periodic(self) -> list[_Periodic]:
        return [self.rules, self.outbox]

    def join(self, timeout: float = 30.0) -> None:
        """Wait for the work running now (tests)."""
        deadline = time.monotonic() + timeout
        for thread in self._threads():
            thread.join(max(0.0, deadline - time.monotonic()))

    # -- configuration -------------------------------------------------------------------------
    def _pipeline(self, config: AppConfig) -> Pipeline:
        return Pipeline(self.store, config, self.types, clock=self.clock, worker=self.worker)

    def reload(self) -> bool:
        """Re-read the config (SIGHUP); a bad one is logged and the running config kept."""
        if self.load_config is None:
            log.warning("SIGHUP: no config file to reload")
            return False
        try:
            new = self.load_config()
        except ConfigError as exc:
            log.error("config reload failed; still running the previous config: %s",
                      "; ".join(str(p) for p in exc.problems),
                      extra={"fields": {"event": "reload", "ok": False,
                                        "problems": [str(p) for p in exc.problems]}})
            return False
        except Exception as exc:
            log.error("config reload failed; still running the previous config: %s", exc,
                      extra={"fields": {"event": "reload", "ok": False}})
            return False
        if new.store.url != self.config.store.url:
            log.warning("store.url changed: restart trackloop to use the new store; keeping the current one")
            new = new.model_copy(update={"store": self.config.store})
        if new.daemon.http != self.config.daemon.http:
            log.warning("daemon.http changed: restart trackloop to serve on the new address")
        try:
            pipeline = self._pipeline(new)
            with self.store.transaction() as session:
                exclusive(session, "people")
                pipeline.engine.apply_people(session)
                ensure_states(session, {n: c.type for n, c in new.connectors.items()})
        except (SQLAlchemyError, TrackloopError) as exc:
            log.error("config reload failed; still running the previous config: %s", exc)
            return False
        self.config, self.pipeline = new, pipeline
        self.metrics.connectors(new.connectors)
        self.wake.set()
        log.info("config reloaded: %d connectors", len(new.connectors),
                 extra={"fields": {"event": "reload", "ok": True, "connectors": sorted(new.connectors)}})
        return True

    # -- scheduling ----------------------------------------------------------------------------
    def tick(self) -> float:
        """One pass of the loop: renew leases, start what is due; returns seconds to sleep."""
        try:
            delay = self._tick()
        except (SQLAlchemyError, StoreError) as exc:
            now = time.monotonic()
            if self._store_down_since is None:
                self._store_down_since = now
                log.error("store unavailable, retrying every %.0fs: %s", STORE_RETRY,
                          REDACT(f"{exc.__class__.__name__}: {exc}".splitlines()[0]),
                          extra={"fields": {"event": "store_down"}})
            return STORE_RETRY
        if self._store_down_since is not None:
            log.info("store reachable again after %.0fs", time.monotonic() - self._store_down_since,
                     extra={"fields": {"event": "store_up"}})
            self._store_down_since = None
        return delay

    def _tick(self) -> float:
        now = self.clock()
        config, lease = self.config, self.config.daemon.lease
        if time.monotonic() - self._last_renewal >= lease.total_seconds() / 3:
            self._renew(now, lease)
        with self.store.transaction() as session:
            states = schedules(session)
        wake = now + timedelta(seconds=MAX_SLEEP)
        due: list[tuple[datetime, str]] = []
        with self._lock:
            running = set(self.syncing)
        for name, cfg in config.connectors.items():
            if not cfg.enabled or name in running:
                continue
            state = states.get(name)
            at = self._due(name, state, cfg.interval, now)
            if at is not None and at > now:
                wake = min(wake, at)
                continue
            held = state is not None and state.lease_owner not in (None, self.worker) \
                and state.lease_expires is not None and state.lease_expires > now
            if held:
                assert state is not None and state.lease_expires is not None
                wake = min(wake, state.lease_expires)
                continue
            due.append((at or datetime.min.replace(tzinfo=UTC), name))
        free = config.daemon.workers - len(running)
        if due and free > 0 and not self.stopping.is_set():
            due.sort()
            with self.store.transaction() as session:
                claimed = claim(session, [n for _, n in due], self.worker, now, lease, limit=free,
                                due=lambda s: self._is_due(s, now))
            for name in claimed:
                self._start_sync(name)
        daemon = config.daemon
        self._maybe(self.rules, daemon.rules_interval.total_seconds(), self._run_rules)
        if config.digests and (self._last_digest_check is None
                               or time.monotonic() - self._last_digest_check >= DIGEST_CHECK):
            self.outbox.wanted = True
        self._maybe(self.outbox, daemon.outbox_interval.total_seconds(), self._run_outbox)
        return max(0.05, min(MAX_SLEEP, (wake - now).total_seconds()))

    def _due(self, name: str, state: Schedule | None, interval: timedelta, now: datetime) -> datetime | None:
        at = due_at(state, interval, self.config.daemon.max_backoff)
        with self._lock:
            asked = self.wanted.get(name)
        if asked is None:
            return at
        if state is not None and state.last_attempt is not None and state.last_attempt >= asked:
            with self._lock:  # a sync (here or on another replica) started after the webhook
                if self.wanted.get(name) == asked:
                    del self.wanted[name]
            return at
        if state is not None and state.failures and at is not None and at > now:
            return at  # a failing source keeps its back-off even when a webhook asks
        return None

    def _is_due(self, state: Schedule, now: datetime) -> bool:
        cfg = self.config.connectors.get(state.connector)
        if cfg is None or not cfg.enabled:
            return False
        at = self._due(state.connector, state, cfg.interval, now)
        return at is None or at <= now

    def _renew(self, now: datetime, lease: timedelta) -> None:
        self._last_renewal = time.monotonic()
        with self._lock:
            names = list(self.syncing)
        if not names:
            return
        with self.store.transaction() as session:
            held = renew(session, names, self.worker, now, lease)
        with self._lock:
            for name in names:
                job = self.syncing.get(name)
                if job is not None and name not in held and not job.lost:
                    job.lost = True
                    log.warning("lost the lease of %s to another replica; stopping that sync", name)

    def refresh(self, names: list[str], reason: str) -> None:
        """Sync these connectors as soon as possible (webhooks)."""
        now = self.clock()
        with self._lock:
            for name in names:
                self.wanted[name] = now
        log.info("refresh of %s asked: %s", ", ".join(names), reason,
                 extra={"fields": {"event": "refresh", "connectors": names, "reason": reason}})
        self.wake.set()

    # -- work ----------------------------------------------------------------------------------
    def _start_sync(self, name: str) -> None:
        job = _Job(name)
        job.thread = threading.Thread(target=self._sync, args=(job,), name=f"sync-{name}", daemon=True)
        with self._lock:
            self.syncing[name] = job
            self.wanted.pop(name, None)
            self.metrics.leases_held.set(len(self.syncing))
        job.thread.start()

    def _sync(self, job: _Job) -> None:
        pipeline = self.pipeline
        assert pipeline is not None
        try:
            result = pipeline.engine.sync_one(job.name, control=_Lease(self, job))
            self.metrics.observe_sync(result)
            self.report.syncs += 1
            if _changed(result):
                self.rules.wanted = True
        except Exception as exc:  # the store went away while recording, or a bug: log, go on
            log.error("sync %s: %s: %s", job.name, exc.__class__.__name__, REDACT(str(exc).splitlines()[0]),
                      exc_info=log.isEnabledFor(logging.DEBUG))
        finally:
            try:
                with self.store.transaction() as session:
                    release(session, job.name, self.worker)
            except (SQLAlchemyError, StoreError) as exc:
                log.warning("could not release the lease of %s (it will expire): %s", job.name,
                            exc.__class__.__name__)
            with self._lock:
                self.syncing.pop(job.name, None)
                self.metrics.leases_held.set(len(self.syncing))
            self.wake.set()

    def _maybe(self, job: _Periodic, every: float, target: Callable[[], None]) -> None:
        if job.running or self.stopping.is_set():
            return
        now = time.monotonic()
        if now < job.rest_until:
            return
        retry = job.retry_at is not None and now >= job.retry_at
        if not (job.wanted or retry or job.last is None or now - job.last >= every):
            return
        job.wanted, job.last, job.retry_at = False, now, None
        job.thread = threading.Thread(target=self._periodic_run, args=(job, target), name=job.name, daemon=True)
        job.thread.start()

    def _periodic_run(self, job: _Periodic, target: Callable[[], None]) -> None:
        started = time.monotonic()
        try:
            target()
        except Exception as exc:  # the store went away, or a bug: log it, try again a little later
            job.retry_at = time.monotonic() + JOB_RETRY
            if job is self.rules:
                self.metrics.rules_errors.inc()
            if job is self.outbox:
                self._claims_dirty = True
            log.error("%s: %s: %s", job.name, exc.__class__.__name__, REDACT(str(exc).splitlines()[0]),
                      exc_info=log.isEnabledFor(logging.DEBUG))
        finally:
            ended = time.monotonic()
            job.rest_until = ended + job.rest * (ended - started)
            self.wake.set()

    def _run_rules(self) -> None:
        """Evaluate the rules, then queue the follow-ups they call for."""
        pipeline = self.pipeline
        assert pipeline is not None
        started = time.monotonic()
        try:
            outcomes = pipeline.run_rules()
        finally:
            self.metrics.rules_duration.observe(time.monotonic() - started)
        seconds = time.monotonic() - started
        flagged = sum(o.flagged for o in outcomes)
        log.info("rules: %d open findings (%d new, %d resolved) in %.2fs", flagged,
                 sum(o.stats.opened for o in outcomes), sum(o.stats.resolved for o in outcomes), seconds,
                 extra={"fields": {"event": "rules", "flagged": flagged, "seconds": round(seconds, 3)}})
        plan = pipeline.plan_followups()
        if plan is not None and plan.actions:
            self.outbox.wanted = True

    def _run_outbox(self) -> None:
        """Deliver due actions until none is due (or the daemon stops), claiming one at a time.

        One at a time: a claim is fresh when its push starts, so a batch cannot go stale behind a
        slow push and be claimed again by another replica while this one still means to post it.
        """
        pipeline = self.pipeline
        assert pipeline is not None
        if self._claims_dirty:  # this thread is the only one of ours that claims: nothing is mid-push
            with self.store.transaction() as session:
                dropped = release_claims(session, self.worker)
            self._claims_dirty = False
            if dropped:
                log.info("outbox: took back %d claims a failed run left behind", dropped)
        if pipeline.config.digests and (self._last_digest_check is None
                                        or time.monotonic() - self._last_digest_check >= DIGEST_CHECK):
            self._last_digest_check = time.monotonic()
            self._run_digests()
        total = DeliveryReport()
        for _ in range(OUTBOX_BATCH):
            if self.stopping.is_set():
                break
            report = pipeline.deliver_outbox(limit=1)
            handled = 0
            for result in ("sent", "already_delivered", "retrying", "failed"):
                count = getattr(report, result)
                if count:
                    handled += count
                    setattr(total, result, getattr(total, result) + count)
                    self.metrics.outbox_delivered.labels(result).inc(count)
            if not handled:
                break
        else:
            self.outbox.wanted = True  # more may be due: go on at the next look
        if total.sent or total.already_delivered or total.retrying or total.failed:
            log.info("outbox: %d sent, %d found already delivered, %d to retry, %d failed", total.sent,
                     total.already_delivered, total.retrying, total.failed,
                     extra={"fields": {"event": "outbox", "sent": total.sent, "failed": total.failed,
                                       "already_delivered": total.already_delivered, "retrying": total.retrying}})

    def _run_digests(self) -> None:
        """Send each digest whose schedule reached a slot not sent yet."""
        pipeline = self.pipeline
        assert pipeline is not None
        try:
            runs = pipeline.send_due_digests()
        except IntegrityError:  # another replica queued the same slot at the same moment
            log.info("digests: another replica is sending this slot")
            return
        for run in runs:
            if run.actions:
                self.metrics.digests_sent.inc()
                log.info("digest %s sent for %s to %d recipients", run.name, run.slot.isoformat(), len(run.actions),
                         extra={"fields": {"event": "digest", "digest": run.name, "slot": run.slot.isoformat()}})

    # -- health and webhooks -------------------------------------------------------------------
    def health(self) -> tuple[bool, dict[str, Any]]:
        """200 while every enabled connector succeeded within 3 intervals; else 503 with reasons."""
        now = self.clock()
        try:
            with self.store.transaction() as session:
                states = schedules(session)
        except (SQLAlchemyError, StoreError) as exc:
            reason = f"store unavailable: {exc.__class__.__name__}"
            return False, {"status": "failing", "reasons": [reason], "faults": [reason], "connectors": {}}
        reasons, faults, connectors = [], [], {}
        for name, cfg in self.config.connectors.items():
            if not cfg.enabled:
                continue
            state = states.get(name)
            last = state.last_success if state else None
            limit = 3 * cfg.interval
            healthy = now - (last or self.started_at) <= limit
            error = REDACT(state.last_error) if state and state.last_error else None
            connectors[name] = {
                "healthy": healthy,
                "last_success": last.isoformat() if last else None,
                "last_error": error,
                "last_error_at": state.last_error_at.isoformat() if state and state.last_error_at else None,
                "failures": state.failures if state else 0,
                "syncing_on": state.lease_owner if state and state.lease_expires and state.lease_expires > now
                else None,
            }
            if not healthy:
                since = f"last success {_fmt(now - last)} ago" if last else \
                    f"no success since the daemon started {_fmt(now - self.started_at)} ago"
                reasons.append(f"{name}: {since}, more than 3 intervals ({_fmt(limit)})"
                               + (f"; last error: {error}" if error else ""))
            elif error:
                faults.append(f"{name}: failing ({state.failures if state else 0} in a row): {error}")
        ok = not reasons
        return ok, {"status": "ok" if ok else "failing", "reasons": reasons, "faults": faults,
                    "connectors": connectors, "worker": self.worker}

    def webhook(self, source: str, headers: dict[str, str], query: dict[str, str], body: bytes) -> Reply:
        reply = self.webhooks.handle(source, headers, query, body)
        self.metrics.webhooks.labels(source if source in ("github", "jira", "slack") else "other",
                                     reply.outcome).inc()
        return reply


def _changed(result: SyncResult) -> bool:
    u = result.upserts
    return bool(u.inserted or u.updated or u.cancelled or u.events)
