"""Benchmark of `trackloop run`: 50 connectors over 100,000 tasks.

The sources are the loopback stand-ins, seeded and served by three separate processes (GitHub:
20 connectors of 2 repositories, 50,000 issues; Jira Cloud: 15 connectors of one project each,
40,000 issues; Slack: 15 connectors of one channel each, 10,000 captured messages), so the
stand-ins do not share one interpreter with each other or with the daemon.

    python bench/bench_daemon.py idle [--minutes 10] [--url sqlite:///PATH]
        One replica, every connector on a 5-minute interval: the cold sync of all 50, then CPU
        and RSS of the daemon process while it keeps them in sync (idle: nothing changes).
    python bench/bench_daemon.py scale [--url postgresql+psycopg://...] [--replicas 1 3] [--latency 0.3]
        Cold sync of all 50 connectors into an empty PostgreSQL schema by 1, then by 3 replicas
        (each with the default 4 workers); throughput is tasks per second from the replicas'
        start to the last connector's first success. `--latency` adds a round trip to every
        stand-in answer: real APIs take 100 ms to 1 s, a page of 100 issues from GitHub or Jira
        typically 0.3 s or more; at 0.1 s the three replicas and their stand-ins outrun the
        2 cores of the development machine, so the run measures its CPU, not the replicas.

Figures are printed as JSON; bench/README.md records them with the commands.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_store import scratch  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from store.db import Store  # noqa: E402
from store.models import SyncStateRow, Task  # noqa: E402
from tests.daemon_rig import Replica, wait_until, write_config  # noqa: E402

PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
GITHUB, JIRA, SLACK = (20, 2, 50_000), 15, 15  # connectors (and repos each, issues in all)
JIRA_ISSUES, SLACK_TASKS = 40_000, 10_000
TEAM = [f"dev{i}" for i in range(12)]
T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(days=2)


def split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


# -- the stand-in farms (child processes) ------------------------------------------------------
def serve(kind: str, latency: float) -> None:
    """Seed and serve one kind of stand-in; print the connector sections; serve until stdin closes."""
    sections: dict[str, dict[str, Any]] = {}
    standins: list[Any] = []
    retry = {"attempts": 3, "max_wait": "5s"}
    if kind == "github":
        from sync.standins.github import GithubStandin

        gh = GithubStandin()
        connectors, repos_each, issues = GITHUB
        counts = split(issues, connectors * repos_each)
        for c in range(connectors):
            repos = [f"org{c:02d}/repo{r}" for r in range(repos_each)]
            for r, repo in enumerate(repos):
                gh.add_repo(repo)
                for i in range(counts[c * repos_each + r]):
                    gh.add_issue(repo, title=f"{repo} issue {i}",
                                 body=f"Details of {i}.\n\nblocked by #{max(1, i - 3)}",
                                 labels=[["bug"], ["p1"], [], ["blocked"]][i % 4],
                                 assignees=[TEAM[i % len(TEAM)]] if i % 3 else [],
                                 state="closed" if i % 7 == 0 else "open",
                                 created_at=T0 - timedelta(days=30, minutes=i), updated_at=T0 - timedelta(minutes=i))
            sections[f"gh{c:02d}"] = {"type": "github", "token": gh.token, "repos": repos, "retry": retry}
        standins.append(gh)
    elif kind == "jira":
        from sync.standins.jira import JiraStandin

        for c, count in enumerate(split(JIRA_ISSUES, JIRA)):
            jira = JiraStandin("cloud", email="bot@acme.io", token="t")
            for p in TEAM:
                jira.add_user(f"acc-{p}", name=p, display_name=p.title(), email=f"{p}@example.com")
            project = f"P{chr(65 + c)}"
            for i in range(count):
                jira.add_issue(f"{project}-{i + 1}", summary=f"{project} task {i}",
                               status=["To Do", "In Progress", "Done"][i % 3],
                               assignee=f"acc-{TEAM[i % len(TEAM)]}" if i % 4 else None,
                               reporter=f"acc-{TEAM[(i + 1) % len(TEAM)]}", priority=["High", "Medium", "Low"][i % 3],
                               created=T0 - timedelta(days=20), updated=T0 - timedelta(minutes=i))
            sections[f"jira{c:02d}"] = {"type": "jira", "auth": "basic", "email": jira.email, "token": jira.token,
                                        "jql": f"project = {project}", "retry": retry}
            standins.append(jira)
    else:
        from sync.standins.slack import SlackStandin

        slack = SlackStandin()
        for i, p in enumerate(TEAM):
            slack.add_user(f"U{i:04d}", p, email=f"{p}@example.com")
        for c, count in enumerate(split(SLACK_TASKS, SLACK)):
            channel = f"C{c:04d}"
            slack.add_channel(channel, f"ops{c}")
            for i in range(count):
                slack.set_now(T0 + timedelta(seconds=60 * i + c))
                mention = f"<@U{(i + 1) % len(TEAM):04d}>"
                slack.post(channel, f"U{i % len(TEAM):04d}", f"TODO: task {i} in {channel} {mention}")
            sections[f"slack{c:02d}"] = {"type": "slack", "token": slack.token, "channels": [channel],
                                         "history_calls_per_minute": 100_000, "retry": retry}
        slack.set_now(None)
        standins.append(slack)
    for standin in standins:
        standin.latency = latency
        standin.start()
    for name, section in sections.items():
        standin = standins[0] if len(standins) == 1 else standins[int(name[-2:])]
        section["url" if kind == "jira" else "base_url"] = standin.base_url + ("/api/" if kind == "slack" else "")
    print(json.dumps(sections), flush=True)
    sys.stdin.read()  # serve until the parent closes our stdin


class Farms:
    def __init__(self, latency: float) -> None:
        self.procs = []
        self.sections: dict[str, dict[str, Any]] = {}
        started = time.monotonic()
        for kind in ("github", "jira", "slack"):
            self.procs.append(subprocess.Popen([sys.executable, __file__, "serve", kind, "--latency", str(latency)],
                                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        for proc in self.procs:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            if not line:
                raise SystemExit("a stand-in farm failed to start")
            self.sections.update(json.loads(line))
        print(f"stand-ins seeded and serving in {time.monotonic() - started:.0f}s", file=sys.stderr)

    def close(self) -> None:
        for proc in self.procs:
            proc.stdin.close()  # type: ignore[union-attr]
            proc.wait(30)


# -- measuring ------------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_mb(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def progress(url: str) -> tuple[int, int]:
    """(connectors with a success, tasks stored)."""
    store = Store(url, migrate=False)
    try:
        with store.transaction() as s:
            done = s.scalar(select(func.count()).select_from(SyncStateRow)
                            .where(SyncStateRow.last_success.is_not(None)))
            tasks = s.scalar(select(func.count()).select_from(Task))
        return int(done or 0), int(tasks or 0)
    except Exception:
        return 0, 0
    finally:
        store.close()


def config_for(folder: Path, url: str, sections: dict[str, dict[str, Any]], interval: str) -> Path:
    connectors = {name: {**section, "interval": interval} for name, section in sections.items()}
    people = {p: {"email": f"{p}@example.com", "github": p, "jira": f"acc-{p}", "slack": f"U{i:04d}"}
              for i, p in enumerate(TEAM)}
    return write_config(folder / "trackloop.toml", {"store": {"url": url}, "people": people,
                                                    "connectors": connectors})


def cold_sync(folder: Path, url: str, sections: dict[str, dict[str, Any]], replicas: int,
              keep: bool = False) -> tuple[dict[str, Any], list[Replica]]:
    config = config_for(folder, url, sections, "5m")
    group = [Replica(config, worker=f"r{i}", log=folder / f"r{i}.log") for i in range(replicas)]
    for r in group:
        r.start()
    wait_until(lambda: all(r.started() for r in group), 60, "the replicas to start")
    started = time.monotonic()
    total = len(sections)
    last = -1
    while True:
        done, tasks = progress(url)
        if done != last:
            print(f"  {time.monotonic() - started:6.1f}s: {done}/{total} connectors, {tasks} tasks", file=sys.stderr)
            last = done
        if done >= total:
            break
        if time.monotonic() - started > 3600:
            raise SystemExit("cold sync took over an hour")
        time.sleep(1)
    seconds = time.monotonic() - started
    _, tasks = progress(url)
    result = {"replicas": replicas, "connectors": total, "tasks": tasks, "seconds": round(seconds, 1),
              "tasks_per_second": round(tasks / seconds), "peak_rss_mb": [memory_mb(r.proc.pid)["VmHWM"]
                                                                          for r in group if r.proc]}
    if not keep:
        for r in group:
            r.terminate(30)
    return result, group


def idle(args: argparse.Namespace) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="trackloop-bench-daemon-"))
    url = args.url or f"sqlite:///{folder / 'store.db'}"
    farms = Farms(args.latency)
    try:
        cold, [replica] = cold_sync(folder, url, farms.sections, 1, keep=True)
        assert replica.proc is not None
        time.sleep(30)  # the rules run that follows the last sync
        pid = replica.proc.pid
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        rss = []
        while time.monotonic() - t0 < args.minutes * 60:
            time.sleep(10)
            rss.append(memory_mb(pid)["VmRSS"])
        cpu = cpu_seconds(pid) - cpu0
        wall = time.monotonic() - t0
        syncs = sum(1 for line in replica.lines() if line.get("event") == "sync")
        code, stop_seconds = replica.terminate(30)
        return {"cold_sync": cold, "idle_minutes": round(wall / 60, 1),
                "idle_cpu_percent_of_one_core": round(100 * cpu / wall, 2), "idle_cpu_seconds": round(cpu, 1),
                "rss_mb_max_while_idle": max(rss), "rss_mb_peak_incl_cold_sync": memory_mb_peak(replica),
                "syncs_logged": syncs, "sigterm_exit": [code, round(stop_seconds, 2)]}
    finally:
        farms.close()


def memory_mb_peak(replica: Replica) -> float | None:
    try:
        return memory_mb(replica.proc.pid)["VmHWM"]  # type: ignore[union-attr]
    except (OSError, KeyError):
        return None


def scale(args: argparse.Namespace) -> dict[str, Any]:
    base = args.url or PG_DEFAULT
    farms = Farms(args.latency)
    out: dict[str, Any] = {"latency_s": args.latency, "runs": []}
    try:
        for replicas in args.replicas:
            with scratch(base) as url:
                Store(url).close()  # migrate first: the clock starts when replicas are up
                folder = Path(tempfile.mkdtemp(prefix=f"trackloop-bench-scale{replicas}-"))
                result, _ = cold_sync(folder, url, farms.sections, replicas)
                out["runs"].append(result)
                print(json.dumps(result), file=sys.stderr)
        if len(out["runs"]) >= 2:
            out["speedup"] = round(out["runs"][-1]["tasks_per_second"] / out["runs"][0]["tasks_per_second"], 2)
    finally:
        farms.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    p_idle = sub.add_parser("idle")
    p_idle.add_argument("--minutes", type=float, default=10)
    p_idle.add_argument("--url", default=None, help="store URL (default: a fresh SQLite file)")
    p_idle.add_argument("--latency", type=float, default=0.0)
    p_scale = sub.add_parser("scale")
    p_scale.add_argument("--url", default=None, help=f"PostgreSQL server (default {PG_DEFAULT})")
    p_scale.add_argument("--replicas", type=int, nargs="+", default=[1, 3])
    p_scale.add_argument("--latency", type=float, default=0.3)
    p_serve = sub.add_parser("serve")
    p_serve.add_argument("kind", choices=["github", "jira", "slack"])
    p_serve.add_argument("--latency", type=float, default=0.0)
    args = parser.parse_args()
    if args.mode == "serve":
        serve(args.kind, args.latency)
        return
    result = idle(args) if args.mode == "idle" else scale(args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
