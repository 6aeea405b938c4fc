"""The one retry layer in the connector base: tenacity, Retry-After, bounded, transient only."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from connectors.base import Connector, ConnectorConfig, parse_retry_after
from connectors.errors import AuthError, RateLimited, TransientError
from store.canonical import CheckResult, Page, SyncState


class Dummy(Connector[ConnectorConfig, object]):  # type: ignore[type-var]
    kind = "dummy"

    def pull(self, state: SyncState) -> Iterator[Page]:
        yield from ()

    def check(self) -> CheckResult:
        return CheckResult(True, "")


def make(**retry) -> tuple[Dummy, list[float]]:
    waits: list[float] = []
    cfg = ConnectorConfig(type="dummy", retry=retry or {})
    return Dummy("d", cfg, sleep=waits.append), waits


def flaky(errors: list[Exception]):
    calls = {"n": 0}

    def fn() -> str:
        calls["n"] += 1
        if errors:
            raise errors.pop(0)
        return "ok"

    return fn, calls


def test_transient_errors_are_retried_honouring_retry_after() -> None:
    conn, waits = make()
    fn, calls = flaky([TransientError("429", retry_after=7), TransientError("502")])
    assert conn.call(fn) == "ok"
    assert calls["n"] == 3 and conn.stats.retries == 2
    assert waits[0] == 7 and 0 <= waits[1] <= 60


def test_attempts_are_bounded() -> None:
    conn, waits = make(attempts=3)
    fn, calls = flaky([TransientError("502")] * 5)
    with pytest.raises(TransientError):
        conn.call(fn)
    assert calls["n"] == 3 and len(waits) == 2


def test_auth_errors_are_never_retried() -> None:
    conn, waits = make()
    fn, calls = flaky([AuthError("401")])
    with pytest.raises(AuthError):
        conn.call(fn)
    assert calls["n"] == 1 and waits == []


def test_retry_after_beyond_max_wait_gives_up_at_once() -> None:
    conn, waits = make(max_wait="30s")
    fn, calls = flaky([RateLimited("spent", retry_after=3600)])
    with pytest.raises(RateLimited):
        conn.call(fn)
    assert calls["n"] == 1 and waits == []


def test_writes_run_once() -> None:
    conn, _ = make()
    fn, calls = flaky([TransientError("502")])
    with pytest.raises(TransientError):
        conn.once(fn)
    assert calls["n"] == 1


def test_parse_retry_after() -> None:
    now = datetime(2015, 10, 21, 7, 27, 0, tzinfo=UTC)
    assert parse_retry_after("120") == 120
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now) == 60
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
