"""The `jira` connector: issues from Jira Cloud or Jira Server/Data Center, comments pushed back.

Built on the `jira` library (pycontribs), unchanged. The client is constructed with
`max_retries=0`, so the library's own ResilientSession never sleeps or retries; every read goes
through the base's single retry layer (`call()`), every write through `once()`.

Deployment. Jira Cloud and Server/DC differ in search endpoint, rich-text format and identity:

    Cloud       REST v3, `GET /rest/api/3/search/jql` paged by `nextPageToken`, ADF rich text,
                people by `accountId`; the library only knows it is on Cloud after its
                `serverInfo` handshake, so that handshake happens on every run.
    Server/DC   REST v2, `GET /rest/api/2/search` paged by `startAt`, wiki-markup rich text,
                people by `name`; the client is built without the handshake (the library
                assumes Server then).

`deployment = "auto"` asks `serverInfo` once (v3 first: it exists only on Cloud) and stores the
answer in the cursor; `--full` asks again. Pushes get the stored answer through `restore()`.

Incremental pull. Each run searches `(<configured JQL>) AND updated >= <epoch ms> ORDER BY updated
ASC, key ASC`. Epoch milliseconds avoid the searching account's time zone; the bound is the newest
`updated` already committed, stepped back by `overlap` (default 2 minutes, Cloud search is
eventually consistent) and floored to the minute, so a run of issues sharing an `updated` minute
is always re-read as a whole and upserts drop the repeats. The cursor saved with each page is the
newest `updated` of the pages committed so far, so it never moves past an issue not yet committed:
an issue edited during the run (listed out of order) does not move it, and if the listing shifts
under the pager (an issue already listed is edited or deleted mid-run, which moves `startAt`
offsets), the cursor is held back to where the shift could have started.

A listing with no time bound (the first run, a changed JQL, or `--full`) is complete: its last
page vouches for every project it saw or that earlier listings saw, and the engine marks the
tasks of those projects that it did not return (deleted, moved out of scope) as `cancelled`.
A project with an unreadable issue is not vouched for, and a listing that shifted under the
pager (the signs above) vouches for nothing: absence there may be an offset's skip.

Activity. The search also asks for each issue's `comment` field (a larger reply, no extra
request), so an update that is a comment by a bot (a Cloud app account, an account in `bots`, the
connector's own account, or any comment ending in a trackloop marker) does not count as activity.

Push. `comment` actions add a comment whose last line is a small monospace marker,
`trackloop:<action key>`; before posting, the issue's comments are scanned for that marker in a
comment by the bot's own account, so a retry after a lost reply finds the first post instead of
posting twice.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

import requests
from dateutil import parser as dateparser
from jira import JIRA, JIRAError
from pydantic import Field, SecretStr, field_validator, model_validator

from connectors.base import (
    CommentTrail,
    Connector,
    ConnectorConfig,
    bot_names,
    comment_trail,
    human_activity,
    parse_retry_after,
)
from connectors.errors import (
    AuthError,
    ConnectorError,
    PayloadError,
    PushError,
    TransientError,
)
from store.canonical import (
    Action,
    CheckResult,
    Cursor,
    IdentityKind,
    IdentityRef,
    LinkKind,
    LinkRecord,
    Page,
    Priority,
    PushResult,
    Status,
    SyncState,
    TaskRecord,
    TaskRef,
)
from store.durations import Duration

Deployment = Literal["cloud", "server"]

# Page maxima: Cloud /search/jql pages at 100 issues once fields beyond the id are requested;
# Server/DC /search at `jira.search.views.default.max`, 1000 by default.
CLOUD_PAGE_MAX = 100
SERVER_PAGE_MAX = 1000
COMMENT_PAGE = 100

# Only the fields the mapping reads. `timeoriginalestimate`/`timeestimate`/`timespent` rather than
# `timetracking`, which search results do not reliably carry; `comment` tells whether a bot's
# comment was the latest change (no request per issue).
SEARCH_FIELDS: tuple[str, ...] = (
    "summary", "description", "status", "statuscategorychangedate", "resolution", "resolutiondate",
    "issuetype", "assignee", "reporter", "priority", "duedate", "labels", "parent", "subtasks",
    "issuelinks", "timeoriginalestimate", "timeestimate", "timespent", "created", "updated", "comment",
)  # fmt: skip

CATEGORY_STATUS: dict[str, Status] = {
    "new": Status.TODO,
    "indeterminate": Status.IN_PROGRESS,
    "done": Status.DONE,
}
# Jira's default priority schemes: today's five levels and the older Blocker..Trivial one.
DEFAULT_PRIORITY_MAP: dict[str, Priority] = {
    "highest": Priority.HIGH, "high": Priority.HIGH, "blocker": Priority.HIGH, "critical": Priority.HIGH,
    "medium": Priority.MEDIUM, "major": Priority.MEDIUM,
    "low": Priority.LOW, "lowest": Priority.LOW, "minor": Priority.LOW, "trivial": Priority.LOW,
}  # fmt: skip

_ISSUE_KEY = re.compile(r"(?P<project>[A-Z][A-Z0-9_]*)-(?P<number>[1-9][0-9]*)")
_ORDER_BY = re.compile(r"\border\s+by\b", re.IGNORECASE)
_QUOTED = re.compile(r""""(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'""")
_MARKER_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@#=-]{0,199}")
MARKER_PREFIX = "trackloop:"


# -- config and cursor ----------------------------------------------------------------------------


class JiraConfig(ConnectorConfig):
    url: str = Field(
        description='Site base URL, e.g. "https://acme.atlassian.net" or "https://jira.acme.io".'
    )
    auth: Literal["basic", "bearer"] = Field(
        "basic",
        description='"basic": email (Cloud) or username (Server/DC) plus an API token or password; '
        '"bearer": a Server/DC personal access token.',
    )
    email: str | None = Field(
        None, description='Account email (Cloud) or username (Server/DC) for auth = "basic".'
    )
    token: SecretStr = Field(description="API token (Cloud), personal access token or password (Server/DC).")
    jql: str = Field(
        description='The scope, e.g. "project in (OPS, MIG)"; trackloop adds the time bound and the '
        "ordering, so leave out ORDER BY."
    )
    deployment: Literal["auto", "cloud", "server"] = Field(
        "auto",
        description='"cloud", "server" (Server/Data Center), or "auto": ask serverInfo once and remember.',
    )
    status_map: dict[str, Status] = Field(
        default_factory=dict,
        description="Status name -> canonical status, overriding the status category "
        '(new -> todo, indeterminate -> in_progress, done -> done), e.g. {"Blocked" = "blocked"}.',
    )
    priority_map: dict[str, Priority] = Field(
        default_factory=dict,
        description="Priority name -> high/medium/low/none, on top of the defaults "
        "(Highest/High/Blocker/Critical -> high, Medium/Major -> medium, Low/Lowest/Minor/Trivial -> low).",
    )
    acceptance_field: str | None = Field(
        None, description='Custom field holding acceptance criteria, e.g. "customfield_10042".'
    )
    acceptance_heading: str = Field(
        "Acceptance criteria",
        description="Heading of the description section read as acceptance criteria when the field is empty.",
    )
    verified_statuses: list[str] = Field(
        default_factory=lambda: ["Verified"],
        description="Status names that mean the work was verified (the task counts as verified).",
    )
    overlap: Duration = Field(
        timedelta(minutes=2),
        description="How far each incremental search steps back before the newest change already seen.",
    )
    page_size: int | None = Field(
        None, ge=1, le=SERVER_PAGE_MAX,
        description="Issues per search page; default and cap: 100 on Cloud, 1000 on Server/DC.",
    )  # fmt: skip
    timeout: Duration = Field(timedelta(seconds=30), description="HTTP connect/read timeout per request.")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        value = value.strip()
        if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", value):
            raise ValueError(f'expected a URL like "https://acme.atlassian.net", got {value!r}')
        return value.rstrip("/")

    @field_validator("jql")
    @classmethod
    def _jql(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError('expected a JQL restriction like "project in (OPS, MIG)", got an empty string')
        if _ORDER_BY.search(_QUOTED.sub('""', value)):
            raise ValueError(
                f'remove ORDER BY: trackloop orders by "updated ASC, key ASC" itself, got {value!r}'
            )
        return value

    @field_validator("acceptance_field")
    @classmethod
    def _custom_field(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"customfield_\d+", value):
            raise ValueError(f'expected a custom field id like "customfield_10042", got {value!r}')
        return value

    @field_validator("overlap")
    @classmethod
    def _overlap(cls, value: timedelta) -> timedelta:
        if not timedelta(0) <= value <= timedelta(days=1):
            raise ValueError(f'expected an overlap between "0s" and "1d", got {value}')
        return value

    @model_validator(mode="after")
    def _consistent(self) -> JiraConfig:
        if self.auth == "basic" and not (self.email or "").strip():
            raise ValueError('auth = "basic" needs email (Cloud: the account email; Server/DC: the username)')
        if self.auth == "bearer" and self.deployment == "cloud":
            raise ValueError(
                'auth = "bearer" is for Server/Data Center personal access tokens; '
                'Jira Cloud needs auth = "basic" with email and an API token'
            )
        lowered = {k.strip().lower(): v for k, v in self.status_map.items()}
        object.__setattr__(self, "status_map", lowered)
        object.__setattr__(self, "priority_map", {k.strip().lower(): v for k, v in self.priority_map.items()})
        return self


class JiraCursor(Cursor):
    version: int = 1
    deployment: Deployment
    scope: str  # digest of the JQL this cursor belongs to; another JQL starts a complete listing
    updated_ms: int | None = None  # newest `updated` committed (epoch ms); None: nothing listed yet
    projects: tuple[str, ...] = ()  # projects listed so far, so a complete listing can vouch for them


def jql_digest(jql: str) -> str:
    return hashlib.sha256(" ".join(jql.split()).encode()).hexdigest()[:16]


def search_jql(jql: str, since_ms: int | None) -> str:
    """The configured JQL in parentheses (an OR in it cannot escape the bound), bound and ordered."""
    bound = f" AND updated >= {since_ms}" if since_ms is not None else ""
    return f"({jql}){bound} ORDER BY updated ASC, key ASC"


def floor_minute(ms: int) -> int:
    return ms - ms % 60_000


# -- Atlassian Document Format -> plain text ------------------------------------------------------

_INLINE = frozenset(
    {"text", "hardBreak", "mention", "emoji", "inlineCard", "date", "status", "placeholder", "mediaInline"}
)


def adf_to_text(node: Any) -> str:
    """Plain text of an ADF document or node: paragraphs and headings as blocks, lists as `-`/`1.`
    items, code blocks verbatim, mentions and links by their text. Unknown nodes render their
    children (or nothing); malformed parts are skipped, never raised."""
    return _collapse(_block(node))


def _collapse(text: str) -> str:
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _children(node: Mapping[str, Any]) -> list[Any]:
    content = node.get("content")
    return [child for child in content if isinstance(child, Mapping)] if isinstance(content, list) else []


def _attrs(node: Mapping[str, Any]) -> Mapping[str, Any]:
    attrs = node.get("attrs")
    return attrs if isinstance(attrs, Mapping) else {}


def _inline(nodes: Iterable[Mapping[str, Any]]) -> str:
    out = []
    for node in nodes:
        kind, attrs = node.get("type"), _attrs(node)
        if kind == "text":
            text = str(node.get("text") or "")
            marks = node.get("marks") if isinstance(node.get("marks"), list) else []
            href = next(
                (_attrs(m).get("href") for m in marks if isinstance(m, Mapping) and m.get("type") == "link"),
                None,
            )
            out.append(f"{text} ({href})" if href and href != text else text)
        elif kind == "hardBreak":
            out.append("\n")
        elif kind == "mention":
            text = str(attrs.get("text") or "")
            out.append(text if text.startswith("@") or not text else f"@{text}")
        elif kind == "emoji":
            out.append(str(attrs.get("text") or attrs.get("shortName") or ""))
        elif kind == "inlineCard":
            out.append(str(attrs.get("url") or ""))
        elif kind == "date":
            out.append(_adf_date(attrs.get("timestamp")))
        elif kind == "status":
            out.append(str(attrs.get("text") or ""))
        elif kind in _INLINE:
            continue  # placeholders, inline media: nothing to read
        else:
            out.append(_block(node))
    return "".join(out)


def _adf_date(value: Any) -> str:
    try:
        return datetime.fromtimestamp(int(value) / 1000, UTC).date().isoformat()
    except (TypeError, ValueError, OverflowError, OSError):
        return ""


def _indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line if line else line for line in text.split("\n"))


def _list_item(item: Mapping[str, Any], bullet: str) -> str:
    parts = [_block(child) for child in _children(item)]
    parts = [p for p in parts if p]
    if not parts:
        return bullet.rstrip()
    head = _indent(parts[0], " " * len(bullet))[len(bullet) :]
    rest = [_indent(p, " " * len(bullet)) for p in parts[1:]]
    return "\n".join([bullet + head, *rest])


def _block(node: Any) -> str:
    if not isinstance(node, Mapping):
        return ""
    kind, attrs, children = node.get("type"), _attrs(node), _children(node)
    if kind in _INLINE:
        return _inline([node])
    if kind in ("paragraph", "heading"):
        return _inline(children)
    if kind == "bulletList":
        return "\n".join(_list_item(item, "- ") for item in children)
    if kind == "orderedList":
        try:
            start = int(attrs.get("order", 1))
        except (TypeError, ValueError):
            start = 1
        return "\n".join(_list_item(item, f"{start + n}. ") for n, item in enumerate(children))
    if kind == "taskList":
        return "\n".join(
            _list_item(item, "[x] " if _attrs(item).get("state") == "DONE" else "[ ] ") for item in children
        )
    if kind == "decisionList":
        return "\n".join(_list_item(item, "- ") for item in children)
    if kind in ("listItem", "taskItem", "decisionItem"):
        return _inline(children) if all(c.get("type") in _INLINE for c in children) else _blocks(children)
    if kind == "codeBlock":
        return "".join(str(c.get("text") or "") for c in children if c.get("type") == "text")
    if kind == "blockquote":
        return _indent(_blocks(children), "> ")
    if kind == "rule":
        return "---"
    if kind == "table":
        rows = []
        for row in children:
            cells = [_blocks(_children(cell)).replace("\n", " ") for cell in _children(row)]
            rows.append(" | ".join(cells))
        return "\n".join(rows)
    if kind in ("expand", "nestedExpand"):
        title = str(attrs.get("title") or "")
        return "\n\n".join(x for x in (title, _blocks(children)) if x)
    if kind in ("mediaSingle", "mediaGroup", "media", "extension"):
        return ""
    if children:  # doc, panel, layouts, and node types this renderer has never heard of
        if all(c.get("type") in _INLINE for c in children):
            return _inline(children)
        return _blocks(children)
    return str(node.get("text") or "")


def _blocks(children: Sequence[Mapping[str, Any]]) -> str:
    return "\n\n".join(text for text in (_block(c) for c in children) if text.strip())


def is_adf(value: Any) -> bool:
    return isinstance(value, Mapping) and value.get("type") == "doc"


def rich_text(value: Any) -> str:
    """A rich-text field as plain text: ADF (v3) rendered, a wiki string (v2) kept as written."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if is_adf(value):
        return adf_to_text(value)
    if isinstance(value, Mapping):  # option-style custom fields: {"value": "..."}
        return str(value.get("value") or value.get("name") or "").strip()
    if isinstance(value, list):
        items = [rich_text(item) for item in value]
        return "\n".join(f"- {item}" for item in items if item)
    return str(value).strip()


# -- acceptance criteria from a description section ------------------------------------------------

_WIKI_HEADING = re.compile(r"^\s*h[1-6]\.\s+(?P<title>.*\S)\s*$")
_BOLD_LINE = re.compile(r"^\s*(?:\*\*(?P<a>[^*]+)\*\*|\*(?P<b>[^*]+)\*)\s*:?\s*$")


def _title_of(text: str) -> str:
    """A line as a section title: decoration (`*bold*`, `_`, a markdown `#`, a colon) removed."""
    return re.sub(r"[\s:*_]+$", "", re.sub(r"^[\s*_#]+", "", text)).strip().lower()


def _text_blocks(text: str) -> list[tuple[bool, str]]:
    """Wiki lines as (is a heading, line): `h1.`..`h6.` and bold-only lines are headings (a leading
    `#` is a numbered list item in wiki markup, not a heading)."""
    out = []
    for line in text.splitlines():
        heading = _WIKI_HEADING.match(line)
        bold = _BOLD_LINE.match(line)
        if heading:
            out.append((True, heading["title"]))
        elif bold:
            out.append((True, bold["a"] or bold["b"]))
        else:
            out.append((False, line))
    return out


def _adf_blocks(doc: Mapping[str, Any]) -> list[tuple[bool, str]]:
    out = []
    for child in _children(doc):
        text = _block(child)
        strong = child.get("type") == "paragraph" and all(
            c.get("type") != "text"
            or any(isinstance(m, Mapping) and m.get("type") == "strong" for m in (c.get("marks") or []))
            for c in _children(child)
        )
        out.append((child.get("type") == "heading" or (strong and bool(text.strip())), text))
    return out


def section(blocks: Sequence[tuple[bool, str]], heading: str, *, joiner: str) -> str | None:
    """The blocks under `heading` up to the next heading, or the rest of a "Heading: text" block."""
    wanted = _title_of(heading)
    same_line = re.compile(
        rf"^\s*[*_]*{re.escape(heading)}[*_]*\s*:[*_]*\s*(?P<rest>\S.*)$", re.IGNORECASE | re.DOTALL
    )
    for index, (is_heading, text) in enumerate(blocks):
        if _title_of(text) == wanted:
            body = []
            for next_heading, next_text in blocks[index + 1 :]:
                if next_heading:
                    break
                body.append(next_text)
            return joiner.join(body).strip() or None
        if not is_heading and (match := same_line.match(text)):
            return match["rest"].strip()
    return None


def acceptance_criteria(fields: Mapping[str, Any], field_id: str | None, heading: str) -> str | None:
    if field_id:
        value = rich_text(fields.get(field_id))
        if value:
            return value
    description = fields.get("description")
    if is_adf(description):
        return section(_adf_blocks(description), heading, joiner="\n\n")
    if isinstance(description, str):
        return section(_text_blocks(description), heading, joiner="\n")
    return None


# -- mapping: issue payload -> TaskRecord ----------------------------------------------------------


def parse_stamp(value: Any) -> datetime | None:
    """Jira's `2024-01-02T03:04:05.000+0000` (or any ISO 8601) as an aware UTC datetime."""
    if not value:
        return None
    if not isinstance(value, str):
        raise PayloadError(f"expected a timestamp, got {value!r}")
    try:
        parsed = datetime.fromisoformat(value)  # Python 3.11 reads Jira's "+0000" offsets too
    except ValueError:
        try:
            parsed = dateparser.isoparse(value)
        except (ValueError, OverflowError):
            raise PayloadError(f"unreadable timestamp {value!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def to_ms(when: datetime) -> int:
    return int(when.timestamp() * 1000)


def identity(user: Any, *, cloud: bool) -> IdentityRef | None:
    """A Jira user as an identity: accountId on Cloud, the username (else the user key) on Server."""
    if not isinstance(user, Mapping):
        return None
    value = user.get("accountId") if cloud else (user.get("name") or user.get("key"))
    if not value:
        return None
    return IdentityRef(
        IdentityKind.JIRA,
        str(value),
        display_name=user.get("displayName"),
        email=user.get("emailAddress") or None,
    )


def _link_kind(link_type: Mapping[str, Any]) -> LinkKind | None:
    name = str(link_type.get("name") or "").lower()
    outward = str(link_type.get("outward") or "").lower()
    if name == "blocks" or outward == "blocks":
        return LinkKind.BLOCKS
    if name in ("duplicate", "duplicates") or outward == "duplicates":
        return LinkKind.DUPLICATE
    if name == "relates" or outward == "relates to":
        return LinkKind.RELATES
    return None


def links_of(fields: Mapping[str, Any]) -> tuple[LinkRecord, ...]:
    """Blocks/Duplicate/Relates links with their direction, the parent and the sub-tasks.

    An `outwardIssue` reads "this <outward verb> other" (this blocks other); an `inwardIssue`
    reads "other <outward verb> this" (this is blocked by other), hence `inverse=True`."""
    out: list[LinkRecord] = []
    for link in fields.get("issuelinks") or ():
        if not isinstance(link, Mapping) or not isinstance(link.get("type"), Mapping):
            continue
        kind = _link_kind(link["type"])
        if kind is None:
            continue
        for side, inverse in (("outwardIssue", False), ("inwardIssue", True)):
            other = link.get(side)
            if isinstance(other, Mapping) and other.get("key"):
                out.append(LinkRecord(kind, TaskRef(str(other["key"])), inverse=inverse))
    parent = fields.get("parent")
    if isinstance(parent, Mapping) and parent.get("key"):
        out.append(LinkRecord(LinkKind.PARENT, TaskRef(str(parent["key"]))))
    for sub in fields.get("subtasks") or ():
        if isinstance(sub, Mapping) and sub.get("key"):
            out.append(LinkRecord(LinkKind.PARENT, TaskRef(str(sub["key"])), inverse=True))
    return tuple(out)


def _seconds(fields: Mapping[str, Any], flat: str, tracking_key: str) -> int | None:
    value = fields.get(flat)
    if value is None and isinstance(fields.get("timetracking"), Mapping):
        value = fields["timetracking"].get(tracking_key)
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise PayloadError(f"{flat}: expected seconds, got {value!r}") from None


def _due(value: Any) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(str(value)[:10])
    except ValueError:
        raise PayloadError(f"unreadable due date {value!r}") from None


def project_of(key: str) -> str:
    return key.rsplit("-", 1)[0]


def issue_to_record(raw: Mapping[str, Any], config: JiraConfig, *, cloud: bool) -> TaskRecord:
    """Map one search result (`{"key": ..., "fields": {...}}`) to a TaskRecord; PayloadError if unusable."""
    key = raw.get("key")
    fields = raw.get("fields")
    if not isinstance(key, str) or not _ISSUE_KEY.fullmatch(key):
        raise PayloadError(f"issue without a usable key: {key!r}")
    if not isinstance(fields, Mapping):
        raise PayloadError(f"{key}: no fields")
    summary = fields.get("summary")
    if not isinstance(summary, str) or not summary.strip():
        raise PayloadError(f"{key}: no summary")
    status_json = fields.get("status") if isinstance(fields.get("status"), Mapping) else {}
    status_name = str(status_json.get("name") or "")
    category_json = status_json.get("statusCategory")
    category = str(category_json.get("key") or "") if isinstance(category_json, Mapping) else ""
    status = config.status_map.get(status_name.lower()) or CATEGORY_STATUS.get(category, Status.TODO)
    priority_json = fields.get("priority")
    priority_name = str(priority_json.get("name") or "") if isinstance(priority_json, Mapping) else ""
    priority = config.priority_map.get(priority_name.lower()) or DEFAULT_PRIORITY_MAP.get(
        priority_name.lower(), Priority.NONE
    )
    assignee = identity(fields.get("assignee"), cloud=cloud)
    labels = fields.get("labels") if isinstance(fields.get("labels"), list) else ()
    issuetype = fields.get("issuetype")
    resolution = fields.get("resolution")
    closed = status in (Status.DONE, Status.CANCELLED)
    extra: dict[str, Any] = {"id": str(raw.get("id") or ""), "status_category": category or None}
    if isinstance(issuetype, Mapping) and issuetype.get("name"):
        extra["issuetype"] = str(issuetype["name"])
    if isinstance(resolution, Mapping) and resolution.get("name"):
        extra["resolution"] = str(resolution["name"])
    verified = status_name.lower() in {s.strip().lower() for s in config.verified_statuses}
    return TaskRecord(
        external_id=key,
        title=summary.strip(),
        status=status,
        raw_status=status_name or "(none)",
        url=f"{config.url}/browse/{key}",
        body=rich_text(fields.get("description")),
        scope=project_of(key),
        assignees=(assignee,) if assignee else (),
        reporter=identity(fields.get("reporter"), cloud=cloud),
        due=_due(fields.get("duedate")),
        priority=priority,
        labels=tuple(str(label) for label in labels if label),
        acceptance_criteria=acceptance_criteria(fields, config.acceptance_field, config.acceptance_heading),
        created_at=parse_stamp(fields.get("created")),
        updated_at=parse_stamp(fields.get("updated")),
        closed_at=parse_stamp(fields.get("resolutiondate")) if closed else None,
        status_changed_at=parse_stamp(fields.get("statuscategorychangedate")),
        original_estimate_s=_seconds(fields, "timeoriginalestimate", "originalEstimateSeconds"),
        remaining_estimate_s=_seconds(fields, "timeestimate", "remainingEstimateSeconds"),
        time_spent_s=_seconds(fields, "timespent", "timeSpentSeconds"),
        verified=verified,
        links=links_of(fields),
        extra=extra,
    )


def comment_trail_of(fields: Mapping[str, Any], accounts: frozenset[str]) -> CommentTrail | None:
    """Who wrote the issue's newest comments, from its `comment` field (`{"comments": [...],
    "total": N, ...}`, oldest first). A comment is a bot's when the account that wrote it (or last
    edited it) is a Cloud app (`accountType` "app", e.g. Automation for Jira), is in `accounts`
    (lower-cased accountIds, usernames, keys or emails), or the comment carries trackloop's marker.
    None when the field is missing, or holds fewer comments than `total` (the newest are cut off)."""
    page = fields.get("comment")
    comments = page.get("comments") if isinstance(page, Mapping) else None
    if not isinstance(comments, list):
        return None
    total = page.get("total") if isinstance(page, Mapping) else None
    if isinstance(total, int) and total > len(comments):
        return None
    pairs: list[tuple[datetime, bool]] = []
    for comment in comments:
        if not isinstance(comment, Mapping):
            continue
        try:
            at = parse_stamp(comment.get("updated")) or parse_stamp(comment.get("created"))
        except PayloadError:
            continue
        if at is None:
            continue
        writer = comment.get("updateAuthor") or comment.get("author")
        pairs.append((at, _automated(writer, accounts) or _carries_marker(comment_text(comment.get("body")))))
    return comment_trail(pairs)


def _automated(user: Any, accounts: frozenset[str]) -> bool:
    if not isinstance(user, Mapping):
        return False  # anonymous, or a deleted account: nothing says it was a bot
    if user.get("accountType") == "app":
        return True
    ids = (user.get("accountId"), user.get("name"), user.get("key"), user.get("emailAddress"))
    return any(isinstance(value, str) and value.lower() in accounts for value in ids)


# -- push: comment bodies and the idempotency marker -----------------------------------------------


def marker_for(action_key: str) -> str:
    """`trackloop:<key>`; a key with characters wiki markup would read (`*`, `{`, spaces...) is
    replaced by a digest, so the marker renders as typed in both wiki markup and ADF."""
    if _MARKER_SAFE.fullmatch(action_key):
        return MARKER_PREFIX + action_key
    return MARKER_PREFIX + "k-" + hashlib.sha256(action_key.encode()).hexdigest()[:24]


def has_marker(text: str, marker: str) -> bool:
    return any(_marker_line(line) == marker for line in text.splitlines())


def _carries_marker(text: str) -> bool:
    """Whether a comment's last line is a trackloop marker, as trackloop's own follow-ups end."""
    lines = [line for line in text.splitlines() if line.strip()]
    last = _marker_line(lines[-1]) if lines else ""
    return last.startswith(MARKER_PREFIX) and bool(_MARKER_SAFE.fullmatch(last[len(MARKER_PREFIX) :]))


def _marker_line(line: str) -> str:
    return line.strip().strip("{}[]()").strip()


_WIKI_SPECIAL = re.compile(r"([\\{}\[\]*_+^~|!])")


def plain_wiki(text: str) -> str:
    """Plain text made inert in Jira wiki markup: no macros, links, [~mentions] or formatting."""
    return _WIKI_SPECIAL.sub(r"\\\1", text)


def comment_body(text: str, marker: str, *, cloud: bool) -> Any:
    """The comment: the action's text, then the marker as a short monospace last line. ADF on
    Cloud (REST v3 rejects plain strings), a wiki-markup string on Server/DC."""
    text = text.strip()
    if not cloud:
        text = plain_wiki(text)
        return f"{text}\n\n{{{{{marker}}}}}" if text else f"{{{{{marker}}}}}"
    paragraphs: list[dict[str, Any]] = []
    for block in re.split(r"\n\s*\n", text) if text else []:
        content: list[dict[str, Any]] = []
        for number, line in enumerate(block.split("\n")):
            if number:
                content.append({"type": "hardBreak"})
            if line:
                content.append({"type": "text", "text": line})
        paragraphs.append({"type": "paragraph", "content": content})
    paragraphs.append(
        {"type": "paragraph", "content": [{"type": "text", "text": marker, "marks": [{"type": "code"}]}]}
    )
    return {"type": "doc", "version": 1, "content": paragraphs}


def comment_text(body: Any) -> str:
    return adf_to_text(body) if is_adf(body) else str(body or "")


# -- the connector --------------------------------------------------------------------------------


class _Listing:
    """Bookkeeping of one paged listing: the cursor value that is safe to save after each page.

    The value is the newest `updated` listed so far among issues last changed before the run
    began: an issue edited during the run can be listed out of order (ahead of issues not yet
    committed), so it never moves the cursor; the next run reads it again. After a sign that the
    listing shifted under the pager (an issue listed twice: it changed after its first listing;
    or Server's total shrinking: one left), an offset may have skipped the issue at a page edge,
    so the value is held at what was saved before the shift could have happened. Either way the
    next run re-reads from there and upserts absorb the repeats.
    """

    def __init__(self, mark: int | None, began_ms: int) -> None:
        self.mark = mark  # newest `updated` listed (epoch ms) that is safe to resume from
        self.began_ms = began_ms
        self.hold: int | None = None
        self.moved = False  # the listing shifted under the pager: its absences prove nothing
        self.saved: list[int | None] = []  # the value saved after each page
        self.first_page: dict[str, int] = {}
        self.projects: set[str] = set()
        self.unreadable: set[str] = set()
        self._start = mark

    def saw(self, key: str | None, updated_ms: int | None, *, readable: bool) -> None:
        page = len(self.saved)
        if key is not None:
            project = project_of(key)
            self.projects.add(project)
            if not readable:
                self.unreadable.add(project)
            first = self.first_page.setdefault(key, page)
            if first < page:
                self.moved = True
                self._hold(self.saved[first])
        if updated_ms is not None and updated_ms <= self.began_ms:
            self.mark = updated_ms if self.mark is None else max(self.mark, updated_ms)

    def shifted(self) -> None:
        self.moved = True
        self._hold(self.saved[-1] if self.saved else self._start)

    def _hold(self, value: int | None) -> None:
        if value is not None and (self.hold is None or value < self.hold):
            self.hold = value

    def end_page(self) -> int | None:
        value = self.mark if self.hold is None or self.mark is None else min(self.hold, self.mark)
        self.saved.append(value)
        return value


class _NotFound(ConnectorError):
    """HTTP 404: a wrong URL, an issue that is gone, or (on serverInfo v3) a Server/DC site."""


class JiraConnector(Connector[JiraConfig, JiraCursor]):
    kind = "jira"
    config_model = JiraConfig
    cursor_model = JiraCursor

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._jira: JIRA | None = None
        self.deployment: Deployment | None = None  # what this connector found, kept across close()
        self._stored: Deployment | None = None  # what the last sync found (`restore`)
        self._me: str | None = None  # the bot's own identity, from /myself, asked only when needed
        self._scope = jql_digest(self.config.jql)

    # -- client ------------------------------------------------------------------------------------
    def _construct(self, *, version: str, handshake: bool) -> JIRA:
        cfg = self.config
        auth: dict[str, Any] = (
            {"basic_auth": ((cfg.email or "").strip(), cfg.token.get_secret_value())}
            if cfg.auth == "basic"
            else {"token_auth": cfg.token.get_secret_value()}
        )
        if handshake:
            self.stats.requests += 1  # serverInfo, sent inside the constructor before our hook exists
        client = JIRA(
            server=cfg.url,
            options={"rest_api_version": version},
            max_retries=0,
            get_server_info=handshake,
            timeout=cfg.timeout.total_seconds(),
            **auth,
        )
        client._session.hooks["response"].append(self._count)
        return client

    def _count(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        self.stats.requests += 1
        remaining = response.headers.get("X-RateLimit-Remaining")
        if remaining is not None and remaining.strip().isdigit():
            self.stats.rate_limit_remaining = int(remaining)

    def connect(self, stored: Deployment | None = None) -> JIRA:
        """The client, built once per connector; `stored` is the deployment an earlier run found."""
        if self._jira is not None:
            return self._jira
        configured = self.config.deployment
        if configured == "server" or (configured == "auto" and stored == "server"):
            client, deployment = self.call(self._construct, version="2", handshake=False), "server"
        elif configured == "cloud":
            try:
                client, deployment = self._from_v3(self.call(self._construct, version="3", handshake=True))
            except _NotFound:
                client, deployment = None, "server"
            if client is None or deployment != "cloud":
                if client is not None:
                    client.close()
                raise ConnectorError(
                    f'jira connector {self.name!r}: deployment = "cloud" but {self.config.url} does not '
                    f'report itself as Jira Cloud; set deployment = "server" or "auto"'
                )
        else:  # auto, and nothing stored or Cloud stored: the v3 handshake Cloud needs anyway decides
            client, deployment = self._detect()
        self._jira, self.deployment = client, deployment
        return client

    def _detect(self) -> tuple[JIRA, Deployment]:
        """serverInfo on REST v3 exists only on Cloud; a 404 there means Server/DC (confirmed on v2)."""
        try:
            client = self.call(self._construct, version="3", handshake=True)
        except _NotFound:
            client = self.call(self._construct, version="2", handshake=True)
            return client, "cloud" if client.deploymentType == "Cloud" else "server"
        return self._from_v3(client)

    def _from_v3(self, client: JIRA) -> tuple[JIRA, Deployment]:
        """A v3 client that did the handshake: kept on Cloud, else replaced by a v2 one (no request)."""
        if client.deploymentType == "Cloud":
            return client, "cloud"
        client.close()
        return self._construct(version="2", handshake=False), "server"

    def restore(self, cursor: JiraCursor | None) -> None:
        """A push or check reuses the deployment the last sync found instead of asking serverInfo."""
        self._stored = cursor.deployment if cursor is not None else None

    def _known(self) -> Deployment | None:
        return self.deployment or self._stored

    def close(self) -> None:
        if self._jira is not None:
            self._jira.close()
            self._jira = None

    # -- errors ------------------------------------------------------------------------------------
    @contextmanager
    def translate_errors(self) -> Iterator[None]:
        where = f"jira connector {self.name!r}"
        try:
            yield
        except JIRAError as exc:
            raise self._from_jira_error(exc, where) from exc
        except requests.exceptions.Timeout as exc:
            raise TransientError(f"{where}: {self.config.url} timed out") from exc
        except requests.exceptions.ConnectionError as exc:
            raise TransientError(f"{where}: cannot reach {self.config.url} (connection failed)") from exc
        except ValueError as exc:  # a 200 whose body is not JSON: a cut-off reply, worth another try
            raise TransientError(f"{where}: unreadable reply from {self.config.url} (invalid JSON)") from exc
        except requests.exceptions.RequestException as exc:
            raise TransientError(
                f"{where}: request to {self.config.url} failed ({type(exc).__name__})"
            ) from exc

    def _from_jira_error(self, exc: JIRAError, where: str) -> ConnectorError:
        status = exc.status_code
        text = " ".join(str(exc.text or "").split())[:300] or "no details"
        headers = exc.response.headers if exc.response is not None else {}
        if status == 401:
            return AuthError(
                f"{where}: {self.config.url} refused the credentials (HTTP 401); check email/token and auth "
                f'("basic" with an API token on Cloud, "bearer" with a personal access token on Server/DC)'
            )
        if status == 403:
            return AuthError(f"{where}: the account lacks permission (HTTP 403): {text}")
        if status == 429 or status is None or status >= 500:
            retry_after = parse_retry_after(headers.get("Retry-After"), self.now())
            remaining = headers.get("X-RateLimit-Remaining")
            if remaining is not None and str(remaining).strip().isdigit():
                self.stats.rate_limit_remaining = int(remaining)
            label = f"HTTP {status}" if status else "no response"
            if status == 429:
                return self.throttled(f"{where}: Jira answered HTTP 429: {text}", retry_after)
            return TransientError(f"{where}: Jira answered {label}: {text}", retry_after=retry_after)
        if status == 404:
            return _NotFound(f"{where}: not found (HTTP 404) at {self.config.url}: {text}")
        if status == 410:
            return ConnectorError(
                f"{where}: {self.config.url} answered 410 Gone ({text}); the Server search endpoint is "
                f'retired on Jira Cloud: set deployment = "cloud" or "auto" (and run sync --full once)'
            )
        if status == 400:
            return ConnectorError(f"{where}: Jira rejected the request (HTTP 400): {text}")
        return ConnectorError(f"{where}: Jira answered HTTP {status}: {text}")

    # -- check -------------------------------------------------------------------------------------
    def check(self) -> CheckResult:
        try:
            client = self.connect(self._known())
            me = self.call(client.myself)
        except ConnectorError as exc:
            return CheckResult(False, str(exc))
        finally:
            self.close()
        who = me.get("displayName") or me.get("accountId") or me.get("name") or "?"
        login = me.get("emailAddress") or me.get("name") or me.get("accountId") or ""
        kind = "Jira Cloud" if self.deployment == "cloud" else "Jira Server/Data Center"
        zone = me.get("timeZone") or "unknown"
        return CheckResult(
            True, f"{kind} at {self.config.url}: signed in as {who} ({login}), time zone {zone}"
        )

    # -- pull --------------------------------------------------------------------------------------
    def pull(self, state: SyncState[JiraCursor]) -> Iterator[Page[JiraCursor]]:
        prior = state.cursor
        client = self.connect(None if state.full or prior is None else prior.deployment)
        deployment: Deployment = self.deployment or "server"
        usable = prior is not None and prior.scope == self._scope and prior.deployment == deployment
        since = None
        if usable and not state.full and prior is not None and prior.updated_ms is not None:
            since = floor_minute(prior.updated_ms - int(self.config.overlap.total_seconds() * 1000))
        known = set(prior.projects) if prior is not None else set()
        listing = _Listing(prior.updated_ms if usable and prior is not None else None, to_ms(self.now()))
        jql = search_jql(self.config.jql, since)
        accounts = self._automated_accounts()
        for issues, last in self._search(client, deployment, jql, listing):
            records = []
            for raw in issues:
                record, updated_ms, key = self._read(raw, deployment == "cloud", accounts)
                listing.saw(key, updated_ms, readable=record is not None)
                if record is not None:
                    records.append(record)
            cursor = JiraCursor(
                deployment=deployment,
                scope=self._scope,
                updated_ms=listing.end_page(),
                projects=tuple(sorted(known | listing.projects)),
            )
            if not last or since is not None:
                yield Page(tasks=records, cursor=cursor)
            elif listing.moved:  # shifted under the pager: an issue at a page edge may be missing
                self.log.warning(
                    "jira connector %r: the listing shifted while it was read (an issue was edited or removed "
                    "mid-run); not cancelling anything this run", self.name,
                )
                yield Page(tasks=records, cursor=cursor)
            else:  # a complete listing: vouch for every project it (or an earlier listing) held
                completed = sorted((known | listing.projects) - listing.unreadable)
                cursor = cursor.model_copy(update={"projects": tuple(sorted(listing.projects))})
                yield Page(tasks=records, cursor=cursor, completed_scopes=completed)

    def _search(
        self, client: JIRA, deployment: Deployment, jql: str, listing: _Listing
    ) -> Iterator[tuple[list[Any], bool]]:
        """Search result pages as (issues, is last): token-paged on Cloud, offset-paged on Server/DC."""
        cloud = deployment == "cloud"
        cap = CLOUD_PAGE_MAX if cloud else SERVER_PAGE_MAX
        size = min(self.config.page_size or cap, cap)
        fields = [*SEARCH_FIELDS, *([self.config.acceptance_field] if self.config.acceptance_field else [])]
        token: str | None = None
        offset, total = 0, None
        while True:
            if cloud:
                reply = self.call(
                    client.enhanced_search_issues, jql, nextPageToken=token, maxResults=size,
                    fields=list(fields), json_result=True,
                )  # fmt: skip
            else:
                reply = self.call(
                    client.search_issues, jql, startAt=offset, maxResults=size,
                    fields=list(fields), json_result=True,
                )  # fmt: skip
            issues = reply.get("issues") if isinstance(reply, Mapping) else None
            if not isinstance(issues, list):
                raise PayloadError(f"jira connector {self.name!r}: search reply without an issue list")
            if cloud:
                token = reply.get("nextPageToken") or None
                yield issues, token is None
                if token is None:
                    return
                continue
            reported = reply.get("total") if isinstance(reply.get("total"), int) else None
            if reported is not None and total is not None and reported < total:
                listing.shifted()  # an issue left the listing: later offsets moved back by one
            total = reported if reported is not None else total
            offset += len(issues)
            last = not issues or total is None or offset >= total
            yield issues, last
            if last:
                return

    def _automated_accounts(self) -> frozenset[str]:
        """The configured `bots` and what names the connector's own account without asking Jira:
        its sign-in name (the username on Server/DC, the email on Cloud) and, once a push has
        asked `/myself`, its accountId or username."""
        own = [self._me or "", (self.config.email or "") if self.config.auth == "basic" else ""]
        return bot_names([*self.config.bots, *own])

    def _read(
        self, raw: Any, cloud: bool, accounts: frozenset[str]
    ) -> tuple[TaskRecord | None, int | None, str | None]:
        """(record or None if unreadable, its `updated` in epoch ms, its key); an update that a
        comment by one of `accounts` (or another bot) explains is not activity."""
        key = raw.get("key") if isinstance(raw, Mapping) else None
        key = key if isinstance(key, str) and _ISSUE_KEY.fullmatch(key) else None
        updated_ms = None
        try:
            fields = raw.get("fields") if isinstance(raw, Mapping) else None
            updated = parse_stamp(fields.get("updated")) if isinstance(fields, Mapping) else None
            updated_ms = to_ms(updated) if updated else None
            record = issue_to_record(raw, self.config, cloud=cloud)
            return human_activity(record, comment_trail_of(raw["fields"], accounts)), updated_ms, key
        except (PayloadError, KeyError, TypeError, ValueError, AttributeError) as exc:
            self.log.warning("jira connector %r: issue %s skipped: %s", self.name, key or "(no key)", exc)
            return None, updated_ms, key

    # -- push --------------------------------------------------------------------------------------
    def push(self, action: Action) -> PushResult:
        where = f"jira connector {self.name!r}"
        if action.kind != "comment":
            raise PushError(f"{where} cannot deliver {action.kind!r} (only comments)", permanent=True)
        key = (action.task_external_id or action.target or "").strip()
        if not _ISSUE_KEY.fullmatch(key):
            raise PushError(f'{where}: expected an issue key like "OPS-12", got {key!r}', permanent=True)
        marker = marker_for(action.key)
        try:
            client = self.connect(self._known())
            earlier = self._find_marker(client, key, marker)
            if earlier is not None:
                return PushResult(earlier, already_delivered=True)
            body = comment_body(action.text, marker, cloud=self.deployment == "cloud")
            comment = self.once(client.add_comment, key, body)
        except TransientError as exc:
            raise PushError(str(exc), permanent=False) from exc
        except ConnectorError as exc:  # auth, a missing issue, a rejected body: retrying cannot help
            raise PushError(str(exc), permanent=True) from exc
        return PushResult(str(comment.id))

    def _find_marker(self, client: JIRA, key: str, marker: str) -> str | None:
        """The id of the bot's earlier comment carrying `marker`, newest first; None if there is none
        (someone quoting the marker does not count)."""
        start, ids = 0, set()
        while True:
            batch = self.call(
                client.comments, key, start_at=start, max_results=COMMENT_PAGE, order_by="-created"
            )
            fresh = [c for c in batch if c.id not in ids]
            for comment in fresh:
                mine = has_marker(comment_text(comment.raw.get("body")), marker) and self._is_own(client, comment.raw)
                if mine:
                    return str(comment.id)
            ids.update(c.id for c in fresh)
            if len(batch) < COMMENT_PAGE or not fresh:
                return None
            start += len(batch)

    def _is_own(self, client: JIRA, comment: Mapping[str, Any]) -> bool:
        """Whether the connector's own account wrote `comment` (accountId on Cloud, name on Server/DC)."""
        cloud = self.deployment == "cloud"
        if self._me is None:
            me = identity(self.call(client.myself), cloud=cloud)
            self._me = me.value if me is not None else ""
        author = identity(comment.get("author"), cloud=cloud)
        return author is not None and author.value == self._me
