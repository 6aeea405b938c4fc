"""The Slack stand-in driven through the real slack-sdk `WebClient`, so wire shapes stay honest."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_handlers import RateLimitErrorRetryHandler, ServerErrorRetryHandler
from slack_sdk.http_retry.builtin_interval_calculators import FixedValueRetryIntervalCalculator

from sync.standins.slack import SlackStandin

T0 = datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)  # epoch 1700000000


@pytest.fixture(scope="module")
def server() -> Iterator[SlackStandin]:
    """One server for the module: stopping one costs up to 0.5 s (serve_forever's poll interval)."""
    standin = SlackStandin()
    with standin:
        yield standin


@pytest.fixture
def slack(server: SlackStandin) -> SlackStandin:
    server.reset()
    server.set_now(T0)
    server.add_user("U01ALICE", "alice", email="alice@acme.test", real_name="Alice Liddell")
    server.add_user("U02BOB", "bob", real_name="Bob Stone")
    server.add_user("U03GONE", "gone", deleted=True)
    server.add_channel("C01GENERAL", "general")
    server.add_channel("C02SECRET", "secret", is_private=True)
    server.add_channel("C03OUTSIDE", "outside", is_member=False)
    return server


def client_for(slack: SlackStandin, **kwargs: object) -> WebClient:
    kwargs.setdefault("token", slack.token)
    return WebClient(base_url=slack.base_url + "/api/", **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def client(slack: SlackStandin) -> WebClient:
    return client_for(slack)


def api_error(call: object, *args: object, **kwargs: object) -> SlackApiError:
    with pytest.raises(SlackApiError) as info:
        call(*args, **kwargs)  # type: ignore[operator]
    return info.value


def test_auth_test_names_the_bot(client: WebClient, slack: SlackStandin) -> None:
    auth = client.auth_test()
    assert auth["user_id"] == slack.bot_user_id
    assert auth["bot_id"] == slack.bot_id
    assert (auth["team"], auth["team_id"]) == ("Acme", "T0ACME")
    assert auth["url"] == "https://acme.slack.com/"


def test_token_is_checked(slack: SlackStandin) -> None:
    bad = api_error(client_for(slack, token="xoxb-wrong").auth_test)
    assert bad.response.status_code == 200
    assert bad.response["error"] == "invalid_auth"
    assert api_error(client_for(slack, token=None).auth_test).response["error"] == "not_authed"


def test_history_pages_newest_first_with_cursors(client: WebClient, slack: SlackStandin) -> None:
    posted = [slack.post("C01GENERAL", "U01ALICE", f"message {i}") for i in range(250)]
    assert posted == sorted(posted) and len(set(posted)) == 250
    assert posted[0] == "1700000000.000100"

    seen, cursor, calls = [], None, 0
    while True:
        page = client.conversations_history(channel="C01GENERAL", limit=100, cursor=cursor)
        calls += 1
        seen += [m["ts"] for m in page["messages"]]
        if not page["has_more"]:
            assert "response_metadata" not in page
            break
        cursor = page["response_metadata"]["next_cursor"]
    assert calls == 3
    assert seen == posted[::-1]

    # The SDK's own iterator follows next_cursor too.
    pages = list(client.conversations_history(channel="C01GENERAL", limit=999))
    assert [len(p["messages"]) for p in pages] == [250]
    assert client.conversations_history(channel="C01GENERAL")["has_more"] is True  # default limit 100


def test_history_oldest_latest_inclusive(client: WebClient, slack: SlackStandin) -> None:
    ts = [slack.post("C01GENERAL", "U01ALICE", f"m{i}") for i in range(10)]
    newer = client.conversations_history(channel="C01GENERAL", oldest=ts[6])
    assert [m["ts"] for m in newer["messages"]] == ts[:6:-1]
    inclusive = client.conversations_history(channel="C01GENERAL", oldest=ts[6], inclusive=True)
    assert [m["ts"] for m in inclusive["messages"]] == ts[:5:-1]
    window = client.conversations_history(channel="C01GENERAL", oldest=ts[2], latest=ts[5], limit=1)
    assert [m["ts"] for m in window["messages"]] == [ts[4]]
    assert window["has_more"] is True
    rest = client.conversations_history(
        channel="C01GENERAL", oldest=ts[2], latest=ts[5], cursor=window["response_metadata"]["next_cursor"]
    )
    assert [m["ts"] for m in rest["messages"]] == [ts[3]]
    assert rest["has_more"] is False
    bad = api_error(client.conversations_history, channel="C01GENERAL", cursor="bm9wZQ==")
    assert bad.response["error"] == "invalid_cursor"


def test_ts_stays_unique_and_increasing_when_the_clock_moves(slack: SlackStandin) -> None:
    first = slack.post("C01GENERAL", "U01ALICE", "a")
    slack.set_now(datetime(2023, 11, 14, 22, 0, tzinfo=UTC))  # clock goes back
    second = slack.post("C01GENERAL", "U01ALICE", "b")
    slack.set_now(datetime(2023, 11, 15, tzinfo=UTC))
    third = slack.post("C01GENERAL", "U01ALICE", "c")
    assert first < second < third
    assert third.startswith(str(int(datetime(2023, 11, 15, tzinfo=UTC).timestamp())))
    with pytest.raises(ValueError):
        slack.post("C01GENERAL", "U01ALICE", "dup", ts=first)


def test_replies_parent_first_and_thread_fields(client: WebClient, slack: SlackStandin) -> None:
    parent = slack.post("C01GENERAL", "U01ALICE", "can someone review?")
    replies = [
        slack.reply("C01GENERAL", parent, user, f"r{i}")
        for i, user in enumerate(["U02BOB", "U01ALICE", "U02BOB"])
    ]

    history = client.conversations_history(channel="C01GENERAL")["messages"]
    assert [m["ts"] for m in history] == [parent]  # replies live in the thread only
    head = history[0]
    assert head["thread_ts"] == parent
    assert head["reply_count"] == 3
    assert head["reply_users"] == ["U02BOB", "U01ALICE"]
    assert head["latest_reply"] == replies[-1]

    thread = client.conversations_replies(channel="C01GENERAL", ts=parent)
    assert [m["ts"] for m in thread["messages"]] == [parent, *replies]
    assert all(m["thread_ts"] == parent and m["parent_user_id"] == "U01ALICE" for m in thread["messages"][1:])

    first = client.conversations_replies(channel="C01GENERAL", ts=parent, limit=2)
    second = client.conversations_replies(
        channel="C01GENERAL", ts=parent, limit=2, cursor=first["response_metadata"]["next_cursor"]
    )
    assert [m["ts"] for m in first["messages"]] == [parent, replies[0]]
    assert [m["ts"] for m in second["messages"]] == replies[1:]
    newer = client.conversations_replies(channel="C01GENERAL", ts=parent, oldest=replies[0])
    assert [m["ts"] for m in newer["messages"]] == [parent, *replies[1:]]


def test_edits_reactions_and_deletes(client: WebClient, slack: SlackStandin) -> None:
    ts = slack.post("C01GENERAL", "U01ALICE", "tpyo")
    slack.edit("C01GENERAL", ts, "typo")
    slack.react("C01GENERAL", ts, "eyes", "U02BOB")
    slack.react("C01GENERAL", ts, "eyes", "U01ALICE")
    slack.react("C01GENERAL", ts, "white_check_mark", "U02BOB")
    slack.unreact("C01GENERAL", ts, "white_check_mark", "U02BOB")
    message = client.reactions_get(channel="C01GENERAL", timestamp=ts)["message"]
    assert message["text"] == "typo"
    assert message["edited"]["user"] == "U01ALICE" and message["edited"]["ts"] > ts
    assert message["reactions"] == [{"name": "eyes", "users": ["U02BOB", "U01ALICE"], "count": 2}]

    parent = slack.post("C01GENERAL", "U02BOB", "thread")
    reply = slack.reply("C01GENERAL", parent, "U01ALICE", "answer")
    slack.delete("C01GENERAL", ts)
    slack.delete("C01GENERAL", parent)
    history = client.conversations_history(channel="C01GENERAL")["messages"]
    assert [(m["ts"], m.get("subtype")) for m in history] == [(parent, "tombstone")]
    slack.delete("C01GENERAL", reply)  # the last reply takes the tombstone with it
    assert client.conversations_history(channel="C01GENERAL")["messages"] == []


def test_users_info_and_list(client: WebClient, slack: SlackStandin) -> None:
    alice = client.users_info(user="U01ALICE")["user"]
    assert alice["name"] == "alice" and alice["real_name"] == "Alice Liddell"
    assert alice["profile"]["email"] == "alice@acme.test"
    assert alice["deleted"] is False and alice["is_bot"] is False
    assert client.users_info(user="U03GONE")["user"]["deleted"] is True
    assert client.users_info(user=slack.bot_user_id)["user"]["is_bot"] is True
    assert api_error(client.users_info, user="U404").response["error"] == "user_not_found"

    ids = [m["id"] for page in client.users_list(limit=2) for m in page["members"]]
    assert ids == [slack.bot_user_id, "U01ALICE", "U02BOB", "U03GONE"]
    assert len(client.users_list()["members"]) == 4  # no limit: everything at once


def test_conversations_list_and_info(client: WebClient) -> None:
    public = client.conversations_list()["channels"]
    assert [c["id"] for c in public] == ["C01GENERAL", "C03OUTSIDE"]
    assert public[0]["is_channel"] is True and public[0]["is_member"] is True
    both = client.conversations_list(types="public_channel,private_channel", limit=2)
    assert both["response_metadata"]["next_cursor"]
    assert client.conversations_info(channel="C02SECRET")["channel"]["is_private"] is True
    assert api_error(client.conversations_info, channel="C404").response["error"] == "channel_not_found"
    assert api_error(client.conversations_history, channel="C03OUTSIDE").response["error"] == "not_in_channel"


def test_permalink(client: WebClient, slack: SlackStandin) -> None:
    ts = slack.post("C01GENERAL", "U01ALICE", "hello")
    reply = slack.reply("C01GENERAL", ts, "U02BOB", "hi")
    link = client.chat_getPermalink(channel="C01GENERAL", message_ts=ts)
    assert link["permalink"] == "https://acme.slack.com/archives/C01GENERAL/p1700000000000100"
    threaded = client.chat_getPermalink(channel="C01GENERAL", message_ts=reply)["permalink"]
    assert threaded.endswith(f"?thread_ts={ts}&cid=C01GENERAL")
    missing = api_error(client.chat_getPermalink, channel="C01GENERAL", message_ts="1.000001")
    assert missing.response["error"] == "message_not_found"


def test_dm_with_metadata_round_trip(client: WebClient, slack: SlackStandin) -> None:
    opened = client.conversations_open(users="U01ALICE")
    dm = opened["channel"]["id"]
    assert dm.startswith("D")
    again = client.conversations_open(users=["U01ALICE"])
    assert again["channel"]["id"] == dm and again["already_open"] is True
    assert client.conversations_open(users="U02BOB")["channel"]["id"] != dm

    metadata = {"event_type": "task_followup", "event_payload": {"task_id": "T-42", "attempt": 1}}
    posted = client.chat_postMessage(channel=dm, text="Is T-42 done?", metadata=metadata)
    assert posted["channel"] == dm and posted["message"]["bot_id"] == slack.bot_id
    assert client.chat_postMessage(channel="U01ALICE", text="via user id")["channel"] == dm

    plain = client.conversations_history(channel=dm)["messages"]
    assert all("metadata" not in m for m in plain)
    full = client.conversations_history(channel=dm, include_all_metadata=True)["messages"]
    assert full[-1]["ts"] == posted["ts"] and full[-1]["metadata"] == metadata
    assert full[-1]["user"] == slack.bot_user_id and full[-1]["bot_id"] == slack.bot_id

    reply = client.chat_postMessage(channel=dm, text="nudge", thread_ts=posted["ts"])
    assert reply["message"]["thread_ts"] == posted["ts"]
    assert slack.sent(dm)[0] == {
        "channel": dm,
        "ts": posted["ts"],
        "text": "Is T-42 done?",
        "blocks": None,
        "thread_ts": None,
        "metadata": metadata,
    }
    assert slack.sent(dm)[-1]["thread_ts"] == posted["ts"]
    bad = api_error(client.chat_postMessage, channel=dm, text="x", thread_ts="1.000001")
    assert bad.response["error"] == "invalid_thread_ts"


def test_form_encoded_post_takes_json_strings(client: WebClient, slack: SlackStandin) -> None:
    blocks = [{"type": "section", "text": {"type": "mrkdwn", "text": "*hi*"}}]
    metadata = {"event_type": "digest", "event_payload": {"n": 3}}
    client.api_call(
        "chat.postMessage",
        params={
            "channel": "#general",
            "text": "hi",
            "blocks": json.dumps(blocks),
            "metadata": json.dumps(metadata),
        },
    )
    (sent,) = slack.sent("C01GENERAL")
    assert sent["blocks"] == blocks and sent["metadata"] == metadata


def test_query_string_and_token_argument(slack: SlackStandin) -> None:
    slack.post("C01GENERAL", "U01ALICE", "hello")
    query = urllib.parse.urlencode({"channel": "C01GENERAL", "token": slack.token})
    with urllib.request.urlopen(f"{slack.base_url}/api/conversations.history?{query}") as resp:
        body = json.load(resp)
    assert body["ok"] is True and body["messages"][0]["text"] == "hello"


@pytest.mark.parametrize(
    ("blocks", "pointer"),
    [
        ([{"type": "divider"}] * 51, "/blocks"),
        ([{"type": "section", "text": {"type": "mrkdwn", "text": "x" * 3001}}], "/blocks/0/text/text"),
        (
            [{"type": "divider"}, {"type": "header", "text": {"type": "plain_text", "text": "x" * 151}}],
            "/blocks/1/text/text",
        ),
        ([{"type": "section", "fields": [{"type": "mrkdwn", "text": "x"}] * 11}], "/blocks/0/fields"),
        ([{"text": "no type"}], "/blocks/0"),
    ],
)
def test_block_kit_limits(client: WebClient, slack: SlackStandin, blocks: list, pointer: str) -> None:
    error = api_error(client.chat_postMessage, channel="C01GENERAL", text="fallback", blocks=blocks)
    assert error.response.status_code == 200
    assert error.response["error"] == "invalid_blocks"
    assert any(e.endswith(f"[json-pointer:{pointer}]") for e in error.response["errors"])
    assert slack.sent() == []


def test_block_kit_at_the_limits_is_accepted(client: WebClient) -> None:
    blocks = [{"type": "section", "text": {"type": "mrkdwn", "text": "x" * 3000}}] + [
        {"type": "divider"}
    ] * 49
    assert client.chat_postMessage(channel="C01GENERAL", text="ok", blocks=blocks)["ok"] is True


def test_post_message_errors(client: WebClient) -> None:
    assert (
        api_error(client.chat_postMessage, channel="C404", text="x").response["error"] == "channel_not_found"
    )
    assert (
        api_error(client.chat_postMessage, channel="C03OUTSIDE", text="x").response["error"]
        == "not_in_channel"
    )
    no_text = api_error(client.api_call, "chat.postMessage", json={"channel": "C01GENERAL"})
    assert no_text.response["error"] == "no_text"
    missing = api_error(client.api_call, "chat.postMessage", json={"text": "x"})
    assert missing.response["error"] == "invalid_arguments"
    bad_meta = api_error(
        client.chat_postMessage, channel="C01GENERAL", text="x", metadata={"event_type": "x"}
    )
    assert bad_meta.response["error"] == "invalid_metadata_format"


def test_long_text_is_truncated_with_a_warning(client: WebClient, slack: SlackStandin) -> None:
    posted = client.chat_postMessage(channel="C01GENERAL", text="y" * 40_001)
    assert len(posted["message"]["text"]) == 40_000
    assert posted["response_metadata"]["warnings"] == ["message_truncated"]
    assert len(slack.messages("C01GENERAL")[0]["text"]) == 40_000


def test_rate_limit_without_retry_handler_raises_with_retry_after(
    client: WebClient, slack: SlackStandin
) -> None:
    slack.inject(r"/api/conversations\.history$", status=429, retry_after=7)
    error = api_error(client.conversations_history, channel="C01GENERAL")
    assert error.response.status_code == 429
    assert error.response.headers["Retry-After"] == "7"
    assert error.response["error"] == "ratelimited"
    assert client.conversations_history(channel="C01GENERAL")["ok"] is True  # the fault was one-shot


def test_rate_limit_retry_handler_waits_and_succeeds(slack: SlackStandin) -> None:
    client = client_for(slack, retry_handlers=[RateLimitErrorRetryHandler(max_retry_count=1)])
    slack.inject(r"/api/chat\.postMessage$", status=429, retry_after=0)
    assert client.chat_postMessage(channel="C01GENERAL", text="eventually")["ok"] is True
    assert [r.status for r in slack.requests(path_pattern=r"chat\.postMessage")] == [429, 200]
    assert len(slack.sent()) == 1


def test_server_errors_surface_as_slack_api_error(client: WebClient, slack: SlackStandin) -> None:
    slack.inject(r"/api/users\.info$", status=500)
    error = api_error(client.users_info, user="U01ALICE")
    assert error.response.status_code == 500
    assert "non-JSON" in error.response["error"]

    retrying = client_for(
        slack,
        retry_handlers=[ServerErrorRetryHandler(interval_calculator=FixedValueRetryIntervalCalculator(0))],
    )
    slack.inject(r"/api/users\.info$", status=503)
    assert retrying.users_info(user="U01ALICE")["user"]["id"] == "U01ALICE"
