"""Soak of `trackloop run`: kill -9 at random moments, source faults, a database restart.

The harness runs the GitHub, Jira and Slack stand-ins in its own process (a small team's world,
with a steady stream of changes and a 30 ms round trip per request) and the daemon as separate
`trackloop run` processes with `[notify]` follow-ups and a per-minute digest switched on.

1. Kill -9: `--kills` times, a random replica is killed at a random moment after it started
   (the harness notes whether a request was in flight: a pull or a push, or none: a commit or
   an idle moment) and restarted.
2. Faults (`--fault-seconds`, 0 to skip): each stand-in in turn answers 502, then 429 with
   Retry-After, then timeouts, then malformed JSON, for that long each. The harness checks that
   the other connectors keep syncing, that /healthz turns 503 naming the faulty connector, that
   `trackloop status` shows its failures, that it backs off, and how long it takes to recover.
3. PostgreSQL only, `--db-restarts N`: the local cluster is restarted with `pg_ctlcluster` while
   replicas sync; they must reconnect and carry on.

At the end the changes stop; once every connector has synced again and no follow-up is due,
the replicas are stopped with SIGTERM (each must exit within 10 s) and the store is compared
with a clean single `trackloop sync` of the same world into a fresh store (same tasks, same
fields; see tests/daemon_rig.py for the fields that record when this store saw something), and
every follow-up posted to the stand-ins is counted by its marker: none twice, none missing.

    python bench/soak_daemon.py                                   # SQLite, 1 replica, 30 kills
    python bench/soak_daemon.py --store postgresql --replicas 3 --db-restarts 2
    python bench/soak_daemon.py --fault-seconds 90 --kills 0      # the faults phase alone

Exits non-zero if any check fails.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_store import scratch  # noqa: E402

from sync.standins.base import Standin  # noqa: E402
from sync.standins.world import DIGESTS, NOTIFY, PEOPLE, World  # noqa: E402
from tests.daemon_rig import (  # noqa: E402
    TRACKLOOP,
    Replica,
    _states,
    clean_env,
    delivery_problems,
    differences,
    outbox_rows,
    outbox_settled,
    posted_on,
    snapshot,
    succeeded_since,
    synced_since,
    wait_until,
    write_config,
)

NAMES = ["gh", "jira", "slack"]
PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


class Traffic:
    """Watches a stand-in's requests: what is in flight, and when the last one ended."""

    def __init__(self, standins: list[Standin]) -> None:
        self.lock = threading.Lock()
        self.inflight: Counter[str] = Counter()
        self.last_end = 0.0
        for standin in standins:
            inner = standin._dispatch

            def dispatch(req: Any, inner: Any = inner) -> Any:
                kind = "push" if req.method == "POST" and not req.path.endswith(
                    ("conversations.history", "conversations.replies", "users.info", "conversations.open",
                     "chat.getPermalink", "conversations.list", "auth.test")) and "search" not in req.path \
                    else "pull"
                with self.lock:
                    self.inflight[kind] += 1
                try:
                    return inner(req)
                finally:
                    with self.lock:
                        self.inflight[kind] -= 1
                        self.last_end = time.monotonic()

            standin._dispatch = dispatch  # type: ignore[method-assign]

    def moment(self) -> str:
        with self.lock:
            if self.inflight["push"]:
                return "mid-push"
            if self.inflight["pull"]:
                return "mid-pull"
            return "between requests (commit)" if time.monotonic() - self.last_end < 0.15 else "idle"


def log(msg: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


def get_json(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError as exc:
        return 0, {"error": str(exc)}


def changes(world: World, stop: threading.Event, every: float) -> threading.Thread:
    def run() -> None:
        while not stop.is_set():
            world.change()
            time.sleep(every)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--url", default=PG_DEFAULT, help="PostgreSQL server (a schema is created and dropped)")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--fault-seconds", type=float, default=0)
    parser.add_argument("--db-restarts", type=int, default=0)
    parser.add_argument("--pg-cluster", default="15 main", help="pg_ctlcluster version and name")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--latency", type=float, default=0.03, help="seconds per stand-in request")
    args = parser.parse_args()
    if args.store == "sqlite" and args.replicas != 1:
        parser.error("SQLite runs one replica")
    if args.db_restarts and args.store != "postgresql":
        parser.error("--db-restarts needs --store postgresql")

    folder = Path(tempfile.mkdtemp(prefix="trackloop-soak-"))
    rng = random.Random(args.seed)
    world = World(seed=args.seed, github_issues=120, jira_issues=120, slack_tasks=30)
    traffic = Traffic([world.github, world.jira, world.slack])
    for standin in (world.github, world.jira, world.slack):
        standin.latency = args.latency
    world.start()
    cleanup = ExitStack()
    store_url = args.url if args.store == "postgresql" else f"sqlite:///{folder / 'store.db'}"
    url = cleanup.enter_context(scratch(store_url))  # PostgreSQL: a throwaway schema
    config = write_config(folder / "trackloop.toml", {
        "store": {"url": url},
        "daemon": {"lease": "5s", "max_backoff": "8s", "outbox_interval": "1s"},
        "people": PEOPLE, "notify": NOTIFY, "digests": DIGESTS,
        "connectors": world.connectors("1s", retry_wait="1s"),
    })
    ports = [19470 + i for i in range(args.replicas)]
    group = [Replica(config, worker=f"r{i}", log=folder / f"r{i}.log", http=f"127.0.0.1:{ports[i]}")
             for i in range(args.replicas)]
    failures: list[str] = []
    report: dict[str, Any] = {"store": args.store, "replicas": args.replicas, "folder": str(folder)}
    stop = threading.Event()
    stream = changes(world, stop, 0.05)
    started = time.monotonic()
    try:
        for r in group:
            r.start()
        for r in group:
            wait_until(r.started, 60, f"{r.worker} to start")
        # -- 1. kill -9 --------------------------------------------------------------------------
        moments: Counter[str] = Counter()
        for i in range(args.kills):
            victim = rng.choice(group)
            wait_until(victim.started, 60, f"{victim.worker} to run")
            time.sleep(rng.uniform(0.2, 3.0))
            moment = traffic.moment()
            victim.kill()
            moments[moment] += 1
            log(f"kill {i + 1}/{args.kills}: {victim.worker} {moment}")
            victim.start()
        report["kills"] = dict(moments)
        # -- 2. faults -----------------------------------------------------------------------------
        if args.fault_seconds:
            report["faults"] = faults(world, url, config, group, args.fault_seconds, failures)
        # -- 3. database restarts --------------------------------------------------------------------
        if args.db_restarts:
            report["db_restarts"] = db_restarts(args.db_restarts, args.pg_cluster, url, group, failures)
        # -- the end --------------------------------------------------------------------------------
        for r in group:
            if not r.alive:
                failures.append(f"{r.worker} died (exit {r.proc.returncode if r.proc else '?'})")
                r.start()
        stop.set()
        stream.join()
        quiet = datetime.now(UTC)
        wait_until(lambda: synced_since(url, NAMES, quiet), 120, "every connector to sync after the last change")
        time.sleep(3)
        wait_until(lambda: outbox_settled(url, datetime.now(UTC)), 120, "every due follow-up to go out")
        exits = []
        for r in group:
            code, seconds = r.terminate()
            exits.append(round(seconds, 2))
            if code != 0 or seconds >= 10:
                failures.append(f"{r.worker}: SIGTERM -> exit {code} after {seconds:.1f}s")
        report["sigterm_exit_seconds"] = exits
        report["changes"] = world.changes
        report["minutes"] = round((time.monotonic() - started) / 60, 1)
        # -- compare with a clean run -----------------------------------------------------------------
        clean = f"sqlite:///{folder / 'clean.db'}"
        clean_cfg = write_config(folder / "clean.toml", {"store": {"url": clean}, "people": PEOPLE,
                                                         "connectors": world.connectors("1s")})
        done = subprocess.run([*TRACKLOOP, "--config", str(clean_cfg), "sync"], capture_output=True, text=True,
                              env=clean_env(), timeout=300)
        if done.returncode != 0:
            failures.append(f"clean sync failed: {done.stderr}")
        got, want = snapshot(url), snapshot(clean)
        diff = differences(got, want, own_posts=posted_on(url))
        report["tasks"] = len(want)
        report["store_differences"] = len(diff)
        failures += diff[:50]
        posted = world.deliveries()
        kinds = {name: section["type"] for name, section in world.connectors().items()}
        problems = delivery_problems(posted, url, kinds)
        rows = outbox_rows(url)
        report["follow_ups"] = {"actions": len(rows), "sent": sum(r.status == "sent" for r in rows),
                                "posts": sum(posted.values()), "posted_twice": sum(c > 1 for c in posted.values()),
                                "by_kind": dict(Counter(r.kind for r in rows))}
        report["delivery_problems"] = len(problems)
        failures += problems[:50]
        errors = [line for r in group for line in r.lines() if "Traceback" in str(line.get("message", ""))
                  or line.get("level") == "raw"]
        report["tracebacks_in_logs"] = len(errors)
    finally:
        stop.set()
        for r in group:
            if r.alive:
                r.kill()
        world.stop()
        cleanup.close()
    report["failures"] = failures
    print(json.dumps(report, indent=2, default=str))
    return 1 if failures else 0


def faults(world: World, url: str, config: Path, group: list[Replica], seconds: float,
           failures: list[str]) -> list[dict[str, Any]]:
    """Each stand-in answers badly for `seconds` per kind of fault; the others must keep syncing."""
    out = []
    health = f"http://{group[0].http}/healthz"
    plan = [("gh", world.github, r"/repos/"), ("jira", world.jira, r"/rest/api/"), ("slack", world.slack, r"/api/")]
    kinds = [("502", {"status": 502}), ("429", {"status": 429, "retry_after": 2}),
             ("timeout", {"kind": "timeout", "delay": 6.0}),
             # the issue listing only: the connectors park a push as failed when the answer to its
             # duplicate check is garbled (see bench/README.md)
             ("malformed", {"kind": "malformed", "method": "GET", "pattern": r"/issues$"})]
    for i, (label, options) in enumerate(kinds):
        name, standin, pattern = plan[i % len(plan)]
        options = dict(options)
        pattern = options.pop("pattern", pattern)
        others = [n for n in NAMES if n != name]
        began, began_at = datetime.now(UTC), time.monotonic()
        standin.reset_log()
        standin.inject(pattern, times=-1, **options)
        log(f"fault: {name} answers {label} for {seconds:.0f}s")
        first_503 = None
        stalest = 0.0  # the longest any other connector went without a success during the fault
        status_failures = 0
        while time.monotonic() - began_at < seconds:
            code, body = get_json(health)
            if code == 503 and first_503 is None and any(r.startswith(f"{name}:") for r in body.get("reasons", [])):
                first_503 = round(time.monotonic() - began_at, 1)
            states = _states(url)
            for n in others:
                last = states[n].last_success if n in states else None
                if last is not None:
                    stalest = max(stalest, (datetime.now(UTC) - last).total_seconds())
            time.sleep(1)
        shown = subprocess.run([*TRACKLOOP, "--config", str(config), "status", "--json"], capture_output=True,
                               text=True, env=clean_env(), timeout=60)
        for doc in json.loads(shown.stdout or "[]"):
            if doc["connector"] == name:
                status_failures = doc["failures"]
        requests = len(standin.requests())
        standin.clear_faults()
        healed = datetime.now(UTC)
        t0 = time.monotonic()
        try:
            wait_until(lambda n=name, h=healed: succeeded_since(url, [n], h), 120, f"{name} to recover")
            recovery = round(time.monotonic() - t0, 1)
        except AssertionError as exc:
            failures.append(str(exc))
            recovery = None
        stalled = [n for n in others if not succeeded_since(url, [n], began)]
        result = {"connector": name, "fault": label, "seconds": seconds, "first_503_after_s": first_503,
                  "status_failures": status_failures, "requests_during_fault": requests,
                  "others_longest_without_success_s": round(stalest, 1), "recovered_after_s": recovery}
        if first_503 is None:
            failures.append(f"fault {label} on {name}: /healthz never answered 503 naming it")
        if status_failures < 1:
            failures.append(f"fault {label} on {name}: `status` shows {status_failures} failures")
        if stalled or stalest > 10:
            failures.append(f"fault {label} on {name}: others went {stalest:.0f}s without a success")
        log(f"fault result: {result}")
        out.append(result)
    return out


def db_restarts(count: int, cluster: str, url: str, group: list[Replica], failures: list[str]) -> list[dict[str, Any]]:
    out = []
    version, name = cluster.split()
    for i in range(count):
        time.sleep(5)
        log(f"restarting PostgreSQL ({i + 1}/{count})")
        t0 = time.monotonic()
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, name, "restart"], check=True)
        command = round(time.monotonic() - t0, 1)
        restarted, t1 = datetime.now(UTC), time.monotonic()
        try:
            wait_until(lambda r=restarted: synced_since(url, NAMES, r), 120, "syncs after the database restart")
            back = round(time.monotonic() - t1, 1)
        except AssertionError as exc:
            failures.append(str(exc))
            back = None
        dead = [r.worker for r in group if not r.alive]
        if dead:
            failures.append(f"replicas died with the database: {dead}")
        out.append({"restart": i + 1, "pg_ctlcluster_restart_s": command,
                    "all_connectors_synced_again_after_s": back, "replicas_alive": not dead})
        log(f"database restart {i + 1}: {out[-1]}")
    return out


if __name__ == "__main__":
    sys.exit(main())
