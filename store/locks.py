"""Serializing work that replicas must not do at the same time (rules, people from config).

PostgreSQL: a transaction-scoped advisory lock keyed by name, released at commit or rollback,
so a replica that dies never leaves it held. SQLite: nothing to do, a store has one writer
process (the daemon refuses a second replica) and one write transaction at a time.
"""

from __future__ import annotations

import hashlib

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from store.sql import dialect_of


def lock_key(name: str) -> int:
    """A stable signed 64-bit key for `name`."""
    digest = hashlib.blake2b(f"trackloop:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def exclusive(session: Session, name: str) -> None:
    """Wait until no other transaction holds `name`, then hold it until this one ends."""
    if dialect_of(session) == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(lock_key(name))))
