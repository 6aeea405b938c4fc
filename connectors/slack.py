"""The `slack` connector: tasks captured from Slack channels; DMs, replies and digests posted back.

A message becomes a task when it carries a capture reaction (`:task:`) or starts with a capture
prefix ("TODO:"). Each sync reads, per channel, the history of a bounded look-back window with
`conversations.history`, plus `conversations.replies` only for threads whose `latest_reply`
moved, the thread of a captured message that changed, and threads holding a captured reply (a
reaction or an edit on a reply does not move its thread), so a reaction, an edit or a reply added
today to yesterday's message is seen at a cost that does not grow with the channel's age. The
cursor remembers, for the window only, each thread's `latest_reply` and a fingerprint of each
captured message, so an idle sync costs one history call per channel (plus one per thread holding
a captured reply) and writes nothing.

Slack reports reactions without a time: a change in a message's (human) reactions is dated by
the sync that first saw it, which bounds the error by the sync interval.

Pushes carry their idempotency key in message `metadata` (event type `trackloop_action`); before
posting, the target conversation's history of the last `push_lookback` (or the thread) is searched
for it, so a retry after a crash never doubles a message. Digests are split so every part respects
Block Kit limits, each part keyed by its number, and a retry posts only the parts that are missing.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import re
from collections import deque
from collections.abc import Container, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError

from connectors.base import Connector, ConnectorConfig, parse_retry_after, safe_url
from connectors.errors import (
    AuthError,
    ConnectorError,
    PayloadError,
    PushError,
    RateLimited,
    TransientError,
)
from store.canonical import (
    Action,
    ActivityRecord,
    CheckResult,
    Cursor,
    IdentityKind,
    IdentityRef,
    Page,
    PushResult,
    Status,
    SyncState,
    TaskRecord,
    TaskRef,
)
from store.durations import Duration

EVENT_TYPE = "trackloop_action"  # message metadata that marks trackloop's own posts
PAGE_RECORDS = 200  # task records per committed page
TITLE_MAX = 200
BODY_MAX = 20_000
TEXT_MAX = 39_000  # under chat.postMessage's 40,000 characters, so Slack never truncates us

# Block Kit limits (https://docs.slack.dev/block-kit and each block's reference page).
MAX_BLOCKS = 50
MAX_SECTION_TEXT = 3000
MAX_SECTION_FIELDS = 10
MAX_FIELD_TEXT = 2000
MAX_HEADER_TEXT = 150
MAX_CONTEXT_ELEMENTS = 10
MAX_BLOCK_ID = 255

# Message subtypes that can carry a task; joins, topic changes, tombstones and the like never do.
TASK_SUBTYPES = frozenset({None, "thread_broadcast", "file_share", "bot_message", "me_message"})
# `ok: false` errors that mean the token itself is bad: a configuration problem, never retried.
AUTH_ERRORS = frozenset(
    {"not_authed", "invalid_auth", "account_inactive", "token_revoked", "token_expired", "no_permission",
     "not_allowed_token_type", "ekm_access_denied", "team_access_not_granted", "org_login_required"}
)
TRANSIENT_ERRORS = frozenset(
    {"ratelimited", "internal_error", "fatal_error", "service_unavailable", "request_timeout"}
)

_TS = re.compile(r"\d{1,12}\.\d{6}")
_CHANNEL_ID = re.compile(r"[CGD][A-Z0-9]{2,}")
_USER_ID = re.compile(r"[UW][A-Z0-9]{2,}")
_MENTION = re.compile(r"<@([UW][A-Z0-9]+)(?:\|[^>]*)?>")
_TOKEN = re.compile(r"<([^<>\n]*)>")
_BROADCAST = re.compile(r"<!(channel|here|everyone)(\|[^>]*)?>")
_AT_BROADCAST = re.compile(r"@(channel|here|everyone)\b", re.IGNORECASE)


# -- config --------------------------------------------------------------------------------------
def _reaction_names(values: list[str]) -> list[str]:
    names = []
    for value in values:
        name = value.strip().strip(":").strip()
        if not name or not re.fullmatch(r"[a-z0-9_+'\-]+(::skin-tone-\d)?", name):
            raise ValueError(f'expected an emoji name like "white_check_mark", got {value!r}')
        names.append(name)
    return names


class SlackCapture(BaseModel):
    """What turns a message into a task."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    reactions: list[str] = Field(
        default_factory=lambda: ["task"],
        description='Emoji names (no colons); a message with one of these reactions becomes a task.',
    )
    prefixes: list[str] = Field(
        default_factory=lambda: ["TODO:", "action item:"],
        description="A message starting with one of these (case-insensitive) becomes a task.",
    )

    @field_validator("reactions")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        return _reaction_names(value)

    @field_validator("prefixes")
    @classmethod
    def _prefixes(cls, value: list[str]) -> list[str]:
        out = [p.strip() for p in value]
        if any(not p for p in out):
            raise ValueError("expected non-empty prefixes, got an empty one")
        return out


class SlackReactions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    reactions: list[str] = Field(description="Emoji names (no colons).")

    @field_validator("reactions")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        return _reaction_names(value)


class SlackDone(SlackReactions):
    """What marks a captured task done."""

    reactions: list[str] = Field(
        default_factory=lambda: ["white_check_mark", "heavy_check_mark"],
        description="Emoji names that mark the task done; added by someone other than the owner = verified.",
    )


class SlackAssign(SlackReactions):
    """What makes someone the owner of a captured task."""

    reactions: list[str] = Field(
        default_factory=lambda: ["raising_hand"],
        description="Whoever reacts with one of these owns the task (several people: shared, no single "
        "owner). Without one, the first person mentioned in the message owns it.",
    )


class SlackConfig(ConnectorConfig):
    token: SecretStr = Field(
        description='Bot token (xoxb-...) of an internal (custom) app; write "${SLACK_BOT_TOKEN}".'
    )
    base_url: str = Field(
        "https://slack.com/api/", description="Web API base URL; any Slack-compatible server."
    )
    channels: list[str] = Field(
        min_length=1,
        description='Channels to capture tasks from: ids ("C0123ABCD") or names ("#ops"); names are resolved '
        "once and cached in the cursor.",
    )
    capture: SlackCapture = Field(
        default_factory=SlackCapture, description="What turns a message into a task."
    )
    done: SlackDone = Field(default_factory=SlackDone, description="What marks a captured task done.")
    assign: SlackAssign = Field(default_factory=SlackAssign, description="What makes someone the owner.")
    lookback: Duration = Field(
        timedelta(days=7),
        description="Every sync re-reads this much history, so later reactions, edits and replies are seen.",
    )
    backfill: Duration = Field(
        timedelta(days=7),
        description="How far back the first sync reads (at least `lookback`).",
    )
    page_size: int = Field(
        999, ge=1, le=999,
        description="Messages per conversations.history call (Slack's maximum, 999, keeps re-reading the "
        "window cheap).",
    )
    history_calls_per_minute: int = Field(
        45,
        ge=1,
        description="Most conversations.history/replies calls one sync makes per minute (Slack's Tier 3 is "
        "50+); further calls wait.",
    )
    push_search: int = Field(
        200,
        ge=1,
        le=999,
        description="Messages per conversations.history call when the target conversation is searched "
        "for an earlier delivery before posting.",
    )
    push_lookback: Duration = Field(
        timedelta(days=2),
        description="How far back that search goes (newest first, stopping once the post is found); a "
        "retry of an action first attempted longer ago than this may post it again.",
    )
    timeout: Duration = Field(timedelta(seconds=30), description="HTTP timeout per request.")

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f'expected an http(s) URL like "https://slack.com/api/", got {value!r}')
        return value if value.endswith("/") else value + "/"

    @field_validator("channels")
    @classmethod
    def _channels(cls, value: list[str]) -> list[str]:
        out = []
        for item in value:
            item = item.strip()
            if not (_CHANNEL_ID.fullmatch(item) or re.fullmatch(r"#[a-z0-9][a-z0-9_\-]{0,79}", item)):
                raise ValueError(
                    f'expected a channel id like "C0123ABCD" or a name like "#ops", got {item!r}'
                )
            out.append(item)
        return out

    @model_validator(mode="after")
    def _windows(self) -> SlackConfig:
        if self.lookback <= timedelta(0):
            raise ValueError("lookback must be longer than 0s")
        if self.backfill < self.lookback:
            raise ValueError("backfill must be at least as long as lookback")
        return self


# -- cursor --------------------------------------------------------------------------------------
class SlackSeen(BaseModel):
    """A captured message as last emitted: what it looked like, and what we learnt about it."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    fp: str  # fingerprint of the message (text, edit, reactions, thread); unchanged = nothing to do
    rx: str = ""  # digest of its human reactions
    rx_at: datetime | None = None  # when a change in them was first seen
    done: bool = False  # a done reaction was on it
    done_at: datetime | None = None  # when that was first seen (None: it was done when first read)
    url: str | None = None  # chat.getPermalink, fetched once
    thread: str | None = None  # a captured reply's parent ts: its thread is re-read while it is in the window


class SlackChannelState(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    top: str  # newest top-level ts read so far
    floor: str  # where the first read started; --full re-reads from here
    threads: dict[str, str] = Field(default_factory=dict)  # parent ts -> latest_reply, in the window
    seen: dict[str, SlackSeen] = Field(default_factory=dict)  # captured ts -> what was emitted


class SlackCursor(Cursor):
    version: int = 1
    rules: str = ""  # digest of the capture settings; when they change, the window is re-evaluated
    names: dict[str, str] = Field(default_factory=dict)  # "#name" -> channel id
    channels: dict[str, SlackChannelState] = Field(default_factory=dict)


# -- pure mapping --------------------------------------------------------------------------------
def ts_key(ts: str) -> int:
    """'1700000000.000100' -> microseconds: Slack timestamps compare exactly as integers."""
    seconds, _, fraction = ts.partition(".")
    return int(seconds) * 1_000_000 + int(fraction.ljust(6, "0")[:6] or 0)


def ts_datetime(ts: str) -> datetime:
    key = ts_key(ts)
    return datetime.fromtimestamp(key // 1_000_000, UTC).replace(microsecond=key % 1_000_000)


def datetime_ts(when: datetime) -> str:
    when = when.astimezone(UTC)
    return f"{int(when.replace(microsecond=0).timestamp())}.{when.microsecond:06d}"


def user_name(user: Mapping[str, Any] | None, fallback: str = "") -> str:
    """How Slack shows a person: display name, else real name, else handle."""
    if not user:
        return fallback
    profile = user.get("profile") or {}
    return (
        profile.get("display_name") or profile.get("real_name") or user.get("real_name") or user.get("name")
        or fallback
    )


def mentioned_users(text: str) -> list[str]:
    """User ids mentioned in a message, in order, without repeats."""
    return list(dict.fromkeys(_MENTION.findall(text or "")))


def render_text(text: str, names: Mapping[str, str]) -> str:
    """Slack's wire format to plain text: <@U1> -> @alice, <#C1|ops> -> #ops, <url|label> -> label."""

    def token(match: re.Match[str]) -> str:
        target, _, label = match.group(1).partition("|")
        if target.startswith("@"):
            return "@" + (names.get(target[1:]) or label or target[1:])
        if target.startswith("#"):
            return "#" + (label or names.get(target[1:]) or target[1:])
        if target.startswith("!"):
            special = target[1:].split("^", 1)[0]
            if special in ("here", "channel", "everyone"):
                return "@" + special
            return label or ("@group" if special == "subteam" else special)
        return label or target.removeprefix("mailto:")

    plain = _TOKEN.sub(token, text or "")
    return plain.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def escape_mrkdwn(text: str) -> str:
    """User text made safe for Slack mrkdwn: no links, mentions or @channel/@here can be injected."""
    escaped = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _AT_BROADCAST.sub(lambda m: "@\u2060" + m.group(1), escaped)


def defuse_broadcasts(text: str) -> str:
    """Composed mrkdwn with <!channel>, <!here> and <!everyone> made inert (other markup kept)."""
    text = _BROADCAST.sub(lambda m: "@\u2060" + m.group(1), text)
    return _AT_BROADCAST.sub(lambda m: "@\u2060" + m.group(1), text)


_WEEKDAYS = {
    "monday": 0, "mon": 0, "tuesday": 1, "tue": 1, "tues": 1, "wednesday": 2, "wed": 2, "thursday": 3,
    "thu": 3, "thur": 3, "thurs": 3, "friday": 4, "fri": 4, "saturday": 5, "sat": 5, "sunday": 6, "sun": 6,
}
_MONTHS = {
    "january": 1, "jan": 1, "february": 2, "feb": 2, "march": 3, "mar": 3, "april": 4, "apr": 4, "may": 5,
    "june": 6, "jun": 6, "july": 7, "jul": 7, "august": 8, "aug": 8, "september": 9, "sep": 9, "sept": 9,
    "october": 10, "oct": 10, "november": 11, "nov": 11, "december": 12, "dec": 12,
}
_WD = "|".join(sorted(_WEEKDAYS, key=len, reverse=True))
_MO = "|".join(sorted(_MONTHS, key=len, reverse=True))
_DUE_TRIGGER = re.compile(r"\b(?:due(?:\s+(?:by|on|date))?|by|deadline|no\s+later\s+than)\b\s*:?\s*", re.I)
_EOD = re.compile(r"(?:eod|cob|end\s+of\s+(?:the\s+)?(?:business\s+)?day|close\s+of\s+business)\b\s*")
_ISO = re.compile(r"(\d{4})-(\d{2})-(\d{2})\b")
_WEEKDAY = re.compile(rf"(?:(next|this)\s+)?({_WD})\b\.?")
_MONTH_DAY = re.compile(rf"({_MO})\.?\s+(\d{{1,2}})(?:st|nd|rd|th)?\b(?:,?\s+(\d{{4}})\b)?")
_DAY_MONTH = re.compile(rf"(\d{{1,2}})(?:st|nd|rd|th)?\s+(?:of\s+)?({_MO})\b\.?(?:,?\s+(\d{{4}})\b)?")


def _calendar(year: int, month: int, day: int) -> date | None:
    try:
        return date(year, month, day)
    except ValueError:
        return None


def _undated_year(month: int, day: int, today: date) -> date | None:
    """A date without a year: this year's, unless that is half a year gone (then next year's)."""
    found = _calendar(today.year, month, day)
    if found is not None and (today - found).days > 183:
        found = _calendar(today.year + 1, month, day)
    return found


def _when(text: str, today: date) -> date | None:
    s = re.sub(r"^the\s+", "", text.strip().lower())
    if m := _ISO.match(s):
        return _calendar(int(m[1]), int(m[2]), int(m[3]))
    if m := _EOD.match(s):  # "by EOD", "by EOD Friday"
        rest = re.sub(r"^(?:on\s+)?", "", s[m.end():])
        return _when(rest, today) if rest and _when(rest, today) else today
    if re.match(r"(?:today|tonight)\b", s):
        return today
    if re.match(r"(?:tomorrow|tmrw|tmr)\b", s):
        return today + timedelta(days=1)
    if re.match(r"(?:eow|end\s+of\s+(?:the\s+|this\s+)?week)\b", s):
        return today + timedelta(days=(4 - today.weekday()) % 7)
    if re.match(r"(?:eom|end\s+of\s+(?:the\s+|this\s+)?month)\b", s):
        first_next = date(today.year + today.month // 12, today.month % 12 + 1, 1)
        return first_next - timedelta(days=1)
    if re.match(r"next\s+week\b", s):
        return today + timedelta(days=7 - today.weekday())
    if m := _WEEKDAY.match(s):
        weekday = _WEEKDAYS[m[2]]
        if m[1] == "next":  # the one in the following calendar week
            return today - timedelta(days=today.weekday()) + timedelta(days=7 + weekday)
        return today + timedelta(days=(weekday - today.weekday()) % 7)
    if m := _MONTH_DAY.match(s):
        month, day = _MONTHS[m[1]], int(m[2])
        return _calendar(int(m[3]), month, day) if m[3] else _undated_year(month, day, today)
    if m := _DAY_MONTH.match(s):
        day, month = int(m[1]), _MONTHS[m[2]]
        return _calendar(int(m[3]), month, day) if m[3] else _undated_year(month, day, today)
    return None


def parse_due(text: str, today: date) -> date | None:
    """A due date from phrases like "by Friday", "due 2026-12-03", "by end of week", "by tomorrow".

    Relative phrases count from `today` (the message's date): a weekday means its next occurrence
    (today included), "next Friday" the Friday of the following week, "end of week" Friday.
    """
    for match in _DUE_TRIGGER.finditer(text or ""):
        found = _when(text[match.end() : match.end() + 60], today)
        if found is not None:
            return found
    return None


@dataclass(frozen=True, slots=True)
class CaptureRules:
    """The capture settings in the shape the mapping functions use."""

    capture: frozenset[str] = frozenset({"task"})
    prefixes: tuple[str, ...] = ("TODO:", "action item:")
    done: frozenset[str] = frozenset({"white_check_mark"})
    assign: tuple[str, ...] = ("raising_hand",)

    @classmethod
    def from_config(cls, config: SlackConfig) -> CaptureRules:
        return cls(
            capture=frozenset(config.capture.reactions),
            prefixes=tuple(config.capture.prefixes),
            done=frozenset(config.done.reactions),
            assign=tuple(config.assign.reactions),
        )

    def digest(self) -> str:
        data = [sorted(self.capture), list(self.prefixes), sorted(self.done), list(self.assign)]
        return hashlib.sha256(json.dumps(data).encode()).hexdigest()[:12]


def malformed(message: Any) -> str | None:
    """Why a history item cannot be read as a message, or None when it can."""
    if not isinstance(message, dict):
        return "not an object"
    ts = message.get("ts")
    if not isinstance(ts, str) or not _TS.fullmatch(ts):
        return f"bad ts {ts!r}"
    if not isinstance(message.get("text", ""), str):
        return "text is not a string"
    for name in ("user", "thread_ts", "latest_reply", "subtype", "bot_id"):
        if message.get(name) is not None and not isinstance(message[name], str):
            return f"{name} is not a string"
    reactions = message.get("reactions", [])
    if not isinstance(reactions, list) or not all(
        isinstance(r, dict) and isinstance(r.get("name"), str) and isinstance(r.get("users", []), list)
        for r in reactions
    ):
        return "reactions are malformed"
    if not isinstance(message.get("files", []), list):
        return "files is not a list"
    edited = message.get("edited")
    if edited is not None and not (isinstance(edited, dict) and _TS.fullmatch(str(edited.get("ts", "")))):
        return "edited is malformed"
    return None


def is_bot_message(message: Mapping[str, Any]) -> bool:
    return bool(message.get("bot_id")) or message.get("subtype") == "bot_message"


def is_own_post(message: Mapping[str, Any]) -> bool:
    metadata = message.get("metadata")
    return isinstance(metadata, dict) and metadata.get("event_type") == EVENT_TYPE


def reactors(message: Mapping[str, Any], names: Container[str], bots: Container[str] = ()) -> list[str]:
    """People who reacted with one of `names`, in order, without bots or repeats."""
    found: dict[str, None] = {}
    for reaction in message.get("reactions") or []:
        if reaction.get("name") in names:
            for user in reaction.get("users") or []:
                if isinstance(user, str) and user not in bots:
                    found[user] = None
    return list(found)


def _strip_prefix(text: str, prefixes: Sequence[str]) -> tuple[str, str | None]:
    stripped = text.lstrip()
    for prefix in prefixes:
        if stripped[: len(prefix)].lower() == prefix.lower():
            return stripped[len(prefix) :].lstrip(), prefix
    return text, None


def capture_reason(message: Mapping[str, Any], rules: CaptureRules, bots: Container[str] = ()) -> str | None:
    """Why a message is a task ("prefix:TODO:", "reaction:task"), or None when it is not one.

    Bot posts are captured only by a person's reaction; trackloop's own posts never are.
    """
    if message.get("subtype") not in TASK_SUBTYPES or is_own_post(message):
        return None
    if not is_bot_message(message) and message.get("user") not in bots:
        _, prefix = _strip_prefix(message.get("text") or "", rules.prefixes)
        if prefix is not None:
            return f"prefix:{prefix}"
    for reaction in message.get("reactions") or []:
        if reaction.get("name") in rules.capture and reactors(message, {reaction["name"]}, bots):
            return f"reaction:{reaction['name']}"
    return None


def fingerprint(message: Mapping[str, Any]) -> str:
    """Changes whenever anything the task is built from changes (text, edit, reactions, thread)."""
    data = [
        message.get("text"), (message.get("edited") or {}).get("ts"), message.get("reactions"),
        message.get("latest_reply"), message.get("reply_count"), message.get("subtype"),
        [(f.get("id"), f.get("name"), f.get("title")) for f in message.get("files") or []
         if isinstance(f, dict)],
    ]
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def reactions_digest(message: Mapping[str, Any], bots: Container[str]) -> str:
    """A digest of the people's reactions (bots left out); "" when there are none."""
    pairs = sorted(
        (r["name"], u) for r in message.get("reactions") or [] for u in r.get("users") or [] if u not in bots
    )
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()[:12] if pairs else ""


def identity(user_id: str, users: Mapping[str, Mapping[str, Any]]) -> IdentityRef:
    user = users.get(user_id)
    email = ((user or {}).get("profile") or {}).get("email") or None
    return IdentityRef(IdentityKind.SLACK, user_id, display_name=user_name(user) or None, email=email)


def attachment_text(message: Mapping[str, Any]) -> str:
    """What a bot post without `text` says in its legacy attachments (alert bots often post so)."""
    for item in message.get("attachments") or []:
        if isinstance(item, dict):
            for name in ("title", "fallback", "pretext", "text"):
                if isinstance(item.get(name), str) and item[name].strip():
                    return item[name]
    return ""


def _zone(user: Mapping[str, Any] | None) -> ZoneInfo | None:
    tz = (user or {}).get("tz")
    if not isinstance(tz, str) or not tz:
        return None
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        return None


def _title(text: str, message: Mapping[str, Any]) -> str:
    for line in text.splitlines():
        line = line.strip()
        if line:
            return line if len(line) <= TITLE_MAX else line[: TITLE_MAX - 1] + "…"
    files = [f for f in message.get("files") or [] if isinstance(f, dict)]
    if files:
        return "File: " + str(files[0].get("title") or files[0].get("name") or "untitled")
    return "(no text)"


def message_to_task(
    channel: str,
    message: Mapping[str, Any],
    *,
    rules: CaptureRules,
    users: Mapping[str, Mapping[str, Any]],
    bots: Container[str] = (),
    thread: Sequence[Mapping[str, Any]] = (),
    url: str | None = None,
    reactions_at: datetime | None = None,
    done_at: datetime | None = None,
    captured: bool = True,
) -> TaskRecord:
    """A captured message (and its thread's replies) as a task.

    `users` maps user ids to `users.info` payloads; `bots` holds the user ids that are bots, whose
    replies, edits and reactions never count as activity. `reactions_at` dates the people's
    reactions and `done_at` the done reaction (Slack dates neither). `captured=False` builds the
    record of a message that was a task and no longer is (capture reaction or prefix removed): it
    comes out cancelled.
    """
    ts = message["ts"]
    created = ts_datetime(ts)
    text = message.get("text") or attachment_text(message)
    author = message.get("user") if not is_bot_message(message) else None
    names = {uid: user_name(u, uid) for uid, u in users.items()}
    body_text, prefix = _strip_prefix(render_text(text, names), rules.prefixes)
    title = _title(body_text, message)
    if prefix is not None:  # "TODO: rotate certs" -> "Rotate certs"
        title = title[:1].upper() + title[1:]

    claimed = reactors(message, rules.assign, bots)
    mentioned = [u for u in mentioned_users(text) if u not in bots]
    owners = claimed or mentioned[:1]
    owner = owners[0] if len(owners) == 1 else None
    finishers = reactors(message, rules.done, bots)

    human_times = [created] if author and author not in bots else []
    edited = message.get("edited") or {}
    if edited.get("ts") and edited.get("user") not in bots and not is_bot_message(message):
        human_times.append(ts_datetime(edited["ts"]))
    if reactions_at is not None:
        human_times.append(reactions_at)
    lines = []
    for reply in thread:
        if is_own_post(reply):
            continue  # trackloop's own nudges are not part of the task
        who = reply.get("user")
        who_name = names.get(who, who) if who else "bot"
        lines.append(f"{who_name}: {render_text(reply.get('text') or '', names)}")
        if who and who not in bots and not is_bot_message(reply):
            human_times.append(ts_datetime(reply["ts"]))
    body = render_text(text, names).strip()
    if lines:
        body += "\n\n" + "\n".join(lines)
    if len(body) > BODY_MAX:
        body = body[: BODY_MAX - 1] + "…"

    updated = max([created, *human_times, *(ts_datetime(r["ts"]) for r in thread)])
    if edited.get("ts"):
        updated = max(updated, ts_datetime(edited["ts"]))
    thread_root = message.get("thread_ts") or ts
    zone = _zone(users.get(author or ""))
    today = created.astimezone(zone).date() if zone else created.date()

    if not captured:
        status, raw = Status.CANCELLED, "no longer captured"
    elif finishers:
        status, raw = Status.DONE, "done"
    else:
        status, raw = Status.TODO, "open"
    done_at = done_at if status is Status.DONE else None
    return TaskRecord(
        external_id=f"{channel}:{ts}",
        title=title,
        body=body,
        status=status,
        raw_status=raw,
        url=url,
        scope=channel,
        assignees=tuple(identity(u, users) for u in owners),
        reporter=identity(author, users) if author else None,
        due=parse_due(body_text, today),
        created_at=created,
        updated_at=updated,
        closed_at=done_at,
        status_changed_at=done_at,
        last_activity_at=max(human_times) if human_times else None,
        verified=status is Status.DONE and any(u != owner for u in finishers),
        extra={
            "channel": channel,
            "ts": ts,
            "thread_ts": thread_root,
            "captured_by": capture_reason(message, rules, bots),
            "reply_count": int(message.get("reply_count") or 0) if thread_root == ts else 0,
            "done_by": finishers,
        },
    )


# -- digests -------------------------------------------------------------------------------------
def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _chunks(text: str, limit: int) -> list[str]:
    """Split at line breaks where possible, so no piece exceeds `limit` characters."""
    pieces, current = [], ""
    for line in text.split("\n"):
        while len(line) > limit:
            if current:
                pieces.append(current)
                current = ""
            pieces.append(line[:limit])
            line = line[limit:]
        candidate = f"{current}\n{line}" if current else line
        if len(candidate) > limit:
            pieces.append(current)
            current = line
        else:
            current = candidate
    if current or not pieces:
        pieces.append(current)
    return pieces


def _safe_text(obj: Any, limit: int) -> Any:
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        return obj
    text = obj["text"]
    if obj.get("type") == "mrkdwn":
        text = defuse_broadcasts(text)
    return {**obj, "text": _cut(text, limit)}


def fit_block(block: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One block made to respect Block Kit's limits: long sections split, headers cut, ids trimmed."""
    block = dict(block)
    if len(str(block.get("block_id", ""))) > MAX_BLOCK_ID:
        block.pop("block_id")
    kind = block.get("type")
    if kind == "header":
        return [{**block, "text": _safe_text(block.get("text"), MAX_HEADER_TEXT)}]
    if kind == "context":
        elements = [_safe_text(e, MAX_SECTION_TEXT) for e in block.get("elements") or []]
        if len(elements) <= MAX_CONTEXT_ELEMENTS:
            return [{**block, "elements": elements}]
        rest = {k: v for k, v in block.items() if k not in ("elements", "block_id")}
        return [
            {**(block if i == 0 else rest), "elements": elements[i : i + MAX_CONTEXT_ELEMENTS]}
            for i in range(0, len(elements), MAX_CONTEXT_ELEMENTS)
        ]
    if kind != "section":
        return [block]
    out: list[dict[str, Any]] = []
    text = block.get("text")
    if isinstance(text, dict) and isinstance(text.get("text"), str):
        body = defuse_broadcasts(text["text"]) if text.get("type") == "mrkdwn" else text["text"]
        pieces = _chunks(body, MAX_SECTION_TEXT)
        for i, piece in enumerate(pieces):
            part: dict[str, Any] = {"type": "section", "text": {**text, "text": piece or " "}}
            if i == 0:
                part.update({k: v for k, v in block.items() if k not in ("text", "fields", "type")})
            out.append(part)
    fields = [_safe_text(f, MAX_FIELD_TEXT) for f in block.get("fields") or []]
    for i in range(0, len(fields), MAX_SECTION_FIELDS):
        part = {"type": "section", "fields": fields[i : i + MAX_SECTION_FIELDS]}
        if not out:
            part.update({k: v for k, v in block.items() if k not in ("text", "fields", "type")})
        out.append(part)
    return out or [block]


def split_digest(blocks: Sequence[Mapping[str, Any]]) -> list[list[dict[str, Any]]]:
    """Blocks in messages of at most 50, each block within its limits; a header never ends a part."""
    fitted = [b for block in blocks for b in fit_block(block)]
    parts: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []
    for block in fitted:
        if len(current) == MAX_BLOCKS:
            carry = []
            if current[-1].get("type") == "header":  # a header belongs with what follows it
                carry.insert(0, current.pop())
                if current[-1].get("type") == "divider":
                    carry.insert(0, current.pop())
            parts.append(current)
            current = carry
        current.append(block)
    if current:
        parts.append(current)
    return parts


# -- the connector -------------------------------------------------------------------------------
class SlackError(ConnectorError):
    """An `ok: false` answer that is neither about credentials nor worth retrying."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


class _ChannelRead:
    """One channel's read in progress: the records and activities it produced, and its new state."""

    def __init__(
        self,
        connector: SlackConnector,
        channel: str,
        prev: SlackChannelState | None,
        now: datetime,
        *,
        force: bool,
    ) -> None:
        self.connector = connector
        self.channel = channel
        self.now = now
        self.force = force  # --full or changed rules: rebuild every captured message, changed or not
        self.threads_before = prev.threads if prev else {}
        self.seen_before = prev.seen if prev else {}
        self.top_before = prev.top if prev else None
        self.tasks: list[TaskRecord] = []
        self.activities: list[ActivityRecord] = []
        self.seen: dict[str, SlackSeen] = {}
        self.evaluated: set[str] = set()
        self.state: SlackChannelState = SlackChannelState(top="0.000000", floor="0.000000")
        self.complete = False

    def consider(self, message: dict[str, Any], thread: Sequence[dict[str, Any]] | None) -> None:
        """Emit a record for a captured (or formerly captured) message that changed since last time."""
        c = self.connector
        ts = message["ts"]
        self.evaluated.add(ts)
        before = self.seen_before.get(ts)
        fp = fingerprint(message)
        if before is not None and before.fp == fp and not self.force:
            self.seen[ts] = before
            return
        reason = capture_reason(message, c.rules, c._config_bots())
        if reason is not None:  # neither a bot user's prefix nor a bot's reaction counts: look them up
            people = [message.get("user") or "", *reactors(message, c.rules.capture)]
            reason = capture_reason(message, c.rules, c._bots_among([u for u in people if u]))
        if reason is None and (before is None or message.get("subtype") not in TASK_SUBTYPES):
            return  # not a task; a deleted one (tombstone) is cancelled by the next --full
        if thread is None and message.get("latest_reply") and message.get("thread_ts") == ts:
            thread = c._replies(self.channel, ts)  # the body holds the thread, even when it did not move
        thread = thread or ()
        ids = [message.get("user") or ""]
        ids += [u for r in message.get("reactions") or [] for u in r.get("users") or []]
        ids += mentioned_users(message.get("text") or "")
        ids += [r.get("user") or "" for r in thread]
        ids += [u for r in thread for u in mentioned_users(r.get("text") or "")]
        bots = c._bots_among([u for u in ids if u])
        rx = reactions_digest(message, bots)
        if before is not None:
            rx_at = before.rx_at if before.rx == rx else self.now
        elif rx and self._read_before(message):
            rx_at = self.now  # a message the last read saw uncaptured: its reactions are new since
        else:
            rx_at = None  # first sight: when the reactions were added is unknown, so they are not dated
        done = bool(reactors(message, c.rules.done, bots))
        if not done:
            done_at = None
        elif before is not None:
            done_at = before.done_at if before.done else self.now
        else:
            done_at = rx_at
        url = before.url if before is not None else None
        parent = message.get("thread_ts")
        if url is None and reason:
            url = c._permalink(self.channel, ts, reply=parent not in (None, ts))
        record = message_to_task(
            self.channel, message, rules=c.rules, users=c._known(), bots=bots, thread=thread, url=url,
            reactions_at=rx_at, done_at=done_at, captured=reason is not None,
        )
        self.tasks.append(record)
        if reason is not None:
            self.seen[ts] = SlackSeen(fp=fp, rx=rx, rx_at=rx_at, done=done, done_at=done_at, url=url,
                                      thread=parent if parent not in (None, ts) else None)
        if before is None:
            return
        target = TaskRef(record.external_id)
        if rx != before.rx and rx_at is not None:
            self.activities.append(ActivityRecord(target, rx_at, None, "reaction"))
        edited = message.get("edited") or {}
        author = message.get("user")
        if edited.get("ts") and author and author not in bots and not is_bot_message(message):
            self.activities.append(
                ActivityRecord(target, ts_datetime(edited["ts"]), identity(author, c._known()), "edit")
            )

    def consider_replies(self, thread: Sequence[dict[str, Any]], window_start: int, moved: bool) -> None:
        """All replies of a thread that moved; of one re-read for its captured replies, those in the window."""
        for reply in thread:
            if moved or ts_key(reply["ts"]) >= window_start:  # older ones stay frozen as last seen
                self.consider(reply, ())

    def _read_before(self, message: Mapping[str, Any]) -> bool:
        """Whether the previous read listed this message (Slack's own timestamps decide, not our clock)."""
        ts, parent = message["ts"], message.get("thread_ts")
        if parent and parent != ts:
            latest = self.threads_before.get(parent)
            return latest is not None and ts_key(ts) <= ts_key(latest)
        return self.top_before is not None and ts_key(ts) <= ts_key(self.top_before)

    def thread_activity(self, parent: dict[str, Any], thread: Sequence[dict[str, Any]]) -> None:
        """Replies newer than the thread's last known reply are activity on the captured parent."""
        if parent["ts"] not in self.seen:
            return
        c = self.connector
        latest_before = self.threads_before.get(parent["ts"])
        target = TaskRef(f"{self.channel}:{parent['ts']}")
        for reply in thread:
            if latest_before is not None and ts_key(reply["ts"]) <= ts_key(latest_before):
                continue
            who = reply.get("user")
            if not who or is_bot_message(reply) or c._is_bot(who):
                continue
            self.activities.append(
                ActivityRecord(target, ts_datetime(reply["ts"]), identity(who, c._known()), "reply")
            )


class SlackConnector(Connector[SlackConfig, SlackCursor]):
    kind = "slack"
    config_model = SlackConfig
    cursor_model = SlackCursor

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rules = CaptureRules.from_config(self.config)
        self._client: WebClient | None = None
        self._users: dict[str, dict[str, Any] | None] = {}
        self._names: dict[str, str] = {}
        self._link_bases: dict[str, str] = {}  # channel -> "https://…/archives/CHANNEL", from a permalink
        self._paced: deque[datetime] = deque()
        self._method = ""

    # -- plumbing ------------------------------------------------------------------------------
    @property
    def client(self) -> WebClient:
        if self._client is None:
            sdk_log = self.log.getChild("sdk")
            if not self.log.isEnabledFor(logging.DEBUG):  # it logs as errors what we translate and retry
                sdk_log.setLevel(logging.CRITICAL)
            self._client = WebClient(
                token=self.config.token.get_secret_value(),
                base_url=self.config.base_url,
                timeout=int(self.config.timeout.total_seconds()),
                retry_handlers=[],  # the base's tenacity policy is the only retry layer
                logger=sdk_log,
            )
        return self._client

    @contextmanager
    def translate_errors(self) -> Iterator[None]:
        try:
            yield
        except SlackApiError as exc:
            raise self._translate_api_error(exc) from exc
        except (http.client.HTTPException, OSError) as exc:  # refused, reset, timed out, DNS
            reason = getattr(exc, "reason", None) or exc.__class__.__name__
            raise TransientError(f"slack {self.name}: {self._method} failed: {reason}") from exc

    def _translate_api_error(self, exc: SlackApiError) -> ConnectorError:
        response = exc.response
        status = getattr(response, "status_code", 200)
        data = response.data if isinstance(getattr(response, "data", None), dict) else {}
        code = str(data.get("error") or "")
        where = f"slack {self.name}: {self._method}"
        headers = {k.lower(): v for k, v in (getattr(response, "headers", None) or {}).items()}
        raw = headers.get("retry-after")
        hint = parse_retry_after(raw[0] if isinstance(raw, list) else raw, self.now())
        if status == 429 or code == "ratelimited":
            wait = 1.0 if hint is None else hint
            if wait > self.config.retry.max_wait.total_seconds():
                return RateLimited(
                    f"{where} is rate limited for {wait:.0f}s", reset_at=self.now() + timedelta(seconds=wait),
                    retry_after=wait,
                )
            return TransientError(f"{where} is rate limited (retry after {wait:.0f}s)", retry_after=wait)
        if status in (401, 403) or code in AUTH_ERRORS:
            reason = code or f"HTTP {status}"
            return AuthError(f"slack connector {self.name!r}: token refused ({reason}); check `token`")
        if code == "missing_scope":
            needed = data.get("needed") or "?"
            return AuthError(
                f"slack connector {self.name!r}: the token lacks the {needed} scope ({self._method})"
            )
        if status >= 500 or code in TRANSIENT_ERRORS:
            reason = f"HTTP {status}" if status >= 500 else code
            return TransientError(f"{where} failed: {reason}", retry_after=hint)
        if code.startswith("Received a response in a non-JSON format"):
            return PayloadError(f"{where}: unreadable answer (HTTP {status})")
        if status != 200:
            return SlackError(f"{where}: HTTP {status} (is base_url {self.config.base_url} right?)",
                              code=code)
        advice = {"not_in_channel": " (invite the bot to the channel)",
                  "channel_not_found": " (check `channels`)"}
        return SlackError(f"{where} failed: {code}{advice.get(code, '')}", code=code)

    def _request(self, method: str, kwargs: dict[str, Any]) -> Any:
        self._method = method
        if method in ("conversations.history", "conversations.replies"):
            self._pace()
        self.stats.requests += 1
        return self.client.api_call(method, params=kwargs)

    def _read(self, method: str, **kwargs: Any) -> Any:
        """A read: translated, retried on transient faults, counted, paced for Tier 3 methods."""
        return self.call(self._request, method, kwargs)

    def _write(self, method: str, **kwargs: Any) -> Any:
        """A write: exactly once (the outbox retries), translated and counted."""
        self._method = method
        self.stats.requests += 1
        return self.once(self.client.api_call, method, json=kwargs)

    def _pace(self) -> None:
        """Keep history/replies calls within `history_calls_per_minute` over any 60 seconds."""
        window = timedelta(minutes=1)
        now = self.now()
        while self._paced and now - self._paced[0] >= window:
            self._paced.popleft()
        if len(self._paced) >= self.config.history_calls_per_minute:
            wait = (self._paced[0] + window - now).total_seconds()
            self.log.debug("%s: pacing Tier 3 calls, waiting %.1fs", self.name, wait)
            self._sleep(wait)
            now = max(self.now(), self._paced.popleft() + window)
        self._paced.append(now)

    # -- people --------------------------------------------------------------------------------
    def _user(self, user_id: str) -> dict[str, Any] | None:
        """users.info, once per user per sync; an unknown user is None."""
        if user_id not in self._users:
            try:
                self._users[user_id] = self._read("users.info", user=user_id)["user"]
            except SlackError as exc:
                if exc.code not in ("user_not_found", "users_not_found", "user_not_visible"):
                    raise
                self._users[user_id] = None
        return self._users[user_id]

    def _is_bot(self, user_id: str) -> bool:
        if user_id in self.config.bots or user_id == "USLACKBOT":
            return True
        user = self._user(user_id)
        return bool(user and (user.get("is_bot") or user.get("name") in self.config.bots))

    def _bots_among(self, ids: Sequence[str]) -> set[str]:
        return {u for u in dict.fromkeys(ids) if self._is_bot(u)}

    # -- check ---------------------------------------------------------------------------------
    def check(self) -> CheckResult:
        try:
            auth = self.once(self._request, "auth.test", {})  # one try: doctor reports, it does not wait
        except ConnectorError as exc:
            return CheckResult(False, str(exc))
        return CheckResult(
            True,
            f"authenticated as @{auth.get('user')} in {auth.get('team')} ({auth.get('team_id')}); "
            f"{len(self.config.channels)} channel(s) configured",
        )

    # -- pull ----------------------------------------------------------------------------------
    def pull(self, state: SyncState[SlackCursor]) -> Iterator[Page[SlackCursor]]:
        self._users.clear()
        cursor = state.cursor or SlackCursor()
        rules = self.rules.digest()
        rules_changed = state.cursor is not None and cursor.rules != rules
        # Pages keep the old rules digest until every channel was re-read under the new rules.
        page_rules = cursor.rules if rules_changed else rules
        names = dict(cursor.names)
        channels = dict(cursor.channels)
        failures: list[str] = []
        for spec in self.config.channels:
            channel_id = self._channel_id(spec, names)
            if channel_id is None:
                failures.append(f"{spec}: no such channel, or the bot cannot see it")
                continue
            try:
                run = self._read_channel(channel_id, channels.get(channel_id), state.full, rules_changed)
            except SlackError as exc:
                if exc.code not in ("not_in_channel", "channel_not_found", "is_archived"):
                    raise
                if exc.code == "channel_not_found":
                    names.pop(spec, None)  # resolve the name afresh next time
                failures.append(f"{spec}: {exc.code}")
                continue
            before = SlackCursor(rules=page_rules, names=names, channels=dict(channels))
            channels[channel_id] = run.state
            after = SlackCursor(rules=page_rules, names=names, channels=dict(channels))
            chunks = [run.tasks[i : i + PAGE_RECORDS] for i in range(0, len(run.tasks), PAGE_RECORDS)] or [[]]
            for i, chunk in enumerate(chunks):
                last = i == len(chunks) - 1
                yield Page(
                    tasks=chunk,
                    cursor=after if last else before,
                    activities=run.activities if last else (),
                    completed_scopes=[channel_id] if last and run.complete else (),
                )
        if failures:
            raise SlackError(f"slack {self.name}: cannot read " + "; ".join(failures), code="channels")
        if page_rules != rules:
            yield Page(cursor=SlackCursor(rules=rules, names=names, channels=channels))

    def _channel_id(self, spec: str, names: dict[str, str]) -> str | None:
        if not spec.startswith("#"):
            return spec
        if spec not in names:
            if not self._names:
                self._load_channel_names()
            if spec[1:] in self._names:
                names[spec] = self._names[spec[1:]]
        return names.get(spec)

    def _load_channel_names(self) -> None:
        """conversations.list once: every channel the bot can see, by name."""
        cursor = None
        while True:
            kwargs: dict[str, Any] = {"types": "public_channel,private_channel", "exclude_archived": True,
                                      "limit": 1000}
            if cursor:
                kwargs["cursor"] = cursor
            page = self._read("conversations.list", **kwargs)
            for channel in page.get("channels") or []:
                if isinstance(channel, dict) and channel.get("name") and channel.get("id"):
                    self._names[channel["name"]] = channel["id"]
            cursor = (page.get("response_metadata") or {}).get("next_cursor")
            if not cursor:
                return

    def _paged(self, method: str, key: str, **kwargs: Any) -> Iterator[Any]:
        """Every item of a cursor-paged listing, in the order Slack sends them; a page is read when needed."""
        cursor = None
        while True:
            page = self._read(method, **kwargs, **({"cursor": cursor} if cursor else {}))
            items = page.get(key)
            if not isinstance(items, list):
                raise PayloadError(f"slack {self.name}: {method} {kwargs.get('channel')}: no {key} list")
            yield from items
            cursor = (page.get("response_metadata") or {}).get("next_cursor")
            if not page.get("has_more") or not cursor:
                return

    def _history(self, channel: str, oldest: str) -> list[dict[str, Any]]:
        """Every top-level message since `oldest` (inclusive), oldest first."""
        kwargs: dict[str, Any] = {"channel": channel, "limit": self.config.page_size, "inclusive": True,
                                  "include_all_metadata": True, "oldest": oldest}
        return self._readable(channel, reversed(list(self._paged("conversations.history", "messages", **kwargs))))

    def _replies(self, channel: str, ts: str) -> list[dict[str, Any]]:
        """A thread's replies (the parent left out), oldest first; [] when the thread is gone."""
        try:
            found = list(self._paged("conversations.replies", "messages", channel=channel, ts=ts, limit=1000,
                                     include_all_metadata=True))
        except SlackError as exc:
            if exc.code == "thread_not_found":
                return []
            raise
        return [m for m in self._readable(channel, found) if m["ts"] != ts]

    def _readable(self, channel: str, messages: Any) -> list[dict[str, Any]]:
        out = []
        for message in messages:
            reason = malformed(message)
            if reason is not None:
                ts = message.get("ts") if isinstance(message, dict) else None
                self.log.warning("%s: skipped an unreadable message %s:%s (%s)",
                                 self.name, channel, ts, reason)
                continue
            out.append(message)
        return out

    def _read_channel(
        self, channel: str, prev: SlackChannelState | None, full: bool, rules_changed: bool
    ) -> _ChannelRead:
        now = self.now()
        window_start = ts_key(datetime_ts(now - self.config.lookback))
        if prev is None:  # the first read (a --full one too) covers the backfill window
            oldest = datetime_ts(now - self.config.backfill)
        elif full:  # from where the first read started: all this store can hold of the channel
            oldest = prev.floor
        else:  # the window, or from the newest message read if the last sync is older than that
            oldest = min(prev.top, datetime_ts(now - self.config.lookback), key=ts_key)
        floor = oldest if prev is None else min(prev.floor, oldest, key=ts_key)
        read = _ChannelRead(self, channel, prev, now, force=full or rules_changed)
        read.complete = full and prev is not None  # only then can tasks missing from it be cancelled
        top = prev.top if prev else oldest
        threads: dict[str, str] = {}
        # Threads holding captured replies inside the window are re-read every sync: a reaction or an
        # edit on a reply does not move the thread's latest_reply.
        held = {e.thread for ts, e in read.seen_before.items() if e.thread and ts_key(ts) >= window_start}
        for message in self._history(channel, oldest):
            ts = message["ts"]
            if message.get("thread_ts") not in (None, ts):
                continue  # a reply also sent to the channel: it is handled with its thread
            if ts_key(ts) > ts_key(top):
                top = ts
            if prev is not None and not full and ts_key(ts) < window_start and ts_key(ts) <= ts_key(prev.top):
                continue  # read before and now older than the window (a quiet channel's newest): frozen
            latest = message.get("latest_reply")
            thread = None
            moved = False
            if latest and message.get("thread_ts") == ts:
                if ts_key(ts) >= window_start:
                    threads[ts] = latest
                moved = full or rules_changed or read.threads_before.get(ts) != latest
                if moved or ts in held:
                    thread = self._replies(channel, ts)
            read.consider(message, thread)
            read.consider_replies(thread or (), window_start, moved)
            if thread:
                read.thread_activity(message, thread)
        for parent in sorted(held - read.evaluated, key=ts_key):  # its parent is older than what history read
            read.consider_replies(self._replies(channel, parent), window_start, full)
        # captured replies in threads that did not move keep their entry
        seen = {ts: e for ts, e in read.seen_before.items() if ts not in read.evaluated}
        seen.update(read.seen)
        seen = {ts: e for ts, e in seen.items() if ts_key(ts) >= window_start}
        read.state = SlackChannelState(top=top, floor=floor, threads=threads, seen=seen)
        return read

    def _config_bots(self) -> set[str]:
        return set(self.config.bots) | {"USLACKBOT"}

    def _known(self) -> dict[str, dict[str, Any]]:
        return {uid: user for uid, user in self._users.items() if user is not None}

    def _permalink(self, channel: str, ts: str, *, reply: bool) -> str | None:
        """The message's link, from chat.getPermalink.

        A top-level message's link is `…/archives/CHANNEL/p` + its ts without the dot. Once the
        server's own answer for a channel shows that form, the channel's other top-level messages
        are linked the same way instead of costing a call each (hundreds on a first sync);
        replies, whose links carry the thread, and servers answering otherwise are always asked.
        """
        stamp = "/p" + ts.replace(".", "")
        base = self._link_bases.get(channel)
        if base is not None and not reply:
            return base + stamp
        try:
            link = self._read("chat.getPermalink", channel=channel, message_ts=ts).get("permalink")
        except SlackError as exc:
            self.log.warning("%s: no permalink for %s:%s (%s)", self.name, channel, ts, exc.code)
            return None
        if isinstance(link, str) and not reply and link.endswith(f"/archives/{channel}{stamp}"):
            self._link_bases[channel] = link.removesuffix(stamp)
        return link

    # -- push ----------------------------------------------------------------------------------
    def push(self, action: Action) -> PushResult:
        """Deliver `dm`, `channel`, `reply` or `digest` once per `action.key`.

        Failures become PushError: `permanent=False` when a retry may help (rate limit, outage).
        """
        if action.kind not in ("dm", "channel", "reply", "digest"):
            raise PushError(f"slack {self.name}: cannot deliver {action.kind!r}", permanent=True)
        try:
            return self._push(action)
        except PushError:
            raise
        except TransientError as exc:
            raise PushError(str(exc), permanent=False) from exc
        except ConnectorError as exc:
            raise PushError(str(exc), permanent=True) from exc

    def _push(self, action: Action) -> PushResult:
        conversation, thread_ts = self._push_target(action)
        if action.kind == "digest":
            blocks = action.payload.get("blocks")
            if not isinstance(blocks, list) or not blocks:
                raise PushError(f"slack {self.name}: digest {action.key} has no blocks", permanent=True)
            parts = split_digest(blocks)
            fallback = _cut(escape_mrkdwn(action.text), 2900)
            messages: list[tuple[str, list[dict[str, Any]] | None]] = [
                (fallback if len(parts) == 1 else f"{fallback} ({i}/{len(parts)})", part)
                for i, part in enumerate(parts, 1)
            ]
        else:
            text = escape_mrkdwn(action.text)
            link = _link(action.task_url)
            if link and action.task_url not in action.text:
                text += f"\n{link}"
            messages = [(_cut(text, TEXT_MAX), None)]

        delivered = self._delivered(conversation, thread_ts, action.key, len(messages))
        posted: dict[int, str] = dict(delivered)
        for number, (text, blocks) in enumerate(messages, 1):
            if number in posted:
                continue
            kwargs: dict[str, Any] = {
                "channel": conversation, "text": text, "unfurl_links": False, "unfurl_media": False,
                "metadata": {"event_type": EVENT_TYPE, "event_payload": {
                    "key": action.key, "kind": action.kind, "part": number, "parts": len(messages)}},
            }
            if blocks is not None:
                kwargs["blocks"] = blocks
            if thread_ts:
                kwargs["thread_ts"] = thread_ts
            posted[number] = self._write("chat.postMessage", **kwargs)["ts"]
        first = posted[min(posted)]
        already = all(n in delivered for n in range(1, len(messages) + 1))
        return PushResult(f"{conversation}:{first}", already_delivered=already)

    def _push_target(self, action: Action) -> tuple[str, str | None]:
        """The conversation id to post in (and search), and the thread, if any."""
        if action.kind == "reply":
            ref = action.task_external_id or ""
            channel, _, ts = ref.partition(":")
            if not _CHANNEL_ID.fullmatch(channel) or not _TS.fullmatch(ts):
                raise PushError(f'slack {self.name}: reply needs a task id "CHANNEL:TS", got {ref!r}',
                                permanent=True)
            thread = action.task_extra.get("thread_ts") if action.task_extra else None
            return channel, str(thread) if thread and _TS.fullmatch(str(thread)) else ts
        target = (action.target or "").strip()
        if action.kind == "dm" or (action.kind == "digest" and _USER_ID.fullmatch(target)):
            if not _USER_ID.fullmatch(target):
                raise PushError(f'slack {self.name}: a DM needs a user id like "U0123ABCD", got {target!r}',
                                permanent=True)
            opened = self._read("conversations.open", users=target)
            return opened["channel"]["id"], None
        if _CHANNEL_ID.fullmatch(target):
            return target, None
        if target.startswith("#"):
            if not self._names:
                self._load_channel_names()
            if target[1:] in self._names:
                return self._names[target[1:]], None
        raise PushError(f'slack {self.name}: expected a channel id or "#name", got {target!r}',
                        permanent=True)

    def _delivered(self, conversation: str, thread_ts: str | None, key: str, parts: int) -> dict[int, str]:
        """Parts of `key` already posted there (part number -> ts), from trackloop's message metadata.

        A conversation is searched newest first, `push_lookback` back: a retry (the outbox's, or
        `outbox retry` by hand) comes after the attempt it repeats, and the search stops once every
        part is found.
        """
        if thread_ts:
            messages = self._paged("conversations.replies", "messages", channel=conversation, ts=thread_ts,
                                   limit=1000, include_all_metadata=True)
        else:
            messages = self._paged("conversations.history", "messages", channel=conversation,
                                   limit=self.config.push_search, include_all_metadata=True,
                                   oldest=datetime_ts(self.now() - self.config.push_lookback))
        found: dict[int, str] = {}
        for message in messages:
            if not isinstance(message, dict) or not message.get("bot_id") or not is_own_post(message):
                continue
            payload = message["metadata"].get("event_payload") or {}
            if payload.get("key") == key:
                found[int(payload.get("part") or 1)] = str(message.get("ts"))
                if found.keys() >= set(range(1, parts + 1)):
                    break
        return found


def _link(url: str | None) -> str | None:
    """A mrkdwn link to the task; characters that would end the link are percent-encoded."""
    safe = safe_url(url)
    return f"<{safe}|Open the task>" if safe else None


__all__ = [
    "EVENT_TYPE",
    "CaptureRules",
    "SlackConfig",
    "SlackConnector",
    "SlackCursor",
    "SlackError",
    "capture_reason",
    "defuse_broadcasts",
    "escape_mrkdwn",
    "fit_block",
    "malformed",
    "message_to_task",
    "parse_due",
    "render_text",
    "split_digest",
]
