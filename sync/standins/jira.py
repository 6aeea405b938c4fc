"""A local stand-in of the Jira REST API: Cloud (platform v2/v3) and Server/Data Center (v2).

It speaks the wire protocol the unchanged `jira` library uses, so tests, benchmarks and the offline
demo exercise the real client: its start-up handshake (`serverInfo`), field discovery, the enhanced
search with `nextPageToken` on Cloud, `startAt` paging on Server, issues rendered per API version
(Atlassian Document Format on v3, wiki markup on v2), comments, auth failures and injected faults.

Issues are stored in a neutral form (plain-text bodies, UTC datetimes) and rendered per request, so
one data set serves both deployments and both API versions.
"""

from __future__ import annotations

import base64
import operator
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, TypeAlias, TypeGuard
from zoneinfo import ZoneInfo

from .base import Fault, Request, Response, Router, Standin

# -- wire vocabulary -------------------------------------------------------------------------------

_GONE = (
    "The requested API has been removed. Please migrate to the /rest/api/3/search/jql API. "
    "A full migration guideline is available at https://developer.atlassian.com/changelog/#CHANGE-2046"
)
_NO_ISSUE = "Issue does not exist or you do not have permission to see it."
_UNBOUNDED = "Unbounded JQL queries are not allowed here. Please add a search restriction to your query."
_ISSUE_EXPAND = "renderedFields,names,schema,operations,editmeta,changelog,versionedRepresentations"

_CATEGORIES = {
    "new": {"id": 2, "key": "new", "colorName": "blue-gray", "name": "To Do"},
    "indeterminate": {"id": 4, "key": "indeterminate", "colorName": "yellow", "name": "In Progress"},
    "done": {"id": 3, "key": "done", "colorName": "green", "name": "Done"},
}
# The default workflow: lower-cased name -> (name, id, category). Other names get fresh ids.
_KNOWN_STATUSES = {
    "to do": ("To Do", "10000", "new"),
    "in progress": ("In Progress", "3", "indeterminate"),
    "done": ("Done", "10001", "done"),
}
_PRIORITIES = {"Highest": "1", "High": "2", "Medium": "3", "Low": "4", "Lowest": "5"}
_LINK_TYPES = {
    "Blocks": {"id": "10000", "name": "Blocks", "inward": "is blocked by", "outward": "blocks"},
    "Cloners": {"id": "10001", "name": "Cloners", "inward": "is cloned by", "outward": "clones"},
    "Duplicate": {"id": "10002", "name": "Duplicate", "inward": "is duplicated by", "outward": "duplicates"},
    "Relates": {"id": "10003", "name": "Relates", "inward": "relates to", "outward": "relates to"},
}
_TIME_KEYS = ("originalEstimate", "remainingEstimate", "timeSpent")
_KEY = re.compile(r"([A-Z][A-Z0-9_]*)-([1-9][0-9]*)")


@dataclass(frozen=True, slots=True)
class _FieldDef:
    id: str
    name: str
    clause_names: tuple[str, ...]
    schema: dict[str, Any] | None
    navigable: bool = True


def _system(kind: str, system: str, **extra: Any) -> dict[str, Any]:
    return {"type": kind, "system": system, **extra}


def _custom(kind: str, plugin: str, number: int, **extra: Any) -> dict[str, Any]:
    return {"type": kind, **extra, "custom": plugin, "customId": number}


_FIELDS = (
    _FieldDef("issuekey", "Key", ("id", "issue", "issuekey", "key"), None),
    _FieldDef("summary", "Summary", ("summary",), _system("string", "summary")),
    _FieldDef("description", "Description", ("description",), _system("string", "description")),
    _FieldDef("issuetype", "Issue Type", ("issuetype", "type"), _system("issuetype", "issuetype")),
    _FieldDef("project", "Project", ("project",), _system("project", "project")),
    _FieldDef("status", "Status", ("status",), _system("status", "status")),
    _FieldDef("resolution", "Resolution", ("resolution",), _system("resolution", "resolution")),
    _FieldDef("priority", "Priority", ("priority",), _system("priority", "priority")),
    _FieldDef("assignee", "Assignee", ("assignee",), _system("user", "assignee")),
    _FieldDef("reporter", "Reporter", ("reporter",), _system("user", "reporter")),
    _FieldDef("labels", "Labels", ("labels",), _system("array", "labels", items="string")),
    _FieldDef("duedate", "Due date", ("due", "duedate"), _system("date", "duedate")),
    _FieldDef("parent", "Parent", ("parent",), None),
    _FieldDef("subtasks", "Sub-tasks", ("subtasks",), _system("array", "subtasks", items="issuelinks")),
    _FieldDef(
        "issuelinks", "Linked Issues", ("issueLink",), _system("array", "issuelinks", items="issuelinks")
    ),
    _FieldDef("timetracking", "Time tracking", (), _system("timetracking", "timetracking")),
    _FieldDef(
        "timeoriginalestimate",
        "Original estimate",
        ("originalEstimate", "timeoriginalestimate"),
        _system("number", "timeoriginalestimate"),
    ),
    _FieldDef(
        "timeestimate",
        "Remaining Estimate",
        ("remainingEstimate", "timeestimate"),
        _system("number", "timeestimate"),
    ),
    _FieldDef("timespent", "Time Spent", ("timespent",), _system("number", "timespent")),
    _FieldDef("created", "Created", ("created", "createdDate"), _system("datetime", "created")),
    _FieldDef("updated", "Updated", ("updated", "updatedDate"), _system("datetime", "updated")),
    _FieldDef(
        "resolutiondate", "Resolved", ("resolutiondate", "resolved"), _system("datetime", "resolutiondate")
    ),
    _FieldDef("comment", "Comment", ("comment",), _system("comments-page", "comment"), navigable=False),
    _FieldDef(
        "customfield_10020",
        "Sprint",
        ("Sprint", "cf[10020]"),
        _custom("array", "com.pyxis.greenhopper.jira:gh-sprint", 10020, items="json"),
    ),
    _FieldDef(
        "customfield_10042",
        "Acceptance criteria",
        ("Acceptance criteria", "cf[10042]"),
        _custom("string", "com.atlassian.jira.plugin.system.customfieldtypes:textarea", 10042),
    ),
)
_CLAUSE_NAMES = frozenset(name.lower() for f in _FIELDS for name in f.clause_names)
_NAVIGABLE = tuple(f.id for f in _FIELDS if f.navigable and f.id != "issuekey")
_ALL = tuple(f.id for f in _FIELDS if f.id != "issuekey")


# -- neutral storage -------------------------------------------------------------------------------


@dataclass(slots=True)
class _User:
    account_id: str  # Cloud accountId; also the Server user key
    name: str  # Server username
    display_name: str
    email: str
    time_zone: str
    account_type: str = "atlassian"  # Cloud: "atlassian" (a person), "app" (a bot), "customer"


@dataclass(slots=True)
class _Link:
    id: str
    type: str  # a _LINK_TYPES name
    direction: str  # "outward": this issue <outward verb> other; "inward": other <outward verb> this issue
    other: str  # the other issue's key


@dataclass(slots=True)
class _Comment:
    id: str
    author: str  # account id
    body: str  # plain text / wiki markup
    created: datetime
    updated: datetime


@dataclass(slots=True)
class _Issue:
    id: str
    key: str
    project: str
    number: int
    summary: str
    description: str | None
    status: str
    category: str
    assignee: str | None
    reporter: str | None
    priority: str
    duedate: str | None
    labels: list[str]
    parent: str | None
    timetracking: dict[str, int]
    acceptance: str | None
    created: datetime
    updated: datetime
    resolutiondate: datetime | None
    links: list[_Link] = field(default_factory=list)
    comments: list[_Comment] = field(default_factory=list)


def _natural(issue: _Issue) -> tuple[str, int]:
    """Jira's key order: by project, then numerically (ENG-2 before ENG-10)."""
    return issue.project, issue.number


def _utc(when: datetime) -> datetime:
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _stamp(when: datetime) -> str:
    """Jira's timestamp format: `2024-01-02T03:04:05.000+0000`."""
    when = when.astimezone(UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}+0000"


def _duration(seconds: int) -> str:
    """Jira's pretty duration with its default 5-day weeks and 8-hour days, e.g. `1w 2d 3h`."""
    parts = []
    for unit, size in (("w", 5 * 8 * 3600), ("d", 8 * 3600), ("h", 3600), ("m", 60)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return " ".join(parts) or "0m"


# -- Atlassian Document Format ---------------------------------------------------------------------


def to_adf(text: str) -> dict[str, Any]:
    """Render neutral text as an ADF document: blank lines split paragraphs, newlines become hardBreaks."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", text.strip()):
        content: list[dict[str, Any]] = []
        for number, line in enumerate(block.split("\n")):
            if number:
                content.append({"type": "hardBreak"})
            if line:
                content.append({"type": "text", "text": line})
        paragraphs.append({"type": "paragraph", "content": content})
    return {"type": "doc", "version": 1, "content": paragraphs}


def from_adf(node: Mapping[str, Any]) -> str:
    """Flatten an ADF node to neutral text (lists become wiki `*`/`#` items)."""
    kind = node.get("type")
    children = node.get("content") or []
    if kind == "text":
        return str(node.get("text", ""))
    if kind == "hardBreak":
        return "\n"
    if kind == "mention":
        return str((node.get("attrs") or {}).get("text", ""))
    if kind == "doc":
        return "\n\n".join(from_adf(child) for child in children)
    if kind in ("bulletList", "orderedList"):
        bullet = "*" if kind == "bulletList" else "#"
        return "\n".join(f"{bullet} {from_adf(item)}" for item in children)
    return "".join(from_adf(child) for child in children)


def _is_adf(value: Any) -> TypeGuard[dict[str, Any]]:
    return (
        isinstance(value, dict)
        and value.get("type") == "doc"
        and value.get("version") == 1
        and isinstance(value.get("content"), list)
    )


# -- JQL -------------------------------------------------------------------------------------------


class JqlError(ValueError):
    """A query Jira answers with 400; the message is Jira's wording."""


@dataclass(frozen=True, slots=True)
class Clause:
    field: str
    op: str  # = != > >= < <= ~ !~ in, not in
    values: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Junction:
    op: str  # and | or
    parts: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Negation:
    part: Node


Node: TypeAlias = Clause | Junction | Negation


@dataclass(frozen=True, slots=True)
class Query:
    where: Node | None
    order: tuple[tuple[str, bool], ...]  # (field, descending)


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # punct | op | string | word | end
    text: str
    at: int  # 1-based character position, as Jira reports it


_TOKEN = re.compile(
    r"""(?P<space>\s+)
      | (?P<punct>[(),])
      | (?P<op>!=|!~|>=|<=|=|>|<|~)
      | "(?P<dq>(?:[^"\\]|\\.)*)"
      | '(?P<sq>(?:[^'\\]|\\.)*)'
      | (?P<word>[^\s(),"'=!<>~]+)""",
    re.VERBOSE,
)
_RESERVED = frozenset({"and", "or", "not", "in", "order", "by", "asc", "desc"})


def _tokenize(text: str) -> list[_Token]:
    tokens, pos = [], 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise JqlError(
                f"Error in the JQL Query: The character '{text[pos]}' is a reserved JQL character. You must "
                f"enclose it in a string or use the escape '\\u{ord(text[pos]):04x}' instead. "
                f"(line 1, character {pos + 1})"
            )
        kind = match.lastgroup or ""
        if kind in ("dq", "sq"):
            tokens.append(_Token("string", re.sub(r"\\(.)", r"\1", match[kind]), pos + 1))
        elif kind != "space":
            tokens.append(_Token(kind, match[0], pos + 1))
        pos = match.end()
    tokens.append(_Token("end", "", len(text) + 1))
    return tokens


class _Parser:
    """Recursive descent over: [expr] [ORDER BY field [ASC|DESC], ...] with AND binding tighter than OR."""

    def __init__(self, text: str) -> None:
        self.tokens = _tokenize(text)
        self.pos = 0

    def parse(self) -> Query:
        where = None if self._at_keyword("order") or self._peek().kind == "end" else self._expr()
        order: tuple[tuple[str, bool], ...] = ()
        if self._keyword("order"):
            if not self._keyword("by"):
                raise self._expected("'by'")
            order = self._order()
        if self._peek().kind != "end":
            raise self._expected("either 'OR' or 'AND'")
        return Query(where, order)

    def _peek(self) -> _Token:
        return self.tokens[self.pos]

    def _at_keyword(self, word: str) -> bool:
        token = self._peek()
        return token.kind == "word" and token.text.lower() == word

    def _keyword(self, word: str) -> bool:
        if self._at_keyword(word):
            self.pos += 1
            return True
        return False

    def _at_punct(self, char: str) -> bool:
        token = self._peek()
        return token.kind == "punct" and token.text == char

    def _punct(self, char: str) -> bool:
        if self._at_punct(char):
            self.pos += 1
            return True
        return False

    def _expected(self, what: str) -> JqlError:
        token = self._peek()
        if token.kind == "end":
            return JqlError(f"Error in the JQL Query: Expecting {what} but reached the end of the query.")
        return JqlError(
            f"Error in the JQL Query: Expecting {what} but got '{token.text}'. (line 1, character {token.at})"
        )

    def _expr(self) -> Node:
        parts = [self._term()]
        while self._keyword("or"):
            parts.append(self._term())
        return parts[0] if len(parts) == 1 else Junction("or", tuple(parts))

    def _term(self) -> Node:
        parts = [self._factor()]
        while self._keyword("and"):
            parts.append(self._factor())
        return parts[0] if len(parts) == 1 else Junction("and", tuple(parts))

    def _factor(self) -> Node:
        if self._keyword("not"):
            return Negation(self._factor())
        if self._punct("("):
            node = self._expr()
            if not self._punct(")"):
                raise self._expected("')'")
            return node
        return self._clause()

    def _clause(self) -> Clause:
        token = self._peek()
        if token.kind not in ("word", "string") or (token.kind == "word" and token.text.lower() in _RESERVED):
            raise self._expected("a field name")
        self.pos += 1
        if self._keyword("not"):
            if not self._keyword("in"):
                raise self._expected("'in'")
            return Clause(token.text, "not in", self._list())
        if self._keyword("in"):
            return Clause(token.text, "in", self._list())
        if (op := self._peek()).kind != "op":
            raise JqlError(
                f"Error in the JQL Query: Expecting operator but got '{op.text}'. The query should be of "
                f"the form: <field> <operator> <value> (line 1, character {op.at})"
            )
        self.pos += 1
        return Clause(token.text, op.text, (self._value(),))

    def _value(self) -> str:
        token = self._peek()
        if token.kind == "string" or (token.kind == "word" and token.text.lower() not in _RESERVED):
            self.pos += 1
            if self._at_punct("("):
                raise JqlError(f"Error in the JQL Query: Unable to find JQL function '{token.text}()'.")
            return token.text
        raise self._expected("either a value, list or function")

    def _list(self) -> tuple[str, ...]:
        if not self._punct("("):
            raise self._expected("'('")
        values = [self._value()]
        while self._punct(","):
            values.append(self._value())
        if not self._punct(")"):
            raise self._expected("')'")
        return tuple(values)

    def _order(self) -> tuple[tuple[str, bool], ...]:
        items = []
        while True:
            token = self._peek()
            if token.kind not in ("word", "string"):
                raise self._expected("a field name")
            self.pos += 1
            descending = self._keyword("desc")
            if not descending:
                self._keyword("asc")
            items.append((token.text, descending))
            if not self._punct(","):
                return tuple(items)


def parse_jql(text: str) -> Query:
    """Parse the supported JQL subset into a `Query`; raise `JqlError` with Jira's wording."""
    return _Parser(text).parse()


Predicate: TypeAlias = Callable[[_Issue], bool]
_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "=": operator.eq,
    "!=": operator.ne,
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}
_DATE_FIELDS = {
    "updated": "updated",
    "updateddate": "updated",
    "created": "created",
    "createddate": "created",
}
_DATE_FORMATS = ("%Y-%m-%d %H:%M", "%Y/%m/%d %H:%M", "%Y-%m-%d", "%Y/%m/%d")
_PERIOD = re.compile(r"([-+]?)\s*((?:\d+\s*[wdhm]\s*)+)")
_PERIOD_UNITS = {
    "w": timedelta(weeks=1),
    "d": timedelta(days=1),
    "h": timedelta(hours=1),
    "m": timedelta(minutes=1),
}
_ORDER_KEYS: dict[str, Callable[[_Issue], Any]] = {
    "updated": operator.attrgetter("updated"),
    "updateddate": operator.attrgetter("updated"),
    "created": operator.attrgetter("created"),
    "createddate": operator.attrgetter("created"),
    "key": _natural,
    "issuekey": _natural,
    "id": lambda issue: int(issue.id),
    "project": operator.attrgetter("project"),
}
_CATEGORY_VALUES = {
    "new": "new",
    "to do": "new",
    "indeterminate": "indeterminate",
    "in progress": "indeterminate",
    "done": "done",
}


class _Compiler:
    """Turns a parsed query into a predicate, validating values the way Jira does.

    Strict validation (Cloud always; Server unless `validateQuery=false|warn|none`) rejects unknown
    projects, keys and statuses with 400 rather than matching nothing.
    """

    def __init__(self, standin: JiraStandin, *, strict: bool) -> None:
        self.standin = standin
        self.strict = strict

    def compile(self, node: Node) -> Predicate:
        if isinstance(node, Junction):
            parts = [self.compile(part) for part in node.parts]
            if node.op == "and":
                return lambda issue: all(part(issue) for part in parts)
            return lambda issue: any(part(issue) for part in parts)
        if isinstance(node, Negation):
            inner = self.compile(node.part)
            return lambda issue: not inner(issue)
        return self._clause(node)

    def _clause(self, clause: Clause) -> Predicate:
        name = clause.field.lower()
        if name in _DATE_FIELDS:
            return self._date(clause, _DATE_FIELDS[name])
        if name == "project":
            return self._member(clause, lambda issue: (issue.project,), self._project)
        if name in ("key", "issuekey"):
            return self._member(clause, lambda issue: (issue.key,), self._key)
        if name == "labels":
            return self._member(clause, lambda issue: issue.labels, lambda value, _: value)
        if name == "status":
            return self._member(clause, lambda issue: (issue.status.lower(),), self._status)
        if name == "statuscategory":
            return self._member(clause, lambda issue: (issue.category,), self._category)
        if name in _CLAUSE_NAMES:
            raise JqlError(f"Searching by '{clause.field}' is not supported by the Jira stand-in.")
        raise JqlError(f"Field '{clause.field}' does not exist or you do not have permission to view it.")

    def _unsupported(self, clause: Clause) -> JqlError:
        return JqlError(f"The operator '{clause.op}' is not supported by the '{clause.field}' field.")

    def _member(
        self,
        clause: Clause,
        values_of: Callable[[_Issue], Iterable[str]],
        normalize: Callable[[str, str], str],
    ) -> Predicate:
        if clause.op not in ("=", "!=", "in", "not in"):
            raise self._unsupported(clause)
        wanted = frozenset(normalize(value, clause.field) for value in clause.values)
        if clause.op in ("=", "in"):
            return lambda issue: not wanted.isdisjoint(values_of(issue))
        return lambda issue: wanted.isdisjoint(values_of(issue))

    def _missing(self, value: str, field_name: str) -> None:
        if self.strict:
            raise JqlError(f"The value '{value}' does not exist for the field '{field_name}'.")

    def _project(self, value: str, field_name: str) -> str:
        """Projects match by key or name, case-insensitively."""
        wanted = value.lower()
        key = next(
            (k for k, name in self.standin._projects.items() if wanted in (k.lower(), name.lower())), None
        )
        if key is None:
            self._missing(value, field_name)
        return key or value.upper()

    def _key(self, value: str, field_name: str) -> str:
        key = value.upper()
        if key not in self.standin._issues and self.strict:
            raise JqlError(f"An issue with key '{value}' does not exist for field '{field_name}'.")
        return key

    def _status(self, value: str, field_name: str) -> str:
        if value.lower() not in self.standin._statuses:
            self._missing(value, field_name)
        return value.lower()

    def _category(self, value: str, field_name: str) -> str:
        category = _CATEGORY_VALUES.get(value.lower())
        if category is None:
            self._missing(value, field_name)
        return category or value

    def _date(self, clause: Clause, attribute: str) -> Predicate:
        compare = _COMPARE.get(clause.op)
        if compare is None:
            raise self._unsupported(clause)
        bound = self.instant(clause.values[0], clause.field)
        read = operator.attrgetter(attribute)
        return lambda issue: compare(read(issue), bound)

    def instant(self, value: str, field_name: str) -> datetime:
        """A JQL date: epoch milliseconds, a period like `-5d`, or a minute-precision date string
        read in the searching account's time zone."""
        if value.isdigit():
            return datetime.fromtimestamp(int(value) / 1000, UTC)
        if period := _PERIOD.fullmatch(value):
            amounts = re.findall(r"(\d+)\s*([wdhm])", period[2])
            delta = sum((int(count) * _PERIOD_UNITS[unit] for count, unit in amounts), timedelta())
            return self.standin.now() + (-delta if period[1] == "-" else delta)
        for fmt in _DATE_FORMATS:
            try:
                local = datetime.strptime(value, fmt)
            except ValueError:
                continue
            return local.replace(tzinfo=self.standin._zone).astimezone(UTC)
        raise JqlError(
            f"Date value '{value}' for field '{field_name}' is invalid. Valid formats include: "
            "'yyyy/MM/dd HH:mm', 'yyyy-MM-dd HH:mm', 'yyyy/MM/dd', 'yyyy-MM-dd', or a period format "
            "e.g. '-5d', '4w 2d'."
        )


# -- the stand-in ----------------------------------------------------------------------------------


class _Fail(Exception):
    """An answer in Jira's error shape, raised from deep inside a handler."""

    def __init__(
        self,
        status: int,
        messages: Iterable[str] = (),
        errors: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(status, messages)
        self.status = status
        self.body = {"errorMessages": list(messages), "errors": dict(errors or {})}
        self.headers = dict(headers or {})

    def response(self) -> Response:
        return Response.json(self.body, self.status, self.headers)


_API = r"/rest/api/(?P<v>2|3|latest)"
_ISSUE_PATH = _API + r"/issue/(?P<issue>[^/]+)"


class JiraStandin(Standin):
    """Jira Cloud or Server/Data Center on loopback, speaking the REST wire protocol.

    Point the real client at it with `JIRA(server=s.base_url, basic_auth=(s.email, s.token))` on Cloud
    or `token_auth=s.token` on Server. Cloud answers the retired `/search` endpoints 410 Gone, as the
    real service does since the enhanced search (`/search/jql`) replaced them.
    """

    DEFAULT_MAX_RESULTS = 50
    # Cloud /search/jql: "It returns max 5000 issues" when only `id`/`key` are requested; with other
    # fields the service silently pages at 100 (REST v3 docs, maxResults).
    CLOUD_MAX_RESULTS_IDS = 5000
    CLOUD_MAX_RESULTS = 100
    # Server/DC /search: capped by the `jira.search.views.default.max` property, default 1000.
    SERVER_MAX_RESULTS = 1000
    # Comments: default and cap 5000 (REST v3 docs, Get comments).
    COMMENTS_MAX_RESULTS = 5000
    _MAX_CURSORS = 10_000
    _MAX_CACHED_QUERIES = 16

    def __init__(
        self,
        deployment: str = "cloud",
        *,
        email: str = "bot@acme.io",
        token: str = "test-token",
        timezone: str = "UTC",
    ) -> None:
        if deployment not in ("cloud", "server"):
            raise ValueError(f"deployment must be 'cloud' or 'server', not {deployment!r}")
        super().__init__()
        self.deployment = deployment
        self.cloud = deployment == "cloud"
        self.email = email
        self.token = token
        self.timezone = timezone
        self._zone = ZoneInfo(timezone)
        self._users: dict[str, _User] = {}
        self._issues: dict[str, _Issue] = {}
        self._ids: dict[str, str] = {}  # issue id -> key
        self._children: dict[str, list[str]] = {}  # parent key -> sub-task keys
        self._projects: dict[str, str] = {}  # key -> name
        self._statuses: dict[str, tuple[str, str]] = {  # lower-cased name -> (name, id)
            lowered: (name, status_id) for lowered, (name, status_id, _) in _KNOWN_STATUSES.items()
        }
        self._counters = {"issue": 10000, "comment": 10000, "link": 10000, "status": 10100, "cursor": 0}
        self._generation = 0  # bumped by every change; keys the query cache
        self._query_cache: dict[tuple[Any, ...], list[str]] = {}
        self._cursors: dict[str, tuple[list[str], int]] = {}
        self._forbidden: re.Pattern[str] | None = None
        self.bot = self.add_user(
            "5b10ac8d82e05b22cc7d4ef5", name=email.split("@")[0], display_name="Trackloop Bot", email=email
        )
        self._router = self._routes()

    # -- data API ----------------------------------------------------------------------------------
    def add_user(
        self, account_id: str, *, name: str, display_name: str, email: str, account_type: str = "atlassian"
    ) -> str:
        """Register a person (or, with `account_type="app"`, a Cloud app such as Automation);
        `account_id` is the Cloud accountId and the Server user key."""
        with self.lock:
            self._users[account_id] = _User(account_id, name, display_name, email, self.timezone, account_type)
            return account_id

    def add_issue(
        self,
        key: str,
        *,
        summary: str,
        description: str | None = None,
        status: str = "To Do",
        category: str | None = None,
        assignee: str | None = None,
        reporter: str | None = None,
        priority: str = "Medium",
        duedate: str | date | None = None,
        labels: Iterable[str] = (),
        parent: str | None = None,
        links: Iterable[tuple[str, str]] = (),
        timetracking: Mapping[str, int] | None = None,
        created: datetime | None = None,
        updated: datetime | None = None,
        acceptance: str | None = None,
    ) -> dict[str, Any]:
        """Create an issue. `category` (new|indeterminate|done) defaults from the status name;
        `links` are `(link type, other key)` pairs with this issue on the outward side
        ("ENG-1 blocks ENG-2"); `timetracking` uses Jira's `originalEstimateSeconds`-style keys."""
        match = _KEY.fullmatch(key)
        if match is None:
            raise ValueError(f"not a Jira issue key: {key!r}")
        links = list(links)
        with self.lock:
            if key in self._issues:
                raise ValueError(f"{key} already exists")
            for link_type, other in links:  # check everything before storing anything
                self._link_type(link_type)
                self._issue(other)
            created = _utc(created) if created else self.now()
            issue = _Issue(
                id=str(self._counters["issue"] + 1),
                key=key,
                project=match[1],
                number=int(match[2]),
                summary=summary,
                description=description,
                status=status,
                category="new",
                assignee=None,
                reporter=None,
                priority=priority,
                duedate=None,
                labels=[],
                parent=None,
                timetracking={},
                acceptance=acceptance,
                created=created,
                updated=created,
                resolutiondate=None,
            )
            self._apply(
                issue,
                {
                    "status": status,
                    "category": category,
                    "assignee": assignee,
                    "reporter": reporter or self.bot,
                    "priority": priority,
                    "duedate": duedate,
                    "labels": labels,
                    "parent": parent,
                    "timetracking": timetracking or {},
                    "updated": updated or created,
                },
            )
            self._counters["issue"] += 1
            self._issues[key] = issue
            self._ids[issue.id] = key
            self._projects.setdefault(issue.project, issue.project.title())
            for link_type, other in links:
                self._link(key, link_type, other)
            return self._snapshot(issue)

    def update_issue(self, key: str, **changes: Any) -> dict[str, Any]:
        """Change fields (same names as `add_issue`); `updated` moves to now unless given."""
        allowed = {
            "summary", "description", "status", "category", "assignee", "reporter", "priority",
            "duedate", "labels", "parent", "timetracking", "created", "updated", "acceptance",
        }  # fmt: skip
        if unknown := set(changes) - allowed:
            raise TypeError(f"update_issue() got unexpected fields {sorted(unknown)}")
        with self.lock:
            issue = self._issue(key)
            if "status" in changes and "category" not in changes:
                changes["category"] = None
            changes.setdefault("updated", self.now())
            self._apply(issue, changes)
            return self._snapshot(issue)

    def delete_issue(self, key: str) -> None:
        """Remove an issue with its comments, its sub-tasks (as Jira does) and the links to it."""
        with self.lock:
            issue = self._issue(key)
            for child in list(self._children.get(key, ())):
                self.delete_issue(child)
            self._children.pop(key, None)
            del self._issues[key]
            del self._ids[issue.id]
            if issue.parent:
                self._children[issue.parent].remove(key)
            for link in issue.links:
                other = self._issues.get(link.other)
                if other is not None:
                    other.links = [mine for mine in other.links if mine.id != link.id]
            self._generation += 1

    def add_link(self, key: str, link_type: str, outward_key: str) -> str:
        """Link two issues, e.g. `add_link("ENG-1", "Blocks", "ENG-2")`: ENG-1 blocks ENG-2."""
        with self.lock:
            return self._link(key, link_type, outward_key)

    def add_comment(
        self, key: str, body: str, author: str | None = None, *, created: datetime | None = None
    ) -> dict[str, Any]:
        """Comment as `author` (default: the bot); like Jira this bumps the issue's `updated`."""
        with self.lock:
            return asdict(self._comment(self._issue(key), body, author or self.bot, created))

    def comments(self, key: str) -> list[dict[str, Any]]:
        with self.lock:
            return [asdict(comment) for comment in self._issue(key).comments]

    def issue(self, key: str) -> dict[str, Any]:
        """The stored (neutral) form of an issue."""
        with self.lock:
            return self._snapshot(self._issue(key))

    def forbid(self, path_pattern: str | None = "/rest/api/") -> None:
        """Answer matching API paths 403, like an account that lost access; `None` lifts it."""
        with self.lock:
            self._forbidden = re.compile(path_pattern) if path_pattern is not None else None

    # -- storage helpers ---------------------------------------------------------------------------
    def _issue(self, key: str) -> _Issue:
        try:
            return self._issues[key]
        except KeyError:
            raise KeyError(f"no issue {key}") from None

    def _ensure_user(self, account_id: str) -> None:
        """Unknown people are registered on first mention so test data stays terse."""
        if account_id not in self._users:
            self.add_user(
                account_id, name=account_id, display_name=account_id, email=f"{account_id}@example.com"
            )

    def _status_id(self, name: str) -> str:
        if name.lower() not in self._statuses:
            self._counters["status"] += 1
            self._statuses[name.lower()] = (name, str(self._counters["status"]))
        return self._statuses[name.lower()][1]

    def _apply(self, issue: _Issue, changes: Mapping[str, Any]) -> None:
        """Validate and normalise every change first, then store them, so a bad value changes nothing."""
        values = dict(changes)
        if "category" in values:  # None: inferred from the (possibly new) status
            known = _KNOWN_STATUSES.get(values.get("status", issue.status).lower())
            values["category"] = values["category"] or (known[2] if known else "new")
            if values["category"] not in _CATEGORIES:
                raise ValueError(f"status category must be one of {sorted(_CATEGORIES)}")
        if values.get("priority", issue.priority) not in _PRIORITIES:
            raise ValueError(f"priority must be one of {list(_PRIORITIES)}")
        if values.get("parent") is not None:
            self._issue(values["parent"])
        if values.get("duedate") is not None:
            values["duedate"] = date.fromisoformat(str(values["duedate"])).isoformat()
        for name, normalise in (
            ("labels", list),
            ("timetracking", dict),
            ("created", _utc),
            ("updated", _utc),
        ):
            if name in values:
                values[name] = normalise(values[name])

        for person in (values.get("assignee"), values.get("reporter")):
            if person is not None:
                self._ensure_user(person)
        if "status" in values:
            self._status_id(values["status"])
        if "parent" in values:
            self._reparent(issue, values["parent"])
        for name, value in values.items():
            setattr(issue, name, value)
        if "category" in values:
            done = issue.category == "done"
            issue.resolutiondate = (issue.resolutiondate or issue.updated) if done else None
        self._generation += 1

    def _reparent(self, issue: _Issue, parent: str | None) -> None:
        if issue.parent:
            self._children[issue.parent].remove(issue.key)
        if parent:
            self._children.setdefault(parent, []).append(issue.key)

    def _comment(self, issue: _Issue, body: str, author: str, created: datetime | None) -> _Comment:
        self._ensure_user(author)
        when = _utc(created) if created else self.now()
        self._counters["comment"] += 1
        comment = _Comment(str(self._counters["comment"]), author, body, when, when)
        issue.comments.append(comment)
        issue.updated = max(issue.updated, when)
        self._generation += 1
        return comment

    @staticmethod
    def _link_type(name: str) -> None:
        if name not in _LINK_TYPES:
            raise ValueError(f"link type must be one of {list(_LINK_TYPES)}")

    def _link(self, key: str, link_type: str, outward_key: str) -> str:
        self._link_type(link_type)
        source, target = self._issue(key), self._issue(outward_key)
        self._counters["link"] += 1
        link_id = str(self._counters["link"])
        source.links.append(_Link(link_id, link_type, "outward", outward_key))
        target.links.append(_Link(link_id, link_type, "inward", key))
        self._generation += 1
        return link_id

    def _snapshot(self, issue: _Issue) -> dict[str, Any]:
        return {**asdict(issue), "subtasks": list(self._children.get(issue.key, ()))}

    # -- serving -----------------------------------------------------------------------------------
    def fault_response(self, fault: Fault, req: Request) -> Response:
        """Injected failures in Jira's error envelope, with Retry-After when the fault carries one."""
        messages = {
            429: "Rate limit exceeded.",
            500: "Internal server error.",
            503: "Service unavailable. Please try again later.",
        }
        headers = {"Retry-After": str(int(fault.retry_after))} if fault.retry_after is not None else {}
        message = messages.get(fault.status, f"Injected failure ({fault.status}).")
        return _Fail(fault.status, [message], headers=headers).response()

    def handle(self, req: Request) -> Response:
        """One request at a time under the lock: handlers read shared state and comments write it."""
        with self.lock:
            try:
                return self._serve(req)
            except _Fail as failure:
                return failure.response()
            except JqlError as error:
                return _Fail(400, [str(error)]).response()

    def _serve(self, req: Request) -> Response:
        version = re.match(r"/rest/api/(2|3|latest)/", req.path)
        if version and version[1] == "3" and not self.cloud:
            return self._not_found(req)
        if self._authenticate(req) is None and not req.path.endswith("/serverInfo"):
            raise self._unauthorized()
        if self._forbidden is not None and self._forbidden.search(req.path):
            raise _Fail(403, ["You do not have permission to perform this operation."])
        return self._router.dispatch(req) or self._not_found(req)

    def _not_found(self, req: Request) -> Response:
        return Response.json({"message": f"null for uri: {self.base_url}{req.path}", "status-code": 404}, 404)

    def _unauthorized(self) -> _Fail:
        headers = {"WWW-Authenticate": 'Basic realm="protected-area"'}
        if not self.cloud:
            headers["X-Seraph-LoginReason"] = "AUTHENTICATED_FAILED"
        message = "You are not authenticated. Authentication required to perform this operation."
        return _Fail(401, [message], headers=headers)

    def _authenticate(self, req: Request) -> str | None:
        """The caller's account id; None when anonymous. Bad credentials are 401 on every path."""
        header = req.headers.get("authorization")
        if header is None:
            return None
        scheme, _, credential = header.partition(" ")
        if scheme.lower() == "basic":
            try:
                user, _, secret = base64.b64decode(credential, validate=True).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                raise self._unauthorized() from None
            names = {self.email} if self.cloud else {self.email, self._users[self.bot].name}
            if user in names and secret == self.token:
                return self.bot
        elif scheme.lower() == "bearer" and not self.cloud and credential == self.token:
            return self.bot
        raise self._unauthorized()

    def _routes(self) -> Router:
        router = Router()
        router.add("GET", _API + r"/serverInfo", self._server_info)
        router.add("GET", _API + r"/field", self._field_list)
        router.add("GET", _API + r"/myself", self._myself)
        router.add("GET", r"/rest/auth/1/session", self._session)
        for method in ("GET", "POST"):
            router.add(method, _API + r"/search", self._search)
            router.add(method, _API + r"/search/jql", self._search_jql)
        router.add("GET", _ISSUE_PATH, self._get_issue)
        router.add("GET", _ISSUE_PATH + r"/comment", self._get_comments)
        router.add("POST", _ISSUE_PATH + r"/comment", self._post_comment)
        return router

    # -- rendering ---------------------------------------------------------------------------------
    def _api(self, version: int) -> str:
        return f"{self.base_url}/rest/api/{version}"

    def _rich(self, text: str | None, version: int) -> Any:
        """Rich text is ADF on v3 and a wiki-markup string on v2."""
        if not text:
            return None
        return to_adf(text) if version == 3 else text

    def _user_json(self, account_id: str | None, version: int) -> dict[str, Any] | None:
        if account_id is None:
            return None
        user = self._users[account_id]
        ident = f"accountId={user.account_id}" if self.cloud else f"username={user.name}"
        out: dict[str, Any] = {"self": f"{self._api(version)}/user?{ident}"}
        if self.cloud:
            out["accountId"] = user.account_id
        else:
            out.update(name=user.name, key=user.account_id)
        avatar = f"{self.base_url}/secure/useravatar?ownerId={user.account_id}"
        out.update(
            emailAddress=user.email,
            avatarUrls={size: f"{avatar}&size={size}" for size in ("48x48", "24x24", "16x16", "32x32")},
            displayName=user.display_name,
            active=True,
            timeZone=user.time_zone,
        )
        if self.cloud:
            out["accountType"] = user.account_type
        return out

    def _status_json(self, issue: _Issue, version: int) -> dict[str, Any]:
        name, status_id = self._statuses[issue.status.lower()]
        category = _CATEGORIES[issue.category]
        return {
            "self": f"{self._api(version)}/status/{status_id}",
            "description": "",
            "iconUrl": f"{self.base_url}/images/icons/statuses/generic.png",
            "name": name,
            "id": status_id,
            "statusCategory": {"self": f"{self._api(version)}/statuscategory/{category['id']}", **category},
        }

    def _priority_json(self, issue: _Issue, version: int) -> dict[str, Any]:
        priority_id = _PRIORITIES[issue.priority]
        return {
            "self": f"{self._api(version)}/priority/{priority_id}",
            "iconUrl": f"{self.base_url}/images/icons/priorities/{issue.priority.lower()}.svg",
            "name": issue.priority,
            "id": priority_id,
        }

    def _issuetype_json(self, issue: _Issue, version: int) -> dict[str, Any]:
        subtask = issue.parent is not None
        type_id, name = ("10003", "Sub-task") if subtask else ("10001", "Task")
        return {
            "self": f"{self._api(version)}/issuetype/{type_id}",
            "id": type_id,
            "description": "A small piece of work." if subtask else "A task that needs to be done.",
            "iconUrl": f"{self.base_url}/images/icons/issuetypes/{name.lower()}.svg",
            "name": name,
            "subtask": subtask,
            "hierarchyLevel": -1 if subtask else 0,
        }

    def _project_json(self, issue: _Issue, version: int) -> dict[str, Any]:
        project_id = str(10000 + list(self._projects).index(issue.project))
        return {
            "self": f"{self._api(version)}/project/{project_id}",
            "id": project_id,
            "key": issue.project,
            "name": self._projects[issue.project],
            "projectTypeKey": "software",
        }

    def _issue_ref(self, key: str, version: int) -> dict[str, Any]:
        """The compact form Jira embeds for parents, sub-tasks and linked issues."""
        issue = self._issues[key]
        return {
            "id": issue.id,
            "key": issue.key,
            "self": f"{self._api(version)}/issue/{issue.id}",
            "fields": {
                "summary": issue.summary,
                "status": self._status_json(issue, version),
                "priority": self._priority_json(issue, version),
                "issuetype": self._issuetype_json(issue, version),
            },
        }

    def _link_json(self, link: _Link, version: int) -> dict[str, Any]:
        side = "outwardIssue" if link.direction == "outward" else "inwardIssue"
        link_type = _LINK_TYPES[link.type]
        return {
            "id": link.id,
            "self": f"{self._api(version)}/issueLink/{link.id}",
            "type": {**link_type, "self": f"{self._api(version)}/issueLinkType/{link_type['id']}"},
            side: self._issue_ref(link.other, version),
        }

    def _timetracking_json(self, issue: _Issue) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in _TIME_KEYS:
            seconds = issue.timetracking.get(f"{name}Seconds")
            if seconds is not None:
                out[name] = _duration(seconds)
                out[f"{name}Seconds"] = seconds
        return out

    def _comment_json(self, issue: _Issue, comment: _Comment, version: int) -> dict[str, Any]:
        author = self._user_json(comment.author, version)
        out = {
            "self": f"{self._api(version)}/issue/{issue.id}/comment/{comment.id}",
            "id": comment.id,
            "author": author,
            "body": self._rich(comment.body, version),
            "updateAuthor": author,
            "created": _stamp(comment.created),
            "updated": _stamp(comment.updated),
        }
        if self.cloud:
            out["jsdPublic"] = True
        return out

    def _comment_page(
        self, issue: _Issue, version: int, start: int, size: int, newest_first: bool
    ) -> dict[str, Any]:
        ordered = issue.comments[::-1] if newest_first else issue.comments
        return {
            "comments": [self._comment_json(issue, c, version) for c in ordered[start : start + size]],
            "self": f"{self._api(version)}/issue/{issue.id}/comment",
            "maxResults": size,
            "total": len(issue.comments),
            "startAt": start,
        }

    def _field_value(self, name: str, issue: _Issue, version: int) -> Any:
        time = issue.timetracking.get
        match name:
            case "summary":
                return issue.summary
            case "description":
                return self._rich(issue.description, version)
            case "issuetype":
                return self._issuetype_json(issue, version)
            case "project":
                return self._project_json(issue, version)
            case "status":
                return self._status_json(issue, version)
            case "resolution":
                if issue.category != "done":
                    return None
                return {
                    "id": "10000",
                    "name": "Done",
                    "description": "Work has been completed on this issue.",
                }
            case "priority":
                return self._priority_json(issue, version)
            case "assignee" | "reporter":
                return self._user_json(getattr(issue, name), version)
            case "labels":
                return list(issue.labels)
            case "duedate":
                return issue.duedate
            case "parent":
                return self._issue_ref(issue.parent, version) if issue.parent else None
            case "subtasks":
                return [self._issue_ref(child, version) for child in self._children.get(issue.key, ())]
            case "issuelinks":
                return [self._link_json(link, version) for link in issue.links]
            case "timetracking":
                return self._timetracking_json(issue)
            case "timeoriginalestimate":
                return time("originalEstimateSeconds")
            case "timeestimate":
                return time("remainingEstimateSeconds")
            case "timespent":
                return time("timeSpentSeconds")
            case "created" | "updated":
                return _stamp(getattr(issue, name))
            case "resolutiondate":
                return _stamp(issue.resolutiondate) if issue.resolutiondate else None
            case "comment":
                return self._comment_page(issue, version, 0, len(issue.comments), newest_first=False)
            case "customfield_10042":
                return self._rich(issue.acceptance, version)
            case _:  # customfield_10020: sprints are not modelled
                return None

    def _issue_json(self, issue: _Issue, version: int, wanted: tuple[str, ...]) -> dict[str, Any]:
        fields = {name: self._field_value(name, issue, version) for name in wanted}
        if issue.parent is None:
            fields.pop("parent", None)  # Jira omits the field rather than sending null
        return {
            "expand": _ISSUE_EXPAND,
            "id": issue.id,
            "self": f"{self._api(version)}/issue/{issue.id}",
            "key": issue.key,
            "fields": fields,
        }

    @staticmethod
    def _wanted(specs: Any, default: str) -> tuple[str, ...]:
        """Resolve a `fields` parameter (comma string, list, or repeated query values) to field ids,
        in the stand-in's field order. `*all`, `*navigable` and `-name` exclusions work as in Jira;
        unknown names are ignored, as Jira does."""
        items = [specs] if isinstance(specs, str) else list(specs or [])
        names = [part.strip() for item in items for part in str(item).split(",") if part.strip()] or [default]
        chosen: set[str] = set()
        for name in names:
            if name == "*all":
                chosen.update(_ALL)
            elif name == "*navigable":
                chosen.update(_NAVIGABLE)
            elif not name.startswith("-"):
                chosen.add(name)
        chosen.difference_update(name[1:] for name in names if name.startswith("-"))
        return tuple(name for name in _ALL if name in chosen)

    # -- handlers ----------------------------------------------------------------------------------
    @staticmethod
    def _version(match: re.Match[str]) -> int:
        return 3 if match["v"] == "3" else 2

    def _server_info(self, req: Request, match: re.Match[str]) -> Response:
        if self.cloud:
            version, numbers, build = "1001.0.0-SNAPSHOT", [1001, 0, 0], 100282
        else:
            version, numbers, build = "9.12.15", [9, 12, 15], 9120015
        return Response.json(
            {
                "baseUrl": self.base_url,
                "version": version,
                "versionNumbers": numbers,
                "deploymentType": "Cloud" if self.cloud else "Server",
                "buildNumber": build,
                "buildDate": "2024-11-05T00:00:00.000+0000",
                "serverTime": _stamp(self.now()),
                "scmInfo": "5f2c4b1e0d9a8c7b6a5f4e3d2c1b0a9f8e7d6c5b",
                "serverTitle": "Jira",
                "defaultLocale": {"locale": "en_US"},
            }
        )

    def _field_list(self, req: Request, match: re.Match[str]) -> Response:
        out = []
        for definition in _FIELDS:
            custom = definition.id.startswith("customfield_")
            item: dict[str, Any] = {"id": definition.id}
            if self.cloud:
                item["key"] = definition.id
            item.update(
                name=definition.name,
                custom=custom,
                orderable=definition.id not in ("issuekey", "parent", "subtasks"),
                navigable=definition.navigable,
                searchable=True,
                clauseNames=list(definition.clause_names),
            )
            if custom and self.cloud:
                item["untranslatedName"] = definition.name
            if definition.schema is not None:
                item["schema"] = definition.schema
            out.append(item)
        return Response.json(out)

    def _myself(self, req: Request, match: re.Match[str]) -> Response:
        out = self._user_json(self.bot, self._version(match)) or {}
        out.update(
            locale="en_US",
            groups={"size": 1, "items": []},
            applicationRoles={"size": 1, "items": []},
            expand="groups,applicationRoles",
        )
        if not self.cloud:
            out["deleted"] = False
        return Response.json(out)

    def _session(self, req: Request, match: re.Match[str]) -> Response:
        user = self._users[self.bot]
        return Response.json(
            {
                "self": f"{self.base_url}/rest/api/latest/user?username={user.name}",
                "name": user.name,
                "loginInfo": {"failedLoginCount": 0, "loginCount": 1},
            }
        )

    @staticmethod
    def _search_args(req: Request) -> dict[str, Any]:
        if req.method == "POST":
            try:
                body = req.json()
            except ValueError:
                raise _Fail(400, ["Request body is not valid JSON."]) from None
            if not isinstance(body, dict):
                raise _Fail(400, ["Request body must be a JSON object."])
            return body
        args: dict[str, Any] = {name: values[0] for name, values in req.query.items()}
        args["fields"] = req.query.get("fields", [])
        return args

    @staticmethod
    def _int(args: Mapping[str, Any], name: str, default: int) -> int:
        value = args.get(name)
        if value is None or value == "":
            return default
        try:
            return int(value)
        except (TypeError, ValueError):
            raise _Fail(400, [f"The value '{value}' is not valid for the parameter '{name}'."]) from None

    def _query(self, jql: str, *, bounded: bool, strict: bool) -> list[str]:
        """Matching keys in result order; cached per data generation so paging is not re-sorting."""
        cache_key = (jql, bounded, strict, self._generation, self.now())
        if (hit := self._query_cache.get(cache_key)) is not None:
            return hit
        query = parse_jql(jql)
        if bounded and query.where is None:
            raise JqlError(_UNBOUNDED)
        compiler = _Compiler(self, strict=strict)
        where = compiler.compile(query.where) if query.where else None
        order = []
        for name, descending in query.order or (("key", True),):  # Jira's default: newest key first
            sort_key = _ORDER_KEYS.get(name.lower())
            if sort_key is None:
                raise JqlError(f"Field '{name}' does not exist or you do not have permission to view it.")
            order.append((sort_key, descending))
        hits = sorted(
            (issue for issue in self._issues.values() if where is None or where(issue)), key=_natural
        )
        for sort_key, descending in reversed(order):
            hits.sort(key=sort_key, reverse=descending)  # stable: earlier keys win, key order breaks ties
        keys = [issue.key for issue in hits]
        if len(self._query_cache) >= self._MAX_CACHED_QUERIES:
            del self._query_cache[next(iter(self._query_cache))]
        self._query_cache[cache_key] = keys
        return keys

    def _search(self, req: Request, match: re.Match[str]) -> Response:
        """Server's offset-paged search; on Cloud the endpoint is retired and answers 410."""
        if self.cloud:
            raise _Fail(410, [_GONE])
        args = self._search_args(req)
        strict = str(args.get("validateQuery", "strict")).lower() not in ("false", "warn", "none")
        keys = self._query(str(args.get("jql") or ""), bounded=False, strict=strict)
        start = max(self._int(args, "startAt", 0), 0)
        size = min(max(self._int(args, "maxResults", self.DEFAULT_MAX_RESULTS), 0), self.SERVER_MAX_RESULTS)
        wanted = self._wanted(args.get("fields"), "*navigable")
        issues = [self._issue_json(self._issues[key], 2, wanted) for key in keys[start : start + size]]
        return Response.json(
            {
                "expand": "schema,names",
                "startAt": start,
                "maxResults": size,
                "total": len(keys),
                "issues": issues,
            }
        )

    def _search_jql(self, req: Request, match: re.Match[str]) -> Response:
        """Cloud's enhanced search: token paging, no total, `nextPageToken` absent on the last page."""
        if not self.cloud:
            return self._not_found(req)
        args = self._search_args(req)
        token = args.get("nextPageToken")
        if token:
            cursor = self._cursors.get(str(token))
            if cursor is None:
                raise _Fail(400, ["The provided next page token is invalid or expired."])
            keys, start = cursor
        else:
            keys, start = self._query(str(args.get("jql") or ""), bounded=True, strict=True), 0
        wanted = self._wanted(args.get("fields"), "id")
        cap = self.CLOUD_MAX_RESULTS if wanted else self.CLOUD_MAX_RESULTS_IDS
        size = min(max(self._int(args, "maxResults", self.DEFAULT_MAX_RESULTS), 1), cap)
        end = start + size
        version = self._version(match)
        page = [self._issues.get(key) for key in keys[start:end]]
        body: dict[str, Any] = {
            "issues": [self._issue_json(i, version, wanted) for i in page if i is not None]
        }
        if end < len(keys):
            body["nextPageToken"] = self._new_cursor(keys, end)
        body["isLast"] = end >= len(keys)
        return Response.json(body)

    def _new_cursor(self, keys: list[str], offset: int) -> str:
        """Tokens pin the result list of the first page, so later pages cost only their own rendering."""
        self._counters["cursor"] += 1
        token = base64.urlsafe_b64encode(f"cursor:{self._counters['cursor']}:{offset}".encode()).decode()
        if len(self._cursors) >= self._MAX_CURSORS:
            del self._cursors[next(iter(self._cursors))]
        self._cursors[token] = (keys, offset)
        return token

    def _find(self, match: re.Match[str]) -> _Issue:
        ref = match["issue"]
        issue = self._issues.get(self._ids.get(ref, ref.upper()))
        if issue is None:
            raise _Fail(404, [_NO_ISSUE])
        return issue

    def _get_issue(self, req: Request, match: re.Match[str]) -> Response:
        wanted = self._wanted(req.query.get("fields", []), "*all")
        return Response.json(self._issue_json(self._find(match), self._version(match), wanted))

    def _get_comments(self, req: Request, match: re.Match[str]) -> Response:
        issue = self._find(match)
        args = {name: values[0] for name, values in req.query.items()}
        order = args.get("orderBy", "created")
        if order not in ("created", "+created", "-created"):
            raise _Fail(400, [f"Invalid orderBy value '{order}'. Only 'created' is supported."])
        start = max(self._int(args, "startAt", 0), 0)
        size = min(
            max(self._int(args, "maxResults", self.COMMENTS_MAX_RESULTS), 0), self.COMMENTS_MAX_RESULTS
        )
        page = self._comment_page(issue, self._version(match), start, size, newest_first=order == "-created")
        return Response.json(page)

    def _post_comment(self, req: Request, match: re.Match[str]) -> Response:
        issue = self._find(match)
        version = self._version(match)
        try:
            payload = req.json()
        except ValueError:
            raise _Fail(400, ["Request body is not valid JSON."]) from None
        body = payload.get("body") if isinstance(payload, dict) else None
        if version == 3:
            text = from_adf(body) if _is_adf(body) else None
        else:
            text = body if isinstance(body, str) else None
        if text is None:
            raise _Fail(400, errors={"comment": "Comment body is not valid!"})
        if not text.strip():
            raise _Fail(400, errors={"comment": "Comment body can not be empty!"})
        comment = self._comment(issue, text, self.bot, None)
        return Response.json(self._comment_json(issue, comment, version), 201)
