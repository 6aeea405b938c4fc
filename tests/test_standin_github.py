"""The GitHub stand-in, driven by real PyGithub (and plain requests where PyGithub hides the wire)."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import requests
from github import Auth, Github, GithubException, GithubRetry
from github.GithubException import BadCredentialsException, RateLimitExceededException, UnknownObjectException

from sync.standins.github import GithubStandin

T0 = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.fixture
def gh() -> Iterator[GithubStandin]:
    standin = GithubStandin()
    standin.set_now(T0)
    standin.add_repo("acme/api")
    standin.start()
    yield standin
    # stop() waits out serve_forever's 0.5 s poll; shutting down in the background keeps the suite fast
    threading.Thread(target=standin.stop, daemon=True).start()


def client(gh: GithubStandin, token: str = "test-token", **kw: object) -> Github:
    """PyGithub as a connector should configure it in tests: no throttle sleeps, no silent retries."""
    options: dict = {
        "per_page": 100,
        "retry": None,
        "seconds_between_requests": 0,
        "seconds_between_writes": 0,
    }
    return Github(base_url=gh.base_url, auth=Auth.Token(token), **{**options, **kw})


def raw(gh: GithubStandin, path: str, **headers: str) -> requests.Response:
    return requests.get(
        gh.base_url + path, headers={"Authorization": "token test-token", **headers}, timeout=5
    )


def test_pagination_follows_github_link_headers(gh: GithubStandin) -> None:
    for i in range(250):
        gh.add_issue("acme/api", title=f"issue {i}", created_at=T0 + timedelta(minutes=i))
    repo = client(gh).get_repo("acme/api")
    gh.reset_log()

    numbers = [issue.number for issue in repo.get_issues(state="all")]

    assert numbers == list(range(250, 0, -1))  # default sort: created, newest first
    pages = gh.requests("GET", r"/issues$")
    assert [r.query.get("page") for r in pages] == [None, ["2"], ["3"]]
    assert pages[1].path == f"/repositories/{repo.id}/issues"  # PyGithub followed GitHub's rel="next"

    link = raw(gh, "/repos/acme/api/issues?state=all&per_page=100&page=2").headers["Link"]
    base = f"{gh.base_url}/repositories/{repo.id}/issues?state=all&per_page=100"
    assert link == (
        f'<{base}&page=1>; rel="prev", <{base}&page=3>; rel="next", '
        f'<{base}&page=3>; rel="last", <{base}&page=1>; rel="first"'
    )
    last = raw(gh, "/repos/acme/api/issues?state=all&per_page=100&page=3").headers["Link"]
    assert last == f'<{base}&page=2>; rel="prev", <{base}&page=1>; rel="first"'
    assert "Link" not in raw(gh, "/repos/acme/api/issues?state=all&per_page=100&page=1&labels=x").headers


def test_per_page_caps_at_100_and_defaults_to_30(gh: GithubStandin) -> None:
    for i in range(120):
        gh.add_issue("acme/api", title=f"issue {i}")
    assert len(raw(gh, "/repos/acme/api/issues?per_page=500").json()) == 100
    assert len(raw(gh, "/repos/acme/api/issues").json()) == 30


def test_since_sort_and_direction(gh: GithubStandin) -> None:
    for i in range(5):
        gh.add_issue("acme/api", title=f"issue {i}", updated_at=T0 + timedelta(days=i))
    gh.add_issue("acme/api", title="closed", state="closed", updated_at=T0 + timedelta(days=9))
    repo = client(gh).get_repo("acme/api")

    since = T0 + timedelta(days=2)
    fresh = repo.get_issues(state="all", since=since, sort="updated", direction="asc")
    assert [i.title for i in fresh] == ["issue 2", "issue 3", "issue 4", "closed"]
    assert [i.title for i in repo.get_issues(since=since)] == ["issue 4", "issue 3", "issue 2"]
    assert gh.requests("GET", r"/issues$")[-1].query["since"] == ["2024-01-04T03:04:05Z"]


def test_issue_objects_follow_the_docs(gh: GithubStandin) -> None:
    gh.add_repo("acme/web", members=("octocat",))
    gh.add_issue(
        "acme/web",
        title="Ship it",
        body="soon",
        labels=("bug", "p1"),
        assignees=("alice",),
        milestone_due="2024-02-01",
    )
    item = raw(gh, "/repos/acme/web/issues").json()[0]
    assert item["url"] == f"{gh.base_url}/repos/acme/web/issues/1"
    assert item["html_url"] == "https://github.com/acme/web/issues/1"
    assert item["user"]["login"] == "octocat" and item["author_association"] == "MEMBER"
    assert [(label["name"], label["color"], label["default"]) for label in item["labels"]][0] == (
        "bug",
        "d73a4a",
        True,
    )
    assert item["assignee"]["login"] == "alice" == item["assignees"][0]["login"]
    assert item["milestone"]["due_on"] == "2024-02-01T00:00:00Z" and item["milestone"]["open_issues"] == 1
    assert item["created_at"] == "2024-01-02T03:04:05Z" and item["closed_at"] is None
    assert "pull_request" not in item and "closed_by" not in item  # closed_by only on GET of one issue
    assert item["reactions"]["total_count"] == 0 and item["timeline_url"].endswith("/issues/1/timeline")

    issue = client(gh).get_repo("acme/web").get_issue(1)
    assert (issue.title, issue.milestone.title, issue.labels[1].name) == ("Ship it", "2024-02-01", "p1")


def test_pull_requests_are_listed_with_a_pull_request_object(gh: GithubStandin) -> None:
    gh.add_issue("acme/api", title="an issue")
    gh.add_issue("acme/api", title="a PR", pull_request=True)
    items = raw(gh, "/repos/acme/api/issues").json()
    assert [("pull_request" in i) for i in items] == [True, False]
    assert items[0]["pull_request"]["html_url"] == "https://github.com/acme/api/pull/2"
    assert items[0]["pull_request"]["merged_at"] is None

    pr = next(iter(client(gh).get_repo("acme/api").get_issues()))
    gh.reset_log()
    assert pr.pull_request.html_url == "https://github.com/acme/api/pull/2"
    assert gh.log == []  # present in the listing: no lazy completion request


def test_conditional_get_returns_304_without_spending_rate_limit(gh: GithubStandin) -> None:
    gh.add_issue("acme/api", title="watch me")
    first = raw(gh, "/repos/acme/api/issues")
    etag = first.headers["ETag"]
    assert re.fullmatch(r'W/"[0-9a-f]{64}"', etag) and first.headers["Last-Modified"]

    again = raw(gh, "/repos/acme/api/issues", **{"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    assert again.headers["X-RateLimit-Remaining"] == first.headers["X-RateLimit-Remaining"]

    gh.update_issue("acme/api", 1, title="changed")
    changed = raw(gh, "/repos/acme/api/issues", **{"If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["ETag"] != etag

    issue = client(gh).get_repo("acme/api").get_issue(1)  # PyGithub's own conditional path
    remaining = gh.rate_limit_remaining
    assert issue.update() is False
    assert gh.rate_limit_remaining == remaining and gh.log[-1].status == 304


def test_rate_limit_headers_and_exhaustion(gh: GithubStandin) -> None:
    gh.rate_limit_remaining = 2
    gh.rate_limit_reset = int(T0.timestamp()) + 600
    g = client(gh)
    g.get_repo("acme/api")
    assert g.rate_limiting == (1, 5000) and g.rate_limiting_resettime == int(T0.timestamp()) + 600
    g.get_repo("acme/api")

    with pytest.raises(RateLimitExceededException) as exc:
        g.get_repo("acme/api")
    assert exc.value.status == 403 and exc.value.data["message"].startswith("API rate limit exceeded for")
    headers = raw(gh, "/repos/acme/api").headers
    assert (headers["X-RateLimit-Remaining"], headers["X-RateLimit-Used"]) == ("0", "5000")
    assert headers["X-RateLimit-Resource"] == "core"

    gh.set_now(T0 + timedelta(minutes=11))  # past the reset: a fresh window
    assert raw(gh, "/repos/acme/api").headers["X-RateLimit-Remaining"] == "4999"


def test_bad_or_missing_token_gets_401(gh: GithubStandin) -> None:
    with pytest.raises(BadCredentialsException):
        client(gh, token="nope").get_repo("acme/api")
    resp = requests.get(gh.base_url + "/repos/acme/api", timeout=5)
    assert resp.status_code == 401 and resp.json()["message"] == "Bad credentials"
    bearer = requests.get(gh.base_url + "/repos/acme/api", headers={"Authorization": "Bearer test-token"})
    assert bearer.status_code == 200


def test_unknown_repo_and_issue_are_404(gh: GithubStandin) -> None:
    g = client(gh)
    with pytest.raises(UnknownObjectException):
        g.get_repo("acme/nope")
    with pytest.raises(UnknownObjectException):
        g.get_repo("acme/api").get_issue(7)


def test_injected_502_and_429_with_retry_after(gh: GithubStandin) -> None:
    gh.inject(r"/repos/acme/api$", status=502)
    with pytest.raises(GithubException) as exc:
        client(gh).get_repo("acme/api")
    assert exc.value.status == 502

    gh.inject(r"/repos/acme/api$", status=429, retry_after=7)
    with pytest.raises(GithubException) as exc:
        client(gh).get_repo("acme/api")
    assert exc.value.status == 429 and exc.value.headers["retry-after"] == "7"
    assert exc.value.data["message"].startswith("You have exceeded a secondary rate limit")

    gh.inject(r"/repos/acme/api$", status=403, retry_after=1)
    with pytest.raises(RateLimitExceededException):  # PyGithub recognises the secondary limit wording
        client(gh).get_repo("acme/api")


def test_pygithub_default_retry_hides_transient_faults(gh: GithubStandin) -> None:
    gh.inject(r"/repos/acme/api$", status=502)
    gh.inject(r"/repos/acme/api$", status=429, retry_after=0)
    repo = client(gh, retry=GithubRetry()).get_repo("acme/api")
    assert repo.full_name == "acme/api"
    assert [r.status for r in gh.requests("GET", r"/repos/acme/api$")] == [502, 429, 200]


def test_create_and_list_comments(gh: GithubStandin) -> None:
    gh.add_issue("acme/api", title="talk to me")
    gh.add_comment("acme/api", 1, "first", user="alice")
    gh.set_now(T0 + timedelta(hours=1))
    issue = client(gh).get_repo("acme/api").get_issue(1)

    posted = issue.create_comment("nudge from trackloop")

    assert posted.user.login == "trackloop-bot" and posted.body == "nudge from trackloop"
    assert gh.requests("POST")[0].status == 201
    assert [c.body for c in issue.get_comments()] == ["first", "nudge from trackloop"]
    assert [c.body for c in issue.get_comments(since=T0 + timedelta(minutes=30))] == ["nudge from trackloop"]
    stored = gh.issue("acme/api", 1)
    assert stored["comments"] == 2 and stored["updated_at"] == T0 + timedelta(hours=1)
    assert [c["user"] for c in gh.comments("acme/api", 1)] == ["alice", "trackloop-bot"]


def test_comment_pagination(gh: GithubStandin) -> None:
    gh.add_issue("acme/api", title="chatty")
    for i in range(150):
        gh.add_comment("acme/api", 1, f"c{i}")
    comments = client(gh).get_repo("acme/api").get_issue(1).get_comments()
    assert [c.body for c in comments] == [f"c{i}" for i in range(150)]
    assert len(gh.requests("GET", r"/comments$")) == 2


def test_repository_comment_listing_with_since_sort_pages_and_etag(gh: GithubStandin) -> None:
    gh.add_issue("acme/api", title="one")
    gh.add_issue("acme/api", title="two")
    for i in range(120):
        gh.add_comment("acme/api", 1 + i % 2, f"c{i}", user="renovate[bot]" if i == 119 else "alice",
                       created_at=T0 + timedelta(minutes=i))
    repo = client(gh).get_repo("acme/api")
    gh.reset_log()

    newest = list(repo.get_issues_comments(sort="updated", direction="desc", since=T0 + timedelta(minutes=10)))

    assert [c.body for c in newest] == [f"c{i}" for i in range(119, 9, -1)]
    assert newest[0].user.login == "renovate[bot]" and newest[0].user.type == "Bot"
    assert newest[0].issue_url.endswith("/repos/acme/api/issues/2") and newest[1].user.type == "User"
    pages = gh.requests("GET", r"/issues/comments$")
    assert [r.query.get("page") for r in pages] == [None, ["2"]]  # 110 comments, 100 a page
    assert [c.body for c in repo.get_issues_comments()][:2] == ["c0", "c1"]  # no sort: ascending id
    first = raw(gh, "/repos/acme/api/issues/comments?sort=updated&direction=desc&per_page=100")
    again = raw(gh, "/repos/acme/api/issues/comments?sort=updated&direction=desc&per_page=100",
                **{"If-None-Match": first.headers["ETag"]})
    assert first.status_code == 200 and again.status_code == 304
    assert raw(gh, "/repos/acme/api/issues/comments?sort=comments").status_code == 422


def test_deleted_issue_is_410_and_transferred_issue_redirects(gh: GithubStandin) -> None:
    gh.add_repo("acme/web")
    gh.add_issue("acme/api", title="doomed")
    gh.add_issue("acme/api", title="moving")
    gh.delete_issue("acme/api", 1)
    moved = gh.transfer_issue("acme/api", 2, "acme/web")
    repo = client(gh).get_repo("acme/api")

    with pytest.raises(GithubException) as exc:
        repo.get_issue(1)
    assert exc.value.status == 410 and exc.value.data["message"] == "This issue was deleted"

    resp = requests.get(
        gh.base_url + "/repos/acme/api/issues/2",
        headers={"Authorization": "token test-token"},
        allow_redirects=False,
    )
    assert resp.status_code == 301
    web_id = client(gh).get_repo("acme/web").id
    assert resp.headers["Location"] == f"{gh.base_url}/repositories/{web_id}/issues/{moved['number']}"
    assert repo.get_issue(2).title == "moving"  # PyGithub follows the 301
    assert list(repo.get_issues(state="all")) == []


def test_org_and_user_repo_listings_for_wildcards(gh: GithubStandin) -> None:
    for i in range(120):
        gh.add_repo(f"acme/svc-{i:03}", private=i % 2 == 0)
    g = client(gh)
    org_repos = [r.full_name for r in g.get_organization("acme").get_repos()]
    assert len(org_repos) == 121
    assert len(gh.requests("GET", r"^/organizations/\d+/repos$")) == 1  # page 2 via the Link header
    public = [r.full_name for r in g.get_user("acme").get_repos()]
    assert public[:2] == ["acme/api", "acme/svc-001"] and len(public) == 61


def test_github_enterprise_prefix(gh: GithubStandin) -> None:
    gh.api_prefix = "/api/v3"
    gh.add_issue("acme/api", title="on prem")
    assert gh.base_url.endswith("/api/v3")
    assert [i.title for i in client(gh).get_repo("acme/api").get_issues()] == ["on prem"]
    assert gh.log[-1].path == "/api/v3/repos/acme/api/issues"
    outside = gh.base_url.removesuffix("/api/v3") + "/repos/acme/api"
    assert requests.get(outside, headers={"Authorization": "token test-token"}, timeout=5).status_code == 404
