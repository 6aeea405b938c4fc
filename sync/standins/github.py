"""A stand-in for the GitHub REST API on loopback, so PyGithub (unchanged) and plain HTTP clients run offline.

It follows GitHub's wire protocol where a connector could notice the difference: JSON shapes and field
names from the REST docs, Link pagination written the way GitHub writes it (absolute URLs under
`/repositories/{id}`, `/organizations/{id}`, `/user/{id}`), weak content ETags with 304s that cost no
rate limit, `X-RateLimit-*` on every response, and error bodies worded as GitHub words them (PyGithub
picks its exception class from the wording). Data lives in memory, guarded by `self.lock`; tests seed it
with `add_repo` / `add_issue` / ... and read it back with `issue` / `comments`.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, date, datetime
from email.utils import format_datetime, parsedate_to_datetime
from http import HTTPStatus
from re import Match
from typing import Any, TypeVar
from urllib.parse import quote, urlencode, urlsplit

from sync.standins.base import Fault, Request, Response, Router, Standin

T = TypeVar("T")

DOCS = "https://docs.github.com/rest"
RATE_DOCS = "https://docs.github.com/rest/overview/rate-limits-for-the-rest-api"
ISSUE_DOCS = DOCS + "/issues/issues#get-an-issue"
REPO = r"(?:/repos/(?P<owner>[^/]+)/(?P<name>[^/]+)|/repositories/(?P<rid>\d+))"
DEFAULT_LABEL_COLORS = {
    "bug": "d73a4a", "documentation": "0075ca", "duplicate": "cfd3d7", "enhancement": "a2eeef",
    "good first issue": "7057ff", "help wanted": "008672", "invalid": "e4e669", "question": "d876e3",
    "wontfix": "ffffff",
}  # fmt: skip
REACTIONS = ("+1", "-1", "laugh", "hooray", "confused", "heart", "rocket", "eyes")
USER_LINKS = {
    "followers_url": "/followers", "following_url": "/following{/other_user}",
    "gists_url": "/gists{/gist_id}", "starred_url": "/starred{/owner}{/repo}",
    "subscriptions_url": "/subscriptions",
    "organizations_url": "/orgs", "repos_url": "/repos", "events_url": "/events{/privacy}",
    "received_events_url": "/received_events",
}  # fmt: skip
REPO_LINKS = {
    "forks_url": "/forks", "keys_url": "/keys{/key_id}", "collaborators_url": "/collaborators{/collaborator}",
    "teams_url": "/teams", "hooks_url": "/hooks", "issue_events_url": "/issues/events{/number}",
    "events_url": "/events", "assignees_url": "/assignees{/user}", "branches_url": "/branches{/branch}",
    "tags_url": "/tags", "blobs_url": "/git/blobs{/sha}", "git_tags_url": "/git/tags{/sha}",
    "git_refs_url": "/git/refs{/sha}", "trees_url": "/git/trees{/sha}", "statuses_url": "/statuses/{sha}",
    "languages_url": "/languages", "stargazers_url": "/stargazers", "contributors_url": "/contributors",
    "subscribers_url": "/subscribers", "subscription_url": "/subscription", "commits_url": "/commits{/sha}",
    "git_commits_url": "/git/commits{/sha}", "comments_url": "/comments{/number}",
    "issue_comment_url": "/issues/comments{/number}", "contents_url": "/contents/{+path}",
    "compare_url": "/compare/{base}...{head}", "merges_url": "/merges",
    "archive_url": "/{archive_format}{/ref}",
    "downloads_url": "/downloads", "issues_url": "/issues{/number}", "pulls_url": "/pulls{/number}",
    "milestones_url": "/milestones{/number}", "notifications_url": "/notifications{?since,all,participating}",
    "labels_url": "/labels{/name}", "releases_url": "/releases{/id}", "deployments_url": "/deployments",
}  # fmt: skip
UPDATABLE = frozenset(
    "title body state state_reason labels assignees milestone_due user created_at updated_at closed_at "
    "closed_by locked merged_at".split()
)


def _ts(when: datetime | None) -> str | None:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ") if when else None


def _as_dt(value: datetime | date | str | None) -> datetime | None:
    """Accept what tests find handy; store aware UTC at second precision, as GitHub reports it."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day)
    value = value if value.tzinfo else value.replace(tzinfo=UTC)
    return value.astimezone(UTC).replace(microsecond=0)


def _node_id(kind: str, ident: int) -> str:
    """GitHub's legacy global node id, e.g. base64("05:Issue1")."""
    return base64.b64encode(f"0{len(kind)}:{kind}{ident}".encode()).decode()


def _error(status: int, message: str, docs: str = DOCS, headers: dict[str, str] | None = None) -> Response:
    payload = {"message": message, "documentation_url": docs, "status": str(status)}
    return Response.json(payload, status, headers)


def _not_found(doc: str = "") -> Response:
    """GitHub's 404 body; `doc` is the endpoint's anchor under the REST docs."""
    return _error(404, "Not Found", f"{DOCS}/{doc}" if doc else DOCS)


def _int_arg(req: Request, name: str, default: int) -> int:
    try:
        value = int(req.arg(name) or default)
    except ValueError:
        return default
    return value if value > 0 else default


@dataclass(slots=True)
class _Account:
    id: int
    login: str
    type: str  # User | Organization | Bot
    created_at: datetime


@dataclass(slots=True)
class _Label:
    id: int
    name: str
    color: str
    default: bool


@dataclass(slots=True)
class _Milestone:
    id: int
    number: int
    due_on: datetime
    creator: str
    created_at: datetime


@dataclass(slots=True)
class _Comment:
    id: int
    body: str
    user: str
    created_at: datetime
    updated_at: datetime


@dataclass(slots=True)
class _Issue:
    id: int
    number: int
    title: str
    body: str | None
    state: str
    state_reason: str | None
    labels: list[str]
    assignees: list[str]
    milestone_due: datetime | None
    user: str
    created_at: datetime
    updated_at: datetime
    closed_at: datetime | None
    closed_by: str | None
    pull_request: bool
    merged_at: datetime | None = None
    locked: bool = False
    comments: list[_Comment] = field(default_factory=list)


@dataclass(slots=True)
class _Repo:
    id: int
    owner: str
    name: str
    private: bool
    members: frozenset[str]
    created_at: datetime
    changed_at: datetime  # Last-Modified of anything under the repo
    issues: dict[int, _Issue] = field(default_factory=dict)
    gone: dict[int, tuple[str, int] | None] = field(default_factory=dict)  # None: deleted; else moved to
    labels: dict[str, _Label] = field(default_factory=dict)
    milestones: dict[datetime, _Milestone] = field(default_factory=dict)
    next_number: int = 1

    @property
    def full_name(self) -> str:
        return f"{self.owner}/{self.name}"


ISSUE_SORTS: dict[str, Callable[[_Issue], tuple[Any, int]]] = {
    "created": lambda i: (i.created_at, i.number),
    "updated": lambda i: (i.updated_at, i.number),
    "comments": lambda i: (len(i.comments), i.number),
}
REPO_SORTS: dict[str, Callable[[_Repo], Any]] = {
    "created": lambda r: (r.created_at, r.id),
    "updated": lambda r: (r.changed_at, r.id),
    "pushed": lambda r: (r.created_at, r.id),
    "full_name": lambda r: r.full_name.lower(),
}


class GithubStandin(Standin):
    """GitHub REST on loopback: `with GithubStandin() as gh: Github(base_url=gh.base_url, auth=...)`."""

    def __init__(
        self,
        token: str = "test-token",
        *,
        login: str = "trackloop-bot",
        web_url: str = "https://github.com",
        api_prefix: str = "",
        rate_limit: int = 5000,
    ) -> None:
        super().__init__()
        self.token = token
        self.login = login
        self.web_url = web_url
        self.api_prefix = api_prefix  # "/api/v3" to look like GitHub Enterprise Server
        self.rate_limit = rate_limit
        self.rate_limit_remaining = rate_limit
        self.rate_limit_reset = int(self.now().timestamp()) + 3600
        self._ids = itertools.count(1001)
        self._accounts: dict[str, _Account] = {}  # by lower-cased login
        self._accounts_by_id: dict[int, _Account] = {}
        self._repos: dict[str, _Repo] = {}  # by lower-cased full name
        self._repos_by_id: dict[int, _Repo] = {}
        self.router = Router()
        for method, pattern, route in [
            ("GET", r"/user", self._get_authenticated_user),
            ("GET", r"/rate_limit", self._get_rate_limit),
            ("GET", r"/users/(?P<login>[^/]+)", self._get_account),
            ("GET", r"/orgs/(?P<login>[^/]+)", self._get_org),
            ("GET", r"/(?:users/(?P<login>[^/]+)|user/(?P<uid>\d+))/repos", self._list_user_repos),
            ("GET", r"/(?:orgs/(?P<login>[^/]+)|organizations/(?P<uid>\d+))/repos", self._list_org_repos),
            ("GET", REPO, self._get_repo),
            ("GET", REPO + r"/issues", self._list_issues),
            ("GET", REPO + r"/issues/comments", self._list_repo_comments),
            ("GET", REPO + r"/issues/(?P<number>\d+)", self._get_issue),
            ("GET", REPO + r"/issues/(?P<number>\d+)/comments", self._list_comments),
            ("POST", REPO + r"/issues/(?P<number>\d+)/comments", self._create_comment),
        ]:
            self.router.add(method, pattern, route)

    @property
    def base_url(self) -> str:
        """The API root to hand to `Github(base_url=...)` (includes `api_prefix`)."""
        return super().base_url + self.api_prefix

    # -- data API for tests ----------------------------------------------------------------
    def add_repo(
        self,
        full_name: str,
        *,
        private: bool = False,
        owner_type: str = "Organization",
        members: Iterable[str] = (),
    ) -> dict[str, Any]:
        """Add a repository; `members` get author_association MEMBER (the owner gets OWNER)."""
        owner, name = full_name.split("/")
        with self.lock:
            if full_name.lower() in self._repos:
                raise ValueError(f"repo {full_name} exists")
            self._account(owner).type = owner_type
            now = self.now()
            repo = _Repo(next(self._ids), owner, name, private, frozenset(members), now, now)
            self._repos[full_name.lower()] = self._repos_by_id[repo.id] = repo
            return {"id": repo.id, "full_name": full_name, "private": private}

    def add_issue(
        self,
        repo: str,
        *,
        title: str,
        body: str | None = None,
        state: str = "open",
        state_reason: str | None = None,
        labels: Iterable[str] = (),
        assignees: Iterable[str] = (),
        milestone_due: datetime | date | str | None = None,
        user: str = "octocat",
        created_at: datetime | str | None = None,
        updated_at: datetime | str | None = None,
        pull_request: bool = False,
        number: int | None = None,
        closed_at: datetime | str | None = None,
    ) -> dict[str, Any]:
        """Add an issue (or a pull request: issues and PRs share numbers) and return its record."""
        with self.lock:
            r = self._repo(repo)
            number = number or r.next_number
            if number in r.issues or number in r.gone:
                raise ValueError(f"{repo}#{number} exists")
            created = _as_dt(created_at) or self.now()
            updated = _as_dt(updated_at) or created
            closed = state == "closed"
            issue = _Issue(
                id=next(self._ids),
                number=number,
                title=title,
                body=body,
                state=state,
                state_reason=state_reason or ("completed" if closed and not pull_request else None),
                labels=list(labels),
                assignees=list(assignees),
                milestone_due=_as_dt(milestone_due),
                user=user,
                created_at=created,
                updated_at=updated,
                closed_at=(_as_dt(closed_at) or updated) if closed else None,
                closed_by=user if closed else None,
                pull_request=pull_request,
            )
            self._place(r, issue)
            return self._record(r, issue)

    def update_issue(self, repo: str, number: int, **changes: Any) -> dict[str, Any]:
        """Change fields as someone on GitHub would; closing/reopening fills closed_* and state_reason."""
        if unknown := changes.keys() - UPDATABLE:
            raise TypeError(f"cannot update {sorted(unknown)}")
        with self.lock:
            r = self._repo(repo)
            issue = self._issue(r, number)
            now = self.now()
            for key in ("created_at", "updated_at", "closed_at", "merged_at", "milestone_due"):
                if key in changes:
                    changes[key] = _as_dt(changes[key])
            for key in ("labels", "assignees"):
                if key in changes:
                    changes[key] = list(changes[key])
            if changes.get("state", issue.state) != issue.state:
                closing = changes["state"] == "closed"
                changes.setdefault("closed_at", now if closing else None)
                changes.setdefault("closed_by", issue.user if closing else None)
                if not issue.pull_request:
                    changes.setdefault("state_reason", "completed" if closing else "reopened")
            changes["updated_at"] = changes.get("updated_at") or now
            for key, value in changes.items():
                setattr(issue, key, value)
            self._place(r, issue)
            return self._record(r, issue)

    def delete_issue(self, repo: str, number: int) -> None:
        """Delete an issue: GETs answer 410 Gone from now on, and lists drop it."""
        with self.lock:
            r = self._repo(repo)
            self._issue(r, number)
            del r.issues[number]
            r.gone[number] = None
            r.changed_at = self.now()

    def transfer_issue(self, repo: str, number: int, to_repo: str) -> dict[str, Any]:
        """Move an issue (same id, new number); the old URL answers 301 to the new one."""
        with self.lock:
            src, dst = self._repo(repo), self._repo(to_repo)
            issue = self._issue(src, number)
            if issue.pull_request:
                raise ValueError("pull requests cannot be transferred")
            del src.issues[number]
            issue.number = dst.next_number
            issue.updated_at = self.now()
            src.gone[number] = (to_repo.lower(), issue.number)
            src.changed_at = issue.updated_at
            self._place(dst, issue)
            return self._record(dst, issue)

    def add_comment(
        self,
        repo: str,
        number: int,
        body: str,
        user: str = "octocat",
        created_at: datetime | str | None = None,
    ) -> dict[str, Any]:
        """Comment as someone on GitHub; bumps the issue's updated_at and comment count."""
        with self.lock:
            r = self._repo(repo)
            return asdict(self._post_comment(r, self._issue(r, number), body, user, _as_dt(created_at)))

    def comments(self, repo: str, number: int) -> list[dict[str, Any]]:
        with self.lock:
            r = self._repo(repo)
            return [asdict(c) for c in self._issue(r, number).comments]

    def issue(self, repo: str, number: int) -> dict[str, Any]:
        """The stored record (datetimes, logins, `comments` as a count), not the wire JSON."""
        with self.lock:
            r = self._repo(repo)
            return self._record(r, self._issue(r, number))

    # -- data helpers ----------------------------------------------------------------------
    def _repo(self, full_name: str) -> _Repo:
        try:
            return self._repos[full_name.lower()]
        except KeyError:
            raise KeyError(f"unknown repo {full_name}") from None

    @staticmethod
    def _issue(repo: _Repo, number: int) -> _Issue:
        try:
            return repo.issues[number]
        except KeyError:
            raise KeyError(f"no issue {repo.full_name}#{number}") from None

    def _account(self, login: str) -> _Account:
        account = self._accounts.get(login.lower())
        if account is None:
            kind = "Bot" if login.endswith("[bot]") else "User"
            account = _Account(next(self._ids), login, kind, self.now())
            self._accounts[login.lower()] = self._accounts_by_id[account.id] = account
        return account

    def _place(self, repo: _Repo, issue: _Issue) -> None:
        """Store an issue in a repo, creating the labels, milestone and accounts it mentions."""
        repo.issues[issue.number] = issue
        repo.next_number = max(repo.next_number, issue.number + 1)
        repo.changed_at = self.now()
        for name in issue.labels:
            if name not in repo.labels:
                color = DEFAULT_LABEL_COLORS.get(name) or hashlib.sha1(name.encode()).hexdigest()[:6]
                repo.labels[name] = _Label(next(self._ids), name, color, name in DEFAULT_LABEL_COLORS)
        due = issue.milestone_due
        if due is not None and due not in repo.milestones:
            repo.milestones[due] = _Milestone(
                next(self._ids), len(repo.milestones) + 1, due, issue.user, repo.changed_at
            )
        for login in (issue.user, issue.closed_by, *issue.assignees):
            if login:
                self._account(login)

    def _post_comment(
        self, repo: _Repo, issue: _Issue, body: str, user: str, when: datetime | None
    ) -> _Comment:
        when = when or self.now()
        comment = _Comment(next(self._ids), body, self._account(user).login, when, when)
        issue.comments.append(comment)
        issue.updated_at = max(issue.updated_at, when)
        repo.changed_at = self.now()
        return comment

    @staticmethod
    def _record(repo: _Repo, issue: _Issue) -> dict[str, Any]:
        record = {f.name: getattr(issue, f.name) for f in fields(issue)}
        record.update(repo=repo.full_name, labels=list(issue.labels), assignees=list(issue.assignees))
        record["comments"] = len(issue.comments)
        return record

    # -- wire protocol ---------------------------------------------------------------------
    def handle(self, req: Request) -> Response:
        with self.lock:
            self._roll_rate_window()
            if not self._authorized(req):
                resp = _error(401, "Bad credentials")
            elif self.rate_limit_remaining <= 0:
                user_id = self._account(self.login).id
                resp = _error(403, f"API rate limit exceeded for user ID {user_id}.", RATE_DOCS)
            else:
                resp = self._route(req)
                if resp.status != 304 and req.path != self.api_prefix + "/rate_limit":
                    self.rate_limit_remaining -= 1
            return self._with_headers(resp)

    def fault_response(self, fault: Fault, req: Request) -> Response:
        """Injected 403/429 look like GitHub's secondary rate limit; 5xx like its bare error bodies."""
        headers = {} if fault.retry_after is None else {"Retry-After": str(int(fault.retry_after))}
        if fault.status in (403, 429):
            message = (
                "You have exceeded a secondary rate limit. Please wait a few minutes before you try again. "
                "If you reach out to GitHub Support for help, please include the request ID 0000:0000."
            )
            resp = _error(fault.status, message, RATE_DOCS + "#about-secondary-rate-limits", headers)
        elif fault.status >= 500:
            resp = Response.json({"message": HTTPStatus(fault.status).phrase}, fault.status, headers)
        else:
            resp = _error(fault.status, HTTPStatus(fault.status).phrase, DOCS, headers)
        with self.lock:
            self._roll_rate_window()
            return self._with_headers(resp)

    def _authorized(self, req: Request) -> bool:
        scheme, _, token = req.headers.get("authorization", "").partition(" ")
        return scheme.lower() in ("token", "bearer") and token.strip() == self.token

    def _roll_rate_window(self) -> None:
        now = int(self.now().timestamp())
        if now >= self.rate_limit_reset:
            self.rate_limit_remaining = self.rate_limit
            self.rate_limit_reset = now + 3600

    def _with_headers(self, resp: Response) -> Response:
        remaining = max(self.rate_limit_remaining, 0)
        resp.headers.update(
            {
                "X-RateLimit-Limit": str(self.rate_limit),
                "X-RateLimit-Remaining": str(remaining),
                "X-RateLimit-Reset": str(self.rate_limit_reset),
                "X-RateLimit-Used": str(self.rate_limit - remaining),
                "X-RateLimit-Resource": "core",
                "X-OAuth-Scopes": "repo, read:org",
                "X-GitHub-Media-Type": "github.v3; format=json",
                "X-GitHub-Api-Version-Selected": "2022-11-28",
                "Vary": "Accept, Authorization, Cookie, X-GitHub-OTP",
            }
        )
        return resp

    def _route(self, req: Request) -> Response:
        if not req.path.startswith(self.api_prefix):
            return _not_found()
        routed = self.router.dispatch(replace(req, path=req.path[len(self.api_prefix) :]))
        return routed or _not_found()

    def _api(self, req: Request) -> str:
        """Absolute API root as the client addressed us, so PyGithub accepts the URLs we hand out."""
        host = req.headers.get("host")
        return f"http://{host}{self.api_prefix}" if host else self.base_url

    def _ok(
        self, req: Request, payload: Any, last_modified: datetime, headers: dict[str, str] | None = None
    ) -> Response:
        """A 200 with GitHub's conditional-request headers, or a bodiless 304 if the client is current."""
        body = json.dumps(payload, separators=(",", ":")).encode()
        etag = f'W/"{hashlib.sha256(body).hexdigest()}"'
        hdrs = {
            "ETag": etag,
            "Last-Modified": format_datetime(last_modified, usegmt=True),
            "Cache-Control": "private, max-age=60, s-maxage=60",
            **(headers or {}),
        }
        if _not_modified(req, etag, last_modified):
            return Response(304, b"", hdrs)
        return Response(200, body, {"Content-Type": "application/json; charset=utf-8", **hdrs})

    def _paged(
        self,
        req: Request,
        link_path: str,
        items: list[T],
        render: Callable[[T], dict[str, Any]],
        last_modified: datetime,
    ) -> Response:
        """One page of `items` with a Link header in GitHub's order (prev, next, last, first)."""
        per_page = min(_int_arg(req, "per_page", 30), 100)
        page = _int_arg(req, "page", 1)
        last = max(1, -(-len(items) // per_page))
        rels = [("prev", page - 1)] if page > 1 else []
        rels += [("next", page + 1), ("last", last)] if page < last else []
        rels += [("first", 1)] if page > 1 else []
        query = [(k, v) for k, values in req.query.items() if k != "page" for v in values]
        base = self._api(req) + link_path
        link = ", ".join(f'<{base}?{urlencode([*query, ("page", n)])}>; rel="{rel}"' for rel, n in rels)
        chunk = items[(page - 1) * per_page : page * per_page]
        return self._ok(req, [render(x) for x in chunk], last_modified, {"Link": link} if link else None)

    # -- routes ----------------------------------------------------------------------------
    def _get_authenticated_user(self, req: Request, m: Match[str]) -> Response:
        account = self._account(self.login)
        return self._ok(req, self._account_json(self._api(req), account), account.created_at)

    def _get_rate_limit(self, req: Request, m: Match[str]) -> Response:
        core = {
            "limit": self.rate_limit,
            "used": self.rate_limit - max(self.rate_limit_remaining, 0),
            "remaining": max(self.rate_limit_remaining, 0),
            "reset": self.rate_limit_reset,
        }
        search = {"limit": 30, "used": 0, "remaining": 30, "reset": int(self.now().timestamp()) + 60}
        payload = {"resources": {"core": core, "search": search, "graphql": core}, "rate": core}
        return self._ok(req, payload, self.now())

    def _get_account(self, req: Request, m: Match[str]) -> Response:
        account = self._match_account(m)
        if account is None:
            return _not_found("users/users#get-a-user")
        return self._ok(req, self._account_json(self._api(req), account), account.created_at)

    def _get_org(self, req: Request, m: Match[str]) -> Response:
        org = self._org(m)
        if org is None:
            return _not_found("orgs/orgs#get-an-organization")
        return self._ok(req, self._org_json(self._api(req), org), org.created_at)

    def _list_user_repos(self, req: Request, m: Match[str]) -> Response:
        account = self._match_account(m)
        if account is None:
            return _not_found("repos/repos#list-repositories-for-a-user")
        repos = [r for r in self._owned(account) if not r.private]
        return self._list_repos(req, f"/user/{account.id}/repos", repos, account, "full_name")

    def _list_org_repos(self, req: Request, m: Match[str]) -> Response:
        org = self._org(m)
        if org is None:
            return _not_found("repos/repos#list-organization-repositories")
        kind = req.arg("type", "all")  # public | private narrow; the rest (forks, sources...) list all
        repos = [
            r
            for r in self._owned(org)
            if kind not in ("public", "private") or r.private == (kind == "private")
        ]
        return self._list_repos(req, f"/organizations/{org.id}/repos", repos, org, "created")

    def _list_repos(
        self, req: Request, link_path: str, repos: list[_Repo], owner: _Account, default_sort: str
    ) -> Response:
        sort = req.arg("sort", default_sort)
        direction = req.arg("direction", "asc" if sort == "full_name" else "desc")
        if sort not in REPO_SORTS or direction not in ("asc", "desc"):
            return _invalid("Repository", "sort" if sort not in REPO_SORTS else "direction")
        repos.sort(key=REPO_SORTS[sort], reverse=direction == "desc")
        api = self._api(req)
        changed = max((r.changed_at for r in repos), default=owner.created_at)
        return self._paged(req, link_path, repos, lambda r: self._repo_json(api, r, full=False), changed)

    def _get_repo(self, req: Request, m: Match[str]) -> Response:
        repo = self._find_repo(m)
        if repo is None:
            return _not_found("repos/repos#get-a-repository")
        return self._ok(req, self._repo_json(self._api(req), repo, full=True), repo.changed_at)

    def _list_issues(self, req: Request, m: Match[str]) -> Response:
        repo = self._find_repo(m)
        if repo is None:
            return _not_found("issues/issues#list-repository-issues")
        state, sort = req.arg("state", "open"), req.arg("sort", "created")
        direction = req.arg("direction", "desc")
        for name, value, allowed in [
            ("state", state, ("open", "closed", "all")),
            ("sort", sort, tuple(ISSUE_SORTS)),
            ("direction", direction, ("asc", "desc")),
        ]:
            if value not in allowed:
                return _invalid("Issue", name)
        try:
            since = _as_dt(req.arg("since"))
        except ValueError:
            return _invalid("Issue", "since")
        wanted = {x.strip().lower() for x in (req.arg("labels") or "").split(",") if x.strip()}
        assignee = req.arg("assignee")
        issues = [
            i
            for i in repo.issues.values()
            if (state == "all" or i.state == state)
            and (since is None or i.updated_at >= since)
            and (not wanted or wanted <= {name.lower() for name in i.labels})
            and _assigned(i, assignee)
        ]
        issues.sort(key=ISSUE_SORTS[sort], reverse=direction == "desc")
        api, tally = self._api(req), self._milestone_tally(repo)
        return self._paged(
            req,
            f"/repositories/{repo.id}/issues",
            issues,
            lambda i: self._issue_json(api, repo, i, tally, full=False),
            repo.changed_at,
        )

    def _get_issue(self, req: Request, m: Match[str]) -> Response:
        found = self._resolve(req, m, "")
        if isinstance(found, Response):
            return found
        repo, issue = found
        payload = self._issue_json(self._api(req), repo, issue, self._milestone_tally(repo), full=True)
        return self._ok(req, payload, issue.updated_at)

    def _list_comments(self, req: Request, m: Match[str]) -> Response:
        found = self._resolve(req, m, "/comments")
        if isinstance(found, Response):
            return found
        repo, issue = found
        try:
            since = _as_dt(req.arg("since"))
        except ValueError:
            return _invalid("IssueComment", "since")
        comments = [c for c in issue.comments if since is None or c.updated_at >= since]
        api = self._api(req)
        return self._paged(
            req,
            f"/repositories/{repo.id}/issues/{issue.number}/comments",
            comments,
            lambda c: self._comment_json(api, repo, issue, c),
            issue.updated_at,
        )

    def _list_repo_comments(self, req: Request, m: Match[str]) -> Response:
        """Every issue and pull-request comment of a repository: by ascending id, or by `sort`
        (created/updated) in `direction` (default desc, ignored without `sort`), `since` on updated."""
        repo = self._find_repo(m)
        if repo is None:
            return _not_found("issues/comments#list-issue-comments-for-a-repository")
        sort, direction = req.arg("sort"), req.arg("direction", "desc")
        if sort not in (None, "created", "updated"):
            return _invalid("IssueComment", "sort")
        if direction not in ("asc", "desc"):
            return _invalid("IssueComment", "direction")
        try:
            since = _as_dt(req.arg("since"))
        except ValueError:
            return _invalid("IssueComment", "since")
        found = [
            (issue, c)
            for issue in repo.issues.values()
            for c in issue.comments
            if since is None or c.updated_at >= since
        ]
        if sort is None:
            found.sort(key=lambda ic: ic[1].id)
        else:
            found.sort(key=lambda ic: (getattr(ic[1], f"{sort}_at"), ic[1].id), reverse=direction == "desc")
        api = self._api(req)
        return self._paged(
            req,
            f"/repositories/{repo.id}/issues/comments",
            found,
            lambda ic: self._comment_json(api, repo, ic[0], ic[1]),
            repo.changed_at,
        )

    def _create_comment(self, req: Request, m: Match[str]) -> Response:
        found = self._resolve(req, m, "/comments")
        if isinstance(found, Response):
            return found
        repo, issue = found
        try:
            body = (req.json() or {}).get("body")
        except (ValueError, AttributeError):
            return _error(400, "Problems parsing JSON")
        if not isinstance(body, str):
            return _error(422, 'Invalid request.\n\n"body" wasn\'t supplied.')
        comment = self._post_comment(repo, issue, body, self.login, None)
        payload = self._comment_json(self._api(req), repo, issue, comment)
        return Response.json(payload, 201, {"Location": payload["url"]})

    # -- route helpers ---------------------------------------------------------------------
    def _find_repo(self, m: Match[str]) -> _Repo | None:
        if m["rid"]:
            return self._repos_by_id.get(int(m["rid"]))
        return self._repos.get(f"{m['owner']}/{m['name']}".lower())

    def _match_account(self, m: Match[str]) -> _Account | None:
        """The account a route names, by login (`/users/x`) or by id (`/user/123`, as Link URLs do)."""
        uid = m.groupdict().get("uid")
        return self._accounts_by_id.get(int(uid)) if uid else self._accounts.get(m["login"].lower())

    def _org(self, m: Match[str]) -> _Account | None:
        org = self._match_account(m)
        return org if org is not None and org.type == "Organization" else None

    def _owned(self, owner: _Account) -> list[_Repo]:
        return [r for r in self._repos.values() if r.owner.lower() == owner.login.lower()]

    def _resolve(self, req: Request, m: Match[str], suffix: str) -> tuple[_Repo, _Issue] | Response:
        """Find an issue the way GitHub answers for it: 404 never existed, 410 deleted, 301 transferred."""
        repo, number = self._find_repo(m), int(m["number"])
        if repo is None:
            return _error(404, "Not Found", ISSUE_DOCS)
        moved = False
        while number not in repo.issues:
            if number not in repo.gone:
                return _error(404, "Not Found", ISSUE_DOCS)
            target = repo.gone[number]
            if target is None:
                return _error(410, "This issue was deleted", ISSUE_DOCS)
            repo, number, moved = self._repos[target[0]], target[1], True
        if moved:
            location = f"{self._api(req)}/repositories/{repo.id}/issues/{number}{suffix}"
            payload = {
                "message": "Moved Permanently",
                "url": location,
                "documentation_url": "https://docs.github.com/v3/#http-redirects",
            }
            return Response.json(payload, 301, {"Location": location})
        return repo, repo.issues[number]

    @staticmethod
    def _milestone_tally(repo: _Repo) -> dict[datetime, list[int]]:
        """Open/closed counts per milestone, computed once per request (not once per rendered issue)."""
        tally: dict[datetime, list[int]] = {due: [0, 0] for due in repo.milestones}
        for issue in repo.issues.values() if repo.milestones else ():
            if issue.milestone_due is not None:
                tally[issue.milestone_due][issue.state == "closed"] += 1
        return tally

    def _association(self, repo: _Repo, login: str) -> str:
        if login.lower() == repo.owner.lower():
            return "OWNER"
        return "MEMBER" if login in repo.members else "NONE"

    # -- JSON shapes -----------------------------------------------------------------------
    def _user_json(self, api: str, login: str) -> dict[str, Any]:
        """GitHub's "simple user" object."""
        account = self._account(login)
        url = f"{api}/users/{account.login}"
        return {
            "login": account.login,
            "id": account.id,
            "node_id": _node_id(account.type, account.id),
            "avatar_url": f"https://avatars.githubusercontent.com/u/{account.id}?v=4",
            "gravatar_id": "",
            "url": url,
            "html_url": f"{self.web_url}/{account.login}",
            **{key: url + suffix for key, suffix in USER_LINKS.items()},
            "type": account.type,
            "user_view_type": "public",
            "site_admin": False,
        }

    def _account_json(self, api: str, account: _Account) -> dict[str, Any]:
        """GitHub's public user object (what /users/{login} and /user return)."""
        public_repos = sum(1 for r in self._owned(account) if not r.private)
        return {
            **self._user_json(api, account.login),
            "name": None,
            "company": None,
            "blog": "",
            "location": None,
            "email": None,
            "hireable": None,
            "bio": None,
            "twitter_username": None,
            "public_repos": public_repos,
            "public_gists": 0,
            "followers": 0,
            "following": 0,
            "created_at": _ts(account.created_at),
            "updated_at": _ts(account.created_at),
        }

    def _org_json(self, api: str, org: _Account) -> dict[str, Any]:
        url = f"{api}/orgs/{org.login}"
        return {
            "login": org.login,
            "id": org.id,
            "node_id": _node_id("Organization", org.id),
            "url": url,
            "repos_url": f"{url}/repos",
            "events_url": f"{url}/events",
            "hooks_url": f"{url}/hooks",
            "issues_url": f"{url}/issues",
            "members_url": f"{url}/members{{/member}}",
            "public_members_url": f"{url}/public_members{{/member}}",
            "avatar_url": f"https://avatars.githubusercontent.com/u/{org.id}?v=4",
            "description": None,
            "name": org.login,
            "company": None,
            "blog": "",
            "location": None,
            "email": None,
            "is_verified": False,
            "has_organization_projects": True,
            "has_repository_projects": True,
            "public_repos": sum(1 for r in self._owned(org) if not r.private),
            "public_gists": 0,
            "followers": 0,
            "following": 0,
            "html_url": f"{self.web_url}/{org.login}",
            "created_at": _ts(org.created_at),
            "updated_at": _ts(org.created_at),
            "archived_at": None,
            "type": "Organization",
        }

    def _repo_json(self, api: str, repo: _Repo, *, full: bool) -> dict[str, Any]:
        """The "repository" object; `full` adds what only GET /repos/{owner}/{repo} returns."""
        url = f"{api}/repos/{repo.full_name}"
        web = f"{self.web_url}/{repo.full_name}"
        host = urlsplit(self.web_url).netloc
        open_issues = sum(1 for i in repo.issues.values() if i.state == "open")
        out: dict[str, Any] = {
            "id": repo.id,
            "node_id": _node_id("Repository", repo.id),
            "name": repo.name,
            "full_name": repo.full_name,
            "private": repo.private,
            "owner": self._user_json(api, repo.owner),
            "html_url": web,
            "description": None,
            "fork": False,
            "url": url,
            **{key: url + suffix for key, suffix in REPO_LINKS.items()},
            "created_at": _ts(repo.created_at),
            "updated_at": _ts(repo.changed_at),
            "pushed_at": _ts(repo.created_at),
            "git_url": f"git://{host}/{repo.full_name}.git",
            "ssh_url": f"git@{host}:{repo.full_name}.git",
            "clone_url": f"{web}.git",
            "svn_url": web,
            "homepage": None,
            "size": 0,
            "stargazers_count": 0,
            "watchers_count": 0,
            "language": None,
            "has_issues": True,
            "has_projects": True,
            "has_downloads": True,
            "has_wiki": True,
            "has_pages": False,
            "has_discussions": False,
            "forks_count": 0,
            "mirror_url": None,
            "archived": False,
            "disabled": False,
            "open_issues_count": open_issues,
            "license": None,
            "allow_forking": True,
            "is_template": False,
            "web_commit_signoff_required": False,
            "topics": [],
            "visibility": "private" if repo.private else "public",
            "forks": 0,
            "open_issues": open_issues,
            "watchers": 0,
            "default_branch": "main",
            "permissions": {"admin": False, "maintain": False, "push": True, "triage": True, "pull": True},
        }
        if full:
            owner = self._account(repo.owner)
            if owner.type == "Organization":
                out["organization"] = self._user_json(api, owner.login)
            out.update(network_count=0, subscribers_count=0)
        return out

    def _label_json(self, api: str, repo: _Repo, name: str) -> dict[str, Any]:
        label = repo.labels[name]
        return {
            "id": label.id,
            "node_id": _node_id("Label", label.id),
            "url": f"{api}/repos/{repo.full_name}/labels/{quote(name)}",
            "name": name,
            "color": label.color,
            "default": label.default,
            "description": None,
        }

    def _milestone_json(
        self, api: str, repo: _Repo, due: datetime, tally: dict[datetime, list[int]]
    ) -> dict[str, Any]:
        ms = repo.milestones[due]
        url = f"{api}/repos/{repo.full_name}/milestones/{ms.number}"
        open_issues, closed_issues = tally[due]
        return {
            "url": url,
            "html_url": f"{self.web_url}/{repo.full_name}/milestone/{ms.number}",
            "labels_url": f"{url}/labels",
            "id": ms.id,
            "node_id": _node_id("Milestone", ms.id),
            "number": ms.number,
            "title": due.strftime("%Y-%m-%d"),
            "description": None,
            "creator": self._user_json(api, ms.creator),
            "open_issues": open_issues,
            "closed_issues": closed_issues,
            "state": "open",
            "created_at": _ts(ms.created_at),
            "updated_at": _ts(ms.created_at),
            "due_on": _ts(due),
            "closed_at": None,
        }

    def _issue_json(
        self, api: str, repo: _Repo, issue: _Issue, tally: dict[datetime, list[int]], *, full: bool
    ) -> dict[str, Any]:
        """An issue as listed; `full` adds `closed_by`, which GitHub only returns for a single issue."""
        url = f"{api}/repos/{repo.full_name}/issues/{issue.number}"
        web_repo = f"{self.web_url}/{repo.full_name}"
        assignees = [self._user_json(api, login) for login in issue.assignees]
        out: dict[str, Any] = {
            "url": url,
            "repository_url": f"{api}/repos/{repo.full_name}",
            "labels_url": f"{url}/labels{{/name}}",
            "comments_url": f"{url}/comments",
            "events_url": f"{url}/events",
            "html_url": f"{web_repo}/{'pull' if issue.pull_request else 'issues'}/{issue.number}",
            "id": issue.id,
            "node_id": _node_id("PullRequest" if issue.pull_request else "Issue", issue.id),
            "number": issue.number,
            "title": issue.title,
            "user": self._user_json(api, issue.user),
            "labels": [self._label_json(api, repo, name) for name in issue.labels],
            "state": issue.state,
            "locked": issue.locked,
            "assignee": assignees[0] if assignees else None,
            "assignees": assignees,
            "milestone": (
                self._milestone_json(api, repo, issue.milestone_due, tally) if issue.milestone_due else None
            ),
            "comments": len(issue.comments),
            "created_at": _ts(issue.created_at),
            "updated_at": _ts(issue.updated_at),
            "closed_at": _ts(issue.closed_at),
            "author_association": self._association(repo, issue.user),
            "active_lock_reason": None,
        }
        if issue.pull_request:
            out["draft"] = False
            out["pull_request"] = {
                "url": f"{api}/repos/{repo.full_name}/pulls/{issue.number}",
                "html_url": f"{web_repo}/pull/{issue.number}",
                "diff_url": f"{web_repo}/pull/{issue.number}.diff",
                "patch_url": f"{web_repo}/pull/{issue.number}.patch",
                "merged_at": _ts(issue.merged_at),
            }
        out.update(
            body=issue.body,
            reactions=_reactions(f"{url}/reactions"),
            timeline_url=f"{url}/timeline",
            performed_via_github_app=None,
            state_reason=issue.state_reason,
        )
        if full:
            out["closed_by"] = self._user_json(api, issue.closed_by) if issue.closed_by else None
        return out

    def _comment_json(self, api: str, repo: _Repo, issue: _Issue, comment: _Comment) -> dict[str, Any]:
        url = f"{api}/repos/{repo.full_name}/issues/comments/{comment.id}"
        kind = "pull" if issue.pull_request else "issues"
        return {
            "url": url,
            "html_url": f"{self.web_url}/{repo.full_name}/{kind}/{issue.number}#issuecomment-{comment.id}",
            "issue_url": f"{api}/repos/{repo.full_name}/issues/{issue.number}",
            "id": comment.id,
            "node_id": _node_id("IssueComment", comment.id),
            "user": self._user_json(api, comment.user),
            "created_at": _ts(comment.created_at),
            "updated_at": _ts(comment.updated_at),
            "author_association": self._association(repo, comment.user),
            "body": comment.body,
            "reactions": _reactions(f"{url}/reactions"),
            "performed_via_github_app": None,
        }


def _reactions(url: str) -> dict[str, Any]:
    return {"url": url, "total_count": 0, **dict.fromkeys(REACTIONS, 0)}


def _assigned(issue: _Issue, assignee: str | None) -> bool:
    """GitHub's `assignee` filter: a login, `none` (unassigned) or `*` (assigned to anyone)."""
    if assignee is None:
        return True
    if assignee == "none":
        return not issue.assignees
    if assignee == "*":
        return bool(issue.assignees)
    return assignee.lower() in (login.lower() for login in issue.assignees)


def _invalid(resource: str, field_name: str) -> Response:
    payload = {
        "message": "Validation Failed",
        "errors": [{"resource": resource, "field": field_name, "code": "invalid"}],
        "documentation_url": DOCS,
        "status": "422",
    }
    return Response.json(payload, 422)


def _not_modified(req: Request, etag: str, last_modified: datetime) -> bool:
    """RFC 9110: If-None-Match decides when present (weak comparison); else If-Modified-Since."""
    if (tags := req.headers.get("if-none-match")) is not None:
        strong = etag.removeprefix("W/")
        return any(t.strip() == "*" or t.strip().removeprefix("W/") == strong for t in tags.split(","))
    if since := req.headers.get("if-modified-since"):
        try:
            return last_modified <= parsedate_to_datetime(since)
        except (TypeError, ValueError):
            return False
    return False
