"""Benchmark of the `imap` connector: wall time and IMAP commands for cold, incremental and idle syncs.

    python bench/bench_imap.py              # against the stdlib IMAP stand-in (offline, no root)
    python bench/bench_imap.py --dovecot    # against a throwaway Dovecot (tests/imap_rig, needs root)

A support folder of `--threads` threads of 4 messages each (a request and three replies) is
synced into a fresh SQLite store through the real SyncEngine. Then 20 replies to old threads and
10 new requests arrive (incremental), then nothing (idle). The last row replays the incremental
step with `thread_memory = 0`, so every reply's thread has to be found by searching the server.
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from connectors.imap import ImapConnector  # noqa: E402
from store.db import Store  # noqa: E402
from sync.config import parse_config  # noqa: E402
from sync.engine import SyncEngine, SyncResult  # noqa: E402
from sync.standins.imap import ImapStandin  # noqa: E402

FOLDER, USER, PASSWORD = "Tasks", "support@example.com", "pw"
T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(days=20)
BODY = "Hello,\n\n" + "the report export fails with error 17 since the upgrade; logs attached.\n" * 6


def mail(n: int, k: int, at: datetime) -> bytes:
    """Message k of thread n (k = 0 is the request)."""
    message = EmailMessage()
    message["From"] = f"Client {n} <client{n}@customer.example>" if k % 2 == 0 else "Ops <ops@example.com>"
    message["To"] = USER
    message["Subject"] = ("Re: " if k else "") + f"Request {n}: export fails"
    message["Date"] = format_datetime(at)
    message["Message-ID"] = f"<t{n}.m{k}@customer.example>"
    if k:
        message["In-Reply-To"] = f"<t{n}.m{k - 1}@customer.example>"
        message["References"] = " ".join(f"<t{n}.m{j}@customer.example>" for j in range(k))
    message.set_content(BODY + (f"\nOn earlier, someone wrote:\n> {BODY[:60]}\n" if k else ""))
    return message.as_bytes(policy=SMTP)


@contextmanager
def standin_server() -> Iterator[tuple[int, Callable[[bytes], None]]]:
    with ImapStandin(user=USER, password=PASSWORD) as server:
        yield server.port, lambda raw: server.append(FOLDER, raw)


@contextmanager
def dovecot_server() -> Iterator[tuple[int, Callable[[bytes], None]]]:
    from imapclient import IMAPClient

    rig = Path(tempfile.mkdtemp(prefix="imapbench.", dir="/tmp"))
    start = ROOT / "tests" / "imap_rig" / "start.sh"
    proc = subprocess.run(["bash", str(start), str(rig), "0", USER, PASSWORD], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"Dovecot did not start: {proc.stderr.strip()}")
    port = int(proc.stdout)
    client = IMAPClient("127.0.0.1", port=port, ssl=False)
    client.login(USER, PASSWORD)
    client.create_folder(FOLDER)
    try:
        yield port, lambda raw: client.append(FOLDER, raw)
    finally:
        client.logout()
        subprocess.run(["bash", str(ROOT / "tests" / "imap_rig" / "stop.sh"), str(rig)], check=False)
        shutil.rmtree(rig, ignore_errors=True)


def run(store: Store, port: int, **section: Any) -> tuple[SyncResult, float]:
    data = {
        "store": {"url": store.url},
        "connectors": {
            "mail": {
                "type": "imap",
                "host": "127.0.0.1",
                "port": port,
                "ssl": False,
                "username": USER,
                "password": PASSWORD,
                "folders": [FOLDER],
                "page_size": 100,
                **section,
            }
        },
    }
    config = parse_config(data, env={}, connector_types={"imap": ImapConnector})
    started = time.perf_counter()
    [result] = SyncEngine(store, config, {"imap": ImapConnector}).run()
    if not result.ok:
        raise SystemExit(f"sync failed: {result.error}")
    return result, time.perf_counter() - started


def arrivals(append: Callable[[bytes], None], threads: int, wave: int) -> int:
    rng = random.Random(wave)
    at = T0 + timedelta(days=10 + wave)
    for i, n in enumerate(rng.sample(range(threads), 20)):
        append(mail(n, 4 + wave, at + timedelta(minutes=i)))
    for i in range(10):
        append(mail(threads * (wave + 1) + i, 0, at + timedelta(minutes=30 + i)))
    return 30


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=250, help="threads of 4 messages in the folder")
    parser.add_argument(
        "--dovecot", action="store_true", help="use a throwaway Dovecot instead of the stand-in"
    )
    args = parser.parse_args()
    server = dovecot_server if args.dovecot else standin_server
    rows = []
    with server() as (port, append), tempfile.TemporaryDirectory() as tmp:
        for n in range(args.threads):
            for k in range(4):
                append(mail(n, k, T0 + timedelta(minutes=10 * n + k)))
        store = Store(f"sqlite:///{Path(tmp) / 'bench.db'}")
        cold, seconds = run(store, port)
        rows.append(("cold", args.threads * 4, cold, seconds))
        new = arrivals(append, args.threads, 1)
        result, seconds = run(store, port)
        rows.append(("incremental (20 replies, 10 new)", new, result, seconds))
        result, seconds = run(store, port)
        rows.append(("idle, after keyword marks", 0, result, seconds))
        result, seconds = run(store, port)
        rows.append(("idle", 0, result, seconds))
        new = arrivals(append, args.threads, 2)
        result, seconds = run(store, port, thread_memory=0)
        rows.append(("incremental, threads forgotten (search)", new, result, seconds))
        store.close()
    where = "Dovecot" if args.dovecot else "stdlib stand-in"
    print(f"imap connector against {where}: {args.threads} threads x 4 messages")
    print(
        f"{'sync':42} {'new msgs':>8} {'wall s':>8} {'requests':>9} {'pages':>6}"
        f" {'inserted':>9} {'updated':>8}"
    )
    for name, messages, result, seconds in rows:
        print(
            f"{name:42} {messages:>8} {seconds:>8.2f} {result.requests.requests:>9} {result.pages:>6}"
            f" {result.upserts.inserted:>9} {result.upserts.updated:>8}"
        )


if __name__ == "__main__":
    main()
