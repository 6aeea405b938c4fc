"""The connector plugin surface: subclass `Connector`, give it a config model, register it.

A connector file holds a `<Kind>Config`, a `<Kind>Cursor`, pure mapping functions and one
`<Kind>Connector`. The base owns what they share: the retry policy (tenacity, honouring
`Retry-After`, only for `TransientError`), error translation through `translate_errors()`, the
clock, request accounting, and `human_activity()`, which keeps an update that a bot's comment
explains out of a task's activity. A connector yields pages; it never saves state or opens a
database session: the engine commits each page together with its cursor.
"""

from __future__ import annotations

import logging
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar, Generic, TypeVar
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, field_validator
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential
from tenacity.stop import stop_base

from connectors.errors import PushError, RateLimited, TransientError
from store.canonical import Action, CheckResult, Cursor, CursorT, Page, PushResult, SyncState, TaskRecord
from store.durations import Duration

T = TypeVar("T")


class RetryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    attempts: int = Field(5, ge=1, le=20, description="Tries per request before the sync fails (reads only).")
    max_wait: Duration = Field(
        timedelta(seconds=60),
        description="Longest single back-off; a Retry-After beyond it stops the sync until the next run.",
    )


class ConnectorConfig(BaseModel):
    """Keys every connector accepts; a connector's own model subclasses this."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str = Field(description="Connector type: github, jira, slack, imap, csv, or a plugin's type.")
    enabled: bool = Field(True, description="Disabled connectors are skipped by sync and the daemon.")
    interval: Duration = Field(
        timedelta(minutes=5), description='How often the daemon syncs it, e.g. "5m" (at least "1s").'
    )
    bots: list[str] = Field(
        default_factory=list,
        description="Account names or ids in this source whose comments and posts never count as human "
        "activity (edits the source does not attribute still do; see README).",
    )
    retry: RetryConfig = Field(default_factory=RetryConfig, description="Back-off for transient faults.")

    @field_validator("interval")
    @classmethod
    def _interval_at_least_a_second(cls, value: timedelta) -> timedelta:
        if value < timedelta(seconds=1):
            raise ValueError(f'must be at least "1s", got {value.total_seconds():g}s')
        return value


ConfigT = TypeVar("ConfigT", bound=ConnectorConfig)


@dataclass(slots=True)
class RequestStats:
    """What a sync cost the source; the engine stores it and the daemon exports it."""

    requests: int = 0
    not_modified: int = 0
    retries: int = 0
    rate_limit_remaining: int | None = None


@dataclass(frozen=True, slots=True)
class Confirmed:
    """A connector's verdict on the tasks a complete listing of a scope lacked."""

    gone: frozenset[str] = frozenset()  # deleted or moved away: the engine cancels these
    found: Sequence[TaskRecord] = ()  # still there after all (the listing skipped them): upserted


# A comment sets its task's update time to (about) its own; a source's clocks agree this well.
COMMENT_SLACK = timedelta(seconds=5)


def bot_names(bots: Collection[str]) -> frozenset[str]:
    """The configured `bots`, trimmed and lower-cased for comparison with logins and account ids."""
    return frozenset(b.strip().lower() for b in bots if b.strip())


@dataclass(frozen=True, slots=True)
class CommentTrail:
    """Who wrote a task's newest comments, as far as a connector saw them."""

    latest: datetime  # when its newest comment was written (or last edited)
    by_bot: bool  # whether a bot, a configured bot account or trackloop's own account wrote that one
    human: datetime | None = None  # when its newest comment by a person was written


def comment_trail(comments: Iterable[tuple[datetime, bool]]) -> CommentTrail | None:
    """The trail of (time, written by a bot) pairs in any order; None without any."""
    latest: tuple[datetime, bool] | None = None
    human: datetime | None = None
    for at, by_bot in comments:
        if latest is None or at > latest[0]:
            latest = (at, by_bot)
        if not by_bot and (human is None or at > human):
            human = at
    return None if latest is None else CommentTrail(latest[0], latest[1], human)


def bot_explained(updated_at: datetime | None, trail: CommentTrail | None) -> bool:
    """Whether a task's `updated_at` is its newest comment's, and a bot wrote that comment."""
    return (
        trail is not None and trail.by_bot and updated_at is not None
        and abs(updated_at - trail.latest) <= COMMENT_SLACK
    )  # fmt: skip


def human_activity(record: TaskRecord, trail: CommentTrail | None) -> TaskRecord:
    """`record` with an update that a bot's comment explains left out of its activity: the newest
    human comment seen, else the task's creation, stands in (the store keeps a later stored time;
    it reads a missing `last_activity_at` as `updated_at`, so None is never the answer here)."""
    if not bot_explained(record.updated_at, trail):
        return record
    times = [t for t in (trail.human if trail else None, record.created_at) if t is not None]
    return replace(record, last_activity_at=max(times) if times else record.last_activity_at)


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header: delta-seconds or an HTTP date (RFC 9110)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


_LINKABLE = re.compile(r"https?://[^\s/]", re.IGNORECASE)
_ENDS_A_LINK = re.compile(r"[\s|<>()\"'`\x00-\x1f\x7f]")


def safe_url(url: str | None) -> str | None:
    """A task's URL fit to link anywhere, or None for no link.

    Only http(s) links (a CSV cell may say `javascript:`), with the characters that would end or
    break a link in Slack mrkdwn (`<url|text>`), Markdown (`(url)`) or an HTML attribute
    percent-encoded; HTML still escapes it as an attribute.
    """
    url = (url or "").strip()
    if not _LINKABLE.match(url):
        return None
    return _ENDS_A_LINK.sub(lambda m: quote(m.group(), safe=""), url)


class _WaitRetryAfter:
    """Wait what the server asked for (Retry-After), else exponential back-off with jitter."""

    def __init__(self, max_wait: float) -> None:
        self.max_wait = max_wait
        self.fallback = wait_random_exponential(multiplier=0.5, max=max_wait)

    def __call__(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        hint = getattr(exc, "retry_after", None)
        if hint is not None:
            return min(float(hint), self.max_wait)
        return float(self.fallback(state))


class Connector(ABC, Generic[ConfigT, CursorT]):
    """Base class of every connector (built-in or plugin)."""

    kind: ClassVar[str]
    config_model: ClassVar[type[ConnectorConfig]] = ConnectorConfig
    cursor_model: ClassVar[type[Cursor]] = Cursor

    def __init__(
        self,
        name: str,
        config: ConfigT,
        *,
        clock: Callable[[], datetime] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.name = name
        self.config = config
        self._clock = clock or (lambda: datetime.now(UTC))
        self._sleep = sleep
        self.stats = RequestStats()
        self.log = logging.getLogger(f"trackloop.connector.{name}")

    # -- the surface a connector implements ------------------------------------------------
    @abstractmethod
    def pull(self, state: SyncState[CursorT]) -> Iterator[Page[CursorT]]:
        """Yield pages of records, each with the state to save once the page is committed."""

    def push(self, action: Action) -> PushResult:
        """Deliver an action exactly once per `action.key`; connectors that can write override."""
        raise PushError(f"connector {self.name!r} ({self.kind}) cannot deliver {action.kind!r}", permanent=True)

    @abstractmethod
    def check(self) -> CheckResult:
        """One cheap call that tells `trackloop doctor` whether the connector can work."""

    def confirm_missing(self, scope: str, external_ids: Collection[str]) -> Confirmed:
        """Which open tasks of `scope` that its complete listing lacked are really gone; asked before
        they are cancelled, only about those. The default trusts the listing: all of them."""
        return Confirmed(gone=frozenset(external_ids))

    def restore(self, cursor: CursorT | None) -> None:
        """The cursor the last sync saved, handed to a connector that pushes or checks without
        pulling, so it can reuse what a sync learnt (Jira: its deployment); the default needs none."""

    def translate_errors(self) -> AbstractContextManager[Any]:
        """Map the client library's exceptions to `connectors.errors`; override per connector."""
        return nullcontext()

    def close(self) -> None:
        """Release connections; called by the engine after each sync."""

    # -- shared behaviour -------------------------------------------------------------------
    def now(self) -> datetime:
        return self._clock()

    def load_cursor(self, raw: dict[str, Any] | None) -> CursorT | None:
        """Parse a stored cursor; one of an older version or another shape starts afresh."""
        if not raw:
            return None
        try:
            cursor = self.cursor_model.model_validate(raw)
        except ValueError:
            self.log.warning("stored cursor of %s is unreadable; starting a full pull", self.name)
            return None
        if cursor.version != self.cursor_model.model_fields["version"].default:
            self.log.info("stored cursor of %s has an older version; starting a full pull", self.name)
            return None
        return cursor  # type: ignore[return-value]

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a read, translated and retried on transient faults per the connector's policy."""
        policy = self.config.retry
        retrying = Retrying(
            retry=retry_if_exception_type(TransientError),
            stop=stop_after_attempt(policy.attempts) | _stop_on_long_wait(policy.max_wait.total_seconds()),
            wait=_WaitRetryAfter(policy.max_wait.total_seconds()),
            sleep=self._sleep,
            before_sleep=self._before_sleep,
            reraise=True,
        )
        return retrying(self._translated, fn, *args, **kwargs)

    def throttled(self, message: str, retry_after: float | None) -> TransientError:
        """A rate-limit answer as an error: retried when its `Retry-After` fits `retry.max_wait`, else
        `RateLimited`, which stops the sync cleanly instead of asking again while still limited."""
        if retry_after is not None and retry_after > self.config.retry.max_wait.total_seconds():
            return RateLimited(
                f"{message}; rate limited for {retry_after:.0f}s",
                reset_at=self.now() + timedelta(seconds=retry_after),
                retry_after=retry_after,
            )
        return TransientError(message, retry_after=retry_after)

    def once(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a write exactly once, translated; the outbox is the only retry layer for writes."""
        return self._translated(fn, *args, **kwargs)

    def _translated(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        with self.translate_errors():
            return fn(*args, **kwargs)

    def _before_sleep(self, state: RetryCallState) -> None:
        self.stats.retries += 1
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0
        self.log.warning("%s: %s; retry %d in %.1fs", self.name, exc, state.attempt_number, wait)


class _stop_on_long_wait(stop_base):
    """Stop retrying when the server asks for a wait longer than the policy allows."""

    def __init__(self, max_wait: float) -> None:
        self.max_wait = max_wait

    def __call__(self, state: RetryCallState) -> bool:
        exc = state.outcome.exception() if state.outcome else None
        hint = getattr(exc, "retry_after", None)
        return hint is not None and float(hint) > self.max_wait
