"""Webhooks: GitHub, Jira and Slack tell the daemon that something changed.

A verified event names the connectors it concerns and asks the daemon to sync them now (an
incremental sync of GitHub, Jira or Slack costs about one request per repository, search or
channel, so it is as cheap as fetching the one task, and it goes through the same code that
keeps the cursor right). Polling stays the reconciliation path: a lost or refused webhook
costs latency, never data. A request that fails verification gets 401 and changes nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from dateutil import parser as dateparser
from sqlalchemy import select

from store.db import Store
from store.models import Task
from sync.config import AppConfig

log = logging.getLogger("trackloop.webhooks")

SLACK_WINDOW = 300  # seconds; Slack's own advice: refuse requests stamped further from now
SLACK_EVENTS = {"message", "reaction_added", "reaction_removed"}
DEDUPE_SIZE = 10_000


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: dict[str, Any] = field(default_factory=dict)
    outcome: str = "ok"  # for the metric: ok, refused, duplicate, ignored, stale, bad_request


class _Seen:
    """The last `size` delivery ids; a repeat delivery is acknowledged and not acted on."""

    def __init__(self, size: int = DEDUPE_SIZE) -> None:
        self.size = size
        self.ids: OrderedDict[str, None] = OrderedDict()
        self.lock = threading.Lock()

    def first_time(self, key: str) -> bool:
        with self.lock:
            if key in self.ids:
                self.ids.move_to_end(key)
                return False
            self.ids[key] = None
            if len(self.ids) > self.size:
                self.ids.popitem(last=False)
            return True


def github_signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def slack_signature(secret: str, timestamp: str, body: bytes) -> str:
    base = b"v0:" + timestamp.encode() + b":" + body
    return "v0=" + hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()


def _same(expected: str, given: str | None) -> bool:
    return given is not None and hmac.compare_digest(expected.encode(), given.strip().encode())


class Webhooks:
    """Verifies and routes webhook requests; `refresh(names, reason)` schedules syncs."""

    def __init__(
        self,
        *,
        config: Callable[[], AppConfig],
        store: Callable[[], Store],
        refresh: Callable[[list[str], str], None],
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.refresh = refresh
        self.clock = clock or (lambda: datetime.now(UTC))
        self.seen = {"github": _Seen(), "slack": _Seen(), "jira": _Seen()}

    def handle(self, source: str, headers: Mapping[str, str], query: Mapping[str, str], body: bytes) -> Reply:
        """`headers` with lower-cased names."""
        secrets = self.config().daemon.webhooks
        secret = {"github": secrets.github_secret, "jira": secrets.jira_secret,
                  "slack": secrets.slack_signing_secret}.get(source)
        if secret is None:  # unknown source, or no secret configured: the endpoint does not exist
            return Reply(404, {"error": f"no webhook endpoint for {source!r}"}, "not_found")
        handler = {"github": self._github, "jira": self._jira, "slack": self._slack}[source]
        return handler(secret.get_secret_value(), headers, query, body)

    # -- GitHub ----------------------------------------------------------------------------------
    def _github(self, secret: str, headers: Mapping[str, str], query: Mapping[str, str], body: bytes) -> Reply:
        if not _same(github_signature(secret, body), headers.get("x-hub-signature-256")):
            return _refused("github", "X-Hub-Signature-256 does not match the configured secret")
        payload = _json(body)
        if payload is None:
            return Reply(400, {"error": "body is not a JSON object"}, "bad_request")
        event = headers.get("x-github-event", "")
        delivery = headers.get("x-github-delivery")
        if delivery and not self.seen["github"].first_time(delivery):
            return Reply(200, {"result": "duplicate delivery", "delivery": delivery}, "duplicate")
        if event == "ping":
            return Reply(200, {"result": "pong"})
        repo = str((payload.get("repository") or {}).get("full_name") or "")
        targets = self.github_targets(repo)
        if not targets:
            return Reply(202, {"result": f"no connector reads {repo or 'this repository'}"}, "ignored")
        number = (payload.get("issue") or payload.get("pull_request") or {}).get("number")
        self.refresh(targets, f"github {event} {repo}#{number}" if number else f"github {event} {repo}")
        return Reply(202, {"result": "refresh scheduled", "connectors": targets})

    def github_targets(self, repo: str) -> list[str]:
        owner = repo.split("/")[0].lower()
        out = []
        for name, cfg in self._enabled("github"):
            for pattern in getattr(cfg, "repos", []) or []:
                p_owner, _, p_name = pattern.lower().partition("/")
                if pattern.lower() == repo.lower() or (p_name == "*" and p_owner == owner):
                    out.append(name)
                    break
        return out

    # -- Jira ------------------------------------------------------------------------------------
    def _jira(self, secret: str, headers: Mapping[str, str], query: Mapping[str, str], body: bytes) -> Reply:
        signed = headers.get("x-hub-signature")
        ok = _same(github_signature(secret, body), signed) if signed else _same(secret, query.get("secret"))
        if not ok:
            return _refused("jira", "neither X-Hub-Signature nor ?secret= matches the configured secret")
        payload = _json(body)
        if payload is None:
            return Reply(400, {"error": "body is not a JSON object"}, "bad_request")
        issue = payload.get("issue") or {}
        key = str(issue.get("key") or "")
        event = str(payload.get("webhookEvent") or "")
        delivery = headers.get("x-atlassian-webhook-identifier")
        if delivery and not self.seen["jira"].first_time(delivery):
            return Reply(200, {"result": "duplicate delivery"}, "duplicate")
        targets = self.jira_targets(query.get("connector"), str(issue.get("self") or ""))
        if not targets:
            return Reply(202, {"result": "no jira connector matches this event"}, "ignored")
        updated = _when((issue.get("fields") or {}).get("updated")) or _epoch_ms(payload.get("timestamp"))
        if key and updated is not None and not event.endswith("_deleted"):
            targets = self._newer_than_stored(targets, key, updated)
            if not targets:
                return Reply(200, {"result": f"{key} is not newer than the stored copy"}, "stale")
        self.refresh(targets, f"jira {event or 'event'} {key}".strip())
        return Reply(202, {"result": "refresh scheduled", "connectors": targets})

    def jira_targets(self, named: str | None, issue_url: str) -> list[str]:
        jira = list(self._enabled("jira"))
        if named:
            return [name for name, _ in jira if name == named]
        by_url = [name for name, cfg in jira
                  if issue_url and issue_url.startswith(str(getattr(cfg, "url", "")).rstrip("/") + "/")]
        return by_url or [name for name, _ in jira]

    def _newer_than_stored(self, targets: list[str], key: str, updated: datetime) -> list[str]:
        """Deliveries repeat and arrive late: act only where the event is newer than the task."""
        with self.store().transaction() as session:
            stored = dict(session.execute(  # type: ignore[arg-type]
                select(Task.source, Task.updated_at).where(Task.source.in_(targets), Task.external_id == key)
            ).all())
        return [name for name in targets if stored.get(name) is None or stored[name] < updated]

    # -- Slack -----------------------------------------------------------------------------------
    def _slack(self, secret: str, headers: Mapping[str, str], query: Mapping[str, str], body: bytes) -> Reply:
        stamp = headers.get("x-slack-request-timestamp", "")
        try:
            age = abs(self.clock().timestamp() - int(stamp))
        except ValueError:
            return _refused("slack", "missing or malformed X-Slack-Request-Timestamp")
        if age > SLACK_WINDOW:
            return _refused("slack", f"X-Slack-Request-Timestamp is {age:.0f}s away from now (replay?)")
        if not _same(slack_signature(secret, stamp, body), headers.get("x-slack-signature")):
            return _refused("slack", "X-Slack-Signature does not match the signing secret")
        payload = _json(body)
        if payload is None:
            return Reply(400, {"error": "body is not a JSON object"}, "bad_request")
        if payload.get("type") == "url_verification":
            return Reply(200, {"challenge": payload.get("challenge", "")})
        if payload.get("type") != "event_callback":
            return Reply(200, {"result": "ignored"}, "ignored")
        event_id = str(payload.get("event_id") or "")
        if event_id and not self.seen["slack"].first_time(event_id):
            return Reply(200, {"result": "duplicate event"}, "duplicate")
        event = payload.get("event") or {}
        kind = str(event.get("type") or "")
        if kind not in SLACK_EVENTS:
            return Reply(200, {"result": f"event {kind!r} ignored"}, "ignored")
        channel = str(event.get("channel") or (event.get("item") or {}).get("channel") or "")
        targets = self.slack_targets(channel)
        if not targets:
            return Reply(200, {"result": f"no connector reads channel {channel}"}, "ignored")
        self.refresh(targets, f"slack {kind} in {channel}")
        return Reply(200, {"result": "refresh scheduled", "connectors": targets})

    def slack_targets(self, channel: str) -> list[str]:
        slack = list(self._enabled("slack"))
        by_id = [name for name, cfg in slack if channel in (getattr(cfg, "channels", []) or [])]
        if by_id:
            return by_id
        # Channels configured by #name are resolved at sync time: any of those may read it.
        return [name for name, cfg in slack if any(c.startswith("#") for c in getattr(cfg, "channels", []) or [])]

    # -- helpers ---------------------------------------------------------------------------------
    def _enabled(self, kind: str) -> list[tuple[str, Any]]:
        return [(name, cfg) for name, cfg in self.config().connectors.items() if cfg.enabled and cfg.type == kind]


def _refused(source: str, why: str) -> Reply:
    log.warning("webhook %s refused: %s", source, why, extra={"fields": {"event": "webhook", "source": source,
                                                                         "outcome": "refused"}})
    return Reply(401, {"error": "signature verification failed"}, "refused")


def _json(body: bytes) -> dict[str, Any] | None:
    try:
        doc = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def _when(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = dateparser.isoparse(value)
    except ValueError:
        return None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _epoch_ms(value: Any) -> datetime | None:
    if not isinstance(value, int | float):
        return None
    return datetime.fromtimestamp(value / 1000, UTC)
