"""A loopback stand-in of the Slack Web API, good enough for slack-sdk's `WebClient` unchanged.

Point the client at it with `WebClient(token=s.token, base_url=s.base_url + "/api/")`. Every method
answers at `/api/<method>` (POST or GET) and takes its arguments from the query string, a form body or
a JSON body, like Slack does. API errors come back as HTTP 200 with `{"ok": false, "error": ...}`;
only rate limits (429 + Retry-After) and server faults use other statuses. Shapes follow
https://docs.slack.dev/reference/methods/<method>.

State is seeded and inspected through the data API (`add_user`, `add_channel`, `open_im`, `post`,
`reply`, `react`, `unreact`, `edit`, `delete`, `messages`, `sent`, `reset`). Each conversation keeps a
sorted index of its timeline so paging through thousands of messages costs O(log n + page) per call.
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import re
from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable
from dataclasses import dataclass, field
from http.client import responses
from typing import Any

from sync.standins.base import Fault, Request, Response, Standin

Args = dict[str, Any]
Message = dict[str, Any]

# https://docs.slack.dev/block-kit: "You can include up to 50 blocks in each message".
MAX_BLOCKS = 50
# https://docs.slack.dev/reference/block-kit/blocks/section-block: text "maximum length is 3000
# characters"; fields "Maximum number of items is 10. Maximum length for the text in each item is 2000".
MAX_SECTION_TEXT = 3000
MAX_SECTION_FIELDS = 10
MAX_SECTION_FIELD_TEXT = 2000
# https://docs.slack.dev/reference/block-kit/blocks/header-block: "Maximum length ... is 150 characters".
MAX_HEADER_TEXT = 150
# Same pages: "block_id ... Maximum length for this field is 255 characters".
MAX_BLOCK_ID = 255
# https://api.slack.com/changelog/2018-04-truncating-really-long-messages and the "Truncating
# content" note on chat.postMessage: text over 40,000 characters is not rejected with msg_too_long,
# it is truncated and still posted, with a `message_truncated` warning in response_metadata.
MAX_TEXT = 40_000
# conversations.history: limit defaults to 100, "Maximum of 999"; conversations.replies defaults
# to 1000; conversations.list: default 100, "no larger than 1000"; users.list: no limit = everything.
HISTORY_LIMIT = (100, 999)
REPLIES_LIMIT = (1000, 1000)
LIST_LIMIT = (100, 1000)

TRUNCATED_WARNING = (
    "[WARN] Your message was truncated but still posted. The `text` field accepts up to 40,000 characters."
)


class ApiError(Exception):
    """An `{"ok": false}` answer: raised anywhere inside a method, rendered by `handle`."""

    def __init__(self, code: str, **extra: Any) -> None:
        super().__init__(code)
        self.code = code
        self.extra = extra


def _ts_key(ts: str) -> int:
    """'1700000000.000100' -> microseconds, so timestamps sort and compare exactly (floats do not)."""
    seconds, _, fraction = ts.partition(".")
    if not seconds.isdigit() or (fraction and not fraction.isdigit()) or len(fraction) > 6:
        raise ValueError(f"not a Slack ts: {ts!r}")
    return int(seconds) * 1_000_000 + int(fraction.ljust(6, "0"))


def _ts_str(key: int) -> str:
    return f"{key // 1_000_000}.{key % 1_000_000:06d}"


def _encode_cursor(prefix: str, value: str) -> str:
    """Opaque like Slack's (base64 of e.g. 'next_ts:1700000000.000100'); callers must not parse it."""
    return base64.b64encode(f"{prefix}:{value}".encode()).decode()


def _decode_cursor(prefix: str, cursor: str) -> str:
    try:
        kind, _, value = base64.b64decode(cursor, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise ApiError("invalid_cursor") from None
    if kind != prefix or not value:
        raise ApiError("invalid_cursor")
    return value


def _required(args: Args, name: str) -> str:
    value = args.get(name)
    if value in (None, ""):
        raise ApiError(
            "invalid_arguments", response_metadata={"messages": [f"[ERROR] missing required field: {name}"]}
        )
    return str(value)


def _flag(args: Args, name: str) -> bool:
    """slack-sdk sends booleans as "1"/"0" in forms; JSON bodies and hand-made calls send true/"true"."""
    return args.get(name) in (True, 1, "1", "true", "True")


def _limit(args: Args, default: int, maximum: int) -> int:
    raw = args.get("limit")
    if raw in (None, "", 0, "0"):
        return default
    try:
        limit = int(raw)
    except (TypeError, ValueError):
        raise ApiError("invalid_limit") from None
    if limit < 0:
        raise ApiError("invalid_limit")
    return min(limit, maximum)


def _ts_arg(args: Args, name: str, error: str) -> int | None:
    raw = args.get(name)
    if raw in (None, ""):
        return None
    try:
        return _ts_key(str(raw))
    except ValueError:
        raise ApiError(error) from None


def _json_arg(args: Args, name: str, error: str) -> Any:
    """Blocks, attachments and metadata arrive as JSON strings in forms, as objects in JSON bodies."""
    raw = args.get(name)
    if not isinstance(raw, str):
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        raise ApiError(error) from None


def _text_len(obj: Any) -> int:
    return len(obj.get("text", "")) if isinstance(obj, dict) else 0


def _too_long(limit: int, pointer: str) -> str:
    return f"must be less than {limit + 1} characters [json-pointer:{pointer}]"


def _too_many(limit: int, pointer: str) -> str:
    return f"must provide an array with no more than {limit} items [json-pointer:{pointer}]"


def _block_errors(blocks: list[Any]) -> list[str]:
    """Slack-worded schema errors with JSON pointers, for the Block Kit limits listed above."""
    if len(blocks) > MAX_BLOCKS:
        return [_too_many(MAX_BLOCKS, "/blocks")]
    errors = []
    for i, block in enumerate(blocks):
        at = f"/blocks/{i}"
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            errors.append(f"missing required field: type [json-pointer:{at}]")
            continue
        if len(str(block.get("block_id", ""))) > MAX_BLOCK_ID:
            errors.append(_too_long(MAX_BLOCK_ID, f"{at}/block_id"))
        if block["type"] == "section":
            fields = block.get("fields") or []
            if "text" not in block and not fields:
                errors.append(f"must provide either text or fields [json-pointer:{at}]")
            if _text_len(block.get("text")) > MAX_SECTION_TEXT:
                errors.append(_too_long(MAX_SECTION_TEXT, f"{at}/text/text"))
            if len(fields) > MAX_SECTION_FIELDS:
                errors.append(_too_many(MAX_SECTION_FIELDS, f"{at}/fields"))
            errors += [
                _too_long(MAX_SECTION_FIELD_TEXT, f"{at}/fields/{j}/text")
                for j, item in enumerate(fields)
                if _text_len(item) > MAX_SECTION_FIELD_TEXT
            ]
        elif block["type"] == "header" and _text_len(block.get("text")) > MAX_HEADER_TEXT:
            errors.append(_too_long(MAX_HEADER_TEXT, f"{at}/text/text"))
    return errors


@dataclass(slots=True)
class _Conversation:
    """One channel or DM: its info object, every message by ts, and the sorted history index."""

    info: dict[str, Any]
    messages: dict[str, Message] = field(default_factory=dict)  # ts -> message, replies included
    timeline: list[int] = field(default_factory=list)  # sorted keys of what conversations.history shows
    threads: dict[str, list[int]] = field(default_factory=dict)  # parent ts -> sorted reply keys
    last_key: int = 0


class SlackStandin(Standin):
    """Slack Web API on loopback: a workspace with one bot (the token's owner), users and channels."""

    def __init__(
        self,
        *,
        token: str = "xoxb-trackloop-test",
        team_id: str = "T0ACME",
        team: str = "Acme",
        domain: str = "acme",
        bot_user_id: str = "U0TRACKBOT",
        bot_id: str = "B0TRACKBOT",
        bot_name: str = "trackloop",
    ) -> None:
        super().__init__()
        self.token = token
        self.team_id = team_id
        self.team = team
        self.domain = domain
        self.bot_user_id = bot_user_id
        self.bot_id = bot_id
        self.bot_name = bot_name
        self._users: dict[str, dict[str, Any]] = {}
        self._conversations: dict[str, _Conversation] = {}
        self._ims: dict[tuple[str, ...], str] = {}  # sorted member ids -> D/G id
        self._sent: list[dict[str, Any]] = []
        self._methods: dict[str, Callable[[Args], Args]] = {
            "auth.test": self._auth_test,
            "conversations.list": self._conversations_list,
            "conversations.info": self._conversations_info,
            "conversations.history": self._conversations_history,
            "conversations.replies": self._conversations_replies,
            "conversations.open": self._conversations_open,
            "chat.postMessage": self._chat_post_message,
            "chat.getPermalink": self._chat_get_permalink,
            "users.info": self._users_info,
            "users.list": self._users_list,
            "reactions.get": self._reactions_get,
        }
        self.reset()

    def reset(self) -> None:
        """Back to a workspace holding only the bot, with no faults, log or fixed clock.

        Lets one running server serve many tests: stopping a server takes up to half a second.
        """
        with self.lock:
            self._users.clear()
            self._conversations.clear()
            self._ims.clear()
            self._sent.clear()
            self.clear_faults()
            self.reset_log()
            self.set_now(None)
            self.add_user(self.bot_user_id, self.bot_name, real_name=self.bot_name, is_bot=True)

    # -- data API: seeding ------------------------------------------------------------------
    def add_user(
        self,
        id: str,
        name: str,
        *,
        email: str | None = None,
        real_name: str | None = None,
        is_bot: bool = False,
        deleted: bool = False,
    ) -> None:
        real = real_name or name
        profile: dict[str, Any] = {
            "real_name": real,
            "real_name_normalized": real,
            "display_name": name,
            "display_name_normalized": name,
            "team": self.team_id,
        }
        if email is not None:
            profile["email"] = email
        if is_bot and id == self.bot_user_id:
            profile["bot_id"] = self.bot_id
        with self.lock:
            self._users[id] = {
                "id": id,
                "team_id": self.team_id,
                "name": name,
                "deleted": deleted,
                "real_name": real,
                "tz": "Etc/UTC",
                "tz_offset": 0,
                "is_admin": False,
                "is_owner": False,
                "is_bot": is_bot,
                "is_app_user": False,
                "updated": self._epoch(),
                "profile": profile,
            }

    def add_channel(
        self,
        id: str,
        name: str,
        *,
        is_private: bool = False,
        is_member: bool = True,
        is_archived: bool = False,
    ) -> None:
        """A public (or private) channel; the bot is a member unless told otherwise."""
        with self.lock:
            self._conversations[id] = _Conversation(
                {
                    "id": id,
                    "name": name,
                    "name_normalized": name,
                    "is_channel": True,
                    "is_group": False,
                    "is_im": False,
                    "is_mpim": False,
                    "is_private": is_private,
                    "is_archived": is_archived,
                    "is_general": False,
                    "is_shared": False,
                    "is_ext_shared": False,
                    "is_org_shared": False,
                    "is_member": is_member,
                    "created": self._epoch(),
                    "creator": "",
                    "topic": {"value": "", "creator": "", "last_set": 0},
                    "purpose": {"value": "", "creator": "", "last_set": 0},
                    "previous_names": [],
                }
            )

    def open_im(self, *users: str) -> str:
        """The bot's DM with one user (D id) or group DM with several (G id); stable per member set."""
        with self.lock:
            for user in users:
                if user not in self._users:
                    raise KeyError(f"unknown user {user!r}")
            members = tuple(sorted(set(users)))
            if members in self._ims:
                return self._ims[members]
            if len(members) == 1:
                (user,) = members
                conv_id = "D" + user[1:]
                info = {
                    "id": conv_id,
                    "created": self._epoch(),
                    "is_im": True,
                    "is_org_shared": False,
                    "user": user,
                    "is_user_deleted": self._users[user]["deleted"],
                    "priority": 0,
                }
            else:
                conv_id = f"G{len(self._ims) + 1:010d}"
                name = "mpdm-" + "--".join(self._users[u]["name"] for u in members) + "-1"
                info = {
                    "id": conv_id,
                    "name": name,
                    "name_normalized": name,
                    "created": self._epoch(),
                    "is_channel": False,
                    "is_group": False,
                    "is_im": False,
                    "is_mpim": True,
                    "is_private": True,
                    "is_archived": False,
                    "is_member": True,
                }
            self._ims[members] = conv_id
            self._conversations[conv_id] = _Conversation(info)
            return conv_id

    def post(
        self,
        channel: str,
        user: str | None,
        text: str,
        *,
        ts: str | None = None,
        thread_ts: str | None = None,
        subtype: str | None = None,
        bot_id: str | None = None,
        files: list[dict[str, Any]] | None = None,
    ) -> str:
        """Store a message as if `user` had sent it; returns its ts. With `thread_ts` it is a reply."""
        message: Message = {"type": "message", "text": text}
        if user is not None:
            message["user"] = user
        if files:
            message["files"] = files
            subtype = subtype or "file_share"
        if subtype is not None:
            message["subtype"] = subtype
        if bot_id is not None:
            message["bot_id"] = bot_id
        with self.lock:
            return self._store(self._conversation(channel), message, ts=ts, thread_ts=thread_ts)["ts"]

    def reply(self, channel: str, thread_ts: str, user: str, text: str) -> str:
        return self.post(channel, user, text, thread_ts=thread_ts)

    def react(self, channel: str, ts: str, name: str, user: str) -> None:
        with self.lock:
            message = self._message(self._conversation(channel), ts)
            reactions = message.setdefault("reactions", [])
            reaction = next((r for r in reactions if r["name"] == name), None)
            if reaction is None:
                reactions.append({"name": name, "users": [user], "count": 1})
            elif user not in reaction["users"]:
                reaction["users"].append(user)
                reaction["count"] += 1

    def unreact(self, channel: str, ts: str, name: str, user: str) -> None:
        with self.lock:
            message = self._message(self._conversation(channel), ts)
            reactions = message.get("reactions", [])
            for reaction in reactions:
                if reaction["name"] == name and user in reaction["users"]:
                    reaction["users"].remove(user)
                    reaction["count"] -= 1
            message["reactions"] = [r for r in reactions if r["count"]]
            if not message["reactions"]:
                del message["reactions"]

    def edit(self, channel: str, ts: str, text: str) -> None:
        with self.lock:
            conv = self._conversation(channel)
            message = self._message(conv, ts)
            message["text"] = text
            message["edited"] = {
                "user": message.get("user") or message.get("bot_id"),
                "ts": _ts_str(self._next_key(conv)),
            }

    def delete(self, channel: str, ts: str) -> None:
        """Gone from history, except a thread parent with replies, which stays as a tombstone."""
        with self.lock:
            conv = self._conversation(channel)
            message = self._message(conv, ts)
            parent_ts = message.get("thread_ts")
            if parent_ts == ts and conv.threads.get(ts):
                for name in ("user", "bot_id", "files", "reactions", "edited", "blocks", "metadata"):
                    message.pop(name, None)
                message.update(
                    subtype="tombstone", text="This message was deleted.", user="USLACKBOT", hidden=True
                )
                return
            if parent_ts is None or parent_ts == ts:
                self._drop(conv, ts)
                return
            del conv.messages[ts]
            replies = conv.threads[parent_ts]
            replies.pop(bisect_left(replies, _ts_key(ts)))
            self._refresh_thread(conv, parent_ts)

    # -- data API: inspection ---------------------------------------------------------------
    def messages(self, channel: str) -> list[Message]:
        """Every stored message of a conversation (replies and metadata included), oldest first."""
        with self.lock:
            conv = self._conversation(channel)
            return [copy.deepcopy(conv.messages[ts]) for ts in sorted(conv.messages, key=_ts_key)]

    def sent(self, channel: str | None = None) -> list[dict[str, Any]]:
        """What the bot posted through chat.postMessage: channel, ts, text, blocks, thread_ts, metadata."""
        with self.lock:
            return [copy.deepcopy(s) for s in self._sent if channel is None or s["channel"] == channel]

    # -- faults -----------------------------------------------------------------------------
    def fault_response(self, fault: Fault, req: Request) -> Response:
        """Slack's rate limit is a real HTTP 429 with Retry-After (seconds); 5xx bodies are not JSON."""
        if fault.status == 429:
            retry_after = int(fault.retry_after) if fault.retry_after is not None else 1
            return Response.json(
                {"ok": False, "error": "ratelimited"}, 429, {"Retry-After": str(retry_after)}
            )
        reason = responses.get(fault.status, "Error")
        return Response(fault.status, f"{fault.status} {reason}".encode(), {"Content-Type": "text/plain"})

    # -- serving ----------------------------------------------------------------------------
    def handle(self, req: Request) -> Response:
        match = re.fullmatch(r"/api/([A-Za-z.]+)", req.path)
        method = self._methods.get(match[1]) if match else None
        if method is None:
            return Response.json({"ok": False, "error": "unknown_method", "req_method": req.path[5:]})
        try:
            args = self._args(req)
            auth = req.headers.get("authorization", "")
            token = (
                auth.removeprefix("Bearer ").strip()
                if auth.startswith("Bearer ")
                else args.pop("token", None)
            )
            if not token:
                raise ApiError("not_authed")
            if token != self.token:
                raise ApiError("invalid_auth")
            with self.lock:
                return Response.json({"ok": True, **method(args)})
        except ApiError as exc:
            return Response.json({"ok": False, "error": exc.code, **exc.extra})

    @staticmethod
    def _args(req: Request) -> Args:
        args: Args = {name: values[-1] for name, values in req.query.items()}
        if req.headers.get("content-type", "").startswith("application/json"):
            try:
                body = req.json()
            except json.JSONDecodeError:
                raise ApiError("invalid_json") from None
            if not isinstance(body, dict):
                raise ApiError("json_not_object")
            args.update(body)
        elif req.body:
            args.update(req.form())
        return args

    # -- methods ----------------------------------------------------------------------------
    def _auth_test(self, args: Args) -> Args:
        return {
            "url": f"https://{self.domain}.slack.com/",
            "team": self.team,
            "user": self.bot_name,
            "team_id": self.team_id,
            "user_id": self.bot_user_id,
            "bot_id": self.bot_id,
            "is_enterprise_install": False,
        }

    def _conversations_list(self, args: Args) -> Args:
        types = set(str(args.get("types") or "public_channel").split(","))
        if not types <= {"public_channel", "private_channel", "mpim", "im"}:
            raise ApiError("invalid_types")
        exclude_archived = _flag(args, "exclude_archived")

        def listed(info: dict[str, Any]) -> bool:
            if info.get("is_im"):
                kind = "im"
            elif info.get("is_mpim"):
                kind = "mpim"
            else:
                kind = "private_channel" if info["is_private"] else "public_channel"
            return kind in types and not (exclude_archived and info.get("is_archived"))

        channels = [c.info for c in self._conversations.values() if listed(c.info)]
        page, next_cursor = self._page(channels, args, "team", *LIST_LIMIT)
        return {"channels": page, "response_metadata": {"next_cursor": next_cursor}}

    def _conversations_info(self, args: Args) -> Args:
        return {"channel": self._conversation(_required(args, "channel"), api=True).info}

    def _conversations_history(self, args: Args) -> Args:
        conv = self._readable(_required(args, "channel"))
        inclusive = _flag(args, "inclusive")
        oldest = _ts_arg(args, "oldest", "invalid_ts_oldest")
        latest = _ts_arg(args, "latest", "invalid_ts_latest")
        keys = conv.timeline
        lo = 0 if oldest is None else (bisect_left if inclusive else bisect_right)(keys, oldest)
        hi = len(keys) if latest is None else (bisect_right if inclusive else bisect_left)(keys, latest)
        if args.get("cursor"):
            hi = min(hi, bisect_right(keys, self._cursor_key(args["cursor"])))
        start = max(lo, hi - _limit(args, *HISTORY_LIMIT))
        metadata = _flag(args, "include_all_metadata")
        result: Args = {
            "messages": [self._view(conv.messages[_ts_str(k)], metadata) for k in reversed(keys[start:hi])],
            "has_more": start > lo,
            "pin_count": 0,
        }
        if start > lo:
            result["response_metadata"] = {"next_cursor": _encode_cursor("next_ts", _ts_str(keys[start - 1]))}
        return result

    def _conversations_replies(self, args: Args) -> Args:
        conv = self._readable(_required(args, "channel"))
        ts = _required(args, "ts")
        if ts not in conv.messages:
            raise ApiError("thread_not_found")
        inclusive = _flag(args, "inclusive")
        oldest = _ts_arg(args, "oldest", "invalid_ts_oldest")
        latest = _ts_arg(args, "latest", "invalid_ts_latest")
        replies = conv.threads.get(ts, [])
        lo = 0 if oldest is None else (bisect_left if inclusive else bisect_right)(replies, oldest)
        hi = len(replies) if latest is None else (bisect_right if inclusive else bisect_left)(replies, latest)
        keys = [_ts_key(ts), *replies[lo:hi]]  # the parent leads, as on slack.com
        start = bisect_left(keys, self._cursor_key(args["cursor"])) if args.get("cursor") else 0
        end = start + _limit(args, *REPLIES_LIMIT)
        metadata = _flag(args, "include_all_metadata")
        result: Args = {
            "messages": [self._view(conv.messages[_ts_str(k)], metadata) for k in keys[start:end]],
            "has_more": end < len(keys),
        }
        if end < len(keys):
            result["response_metadata"] = {"next_cursor": _encode_cursor("next_ts", _ts_str(keys[end]))}
        return result

    def _conversations_open(self, args: Args) -> Args:
        if args.get("channel"):
            conv = self._conversation(str(args["channel"]), api=True)
            return {"channel": conv.info if _flag(args, "return_im") else {"id": conv.info["id"]}}
        users = [u for u in str(args.get("users") or "").split(",") if u]
        if not users:
            raise ApiError("users_list_not_supplied")
        if len(users) > 8:
            raise ApiError("too_many_users")
        if any(u not in self._users for u in users):
            raise ApiError("user_not_found")
        existed = tuple(sorted(set(users))) in self._ims
        conv = self._conversations[self.open_im(*users)]
        result: Args = {"channel": conv.info if _flag(args, "return_im") else {"id": conv.info["id"]}}
        if existed:
            result.update(no_op=True, already_open=True)
        return result

    def _chat_post_message(self, args: Args) -> Args:
        channel = _required(args, "channel")
        conv = self._postable(channel)
        text = str(args.get("text") or "")
        blocks = _json_arg(args, "blocks", "invalid_blocks_format")
        attachments = _json_arg(args, "attachments", "invalid_attachments")
        metadata = _json_arg(args, "metadata", "invalid_metadata_format")
        if blocks is not None:
            if not isinstance(blocks, list):
                raise ApiError("invalid_blocks_format")
            if errors := _block_errors(blocks):
                raise ApiError(
                    "invalid_blocks",
                    errors=errors,
                    response_metadata={"messages": [f"[ERROR] {e}" for e in errors]},
                )
        if not (text or blocks or attachments):
            raise ApiError("no_text")
        if metadata is not None and not (
            isinstance(metadata, dict)
            and isinstance(metadata.get("event_type"), str)
            and isinstance(metadata.get("event_payload"), dict)
        ):
            raise ApiError("invalid_metadata_format")
        result: Args = {}
        if len(text) > MAX_TEXT:
            text = text[:MAX_TEXT]
            result["response_metadata"] = {"messages": [TRUNCATED_WARNING], "warnings": ["message_truncated"]}
        message: Message = {
            "type": "message",
            "user": self.bot_user_id,
            "bot_id": self.bot_id,
            "app_id": "A0TRACKLOOP",
            "team": self.team_id,
            "text": text,
        }
        for name, value in (("blocks", blocks), ("attachments", attachments), ("metadata", metadata)):
            if value is not None:
                message[name] = value
        thread_ts = str(args["thread_ts"]) if args.get("thread_ts") else None
        if thread_ts is not None and thread_ts not in conv.messages:
            raise ApiError("invalid_thread_ts")
        stored = self._store(conv, message, thread_ts=thread_ts)
        conv_id = conv.info["id"]
        self._sent.append(
            {
                "channel": conv_id,
                "ts": stored["ts"],
                "text": text,
                "blocks": blocks,
                "thread_ts": stored.get("thread_ts"),
                "metadata": metadata,
            }
        )
        return {"channel": conv_id, "ts": stored["ts"], "message": stored, **result}

    def _chat_get_permalink(self, args: Args) -> Args:
        conv = self._conversation(_required(args, "channel"), api=True)
        ts = _required(args, "message_ts")
        if ts not in conv.messages:
            raise ApiError("message_not_found")
        conv_id = conv.info["id"]
        link = f"https://{self.domain}.slack.com/archives/{conv_id}/p{ts.replace('.', '')}"
        parent = conv.messages[ts].get("thread_ts")
        if parent and parent != ts:
            link += f"?thread_ts={parent}&cid={conv_id}"
        return {"channel": conv_id, "permalink": link}

    def _users_info(self, args: Args) -> Args:
        user = self._users.get(_required(args, "user"))
        if user is None:
            raise ApiError("user_not_found")
        return {"user": user}

    def _users_list(self, args: Args) -> Args:
        members = list(self._users.values())
        everyone = max(len(members), 1)  # no limit means the whole list
        page, next_cursor = self._page(members, args, "user", everyone, everyone)
        return {"members": page, "cache_ts": self._epoch(), "response_metadata": {"next_cursor": next_cursor}}

    def _reactions_get(self, args: Args) -> Args:
        conv = self._conversation(_required(args, "channel"), api=True)
        ts = _required(args, "timestamp")
        if ts not in conv.messages:
            raise ApiError("message_not_found")
        return {
            "type": "message",
            "channel": conv.info["id"],
            "message": self._view(conv.messages[ts], False),
        }

    # -- helpers ----------------------------------------------------------------------------
    def _epoch(self) -> int:
        return int(self.now().timestamp())

    def _next_key(self, conv: _Conversation) -> int:
        """Now (second precision) plus a per-conversation sequence: unique and strictly increasing."""
        conv.last_key = max(self._epoch() * 1_000_000, conv.last_key) + 100
        return conv.last_key

    def _conversation(self, conv_id: str, *, api: bool = False) -> _Conversation:
        conv = self._conversations.get(conv_id)
        if conv is None:
            if api:
                raise ApiError("channel_not_found")
            raise KeyError(f"unknown conversation {conv_id!r}")
        return conv

    def _readable(self, conv_id: str) -> _Conversation:
        conv = self._conversation(conv_id, api=True)
        if not conv.info.get("is_im") and not conv.info.get("is_member"):
            raise ApiError("not_in_channel")
        return conv

    def _postable(self, channel: str) -> _Conversation:
        """chat.postMessage takes an id, a #name, or a user id (which means the bot's DM with them)."""
        if channel in self._users:
            return self._conversations[self.open_im(channel)]
        name = channel.removeprefix("#")
        conv = self._conversations.get(channel) or next(
            (c for c in self._conversations.values() if c.info.get("name") == name), None
        )
        if conv is None:
            raise ApiError("channel_not_found")
        if conv.info.get("is_archived"):
            raise ApiError("is_archived")
        if not conv.info.get("is_im") and not conv.info.get("is_member"):
            raise ApiError("not_in_channel")
        return conv

    @staticmethod
    def _message(conv: _Conversation, ts: str) -> Message:
        if ts not in conv.messages:
            raise KeyError(f"no message {ts} in {conv.info['id']}")
        return conv.messages[ts]

    @staticmethod
    def _view(message: Message, with_metadata: bool) -> Message:
        if with_metadata or "metadata" not in message:
            return message
        return {k: v for k, v in message.items() if k != "metadata"}

    @staticmethod
    def _cursor_key(cursor: str) -> int:
        try:
            return _ts_key(_decode_cursor("next_ts", cursor))
        except ValueError:
            raise ApiError("invalid_cursor") from None

    @staticmethod
    def _page(
        items: list[dict[str, Any]], args: Args, prefix: str, default: int, maximum: int
    ) -> tuple[list, str]:
        """Cursor paging over an id-keyed list: the cursor names the first id of the next page."""
        start = 0
        if args.get("cursor"):
            next_id = _decode_cursor(prefix, str(args["cursor"]))
            start = next((i for i, item in enumerate(items) if item["id"] == next_id), -1)
            if start < 0:
                raise ApiError("invalid_cursor")
        end = start + _limit(args, default, maximum)
        return items[start:end], _encode_cursor(prefix, items[end]["id"]) if end < len(items) else ""

    def _store(
        self, conv: _Conversation, message: Message, *, ts: str | None = None, thread_ts: str | None = None
    ) -> Message:
        """Give the message its ts and file it in the timeline or under its thread parent."""
        parent = None if thread_ts is None else self._message(conv, thread_ts)
        if ts is None:
            key = self._next_key(conv)
        else:
            key = _ts_key(ts)
            conv.last_key = max(conv.last_key, key)
        message["ts"] = _ts_str(key)
        if message["ts"] in conv.messages:
            raise ValueError(f"ts {message['ts']} already used in {conv.info['id']}")
        conv.messages[message["ts"]] = message
        if parent is None:
            insort(conv.timeline, key)
            return message
        parent_ts = parent.get("thread_ts") or parent["ts"]  # a reply to a reply joins the same thread
        parent = conv.messages[parent_ts]
        message.update(thread_ts=parent_ts, parent_user_id=parent.get("user"))
        replies = conv.threads.setdefault(parent_ts, [])
        insort(replies, key)
        users = parent.get("reply_users", [])
        if message.get("user") and message["user"] not in users:
            users.append(message["user"])
        parent.update(
            thread_ts=parent_ts,
            reply_count=len(replies),
            reply_users=users,
            reply_users_count=len(users),
            latest_reply=_ts_str(replies[-1]),
        )
        return message

    def _drop(self, conv: _Conversation, ts: str) -> None:
        del conv.messages[ts]
        conv.threads.pop(ts, None)
        conv.timeline.pop(bisect_left(conv.timeline, _ts_key(ts)))

    def _refresh_thread(self, conv: _Conversation, parent_ts: str) -> None:
        """Recompute the parent's thread fields after a reply was deleted."""
        parent = conv.messages[parent_ts]
        replies = conv.threads.get(parent_ts)
        if replies:
            users = list(dict.fromkeys(u for k in replies if (u := conv.messages[_ts_str(k)].get("user"))))
            parent.update(reply_count=len(replies), reply_users=users, reply_users_count=len(users))
            parent["latest_reply"] = _ts_str(replies[-1])
        elif parent.get("subtype") == "tombstone":  # nothing left to hold the deleted parent up
            self._drop(conv, parent_ts)
        else:
            conv.threads.pop(parent_ts, None)
            for name in ("thread_ts", "reply_count", "reply_users", "reply_users_count", "latest_reply"):
                parent.pop(name, None)
