"""The Jira stand-in, driven through the real `jira` library wherever it can be (plain `requests`
for what the library hides: raw pages, status codes, headers).

Clients are built with `max_retries=0`: the library's ResilientSession otherwise retries 429 and 503
itself (sleeping 2 x Retry-After), which would hide injected faults and slow the suite down.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests
from jira import JIRA, JIRAError

from sync.standins.jira import JiraStandin

T0 = datetime(2024, 1, 15, 15, 30, 20, tzinfo=UTC)  # 10:30:20 in New York (EST)


@pytest.fixture
def cloud() -> Iterator[JiraStandin]:
    standin = JiraStandin("cloud", timezone="America/New_York")
    standin.start()
    yield standin
    standin.stop()


@pytest.fixture
def server() -> Iterator[JiraStandin]:
    standin = JiraStandin("server", email="bot@acme.io", token="pat-123")
    standin.start()
    yield standin
    standin.stop()


def client(standin: JiraStandin, **options: Any) -> JIRA:
    auth: dict[str, Any] = (
        {"basic_auth": (standin.email, standin.token)} if standin.cloud else {"token_auth": standin.token}
    )
    return JIRA(server=standin.base_url, options=options or None, max_retries=0, **auth)


def get(standin: JiraStandin, path: str, **params: Any) -> requests.Response:
    return requests.get(
        standin.base_url + path, params=params, auth=(standin.email, standin.token), timeout=5
    )


def post(standin: JiraStandin, path: str, payload: Any) -> requests.Response:
    return requests.post(
        standin.base_url + path, json=payload, auth=(standin.email, standin.token), timeout=5
    )


def keys_of(issues: Any) -> list[str]:
    return [issue.key for issue in issues]


def seed(standin: JiraStandin, count: int, project: str = "ENG") -> None:
    for number in range(1, count + 1):
        standin.add_issue(f"{project}-{number}", summary=f"Task {number}", updated=T0)


# -- handshake and auth ----------------------------------------------------------------------------


def test_cloud_handshake_is_a_single_server_info_call(cloud: JiraStandin) -> None:
    jira = client(cloud)

    assert jira.deploymentType == "Cloud"
    assert [(r.method, r.path) for r in cloud.requests()] == [("GET", "/rest/api/2/serverInfo")]
    assert cloud.requests()[0].headers["authorization"].startswith("Basic ")
    info = jira.server_info()
    assert info["baseUrl"] == cloud.base_url and info["versionNumbers"][0] == 1001
    me = jira.myself()
    assert me["accountId"] == cloud.bot and me["emailAddress"] == "bot@acme.io"
    assert me["timeZone"] == "America/New_York" and "name" not in me


def test_server_handshake_uses_bearer_token_and_names_users(server: JiraStandin) -> None:
    jira = client(server)

    assert jira.deploymentType == "Server"
    assert server.requests()[0].headers["authorization"] == "Bearer pat-123"
    me = jira.myself()
    assert (me["name"], me["key"], me["timeZone"]) == ("bot", server.bot, "UTC")
    assert "accountId" not in me
    basic = JIRA(server=server.base_url, basic_auth=("bot", "pat-123"), max_retries=0)
    assert basic.myself()["name"] == "bot"


def test_bad_credentials_are_401_in_jiras_shape(cloud: JiraStandin) -> None:
    with pytest.raises(JIRAError) as caught:
        JIRA(server=cloud.base_url, basic_auth=(cloud.email, "wrong"), max_retries=0)
    assert caught.value.status_code == 401 and caught.value.response is not None
    assert caught.value.response.json()["errorMessages"]

    anonymous = requests.get(cloud.base_url + "/rest/api/3/serverInfo", timeout=5)
    assert anonymous.status_code == 200  # serverInfo is public, like on the real site
    assert requests.get(cloud.base_url + "/rest/api/3/myself", timeout=5).status_code == 401
    bearer = {"Authorization": f"Bearer {cloud.token}"}  # a Server PAT means nothing to Cloud
    assert requests.get(cloud.base_url + "/rest/api/3/myself", headers=bearer, timeout=5).status_code == 401


def test_no_permission_is_403(cloud: JiraStandin) -> None:
    cloud.add_issue("ENG-1", summary="Secret")
    jira = client(cloud)
    cloud.forbid("/issue/")

    with pytest.raises(JIRAError) as caught:
        jira.issue("ENG-1")
    assert caught.value.status_code == 403
    cloud.forbid(None)
    assert jira.issue("ENG-1").fields.summary == "Secret"


# -- searching -------------------------------------------------------------------------------------


def test_cloud_enhanced_search_pages_with_next_page_token(cloud: JiraStandin) -> None:
    seed(cloud, 250)
    jira = client(cloud)

    issues = jira.enhanced_search_issues("project = ENG ORDER BY key ASC", maxResults=0, fields="summary")

    assert keys_of(issues) == [f"ENG-{n}" for n in range(1, 251)]
    pages = cloud.requests("GET", r"/search/jql$")
    assert len(pages) == 3 and "nextPageToken" not in pages[0].query
    assert all("nextPageToken" in page.query for page in pages[1:])
    assert not cloud.requests(path_pattern=r"/search$")

    first = get(cloud, "/rest/api/3/search/jql", jql="project = ENG ORDER BY key ASC", maxResults=100).json()
    assert first["isLast"] is False and len(first["issues"]) == 100
    token = first["nextPageToken"]
    rest = post(
        cloud, "/rest/api/3/search/jql", {"jql": "project = ENG", "nextPageToken": token, "maxResults": 500}
    )
    last = rest.json()
    assert last["isLast"] is True and "nextPageToken" not in last and "total" not in last
    assert [issue["key"] for issue in last["issues"]] == [f"ENG-{n}" for n in range(101, 251)]


def test_library_search_issues_on_cloud_goes_to_search_jql(cloud: JiraStandin) -> None:
    seed(cloud, 3)
    jira = client(cloud)

    assert keys_of(jira.search_issues("project = ENG ORDER BY key DESC")) == ["ENG-3", "ENG-2", "ENG-1"]
    assert [r.path for r in cloud.requests(path_pattern="/search")] == ["/rest/api/2/search/jql"]


def test_cloud_page_size_is_clamped_like_the_service(cloud: JiraStandin) -> None:
    seed(cloud, 250)
    jql = "project = ENG ORDER BY key ASC"

    with_fields = get(cloud, "/rest/api/3/search/jql", jql=jql, maxResults=5000, fields="summary").json()
    ids_only = get(cloud, "/rest/api/3/search/jql", jql=jql, maxResults=5000, fields="key").json()

    assert len(with_fields["issues"]) == JiraStandin.CLOUD_MAX_RESULTS == 100 and not with_fields["isLast"]
    assert len(ids_only["issues"]) == 250 and ids_only["isLast"]
    assert JiraStandin.CLOUD_MAX_RESULTS_IDS == 5000
    assert ids_only["issues"][0]["fields"] == {}


def test_retired_search_endpoints_are_gone_on_cloud(cloud: JiraStandin) -> None:
    for response in (
        get(cloud, "/rest/api/3/search", jql="project = ENG"),
        post(cloud, "/rest/api/2/search", {"jql": "project = ENG"}),
    ):
        assert response.status_code == 410
        assert response.json()["errorMessages"][0].startswith("The requested API has been removed.")


def test_server_search_pages_with_start_at(server: JiraStandin) -> None:
    seed(server, 120)
    jira = client(server)

    issues = jira.search_issues("project = ENG ORDER BY key ASC", maxResults=False, fields="summary")

    assert keys_of(issues) == [f"ENG-{n}" for n in range(1, 121)] and issues.total == 120
    starts = [r.query.get("startAt") for r in server.requests("GET", r"/rest/api/2/search$")]
    assert starts == [["0"], ["100"]]
    page = get(server, "/rest/api/2/search", jql="project = ENG", startAt=110, maxResults=5000).json()
    assert (page["startAt"], page["maxResults"], page["total"]) == (110, JiraStandin.SERVER_MAX_RESULTS, 120)
    assert len(page["issues"]) == 10
    assert get(server, "/rest/api/2/search/jql", jql="project = ENG").status_code == 404
    assert get(server, "/rest/api/3/myself").status_code == 404


def test_only_requested_fields_are_returned(cloud: JiraStandin) -> None:
    cloud.add_issue("ENG-1", summary="Pick me", description="Body", acceptance="Given/when/then")
    jira = client(cloud)

    narrow = jira.enhanced_search_issues("key = ENG-1", fields="summary,status")[0]
    assert set(narrow.raw) >= {"id", "key", "self"} and set(narrow.raw["fields"]) == {"summary", "status"}
    everything = jira.issue("ENG-1").raw["fields"]
    assert everything["customfield_10042"] == "Given/when/then" and "comment" in everything
    navigable = get(
        cloud, "/rest/api/3/search/jql", jql="key = ENG-1", fields="*navigable,-description"
    ).json()
    assert "description" not in navigable["issues"][0]["fields"]
    assert "comment" not in navigable["issues"][0]["fields"] and "summary" in navigable["issues"][0]["fields"]


def test_jql_dates_use_the_account_time_zone_at_minute_precision(cloud: JiraStandin) -> None:
    cloud.add_issue("ENG-1", summary="before", updated=T0 - timedelta(seconds=21))  # 10:29:59 EST
    cloud.add_issue("ENG-2", summary="after", updated=T0)  # 10:30:20 EST
    jira = client(cloud)

    def search(jql: str) -> list[str]:
        return keys_of(jira.enhanced_search_issues(f"project = ENG AND {jql} ORDER BY key ASC", fields="key"))

    assert search('updated >= "2024-01-15 10:30"') == ["ENG-2"]
    assert search('updated > "2024/01/15 10:30"') == ["ENG-2"]
    assert search('updated >= "2024-01-15 10:31"') == []
    assert search('updated < "2024-01-15 10:30"') == ["ENG-1"]
    assert search('updated >= "2024-01-15"') == ["ENG-1", "ENG-2"]
    assert search('updated >= "2024-01-15 15:30"') == []  # the UTC wall clock would wrongly match ENG-2


def test_epoch_millisecond_bounds_are_exact(cloud: JiraStandin) -> None:
    cloud.add_issue("ENG-1", summary="earlier", updated=T0 - timedelta(milliseconds=1))
    cloud.add_issue("ENG-2", summary="on the bound", updated=T0)
    jira = client(cloud)
    bound = int(T0.timestamp() * 1000)

    assert keys_of(jira.enhanced_search_issues(f"project = ENG AND updated >= {bound}")) == ["ENG-2"]
    assert keys_of(jira.enhanced_search_issues(f"project = ENG AND updated > {bound}")) == []
    assert jira.issue("ENG-1").fields.updated == "2024-01-15T15:30:19.999+0000"


def test_order_by_updated_then_key_is_natural_within_one_minute(cloud: JiraStandin) -> None:
    for number in (10, 2, 1, 11, 3):
        cloud.add_issue(f"ENG-{number}", summary="same minute", updated=T0)
    cloud.add_issue("APP-7", summary="same minute, other project", updated=T0)
    cloud.add_issue("ENG-5", summary="earlier", updated=T0 - timedelta(seconds=30))
    jira = client(cloud)

    jql = "project in (ENG, APP) AND updated >= '2024-01-15 10:29' ORDER BY updated ASC, key ASC"
    issues = jira.enhanced_search_issues(jql, maxResults=3, fields="updated")

    assert keys_of(issues) == ["ENG-5", "APP-7", "ENG-1"]
    rest = jira.enhanced_search_issues(jql, nextPageToken=issues.nextPageToken, maxResults=10)
    assert keys_of(rest) == ["ENG-2", "ENG-3", "ENG-10", "ENG-11"]
    descending = jira.enhanced_search_issues("project = ENG ORDER BY updated DESC, key DESC", maxResults=2)
    assert keys_of(descending) == ["ENG-11", "ENG-10"]


def test_jql_boolean_logic_labels_and_status(cloud: JiraStandin) -> None:
    cloud.add_issue("ENG-1", summary="a", labels=["sync"], status="In Progress")
    cloud.add_issue("ENG-2", summary="b", labels=["other"], status="Done")
    cloud.add_issue("OPS-1", summary="c", labels=["sync"])
    jira = client(cloud)

    def search(jql: str) -> list[str]:
        return keys_of(jira.enhanced_search_issues(jql + " ORDER BY key ASC"))

    assert search('project = ENG AND (labels = sync OR status = "Done")') == ["ENG-1", "ENG-2"]
    assert search("labels = sync AND NOT project = OPS") == ["ENG-1"]
    assert search("key in (ENG-2, OPS-1)") == ["ENG-2", "OPS-1"]
    assert search("issuekey = eng-1") == ["ENG-1"]
    assert search("statusCategory = Done OR project in (OPS)") == ["ENG-2", "OPS-1"]
    assert jira.issue("ENG-2").fields.status.statusCategory.key == "done"
    assert jira.issue("ENG-2").fields.resolutiondate is not None


@pytest.mark.parametrize(
    ("jql", "message"),
    [
        ("assignee = currentUser()", "Unable to find JQL function 'currentUser()'"),
        ('summary ~ "crash"', "Searching by 'summary' is not supported by the Jira stand-in."),
        ("labels ~ x", "The operator '~' is not supported by the 'labels' field."),
        ("frobnicate = 5", "Field 'frobnicate' does not exist"),
        ("project = ENG AND", "Expecting a field name but reached the end of the query."),
        ("project = NOPE", "The value 'NOPE' does not exist for the field 'project'."),
        ("key = ENG-99", "An issue with key 'ENG-99' does not exist for field 'key'."),
        ('updated > "yesterday"', "Date value 'yesterday' for field 'updated' is invalid."),
        ("ORDER BY updated", "Unbounded JQL queries are not allowed here."),
    ],
)
def test_unsupported_or_invalid_jql_is_400(cloud: JiraStandin, jql: str, message: str) -> None:
    cloud.add_issue("ENG-1", summary="x")

    response = get(cloud, "/rest/api/3/search/jql", jql=jql)

    assert response.status_code == 400
    assert message in response.json()["errorMessages"][0]
    assert response.json()["errors"] == {}


def test_server_lenient_validation_matches_nothing_instead_of_failing(server: JiraStandin) -> None:
    server.add_issue("ENG-1", summary="x")

    strict = get(server, "/rest/api/2/search", jql="key in (ENG-1, ENG-99)")
    lenient = get(server, "/rest/api/2/search", jql="key in (ENG-1, ENG-99)", validateQuery="false")

    assert strict.status_code == 400
    assert [issue["key"] for issue in lenient.json()["issues"]] == ["ENG-1"]


# -- issue shape -----------------------------------------------------------------------------------


def test_rich_text_is_adf_on_v3_and_wiki_markup_on_v2(cloud: JiraStandin, server: JiraStandin) -> None:
    text = "Steps:\n* open the app\n\nThen *crash*."
    for standin in (cloud, server):
        standin.add_issue("ENG-1", summary="Crash", description=text, acceptance="No crash")

    v3 = client(cloud, rest_api_version="3").issue("ENG-1").raw["fields"]
    assert v3["description"] == {
        "type": "doc",
        "version": 1,
        "content": [
            {
                "type": "paragraph",
                "content": [
                    {"type": "text", "text": "Steps:"},
                    {"type": "hardBreak"},
                    {"type": "text", "text": "* open the app"},
                ],
            },
            {"type": "paragraph", "content": [{"type": "text", "text": "Then *crash*."}]},
        ],
    }
    assert v3["customfield_10042"]["type"] == "doc"
    assert client(cloud).issue("ENG-1").fields.description == text
    assert client(server).issue("ENG-1").fields.description == text
    assert client(server).issue("ENG-1").raw["fields"]["assignee"] is None


def test_issue_relations_people_and_time_tracking(cloud: JiraStandin) -> None:
    cloud.add_user("acc-ann", name="ann", display_name="Ann Lee", email="ann@acme.io")
    cloud.add_issue("ENG-1", summary="Parent", assignee="acc-ann", duedate="2024-02-01", priority="High")
    cloud.add_issue("ENG-2", summary="Child", parent="ENG-1", timetracking={"originalEstimateSeconds": 36000})
    jira = client(cloud)

    parent, child = jira.issue("ENG-1"), jira.issue("ENG-2")

    assignee = parent.fields.assignee
    assert assignee is not None and (assignee.accountId, assignee.displayName) == ("acc-ann", "Ann Lee")
    assert parent.fields.duedate == "2024-02-01" and parent.fields.priority.name == "High"
    assert [task.key for task in parent.fields.subtasks] == ["ENG-2"] and "parent" not in parent.raw["fields"]
    assert child.fields.parent.key == "ENG-1" and child.fields.issuetype.subtask is True
    assert child.raw["fields"]["timetracking"] == {
        "originalEstimate": "1d 2h",
        "originalEstimateSeconds": 36000,
    }
    assert child.fields.created == child.fields.updated


def test_link_directions(cloud: JiraStandin) -> None:
    for key in ("ENG-1", "ENG-2", "ENG-3"):
        cloud.add_issue(key, summary=key)
    cloud.add_link("ENG-1", "Blocks", "ENG-2")  # ENG-1 blocks ENG-2
    cloud.add_issue("ENG-4", summary="dup", links=[("Duplicate", "ENG-1")])  # ENG-4 duplicates ENG-1
    jira = client(cloud)

    links = jira.issue("ENG-1").fields.issuelinks
    blocks, duplicated = sorted(links, key=lambda link: link.type.name)
    assert (blocks.type.outward, blocks.outwardIssue.key) == ("blocks", "ENG-2")
    assert not hasattr(blocks, "inwardIssue")
    assert (duplicated.type.inward, duplicated.inwardIssue.key) == ("is duplicated by", "ENG-4")
    (blocked,) = jira.issue("ENG-2").fields.issuelinks
    assert (blocked.type.inward, blocked.inwardIssue.key, blocked.id) == ("is blocked by", "ENG-1", blocks.id)
    assert jira.issue("ENG-3").fields.issuelinks == []


def test_deleted_or_unknown_issue_is_404(cloud: JiraStandin) -> None:
    cloud.add_issue("ENG-1", summary="Parent")
    cloud.add_issue("ENG-2", summary="Child", parent="ENG-1")
    cloud.delete_issue("ENG-1")
    jira = client(cloud)

    for key in ("ENG-1", "ENG-2", "ENG-404"):
        with pytest.raises(JIRAError) as caught:
            jira.issue(key)
        assert caught.value.status_code == 404
        assert caught.value.text == "Issue does not exist or you do not have permission to see it."


def test_update_issue_moves_updated_and_status_category(cloud: JiraStandin) -> None:
    cloud.set_now(T0)
    cloud.add_issue("ENG-1", summary="x")
    cloud.set_now(T0 + timedelta(minutes=5))

    changed = cloud.update_issue("ENG-1", status="Done")

    assert changed["updated"] == T0 + timedelta(minutes=5) and changed["category"] == "done"
    assert changed["resolutiondate"] == changed["updated"]
    reopened = cloud.update_issue("ENG-1", status="In Progress", updated=T0 + timedelta(minutes=6))
    assert reopened["category"] == "indeterminate" and reopened["resolutiondate"] is None


# -- comments --------------------------------------------------------------------------------------


def test_comments_add_and_list(cloud: JiraStandin) -> None:
    cloud.set_now(T0)
    cloud.add_issue("ENG-1", summary="Talk")
    cloud.add_comment("ENG-1", "First!", author="acc-ann")
    cloud.set_now(T0 + timedelta(hours=1))
    jira = client(cloud)

    added = jira.add_comment("ENG-1", "Second, from the bot")

    assert added.body == "Second, from the bot" and added.author.accountId == cloud.bot
    assert [c.body for c in jira.comments("ENG-1")] == ["First!", "Second, from the bot"]
    assert jira.issue("ENG-1").fields.updated == "2024-01-15T16:30:20.000+0000"
    newest = get(cloud, "/rest/api/3/issue/ENG-1/comment", orderBy="-created", maxResults=1).json()
    assert (newest["total"], newest["maxResults"], newest["startAt"]) == (2, 1, 0)
    assert newest["comments"][0]["body"]["content"][0]["content"][0]["text"] == "Second, from the bot"

    adf = {
        "type": "doc",
        "version": 1,
        "content": [{"type": "paragraph", "content": [{"type": "text", "text": "Hi"}]}],
    }
    created = post(cloud, "/rest/api/3/issue/ENG-1/comment", {"body": adf})
    assert created.status_code == 201 and created.json()["body"] == adf
    assert cloud.comments("ENG-1")[-1]["body"] == "Hi"
    rejected = post(cloud, "/rest/api/3/issue/ENG-1/comment", {"body": "plain text is v2 only"})
    assert rejected.status_code == 400 and rejected.json()["errors"] == {
        "comment": "Comment body is not valid!"
    }


# -- faults ----------------------------------------------------------------------------------------


def test_injected_429_carries_retry_after_and_is_not_retried(cloud: JiraStandin) -> None:
    cloud.add_issue("ENG-1", summary="x")
    jira = client(cloud)
    cloud.inject(r"/search/jql$", status=429, retry_after=7)

    with pytest.raises(JIRAError) as caught:
        jira.enhanced_search_issues("project = ENG")

    assert caught.value.status_code == 429 and caught.value.response is not None
    assert caught.value.response.headers["Retry-After"] == "7"
    assert caught.value.text == "Rate limit exceeded."
    assert len(cloud.requests(path_pattern="/search/jql")) == 1


def test_injected_500_surfaces_jiras_error_message(server: JiraStandin) -> None:
    server.add_issue("ENG-1", summary="x")
    jira = client(server)
    server.inject(r"/issue/ENG-1$", status=500)

    with pytest.raises(JIRAError) as caught:
        jira.issue("ENG-1")

    assert (caught.value.status_code, caught.value.text) == (500, "Internal server error.")
    assert jira.issue("ENG-1").key == "ENG-1"


def test_library_retries_429_by_default_honouring_retry_after(cloud: JiraStandin) -> None:
    """The default client (max_retries=3) sleeps 2 x max(Retry-After, 1) x jitter, then succeeds."""
    cloud.add_issue("ENG-1", summary="x")
    jira = JIRA(server=cloud.base_url, basic_auth=(cloud.email, cloud.token))
    cloud.inject(r"/issue/ENG-1$", status=429, retry_after=0)

    assert jira.issue("ENG-1").key == "ENG-1"
    assert [r.status for r in cloud.requests(path_pattern="/issue/ENG-1$")] == [429, 200]


# -- scale -----------------------------------------------------------------------------------------


def test_listing_ten_thousand_issues_in_pages(cloud: JiraStandin) -> None:
    for number in range(1, 10_001):
        cloud.add_issue(f"BIG-{number}", summary=f"Task {number}", updated=T0)
    jira = client(cloud)

    issues = jira.enhanced_search_issues(
        "project = BIG ORDER BY updated ASC, key ASC", maxResults=0, fields="key"
    )

    assert len(issues) == 10_000 and issues[-1].key == "BIG-10000"
    assert len(cloud.requests(path_pattern="/search/jql")) == 100
