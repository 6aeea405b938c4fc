"""Benchmark of the `github` connector: 10,000 issues over 10 repositories through the GitHub stand-in.

Runs the real connector (real PyGithub) through the SyncEngine into a fresh SQLite store and reports,
for the first sync, an idle re-sync and an incremental sync, the wall time and the requests the
stand-in answered, checking the issue's budgets:

- first sync: at most ceil(issues in the repo / 100) + 1 list requests per repo, no request per issue;
- idle re-sync: exactly one request per repo, each answered 304;
- incremental: a changed repo costs its issue listing and its comment listing (who wrote the new
  comments), an unchanged one a 304.

    python bench/bench_github.py [--issues 10000] [--repos 10] [--db PATH]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from connectors.github import GithubConnector  # noqa: E402
from store.db import Store  # noqa: E402
from sync.config import parse_config  # noqa: E402
from sync.engine import SyncEngine, SyncResult  # noqa: E402
from sync.standins.github import GithubStandin  # noqa: E402

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
LABELS = [[], ["bug"], ["p1", "in progress"], ["priority:medium"], ["blocked", "p3"], ["enhancement"]]


def seed(gh: GithubStandin, repos: list[str], issues: int) -> None:
    per_repo = issues // len(repos)
    for r, repo in enumerate(repos):
        gh.add_repo(repo)
        for i in range(per_repo + (1 if r < issues % len(repos) else 0)):
            closed = i % 7 == 0
            gh.add_issue(
                repo,
                title=f"{repo} issue {i}: something to do",
                body=f"Details of {i}.\n\nblocked by #{max(1, i - 3)}\n\n## Acceptance criteria\n- done",
                labels=LABELS[i % len(LABELS)],
                assignees=[f"dev{i % 9}"] if i % 4 else [],
                milestone_due=(T0 + timedelta(days=i % 60)).date() if i % 3 == 0 else None,
                state="closed" if closed else "open",
                state_reason=("not_planned" if i % 14 == 0 else "completed") if closed else None,
                created_at=T0 - timedelta(days=400, minutes=-i),
                updated_at=T0 - timedelta(days=300, minutes=-i),
            )


def run(engine: SyncEngine, gh: GithubStandin) -> tuple[SyncResult, float, list]:
    gh.reset_log()
    started = time.perf_counter()
    [result] = engine.run()
    elapsed = time.perf_counter() - started
    if not result.ok:
        raise SystemExit(f"sync failed: {result.error}")
    return result, elapsed, gh.requests()


def per_repo(log: list, repos: list[str]) -> dict[str, list]:
    return {repo: [r for r in log if r.path == f"/repos/{repo}/issues"] for repo in repos}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--issues", type=int, default=10_000)
    parser.add_argument("--repos", type=int, default=10)
    parser.add_argument("--db", type=Path, default=None, help="SQLite file (default: a temporary one)")
    args = parser.parse_args()

    repos = [f"acme/repo{n:02d}" for n in range(args.repos)]
    folder = tempfile.TemporaryDirectory(prefix="trackloop-bench-")
    db = args.db or Path(folder.name) / "bench.db"
    db.unlink(missing_ok=True)
    gh = GithubStandin()
    gh.set_now(T0)
    seed(gh, repos, args.issues)
    gh.start()
    store = Store(f"sqlite:///{db}")
    clock = [T0]
    try:
        section = {"type": "github", "token": "test-token", "base_url": gh.base_url, "repos": repos}
        config = parse_config(
            {"store": {"url": store.url}, "connectors": {"gh": section}},
            env={},
            connector_types={"github": GithubConnector},
        )
        engine = SyncEngine(store, config, {"github": GithubConnector}, clock=lambda: clock[0])

        first, first_s, first_log = run(engine, gh)
        clock[0] += timedelta(minutes=5)
        gh.set_now(clock[0])
        idle, idle_s, idle_log = run(engine, gh)
        changed = 0
        for repo in repos[:3]:
            for number in range(1, 21):
                gh.update_issue(repo, number, title=f"edited {number}")
                changed += 1
        clock[0] += timedelta(minutes=5)
        gh.set_now(clock[0])
        incr, incr_s, incr_log = run(engine, gh)
    finally:
        store.close()
        gh.stop()
        folder.cleanup()

    sizes = Counter(
        {
            repo: args.issues // len(repos) + (1 if i < args.issues % len(repos) else 0)
            for i, repo in enumerate(repos)
        }
    )
    first_lists = per_repo(first_log, repos)
    worst = max(len(first_lists[r]) - math.ceil(sizes[r] / 100) for r in repos)
    extra = [r for r in first_log if r.path not in {f"/repos/{repo}/issues" for repo in repos}]
    idle_lists = per_repo(idle_log, repos)

    checks = {
        "first sync: list requests per repo <= ceil(n/100)+1": all(
            len(first_lists[r]) <= math.ceil(sizes[r] / 100) + 1 for r in repos
        ),
        "first sync: no request per issue (or any other)": not extra,
        "first sync: every issue stored": first.upserts.inserted == args.issues,
        "idle re-sync: exactly one request per repo, each 304": len(idle_log) == len(repos)
        and all([x.status for x in idle_lists[r]] == [304] for r in repos),
        "idle re-sync: nothing written": idle.pages == 0,
        "incremental: a changed repo costs two 200s (its issues, its comments), the others a 304": (
            sum(x.status == 200 for x in incr_log) == 2 * 3
            and sum(x.path.endswith("/issues/comments") for x in incr_log) == 3
        ),
        "incremental: every change stored": incr.upserts.updated == changed,
    }

    rows = [
        (
            "first sync",
            first_s,
            len(first_log),
            sum(x.status == 304 for x in first_log),
            first.upserts.inserted,
            first.upserts.updated,
        ),
        (
            "idle re-sync",
            idle_s,
            len(idle_log),
            sum(x.status == 304 for x in idle_log),
            idle.upserts.inserted,
            idle.upserts.updated,
        ),
        (
            f"incremental ({changed} edits in 3 repos)",
            incr_s,
            len(incr_log),
            sum(x.status == 304 for x in incr_log),
            incr.upserts.inserted,
            incr.upserts.updated,
        ),
    ]
    print(f"github connector: {args.issues} issues over {args.repos} repos (SQLite, loopback stand-in)\n")
    print("| sync | wall time | requests | of which 304 | inserted | updated |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, seconds, count, not_modified, inserted, updated in rows:
        print(f"| {name} | {seconds:.2f} s | {count} | {not_modified} | {inserted} | {updated} |")
    spread = sorted(Counter(len(v) for v in first_lists.values()).items())
    print(f"\nfirst sync list requests per repo (count, repos): {spread} (ceil(n/100) + {worst} at most)")
    print(
        f"rate limit spent by the idle re-sync: {first.requests.rate_limit_remaining} -> "
        f"{idle.requests.rate_limit_remaining}"
    )
    print()
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    if not all(checks.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
