"""`trackloop run` as a process: the SQLite single-replica lock (exit 3, robust to kill -9),
SIGTERM/SIGHUP, kill -9 at random moments against a moving world (SQLite, and two replicas on
PostgreSQL), and faults in one source while the others keep syncing. The longer soak is
bench/soak_daemon.py."""

from __future__ import annotations

import json
import random
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from connectors.registry import connector_types
from store.db import Store
from sync.config import parse_config
from sync.daemon import Daemon
from sync.pipeline import Pipeline
from sync.standins.world import DIGESTS, NOTIFY, PEOPLE, World
from tests.conftest import PG_SKIP, PG_URL
from tests.daemon_rig import (
    TRACKLOOP,
    Replica,
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


@pytest.fixture
def world() -> Iterator[World]:
    w = World(seed=7, github_issues=40, jira_issues=40, slack_tasks=12)
    for standin in (w.github, w.jira, w.slack):
        standin.latency = 0.02  # syncs take long enough for a kill to land in the middle of one
    w.start()
    yield w
    w.stop()


def csv_project(folder: Path) -> Path:
    (folder / "tasks.csv").write_text("ID,Task\n1,Renew the certificate\n")
    return write_config(folder / "trackloop.toml", {
        "store": {"url": f"sqlite:///{folder / 'store.db'}"},
        "connectors": {"sheet": {"type": "csv", "path": "tasks.csv", "id_column": "ID",
                                 "columns": {"title": "Task"}, "interval": "1s"}}})


def test_a_second_replica_on_sqlite_exits_3_naming_the_holder_and_kill_9_frees_the_store(tmp_path: Path) -> None:
    config = csv_project(tmp_path)
    first = Replica(config, worker="first", log=tmp_path / "first.log")
    first.start()
    try:
        wait_until(first.started, 20, "the first replica to start")
        second = subprocess.run([*TRACKLOOP, "--config", str(config), "run"], capture_output=True, text=True,
                                env=clean_env(), timeout=30)
        assert second.returncode == 3
        assert second.stderr.count("\n") == 1 and f"(pid {first.proc.pid})" in second.stderr  # type: ignore[union-attr]
        first.kill()  # the kernel drops the lock with the process
        third = Replica(config, worker="third", log=tmp_path / "third.log")
        third.start()
        wait_until(third.started, 20, "a replica to start after the holder was killed")
        code, seconds = third.terminate()
        assert code == 0 and seconds < 10
    finally:
        for r in (first,):
            if r.alive:
                r.kill()


def test_sighup_reloads_a_good_config_keeps_a_bad_one_and_sigterm_exits_fast(tmp_path: Path) -> None:
    config = csv_project(tmp_path)
    replica = Replica(config, worker="solo", log=tmp_path / "log")
    replica.start()
    assert replica.proc is not None
    try:
        wait_until(replica.started, 20, "start")
        good = config.read_text()
        config.write_text(good.replace('interval = "1s"', 'interval = "often"'))
        replica.proc.send_signal(1)  # SIGHUP
        wait_until(lambda: any(line.get("event") == "reload" for line in replica.lines()), 10, "a reload")
        [failed] = [line for line in replica.lines() if line.get("event") == "reload"]
        assert failed["level"] == "error" and failed["ok"] is False
        assert "connectors.sheet.interval: expected a duration" in failed["message"] and replica.alive
        (tmp_path / "more.csv").write_text("ID,Task\n9,Order cables\n")
        config.write_text(good + '[connectors.more]\ntype = "csv"\npath = "more.csv"\nid_column = "ID"\n'
                                 'columns = { title = "Task" }\ninterval = "1s"\n')
        replica.proc.send_signal(1)
        wait_until(lambda: any(line.get("event") == "sync" and line.get("connector") == "more"
                               for line in replica.lines()), 10, "the new connector to sync")
        code, seconds = replica.terminate()
        assert code == 0 and seconds < 10
        assert [line for line in replica.lines() if line.get("level") == "raw"] == []  # JSON only
    finally:
        if replica.alive:
            replica.kill()


def change_stream(world: World, stop: threading.Event) -> threading.Thread:
    def run() -> None:
        while not stop.is_set():
            world.change()
            time.sleep(0.05)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def clean_run(world: World, url: str) -> None:
    config = parse_config({"store": {"url": url}, "people": PEOPLE, "connectors": world.connectors()},
                          env={}, connector_types=connector_types())
    store = Store(url)
    try:
        report = Pipeline(store, config, connector_types()).sync()
        assert report.ok, [(s.connector, s.error) for s in report.syncs]
    finally:
        store.close()


def kill_and_compare(world: World, folder: Path, url: str, replicas: int, kills: int, seed: int) -> None:
    """Kill a random replica at random moments while the world changes and follow-ups go out; then
    the store must equal a clean single run's, and every follow-up must have been posted once."""
    config = write_config(folder / "trackloop.toml", {
        "store": {"url": url}, "daemon": {"lease": "3s", "max_backoff": "2s", "outbox_interval": "1s"},
        "people": PEOPLE, "notify": NOTIFY, "digests": DIGESTS, "connectors": world.connectors("1s")})
    rng = random.Random(seed)
    group = [Replica(config, worker=f"r{i}", log=folder / f"r{i}.log") for i in range(replicas)]
    stop = threading.Event()
    stream = change_stream(world, stop)
    try:
        for r in group:
            r.start()
        for _ in range(kills):
            victim = rng.choice(group)
            wait_until(victim.started, 30, "the replica to run")  # a kill after start-up, mid-work
            time.sleep(rng.uniform(0.1, 1.5))
            victim.kill()
            victim.start()
        time.sleep(1.5)
        stop.set()
        stream.join()
        quiet = datetime.now(UTC)
        wait_until(lambda: synced_since(url, NAMES, quiet), 40, "every connector to sync after the last change")
        time.sleep(2)  # rules, then follow-ups planned and delivered
        wait_until(lambda: outbox_settled(url, datetime.now(UTC)), 30, "every due follow-up to go out")
        for r in group:
            code, seconds = r.terminate()
            assert code == 0 and seconds < 10
    finally:
        stop.set()
        for r in group:
            if r.alive:
                r.kill()
    errors = [line["message"] for r in group for line in r.lines() if line.get("level") in ("error", "raw")]
    assert not [e for e in errors if "Traceback" in e], errors
    clean = f"sqlite:///{folder / 'clean.db'}"
    clean_run(world, clean)
    got, want = snapshot(url), snapshot(clean)
    assert len(want) > 100 and differences(got, want, own_posts=posted_on(url)) == []
    kinds = {name: section["type"] for name, section in world.connectors().items()}
    posted = world.deliveries()
    assert len(outbox_rows(url)) > 20 and sum(posted.values()) > 20 and len({m[0] for m in posted}) >= 2
    assert delivery_problems(posted, url, kinds) == []


def test_kill_9_at_random_moments_leaves_the_store_equal_to_a_clean_run_sqlite(world: World, tmp_path: Path) -> None:
    kill_and_compare(world, tmp_path, f"sqlite:///{tmp_path / 'store.db'}", replicas=1, kills=3, seed=11)


@pytest.mark.postgres
def test_kill_9_of_replicas_on_postgresql_leaves_the_store_equal_to_a_clean_run(world: World, tmp_path: Path) -> None:
    if not PG_URL:
        pytest.skip(PG_SKIP)
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in PG_URL else "?"
    try:
        kill_and_compare(world, tmp_path, f"{PG_URL}{sep}options=-csearch_path%3D{schema}", replicas=2, kills=4,
                         seed=12)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def get_json(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_faulty_source_is_reported_backed_off_and_recovers_while_others_sync(world: World, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    doc = {"store": {"url": url}, "daemon": {"max_backoff": "2s"}, "people": PEOPLE,
           "connectors": world.connectors("1s", retry_wait="0.2s")}
    config_path = write_config(tmp_path / "trackloop.toml", doc)
    config = parse_config(doc, env={}, connector_types=connector_types())
    daemon = Daemon(config, connector_types=connector_types(), http="127.0.0.1:0", worker="solo")
    runner = threading.Thread(target=daemon.run, kwargs={"install_signals": False}, daemon=True)
    runner.start()
    try:
        wait_until(lambda: daemon.server is not None and synced_since(url, NAMES, daemon.started_at), 20, "first syncs")
        health = f"http://{daemon.http_address}/healthz"
        assert get_json(health)[0] == 200
        world.github.inject(r"/repos/", status=502, times=-1)
        fault_began = datetime.now(UTC)
        wait_until(lambda: get_json(health)[0] == 503, 15, "/healthz to report the fault")
        status, body = get_json(health)
        assert body["reasons"][0].startswith("gh: last success") and "502" in body["reasons"][0]
        assert body["connectors"]["gh"]["failures"] >= 2
        assert succeeded_since(url, ["jira", "slack"], fault_began)  # the others kept syncing
        shown = subprocess.run([*TRACKLOOP, "--config", str(config_path), "status", "--json"], capture_output=True,
                               text=True, env=clean_env(), timeout=30)
        gh = next(c for c in json.loads(shown.stdout) if c["connector"] == "gh")
        assert gh["failures"] >= 2 and "502" in gh["last_error"]
        failed = daemon.metrics.syncs.labels("gh", "failed")._value.get()
        ok = daemon.metrics.syncs.labels("jira", "ok")._value.get()
        time.sleep(2.5)  # gh waits 2s then 2s (max_backoff) between attempts; jira syncs every second
        assert daemon.metrics.syncs.labels("gh", "failed")._value.get() - failed <= 2
        assert daemon.metrics.syncs.labels("jira", "ok")._value.get() - ok >= 2
        world.github.clear_faults()
        for kind in ("malformed", "status"):  # then a garbled answer and a rate limit, briefly
            world.github.inject(r"/repos/", kind=kind, status=429, retry_after=0, times=1)
        healed = datetime.now(UTC)
        wait_until(lambda: succeeded_since(url, ["gh"], healed) and get_json(health)[0] == 200, 20, "recovery")
        assert get_json(health)[1]["faults"] == []
    finally:
        daemon.stop()
        runner.join(15)
    assert not runner.is_alive()
