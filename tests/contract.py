"""The shared contract every connector passes against its loopback stand-in.

A connector's test module subclasses `ConnectorContract` and provides a `world` fixture: an
object implementing `World` for its service. The contract drives the real connector through
the real sync engine into a real store, so what it checks is what users get.
"""

from __future__ import annotations

from typing import Any, Protocol

import pytest
from sqlalchemy import func, select

from connectors.base import Connector
from store.canonical import Action
from store.db import Store
from store.models import Task
from sync.config import AppConfig, parse_config
from sync.engine import SyncEngine, SyncResult


class World(Protocol):
    """A service stand-in seeded for one test, plus the connector pointed at it."""

    kind: str  # the connector type
    connector_type: type[Connector]  # type: ignore[type-arg]
    page_size: int  # items per listing page the connector will get

    def section(self) -> dict[str, Any]:
        """The `[connectors.NAME]` table pointing at the stand-in."""

    def seed(self, n: int) -> None:
        """Create n tasks in the service."""

    def modify(self, count: int) -> None:
        """Change the title of `count` existing tasks, as a person would (updates their time)."""

    def break_auth(self) -> None:
        """Make the configured credentials invalid."""

    def inject_transient(self, times: int) -> None:
        """Answer the next `times` listing requests with a retryable fault (429 or 5xx)."""

    def add_malformed(self) -> None:
        """Add one record whose payload the connector cannot read; it must be skipped."""

    def request_count(self) -> int:
        """Requests the stand-in has answered so far."""

    def push_action(self, key: str) -> Action:
        """An action for the first seeded task, with idempotency key `key`."""

    def deliveries(self, key: str) -> int:
        """How many times an action with `key` reached the service."""

    def secret(self) -> str:
        """The credential that must never appear in errors or output."""


NAME = "src"


def make_config(world: World, url: str) -> AppConfig:
    return parse_config(
        {"store": {"url": url}, "connectors": {NAME: world.section()}},
        env={},
        connector_types={world.kind: world.connector_type},
    )


def run(world: World, store: Store, *, full: bool = False) -> SyncResult:
    engine = SyncEngine(store, make_config(world, store.url), {world.kind: world.connector_type})
    [result] = engine.run(full=full)
    return result


def count_tasks(store: Store) -> int:
    with store.transaction() as s:
        return s.scalar(select(func.count()).select_from(Task).where(Task.source == NAME)) or 0


class ConnectorContract:
    """Subclass in a connector's test module and provide a `world` fixture."""

    @pytest.fixture
    def contract_store(self, tmp_path: Any) -> Any:
        store = Store(f"sqlite:///{tmp_path / 'contract.db'}")
        yield store
        store.close()

    def test_contract_first_pull_is_paginated(self, world: World, contract_store: Store) -> None:
        n = world.page_size * 2 + 3
        world.seed(n)
        result = run(world, contract_store)
        assert result.ok, result.error
        assert result.upserts.inserted == n
        assert count_tasks(contract_store) == n

    def test_contract_incremental_pull_sees_changes(self, world: World, contract_store: Store) -> None:
        world.seed(5)
        assert run(world, contract_store).ok
        world.modify(2)
        result = run(world, contract_store)
        assert result.ok, result.error
        assert (result.upserts.inserted, result.upserts.updated) == (0, 2)

    def test_contract_overlap_makes_no_duplicates(self, world: World, contract_store: Store) -> None:
        world.seed(5)
        run(world, contract_store)
        again = run(world, contract_store)
        assert again.ok and again.upserts.inserted == 0 and again.upserts.updated == 0
        assert count_tasks(contract_store) == 5

    def test_contract_transient_fault_is_retried(self, world: World, contract_store: Store) -> None:
        world.seed(3)
        world.inject_transient(1)
        result = run(world, contract_store)
        assert result.ok, result.error
        assert result.requests.retries >= 1
        assert count_tasks(contract_store) == 3

    def test_contract_auth_failure_is_surfaced_without_secret(self, world: World, contract_store: Store) -> None:
        world.seed(1)
        world.break_auth()
        before = world.request_count()
        result = run(world, contract_store)
        assert not result.ok
        assert world.secret() not in (result.error or "")
        assert world.request_count() - before <= 3, "an auth failure must not be retried"

    def test_contract_malformed_record_is_skipped(self, world: World, contract_store: Store) -> None:
        world.seed(3)
        world.add_malformed()
        result = run(world, contract_store)
        assert result.ok, result.error
        assert count_tasks(contract_store) == 3

    def test_contract_push_is_idempotent(self, world: World, contract_store: Store) -> None:
        world.seed(1)
        assert run(world, contract_store).ok
        config = make_config(world, contract_store.url)
        connector = world.connector_type(NAME, config.connectors[NAME])
        action = world.push_action("contract-key-1")
        first = connector.push(action)
        second = connector.push(action)  # as after a crash that lost the outbox record
        assert not first.already_delivered and second.already_delivered
        assert first.remote_id == second.remote_id
        assert world.deliveries("contract-key-1") == 1
