"""The `github` connector: issues (and optionally pull requests) of GitHub repositories.

It reads through PyGithub's requester, configured to stay out of the way (no throttle sleeps, no
urllib3 retries; reads are retried once, by the base's tenacity policy, and writes never), and it
fetches list pages itself because PyGithub's `PaginatedList` cannot send `If-None-Match`.

Cost model, per repository and sync:

- Page 1 of `GET /repos/{owner}/{repo}/issues?state=all&sort=updated&direction=desc&per_page=100` is
  requested with the ETag stored from the last completed crawl. The URL carries no `since`, so it
  is the same every run: when nothing changed, GitHub answers `304 Not Modified`, which costs no
  rate limit, and that one request is the whole sync of the repository.
- Otherwise the crawl walks newest-first. Page 1 holds the 100 most recently updated issues; when
  more changed since the last crawl, pages 2.. are requested with `since` = the last crawl's start
  minus `overlap` (the since-filtered listing is a prefix of the unfiltered one, so the page
  numbers agree). An issue updated mid-crawl moves to the front and shifts older ones down, which
  can only repeat an issue (an upsert), never skip one; it is picked up by the next crawl, whose
  `since` is this crawl's start time.
- A crawl of a repository that changed since an earlier crawl also reads the repository's
  comments updated since then, newest first, in one request per 100 comments, to tell an update
  that is a bot's (or trackloop's) comment from a person's; the issue listing does not say who
  made a change.
- A crawl that stops half-way (rate limit, crash, a failing page) resumes at the page after the
  last committed one; the ETag is saved only with the page that ends the crawl.
- `owner/*` costs the owner's repository listing too, but only every `repos_refresh` (and on
  `--full`): the result is cached in the cursor, and the listing is conditional on its ETag. An
  org's listing changes whenever one of its repositories is pushed to, so asking every run would
  turn the idle sync's free 304s into a paid 200 per owner.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import requests
from github import Auth, Github, GithubException
from github.GithubException import BadCredentialsException, RateLimitExceededException
from github.Requester import Requester
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, field_validator

from connectors.base import (
    CommentTrail,
    Confirmed,
    Connector,
    ConnectorConfig,
    bot_explained,
    bot_names,
    comment_trail,
    human_activity,
    parse_retry_after,
)
from connectors.errors import AuthError, ConnectorError, PayloadError, PushError, RateLimited, TransientError
from store.canonical import (
    Action,
    ActivityRecord,
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
    utc,
)
from store.durations import Duration

PER_PAGE = 100  # GitHub's maximum
MAX_PAGES = 100  # a listing that never ends is a bug somewhere, not a reason to spin
MAPPING_VERSION = 1  # bump when the mapping changes, so stored tasks are re-read once
GHOST = "ghost"  # GitHub's stand-in login for deleted accounts
MARKER = "<!-- trackloop:{key} -->"
_OWN_MARKER = re.compile(r"<!-- trackloop:\S+ -->")

DEFAULT_PRIORITY_LABELS: dict[str, list[str]] = {
    "high": ["priority:high", "p1", "urgent"],
    "medium": ["priority:medium", "p2"],
    "low": ["priority:low", "p3"],
}
DEFAULT_STATUS_LABELS: dict[str, list[str]] = {
    "in_progress": ["in progress", "doing"],
    "blocked": ["blocked"],
}

_ISSUE_URL = re.compile(r"/issues/(\d+)$")
_REPO_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})/(?:\*|[A-Za-z0-9._-]{1,100})$")


def _repo(value: str) -> str:
    """One `repos` item, checked alone so a fault names its index (`repos[1]`)."""
    value = value.strip()
    if not _REPO_RE.match(value):
        raise ValueError(f'expected "owner/name", got {json.dumps(value)}')
    return value.lower()


# -- config and cursor ------------------------------------------------------------------------
class GithubConfig(ConnectorConfig):
    """`[connectors.NAME]` with `type = "github"`."""

    token: SecretStr = Field(description='A token that can read the issues, e.g. "${GITHUB_TOKEN}".')
    base_url: str = Field(
        "https://api.github.com",
        description="API root: https://api.github.com, or https://HOST/api/v3 for GitHub Enterprise Server.",
    )
    repos: list[Annotated[str, AfterValidator(_repo)]] = Field(
        min_length=1, description='Repositories as "owner/name"; "owner/*" takes every repository of owner.'
    )
    include_pull_requests: bool = Field(
        False, description="Also store pull requests as tasks (their 'fixes #N' links count either way)."
    )
    priority_labels: dict[Literal["high", "medium", "low"], list[str]] = Field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_PRIORITY_LABELS.items()},
        description="Priority -> labels that set it (case-insensitive); the highest present wins.",
    )
    status_labels: dict[Literal["in_progress", "blocked"], list[str]] = Field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_STATUS_LABELS.items()},
        description="Status of an open issue -> labels that set it (case-insensitive); blocked wins.",
    )
    verified_labels: list[str] = Field(
        default_factory=lambda: ["verified"],
        description="Labels that mark a closed issue as verified (case-insensitive).",
    )
    overlap: Duration = Field(
        timedelta(minutes=5),
        description="How far before the last crawl's start an incremental crawl reaches back (clock skew).",
    )
    repos_refresh: Duration = Field(
        timedelta(hours=1),
        description='How often an "owner/*" pattern re-lists the owner\'s repositories (always on --full); '
        "in between, the cached list is used and costs no request.",
    )
    min_remaining: int = Field(
        50, ge=0, description="Stop the sync (and resume next run) when fewer API requests than this remain."
    )
    max_body_bytes: int = Field(
        65536, ge=1024, description="Longer issue bodies are cut to this many bytes (UTF-8) and flagged."
    )
    comment_lookback: Duration = Field(
        timedelta(days=30),
        description="How far back push looks for its own earlier comment before posting one.",
    )
    timeout: Duration = Field(timedelta(seconds=30), description="Per-request timeout.")

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f'expected an http(s) URL like "https://api.github.com", got {value!r}')
        return value

    @field_validator("repos")
    @classmethod
    def _repos(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))

    @field_validator("priority_labels", "status_labels")
    @classmethod
    def _lower_map(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        return {k: [x.strip().lower() for x in v if x.strip()] for k, v in value.items()}

    @field_validator("verified_labels")
    @classmethod
    def _lower_list(cls, value: list[str]) -> list[str]:
        return [x.strip().lower() for x in value if x.strip()]


class CrawlProgress(BaseModel):
    """A crawl of one repository that has committed some pages but not its last."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    started: datetime  # becomes the repo's `since` when the crawl completes
    page: int  # the next page to request
    etag: str = ""  # page 1's ETag, saved as the repo's validator when the crawl completes


class RepoCursor(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    since: datetime | None = None  # start of the last completed crawl; None: never completed
    crawl: CrawlProgress | None = None


class OwnerListing(BaseModel):
    """The cached result of an `owner/*` repository listing."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["orgs", "users"] = "orgs"
    repos: list[str] = Field(default_factory=list)
    listed_at: datetime | None = None  # when GitHub last confirmed the list (200 or 304)


class GithubCursor(Cursor):
    version: int = 1
    fingerprint: str = ""  # of the mapping settings; a change re-reads every repository once
    repos: dict[str, RepoCursor] = Field(default_factory=dict)
    owners: dict[str, OwnerListing] = Field(default_factory=dict)


# -- pure mapping -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class MappingRules:
    """The config that shapes a record, detached from the connector so mapping stays pure."""

    priority_labels: Mapping[str, Sequence[str]] = field(default_factory=lambda: DEFAULT_PRIORITY_LABELS)
    status_labels: Mapping[str, Sequence[str]] = field(default_factory=lambda: DEFAULT_STATUS_LABELS)
    verified_labels: Sequence[str] = ("verified",)
    bots: frozenset[str] = frozenset()
    max_body_bytes: int = 65536

    @classmethod
    def from_config(cls, config: GithubConfig) -> MappingRules:
        return cls(
            priority_labels=config.priority_labels,
            status_labels=config.status_labels,
            verified_labels=tuple(config.verified_labels),
            bots=bot_names(config.bots),
            max_body_bytes=config.max_body_bytes,
        )

    def is_bot(self, login: str | None) -> bool:
        return bool(login) and (login.lower().endswith("[bot]") or login.lower() in self.bots)  # type: ignore[union-attr]


_OWNER = r"[A-Za-z0-9][A-Za-z0-9-]*"
_NAME = r"[A-Za-z0-9._-]+"
# One reference: a full issue/PR URL, "owner/repo#N" or "#N" (not glued to a word before it).
_REF_PLAIN = (
    rf"(?:https?://[^/\s]+/{_OWNER}/{_NAME}/(?:issues|pull)/\d+|(?<![\w.-])(?:{_OWNER}/{_NAME})?#\d+\b)"
)
_REF = re.compile(
    rf"https?://[^/\s]+/(?P<uowner>{_OWNER})/(?P<urepo>{_NAME})/(?:issues|pull)/(?P<unum>\d+)"
    rf"|(?<![\w.-])(?:(?P<owner>{_OWNER})/(?P<repo>{_NAME}))?#(?P<num>\d+)\b"
)
_REF_LIST = rf"{_REF_PLAIN}(?:\s*(?:,|&|\band\b|\bor\b)?\s*{_REF_PLAIN})*"
_BLOCKERS = re.compile(
    rf"\b(?:blocked\s+by|depends\s+on|depending\s+on|dependent\s+on)\b\s*:?\s*(?P<refs>{_REF_LIST})", re.I
)
_CLOSERS = re.compile(rf"\b(?:close[sd]?|fix(?:e[sd])?|resolve[sd]?)\b\s*:?\s+(?P<refs>{_REF_LIST})", re.I)
_TASK_ITEM = re.compile(rf"^[ \t]*(?:[-*+]|\d+[.)])[ \t]+\[[ xX]\][ \t]+(?P<refs>{_REF_PLAIN})", re.M)
_FENCE = re.compile(r"^[ \t]*(```|~~~).*?^[ \t]*\1[^\n]*$", re.M | re.S)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_HTML_COMMENT = re.compile(r"<!--.*?-->", re.S)
_QUOTE_LINE = re.compile(r"^[ \t]*>.*$", re.M)
_AC_HASH = re.compile(r"^(?P<level>#{1,6})[ \t]*acceptance[ \t]+criteria\b[^\n]*$", re.I | re.M)
_AC_PLAIN = re.compile(
    r"^[ \t]*(?:\*\*|__)?acceptance[ \t]+criteria[ \t]*:?[ \t]*(?:\*\*|__)?[ \t]*:?[ \t]*$", re.I | re.M
)
_ANY_HEADING = re.compile(r"^(?P<level>#{1,6})[ \t]+\S", re.M)
_BOLD_HEADING = re.compile(r"^[ \t]*(?:\*\*|__)[^*_\n]+(?:\*\*|__)[ \t]*:?[ \t]*$", re.M)


def parse_time(value: Any) -> datetime | None:
    """GitHub's ISO 8601 timestamps ("2011-04-22T13:33:48Z") as aware UTC; None stays None."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(f"expected a timestamp string, got {type(value).__name__}")
    return utc(datetime.fromisoformat(value.replace("Z", "+00:00")))


def format_since(value: datetime) -> str:
    """A `since` value in UTC with a literal Z (PyGithub would write Z after a local time)."""
    return utc(value).strftime("%Y-%m-%dT%H:%M:%SZ")


def repo_of(payload: Mapping[str, Any]) -> str:
    """ "owner/name" (lower case) of an issue payload, from its `repository_url` or `html_url`."""
    url = payload.get("repository_url") or ""
    match = re.search(r"/repos/([^/]+)/([^/]+)/?$", url)
    if match is None:
        match = re.search(r"/([^/]+)/([^/]+)/(?:issues|pull)/\d+$", payload.get("html_url") or "")
    if match is None:
        raise ValueError("no repository_url or html_url")
    return f"{match.group(1)}/{match.group(2)}".lower()


def _clean(text: str | None) -> str:
    """Text safe for every store: PostgreSQL refuses NUL characters."""
    return (text or "").replace("\x00", "")


def cap_body(body: str, max_bytes: int) -> tuple[str, bool]:
    """Cut `body` to at most `max_bytes` of UTF-8 at a character boundary; say whether it was cut."""
    raw = body.encode("utf-8", "surrogatepass")
    if len(raw) <= max_bytes:
        return body, False
    return raw[:max_bytes].decode("utf-8", "ignore"), True


def _prose(body: str) -> str:
    """The body without code, HTML comments and quoted lines: references there are not claims."""
    body = _FENCE.sub("", body)
    body = _HTML_COMMENT.sub("", body)
    body = _QUOTE_LINE.sub("", body)
    return _INLINE_CODE.sub("", body)


def _refs(text: str, repo: str) -> list[str]:
    out = []
    for m in _REF.finditer(text):
        if m["unum"]:
            out.append(f"{m['uowner']}/{m['urepo']}#{int(m['unum'])}".lower())
        elif m["owner"]:
            out.append(f"{m['owner']}/{m['repo']}#{int(m['num'])}".lower())
        else:
            out.append(f"{repo}#{int(m['num'])}")
    return out


def blocker_refs(body: str, repo: str) -> list[str]:
    """Issues this body says it waits for: "blocked by #12", "depends on acme/web#7, #8"."""
    return _unique(ref for m in _BLOCKERS.finditer(_prose(body)) for ref in _refs(m["refs"], repo))


def closing_refs(body: str, repo: str) -> list[str]:
    """Issues a pull request says it closes: "fixes #12", "Closes acme/web#7", "resolves <url>"."""
    return _unique(ref for m in _CLOSERS.finditer(_prose(body)) for ref in _refs(m["refs"], repo))


def task_list_refs(body: str, repo: str) -> list[str]:
    """Issues listed as task-list items ("- [ ] #12"): the children of a tracking issue."""
    return _unique(ref for m in _TASK_ITEM.finditer(_prose(body)) for ref in _refs(m["refs"], repo))


def acceptance_criteria(body: str) -> str | None:
    """The text of a section headed "Acceptance criteria" (a # heading, bold line or "…:" line)."""
    text = _FENCE.sub(lambda m: m.group(0).replace("#", "\x01"), body)  # headings in code don't count
    match = _AC_HASH.search(text)
    if match is not None:
        level = len(match["level"])
        start, end = match.end(), len(text)
        for nxt in _ANY_HEADING.finditer(text, start):
            if len(nxt["level"]) <= level:
                end = nxt.start()
                break
    else:
        match = _AC_PLAIN.search(text)
        if match is None:
            return None
        start, end = match.end(), len(text)
        for pattern in (_ANY_HEADING, _BOLD_HEADING):
            nxt = pattern.search(text, start)
            if nxt is not None:
                end = min(end, nxt.start())
    section = text[start:end].replace("\x01", "#").strip()
    return section or None


def _unique(items: Any) -> list[str]:
    return list(dict.fromkeys(items))


def _login(user: Any) -> str | None:
    """A user object's login; deleted accounts ("ghost") and null users give None."""
    if not isinstance(user, Mapping):
        return None
    login = user.get("login")
    if not isinstance(login, str) or not login or login.lower() == GHOST:
        return None
    return login


def _label_names(labels: Any) -> list[str]:
    """Label names; the API documents labels as objects or bare strings."""
    names = []
    for label in labels or ():
        name = label.get("name") if isinstance(label, Mapping) else label
        if isinstance(name, str) and _clean(name).strip():
            names.append(_clean(name).strip())
    return names


def _pick(labels_lower: set[str], table: Mapping[str, Sequence[str]], order: Sequence[str]) -> str | None:
    for key in order:
        if labels_lower & set(table.get(key, ())):
            return key
    return None


def is_pull_request(payload: Mapping[str, Any]) -> bool:
    """In the issues listing a pull request carries a `pull_request` object; plain issues lack it."""
    return bool(payload.get("pull_request"))


def issue_record(payload: Mapping[str, Any], rules: MappingRules | None = None) -> TaskRecord:
    """One issue (or pull request) of the REST listing as a canonical task; raises on unusable data."""
    rules = rules or MappingRules()
    number = payload["number"]
    title = payload["title"]
    if not isinstance(number, int) or isinstance(number, bool) or not isinstance(title, str):
        raise ValueError("number or title missing")
    repo = repo_of(payload)
    external_id = f"{repo}#{number}"
    pull = is_pull_request(payload)
    state = payload.get("state") or "open"
    reason = payload.get("state_reason")
    labels = _label_names(payload.get("labels"))
    lower = {name.lower() for name in labels}

    if state == "closed":
        if pull:
            merged = (payload.get("pull_request") or {}).get("merged_at")
            status = Status.DONE if merged else Status.CANCELLED
        else:
            status = Status.CANCELLED if reason in ("not_planned", "duplicate") else Status.DONE
    else:
        picked = _pick(lower, rules.status_labels, ("blocked", "in_progress"))
        status = Status(picked) if picked else (Status.IN_PROGRESS if pull else Status.TODO)
    raw_status = f"{state}/{reason}" if reason else state
    priority = _pick(lower, rules.priority_labels, ("high", "medium", "low"))

    full_body = _clean(payload.get("body") if isinstance(payload.get("body"), str) else "")
    body, truncated = cap_body(full_body, rules.max_body_bytes)

    logins = _unique(login for a in payload.get("assignees") or () if (login := _login(a)))
    if not logins and (single := _login(payload.get("assignee"))):
        logins = [single]
    author = _login(payload.get("user"))

    due = None
    milestone = payload.get("milestone")
    if isinstance(milestone, Mapping) and milestone.get("due_on"):
        due = parse_time(milestone["due_on"]).date()  # type: ignore[union-attr]

    created_at = parse_time(payload.get("created_at"))
    updated_at = parse_time(payload.get("updated_at"))
    closed_at = parse_time(payload.get("closed_at"))

    links: list[LinkRecord] = []
    for ref in blocker_refs(full_body, repo):
        links.append(LinkRecord(LinkKind.BLOCKS, TaskRef(ref), inverse=True))
    for ref in task_list_refs(full_body, repo):
        links.append(LinkRecord(LinkKind.PARENT, TaskRef(ref), inverse=True))
    if pull:
        for ref in closing_refs(full_body, repo):
            links.append(LinkRecord(LinkKind.RELATES, TaskRef(ref)))

    extra: dict[str, Any] = {"repo": repo, "number": number, "comments": payload.get("comments") or 0}
    if pull:
        extra["pull_request"] = True
    if len(logins) > 1:
        extra["shared_owners"] = logins
    if truncated:
        extra["body_truncated"] = True
    if isinstance(milestone, Mapping) and milestone.get("title"):
        extra["milestone"] = _clean(str(milestone["title"]))
    if payload.get("locked"):
        extra["locked"] = True

    return TaskRecord(
        external_id=external_id,
        title=_clean(title).strip() or f"(untitled #{number})",
        status=status,
        raw_status=raw_status,
        url=payload.get("html_url"),
        body=body,
        scope=repo,
        assignees=tuple(IdentityRef(IdentityKind.GITHUB, login) for login in logins),
        reporter=IdentityRef(IdentityKind.GITHUB, author) if author else None,
        due=due,
        priority=Priority(priority) if priority else Priority.NONE,
        labels=tuple(labels),
        acceptance_criteria=acceptance_criteria(full_body),
        created_at=created_at,
        updated_at=updated_at,
        closed_at=closed_at if state == "closed" else None,
        status_changed_at=closed_at if state == "closed" else None,
        last_activity_at=updated_at,
        verified=bool(lower & set(rules.verified_labels)),
        links=tuple(_unique_links(links)),
        extra=extra,
    )


def _unique_links(links: list[LinkRecord]) -> list[LinkRecord]:
    return list(dict.fromkeys(links))


def comment_trails(
    comments: Iterable[Any], rules: MappingRules | None = None, own: str | None = None
) -> dict[int, CommentTrail]:
    """Per issue number, the newest comment and the newest human one among `comments` (a page or
    more of `GET /repos/{owner}/{repo}/issues/comments`, in any order). A comment is a bot's when
    its login ends in "[bot]", its `user.type` is "Bot", the login is in `bots` or is `own` (the
    token's account, when known), or it carries trackloop's marker (its own follow-up)."""
    rules = rules or MappingRules()
    seen: dict[int, list[tuple[datetime, bool]]] = {}
    for comment in comments:
        if not isinstance(comment, Mapping):
            continue
        match = _ISSUE_URL.search(str(comment.get("issue_url") or ""))
        try:
            at = parse_time(comment.get("updated_at")) or parse_time(comment.get("created_at"))
        except ValueError:
            continue
        if match is not None and at is not None:
            seen.setdefault(int(match.group(1)), []).append((at, _by_bot(comment, rules, own)))
    return {number: trail for number, pairs in seen.items() if (trail := comment_trail(pairs))}


def _by_bot(comment: Mapping[str, Any], rules: MappingRules, own: str | None) -> bool:
    """Whether a bot, a configured bot account or trackloop (by its account or its marker) wrote `comment`."""
    user = comment.get("user") if isinstance(comment.get("user"), Mapping) else {}
    login = _login(user)
    if rules.is_bot(login) or user.get("type") == "Bot" or _OWN_MARKER.search(str(comment.get("body"))):
        return True
    return bool(own and login and login.lower() == own.lower())


def pull_request_activities(
    payload: Mapping[str, Any], rules: MappingRules | None = None, trail: CommentTrail | None = None
) -> list[ActivityRecord]:
    """A pull request that says "fixes #N" is activity on #N at the PR's `updated_at`; bots' PRs
    are not, and a bot's comment on the PR moves that time back to its newest human comment."""
    rules = rules or MappingRules()
    if not is_pull_request(payload):
        return []
    author = _login(payload.get("user"))
    if rules.is_bot(author):
        return []
    at = parse_time(payload.get("updated_at"))
    if bot_explained(at, trail):
        at = trail.human if trail is not None else None
    body = payload.get("body") if isinstance(payload.get("body"), str) else ""
    if at is None or not body:
        return []
    repo = repo_of(payload)
    pr = f"{repo}#{payload.get('number')}"
    actor = IdentityRef(IdentityKind.GITHUB, author) if author else None
    return [
        ActivityRecord(TaskRef(ref), at, actor, what=f"pull request {pr}")
        for ref in closing_refs(_clean(body), repo)
        if ref != pr
    ]


def parse_external_id(external_id: str) -> tuple[str, int]:
    """ "owner/repo#N" -> ("owner/repo", N); raises ValueError otherwise."""
    match = re.fullmatch(rf"({_OWNER}/{_NAME})#(\d+)", external_id.strip())
    if match is None:
        raise ValueError(f'expected "owner/repo#N", got {external_id!r}')
    return match.group(1).lower(), int(match.group(2))


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|~])")
_MENTION = re.compile(r"@(?=[\w-])")


def plain_markdown(text: str) -> str:
    """Plain text made inert in GitHub Markdown: no markup, HTML, links or @mentions of users or
    teams can be injected by a task's title (a zero-width space after "@" breaks the mention)."""
    return _MENTION.sub("@\u200b", _MARKDOWN_SPECIAL.sub(r"\\\1", text))


def marker_for(key: str) -> str:
    """The invisible marker that carries an idempotency key; keys that could end a comment are hashed."""
    safe = key if re.fullmatch(r"[A-Za-z0-9:._/#@+=,-]{1,200}", key) and "--" not in key else None
    return MARKER.format(key=safe or "sha256-" + hashlib.sha256(key.encode()).hexdigest())


def next_link(link_header: str | None) -> str | None:
    """The `rel="next"` URL of a `Link` header, as GitHub writes it."""
    for part in (link_header or "").split(","):
        match = re.match(r'\s*<([^>]+)>\s*;\s*rel="next"', part)
        if match:
            return match.group(1)
    return None


# -- the connector ----------------------------------------------------------------------------
class _Gone(PayloadError):
    """404 or 410: the issue (or repository) is not there."""


@dataclass(slots=True)
class _Answer:
    status: int
    headers: dict[str, str]
    data: Any

    @property
    def etag(self) -> str:
        return self.headers.get("etag", "")

    @property
    def next_url(self) -> str | None:
        return next_link(self.headers.get("link"))


@dataclass(slots=True)
class _Work:
    """The cursor being built during a pull; snapshots of it ride on every page."""

    fingerprint: str
    repos: dict[str, RepoCursor]
    owners: dict[str, OwnerListing]

    def snapshot(self, current: Sequence[str]) -> GithubCursor:
        return GithubCursor(
            fingerprint=self.fingerprint,
            repos={r: self.repos[r] for r in current if r in self.repos},
            owners=dict(self.owners),
        )


class GithubConnector(Connector[GithubConfig, GithubCursor]):
    kind = "github"
    config_model = GithubConfig
    cursor_model = GithubCursor

    def __init__(self, name: str, config: GithubConfig, **kwargs: Any) -> None:
        super().__init__(name, config, **kwargs)
        self.rules = MappingRules.from_config(config)
        self._client: Github | None = None
        self._rate_reset: datetime | None = None
        self._login: str | None = None

    # -- client ------------------------------------------------------------------------------
    @property
    def client(self) -> Github:
        if self._client is None:
            self._client = Github(
                base_url=self.config.base_url,
                auth=Auth.Token(self.config.token.get_secret_value()),
                timeout=max(1, math.ceil(self.config.timeout.total_seconds())),
                per_page=PER_PAGE,
                retry=None,  # GithubRetry would retry POSTs and sleep out rate limits behind our back
                seconds_between_requests=0,
                seconds_between_writes=0,
                lazy=True,  # get_repo/get_issue build objects without a GET
                user_agent="trackloop",
            )
        return self._client

    @property
    def requester(self) -> Requester:
        return self.client.requester

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def fingerprint(self) -> str:
        """Everything that shapes a record; when it changes, the next pull re-reads every repo once."""
        r = self.rules
        payload = json.dumps(
            [
                MAPPING_VERSION,
                r.priority_labels,
                r.status_labels,
                list(r.verified_labels),
                sorted(r.bots),
                r.max_body_bytes,
                self.config.include_pull_requests,
            ],
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    # -- errors ------------------------------------------------------------------------------
    @contextmanager
    def translate_errors(self) -> Iterator[None]:
        try:
            yield
        except GithubException as exc:
            raise self._translate_github(exc) from exc
        except requests.exceptions.Timeout as exc:
            seconds = self.config.timeout.total_seconds()
            raise TransientError(f"GitHub did not answer within {seconds:g}s") from exc
        except requests.exceptions.ConnectionError as exc:
            host = urlsplit(self.config.base_url).hostname
            raise TransientError(f"connection to {host} failed ({exc.__class__.__name__})") from exc
        except requests.exceptions.RequestException as exc:
            raise TransientError(f"request to GitHub failed ({exc.__class__.__name__})") from exc

    def _translate_github(self, exc: GithubException) -> ConnectorError:
        status = exc.status
        data = exc.data if isinstance(exc.data, Mapping) else {}
        message = (str(data.get("message") or exc.message or "").strip().splitlines() or [""])[0]
        text = f"{status} {message}".strip()
        headers = {k.lower(): str(v) for k, v in (exc.headers or {}).items()}
        retry_after = parse_retry_after(headers.get("retry-after"), self.now())
        if isinstance(exc, BadCredentialsException) or status == 401:
            return AuthError(
                f"GitHub refused the token of connector {self.name!r} ({text}); "
                f"check connectors.{self.name}.token"
            )
        primary = Requester.isPrimaryRateLimitError(message) or (
            status in (403, 429) and headers.get("x-ratelimit-remaining") == "0" and retry_after is None
        )
        if primary:
            reset = self._reset_from(headers)
            wait = max(0.0, (reset - self.now()).total_seconds()) if reset else 3600.0
            return RateLimited(f"GitHub rate limit exhausted ({text})", reset_at=reset, retry_after=wait)
        secondary = isinstance(exc, RateLimitExceededException) or (status == 403 and retry_after is not None)
        if status == 429 or secondary:
            wait = 60.0 if retry_after is None else retry_after  # GitHub: wait at least a minute
            return self.throttled(f"GitHub secondary rate limit ({text})", wait)
        if status == 403 and "locked" in message.lower():
            return PayloadError(f"GitHub answered {text}")  # a locked issue takes no comments
        if status == 403:
            return AuthError(
                f"GitHub denied connector {self.name!r} access ({text}); "
                "the token may lack a scope or SSO approval"
            )
        if status >= 500:
            return TransientError(f"GitHub answered {text}", retry_after=retry_after)
        if status in (404, 410):
            return _Gone(f"GitHub answered {text}")
        return PayloadError(f"GitHub answered {text}")

    def _reset_from(self, headers: Mapping[str, str]) -> datetime | None:
        value = headers.get("x-ratelimit-reset")
        try:
            return datetime.fromtimestamp(int(float(value)), UTC) if value else None
        except (TypeError, ValueError):
            return None

    # -- HTTP --------------------------------------------------------------------------------
    def _get(self, path: str, params: Mapping[str, Any] | None = None, etag: str | None = None) -> _Answer:
        """One GET through PyGithub's requester (auth, base URL, redirects); raises on >= 400."""
        headers = {"Accept": "application/vnd.github+json"}
        if etag:
            headers["If-None-Match"] = etag
        self.stats.requests += 1
        status, raw_headers, body = self.requester.requestJson("GET", path, dict(params or {}), headers)
        answer_headers = {k.lower(): v for k, v in raw_headers.items()}
        self._note_rate(answer_headers)
        if status == 304:
            self.stats.not_modified += 1
            return _Answer(status, answer_headers, None)
        try:
            data = json.loads(body) if body else None
        except ValueError:
            if status >= 400:
                data = {"message": body[:200]}
            else:
                raise PayloadError(f"GitHub sent unreadable JSON for {path}") from None
        if status >= 400:
            raise Requester.createException(status, answer_headers, data)
        return _Answer(status, answer_headers, data)

    def _note_rate(self, headers: Mapping[str, str]) -> None:
        remaining = headers.get("x-ratelimit-remaining")
        if remaining is not None:
            try:
                self.stats.rate_limit_remaining = int(float(remaining))
            except ValueError:
                pass
        reset = self._reset_from(headers)
        if reset is not None:
            self._rate_reset = reset

    def _check_budget(self) -> None:
        """Stop cleanly before a request when the rate-limit budget is below the configured floor."""
        remaining = self.stats.rate_limit_remaining
        if remaining is not None and remaining < self.config.min_remaining:
            reset = self._rate_reset
            when = f"; it resets at {reset:%Y-%m-%d %H:%M} UTC" if reset else ""
            raise RateLimited(
                f"GitHub rate limit low ({remaining} requests left, floor {self.config.min_remaining}){when}",
                reset_at=reset,
            )

    def _read(self, path: str, params: Mapping[str, Any] | None = None, etag: str | None = None) -> _Answer:
        self._check_budget()
        return self.call(self._get, path, params, etag)

    # -- check -------------------------------------------------------------------------------
    def check(self) -> CheckResult:
        """`GET /rate_limit`: checks the token and costs no rate limit."""
        try:
            answer = self.call(self._get, "/rate_limit")
        except PayloadError as exc:
            if "404" in str(exc):  # GitHub Enterprise with rate limiting disabled
                return CheckResult(True, f"{self.config.base_url}: token accepted (rate limiting disabled)")
            return CheckResult(False, str(exc))
        except ConnectorError as exc:
            return CheckResult(False, str(exc))
        data = answer.data if isinstance(answer.data, Mapping) else {}
        core = (data.get("resources") or {}).get("core") or data.get("rate") or {}
        reset = self._rate_reset
        resets = f", resets {reset:%H:%M} UTC" if reset else ""
        return CheckResult(
            True,
            f"{self.config.base_url}: token accepted; {core.get('remaining', '?')}/{core.get('limit', '?')} "
            f"requests left{resets}; {len(self.config.repos)} repo pattern(s)",
        )

    # -- pull --------------------------------------------------------------------------------
    def pull(self, state: SyncState[GithubCursor]) -> Iterator[Page[GithubCursor]]:
        fingerprint = self.fingerprint()
        cursor = state.cursor
        validators: Mapping[str, str] = state.validators
        if cursor is None or cursor.fingerprint != fingerprint:
            if cursor is not None:
                self.log.info("%s: mapping settings changed; re-reading every repository once", self.name)
            cursor, validators = GithubCursor(fingerprint=fingerprint), {}
        work = _Work(fingerprint, dict(cursor.repos), dict(cursor.owners))
        failures: list[str] = []

        repos: list[str] = []
        for pattern in self.config.repos:
            owner, _, name = pattern.partition("/")
            if name != "*":
                repos.append(pattern)
                continue
            try:
                listed, page = self._owner_repos(owner, state, work, validators)
            except (RateLimited, AuthError):
                raise
            except ConnectorError as exc:
                failures.append(f"{pattern}: {exc}")
                self.log.warning("%s: listing %s failed: %s", self.name, pattern, exc)
                cached = work.owners.get(owner)
                listed, page = (list(cached.repos) if cached else []), None
            repos.extend(listed)
            if page is not None:
                yield page
        repos = _unique(repos)
        wildcards = sum(p.endswith("/*") for p in self.config.repos)
        stale = {k: "" for k in validators if k.startswith("issues:") and k[len("issues:") :] not in repos}

        for repo in repos:
            try:
                for page in self._crawl(repo, state, work, validators, repos):
                    if stale:
                        page = Page(
                            page.tasks,
                            page.cursor,
                            {**stale, **page.validators},
                            page.activities,
                            page.completed_scopes,
                        )
                        stale = {}
                    yield page
            except (RateLimited, AuthError):
                raise
            except ConnectorError as exc:
                failures.append(f"{repo}: {exc}")
                self.log.warning("%s: %s failed, other repositories continue: %s", self.name, repo, exc)
        if failures:
            raise ConnectorError(
                f"{len(failures)} of {len(repos) + wildcards} GitHub listing(s) failed: "
                + "; ".join(failures[:5])
                + (" ..." if len(failures) > 5 else "")
            )

    def _owner_repos(
        self,
        owner: str,
        state: SyncState[GithubCursor],
        work: _Work,
        validators: Mapping[str, str],
    ) -> tuple[list[str], Page[GithubCursor] | None]:
        """Repositories of `owner`: the cached list until `repos_refresh` has passed, then the
        listing (one 304 when unchanged, which still has to be saved as the new `listed_at`)."""
        key = f"repos:{owner}"
        cached = work.owners.get(owner)
        now = self.now()
        if cached is not None and cached.listed_at is not None and not state.full:
            if now - cached.listed_at < self.config.repos_refresh:
                return list(cached.repos), None
        etag = validators.get(key) if cached is not None and not state.full else None
        kinds: list[Literal["orgs", "users"]] = [cached.kind] if cached else ["orgs", "users"]
        for kind in kinds:
            params = {
                "per_page": PER_PAGE,
                "type": "all" if kind == "orgs" else "owner",
                "sort": "created",
                "direction": "desc",
            }
            try:
                first = self._read(f"/{kind}/{owner}/repos", params, etag)
            except PayloadError as exc:
                if kind == "orgs" and cached is None and "404" in str(exc):
                    continue  # not an organization: try the user's repositories
                raise
            if first.status == 304 and cached is not None:
                work.owners[owner] = cached.model_copy(update={"listed_at": now})
                return list(cached.repos), Page(cursor=work.snapshot(_unique([*work.repos, *cached.repos])))
            items: list[Any] = list(first.data or [])
            answer = first
            for _ in range(MAX_PAGES):  # follow Link: it survives a redirect that drops our query
                if answer.next_url is None:
                    break
                answer = self._read(answer.next_url)
                items.extend(answer.data or [])
            names = []
            for item in items:
                if not isinstance(item, Mapping) or not isinstance(item.get("full_name"), str):
                    self.log.warning("%s: unreadable repository in %s's listing, skipped", self.name, owner)
                    continue
                if item.get("has_issues") is False or item.get("disabled"):
                    continue
                names.append(item["full_name"].lower())
            names.sort()
            work.owners[owner] = OwnerListing(kind=kind, repos=names, listed_at=now)
            # no pruning yet: repositories of later patterns keep their cursors
            page = Page(cursor=work.snapshot(_unique([*work.repos, *names])), validators={key: first.etag})
            return names, page
        raise PayloadError(f"{owner} is neither an organization nor a user GitHub knows (404)")

    def _crawl(
        self,
        repo: str,
        state: SyncState[GithubCursor],
        work: _Work,
        validators: Mapping[str, str],
        current: Sequence[str],
    ) -> Iterator[Page[GithubCursor]]:
        """Pages of one repository's issues, newest-first, down to the last crawl's start (see module doc)."""
        key = f"issues:{repo}"
        path = f"/repos/{repo}/issues"
        rc = work.repos.get(repo) or RepoCursor()
        progress = None if state.full else rc.crawl
        threshold = None if state.full or rc.since is None else rc.since - self.config.overlap
        if progress is not None:
            started, page_no, head_etag = progress.started, progress.page, progress.etag
            self.log.info("%s: resuming %s at page %d", self.name, repo, page_no)
        else:
            started, page_no, head_etag = self.now(), 1, ""
        # Only a listing read from its first page to its last in this run, with every item readable,
        # may cancel what it lacks (and then only what `confirm_missing` finds gone).
        complete = progress is None and threshold is None
        activities: list[ActivityRecord] = []
        trails: dict[int, CommentTrail] | None = None  # read once, when the listing has changed
        params = {"state": "all", "sort": "updated", "direction": "desc", "per_page": PER_PAGE}
        while True:
            if page_no == 1:
                etag = validators.get(key) if threshold is not None else None
                answer = self._read(path, params, etag)
                if answer.status == 304:
                    return
                head_etag = answer.etag
            else:
                extra = {"page": page_no, **({"since": format_since(threshold)} if threshold else {})}
                answer = self._read(path, {**params, **extra})
            if not isinstance(answer.data, list):
                raise PayloadError(f"{repo}: the issues listing is not a JSON array")
            if trails is None:
                trails = self._comment_trails(repo, rc.since - self.config.overlap) if rc.since else {}
            tasks, found, oldest, skipped = self._map_page(repo, answer.data, trails)
            activities.extend(found)
            complete = complete and not skipped
            reached = threshold is not None and oldest is not None and oldest < threshold
            if answer.next_url is not None and not reached:
                progress = CrawlProgress(started=started, page=page_no + 1, etag=head_etag)
                work.repos[repo] = RepoCursor(since=rc.since, crawl=progress)
                yield Page(tasks=tasks, cursor=work.snapshot(current), activities=found)
                page_no += 1
                continue
            work.repos[repo] = RepoCursor(since=started)
            yield Page(
                tasks=tasks,
                cursor=work.snapshot(current),
                validators={key: head_etag},
                activities=activities,  # again at the end: targets may have come on later pages
                completed_scopes=[repo] if complete else [],
            )
            return

    def _map_page(
        self, repo: str, items: list[Any], trails: Mapping[int, CommentTrail]
    ) -> tuple[list[TaskRecord], list[ActivityRecord], datetime | None, int]:
        """(tasks, pull-request activities, the oldest `updated_at`, how many items were unreadable);
        `trails` tell which updates were a bot's comment."""
        skipped = 0
        tasks: list[TaskRecord] = []
        activities: list[ActivityRecord] = []
        oldest: datetime | None = None
        for item in items:
            number = item.get("number") if isinstance(item, Mapping) else None
            try:
                if not isinstance(item, Mapping):
                    raise ValueError("not an object")
                updated = parse_time(item.get("updated_at"))
                if updated is not None and (oldest is None or updated < oldest):
                    oldest = updated
                item_repo = repo_of(item)
                if item_repo != repo:
                    raise PayloadError(
                        f"{repo} answered with issues of {item_repo}: the repository was renamed or moved; "
                        f"update connectors.{self.name}.repos"
                    )
                trail = trails.get(number) if isinstance(number, int) else None
                if is_pull_request(item):
                    activities.extend(pull_request_activities(item, self.rules, trail))
                    if not self.config.include_pull_requests:
                        continue
                tasks.append(human_activity(issue_record(item, self.rules), trail))
            except PayloadError:
                raise
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                self.log.warning("%s: %s#%s is unreadable (%s), skipped", self.name, repo, number, exc)
                skipped += 1
        return tasks, activities, oldest, skipped

    def _comment_trails(self, repo: str, since: datetime) -> dict[int, CommentTrail]:
        """Who wrote the comments of `repo` updated since `since`, from the repository's comment
        listing (newest first; one request per 100 comments), so a bot's comment is not activity."""
        params = {"since": format_since(since), "sort": "updated", "direction": "desc", "per_page": PER_PAGE}
        answer = self._read(f"/repos/{repo}/issues/comments", params)
        comments: list[Any] = list(answer.data if isinstance(answer.data, list) else ())
        for _ in range(MAX_PAGES - 1):
            if answer.next_url is None:
                break
            answer = self._read(answer.next_url)  # Link, not page numbers: a 301 drops the query
            comments.extend(answer.data if isinstance(answer.data, list) else ())
        if answer.next_url is not None:
            self.log.warning("%s: over %d comments on %s since the last crawl; the oldest were not read",
                             self.name, MAX_PAGES * PER_PAGE, repo)
        return comment_trails(comments, self.rules, self._login)

    def confirm_missing(self, scope: str, external_ids: Collection[str]) -> Confirmed:
        """`GET` each issue the complete listing of `scope` lacked: 404, 410 or a move to another
        repository (PyGithub follows the 301) is gone; one still here was skipped by a page shift
        (an issue deleted or transferred off an earlier page mid-crawl) and comes back as a record.
        An issue that cannot be asked about is kept this run."""
        gone: set[str] = set()
        found: list[TaskRecord] = []
        for external_id in sorted(external_ids):
            repo, number = parse_external_id(external_id)
            try:
                answer = self._read(f"/repos/{repo}/issues/{number}")
            except _Gone:
                gone.add(external_id)
                continue
            except (RateLimited, AuthError) as exc:
                self.log.warning("%s: cannot confirm what %s lost (%s); kept this run", self.name, scope, exc)
                break
            except ConnectorError as exc:
                self.log.warning("%s: cannot confirm %s is gone (%s); kept this run", self.name, external_id, exc)
                continue
            payload = answer.data if isinstance(answer.data, Mapping) else {}
            try:
                moved = repo_of(payload) != repo
                if moved or (is_pull_request(payload) and not self.config.include_pull_requests):
                    gone.add(external_id)
                else:
                    found.append(issue_record(payload, self.rules))
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                self.log.warning("%s: %s is unreadable (%s); kept this run", self.name, external_id, exc)
        if found:
            self.log.info("%s: %d issue(s) of %s were missing from the listing but are there", self.name,
                          len(found), scope)
        return Confirmed(gone=frozenset(gone), found=tuple(found))

    # -- push --------------------------------------------------------------------------------
    def push(self, action: Action) -> PushResult:
        """Post `action.text` as a comment on the issue, once per `action.key` (see README)."""
        if action.kind != "comment":
            raise PushError(f"the github connector cannot deliver {action.kind!r} actions", permanent=True)
        target = action.task_external_id or action.target or ""
        try:
            repo, number = parse_external_id(target)
        except ValueError as exc:
            raise PushError(str(exc), permanent=True) from None
        marker = marker_for(action.key)
        try:
            found = self._find_marker(repo, number, marker)
            if found is not None:
                return PushResult(found, already_delivered=True)
            body = f"{plain_markdown(action.text.rstrip())}\n\n{marker}"
            issue = self.client.get_repo(repo).get_issue(number)  # lazy: no request
            self._check_budget()
            self.stats.requests += 1
            comment = self.once(issue.create_comment, body)
            self._note_rate({k.lower(): v for k, v in (comment.raw_headers or {}).items()})
            return PushResult(str(comment.id))
        except PushError:
            raise
        except TransientError as exc:  # RateLimited included: the outbox tries again later
            raise PushError(f"{repo}#{number}: {exc}", permanent=False) from exc
        except AuthError as exc:
            raise PushError(str(exc), permanent=False) from exc
        except ConnectorError as exc:
            raise PushError(f"{repo}#{number}: {exc}", permanent=True) from exc

    def _find_marker(self, repo: str, number: int, marker: str) -> str | None:
        """The id of trackloop's own earlier comment carrying `marker`, among the recent comments."""
        since = format_since(self.now() - self.config.comment_lookback)
        path = f"/repos/{repo}/issues/{number}/comments"
        answer = self._read(path, {"since": since, "per_page": PER_PAGE})
        for _ in range(MAX_PAGES):
            for comment in answer.data if isinstance(answer.data, list) else ():
                if isinstance(comment, Mapping) and marker in (comment.get("body") or ""):
                    if self._is_own(comment):
                        return str(comment.get("id"))
            if answer.next_url is None:
                return None
            answer = self._read(answer.next_url)  # Link, not page numbers: a 301 drops the query
        raise PayloadError(f"{repo}#{number}: over {MAX_PAGES * PER_PAGE} recent comments; not posting blind")

    def _is_own(self, comment: Mapping[str, Any]) -> bool:
        """Whether the token's account wrote `comment` (`GET /user` once per connector, only when needed)."""
        if self._login is None:
            answer = self._read("/user")
            self._login = str((answer.data or {}).get("login") or "")
        author = _login(comment.get("user")) or ""
        return author.lower() == self._login.lower()
