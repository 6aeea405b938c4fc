"""Opening the store: engine setup per backend and schema migrations through Alembic."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from store.errors import StoreError

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")
# Seconds a SQLite transaction waits for the write lock. Every transaction takes it at BEGIN
# (see _on_sqlite_begin) and a rules run over 100,000 tasks holds it for several seconds.
BUSY_TIMEOUT = 60


def _sqlite_path(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def _create_private_file(path: Path) -> None:
    """Create the SQLite file with mode 0600 before SQLite does (it would use the umask)."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.close(fd)


def _on_sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
    # The driver's own transaction handling starts a transaction only before a write, which
    # makes a SAVEPOINT opened first in a transaction commit on release; SQLAlchemy begins
    # transactions itself instead (see _on_sqlite_begin).
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")  # WAL keeps committed data safe across a crash
    cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT * 1000}")
    cur.close()


def _on_sqlite_begin(conn: Any) -> None:
    # IMMEDIATE takes the write lock up front (waiting up to busy_timeout for another writer),
    # so threads that read then write never fail on a snapshot another thread has just made stale.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def redact_url(url: str) -> str:
    """The URL with any password hidden, for logs and errors."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable database URL>"


def make_engine(url: str) -> Engine:
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise StoreError(f"store.url: not a database URL: {redact_url(url)}") from exc
    if parsed.get_backend_name() == "sqlite":
        path = _sqlite_path(url)
        if path is not None:
            _create_private_file(path)
        engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT})
        event.listen(engine, "connect", _on_sqlite_connect)
        event.listen(engine, "begin", _on_sqlite_begin)
        return engine
    try:
        return create_engine(url, pool_pre_ping=True)
    except (ArgumentError, ImportError) as exc:
        raise StoreError(f"store.url: cannot use {redact_url(url)}: {exc}") from exc


def _alembic_config(engine: Engine) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def head_revision() -> str | None:
    return ScriptDirectory.from_config(_alembic_config(None)).get_current_head()  # type: ignore[arg-type]


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


MIGRATION_LOCK = 0x7472_6163_6B6C_6F6F  # "trackloo": the advisory lock key replicas migrate under


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """On PostgreSQL, one process migrates at a time (replicas starting together on an empty
    database); the others wait, then find the schema at head and have nothing to do."""
    if engine.dialect.name != "postgresql":
        yield
        return
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK})
        conn.commit()
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK})
            conn.commit()


def upgrade(engine: Engine) -> None:
    """Bring the schema to the newest revision (what `trackloop db upgrade` runs)."""
    try:
        with _migration_lock(engine):
            command.upgrade(_alembic_config(engine), "head")
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot migrate {redact_url(str(engine.url))}: {exc.__class__.__name__}: {exc}") from exc


class Store:
    """The database behind trackloop: an engine plus a session factory.

    An empty database is migrated on first use; a database behind the code's head revision is
    an error that names `trackloop db upgrade`, so a deploy never migrates by surprise.
    """

    def __init__(self, url: str, *, migrate: bool = True) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        if migrate:
            self._ensure_schema()

    def _ensure_schema(self) -> None:
        try:
            current = current_revision(self.engine)
        except SQLAlchemyError as exc:
            where = redact_url(self.url)
            raise StoreError(f"cannot open the store at {where}: {exc.__class__.__name__}: {exc}") from exc
        if current is None:
            log.info("empty store at %s: creating the schema", redact_url(self.url))
            upgrade(self.engine)
        elif current != head_revision():
            raise StoreError(
                f"the store at {redact_url(self.url)} is at schema {current}, this trackloop needs "
                f"{head_revision()}: run `trackloop db upgrade`"
            )

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One unit of work: committed on success, rolled back on any exception."""
        with self._sessions() as session, session.begin():
            yield session

    def session(self) -> Session:
        return self._sessions()

    def close(self) -> None:
        self.engine.dispose()
