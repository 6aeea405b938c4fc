"""The `imap` connector: tasks from an IMAP mailbox, one task per thread, replies sent back by SMTP.

Pull, per configured folder (opened with EXAMINE, bodies fetched with BODY.PEEK, so nothing is
ever marked as read):

- The cursor keeps (UIDVALIDITY, last UID, HIGHESTMODSEQ) per folder. New mail is
  `UID SEARCH UID n:*` filtered to UIDs above the cursor (`n:*` always returns the newest UID).
  Flag changes come from `SEARCH MODSEQ` (CONDSTORE) when the server has it; the MODSEQ ranges
  our own keyword STOREs produced are remembered and left out of that search by the server.
  A changed UIDVALIDITY, a folder's first sync and `--full` re-read the whole folder; task ids
  are Message-IDs, so a rebuilt mailbox re-maps onto the same tasks, and the complete listing
  lets the engine cancel threads whose mail is gone. (Not a diff of the UID list: the engine
  cancels what a complete listing did not yield, so every thread's record, built from all its
  messages, must be yielded; and the cursor cannot map a vanished UID to its thread.)
- Only headers, flags and BODYSTRUCTURE are fetched for every message; then only the chosen text
  part's section, at most 64 KiB of it: attachments are never downloaded.
- A thread (Message-ID / In-Reply-To / References, then a "Re:"-subject fallback) is one task,
  named by its root's Message-ID. A thread's record is a pure function of all its messages, so a
  reply arriving later rebuilds the record from the earlier messages too: the cursor remembers,
  for recently active threads, the UIDs and hashed Message-IDs of their messages (bounded by
  `thread_memory` messages and `thread_window` of inactivity), so the earlier messages are one
  UID FETCH away. A reply whose thread is older than that is found by searching the folder
  (`SEARCH HEADER Message-ID/References/In-Reply-To`, and `SUBJECT` for the fallback).
- Every captured message gets `mark_keyword` through a separate read-write SELECT + STORE (never
  \\Seen), just before its page is handed to the store; not in a dry run (`state.dry_run`).

Push: `reply`/`comment` answer in the task's thread (In-Reply-To/References from the task's
extra), `email` sends a plain message. The Message-ID is derived from the action's key; the Sent
folder and the thread's folder are searched for it first, and a copy is filed in the Sent folder
right after the send (one APPEND on the connection that searched), so once that copy is filed a
crash never sends twice. SMTP has no idempotency: a crash between the send and the APPEND, or a
failed APPEND followed by a lost outbox record, can still send the message again.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import quopri
import re
import ssl
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from email.header import decode_header
from email.message import EmailMessage
from email.utils import getaddresses, parsedate_to_datetime
from html.parser import HTMLParser
from typing import Any, TypeVar

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError, LoginError
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from connectors.base import Connector, ConnectorConfig
from connectors.errors import AuthError, ConnectorError, PayloadError, PushError, TransientError
from connectors.smtp import (
    SmtpConfig,
    SmtpSender,
    address_domain,
    compose,
    is_loopback,
    message_id_for,
    one_tls_mode,
    tls_context,
)
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
)
from store.durations import Duration
from store.errors import TrackloopError

T = TypeVar("T")

HEADER_FIELDS = (
    "MESSAGE-ID",
    "IN-REPLY-TO",
    "REFERENCES",
    "SUBJECT",
    "FROM",
    "REPLY-TO",
    "TO",
    "CC",
    "DELIVERED-TO",
    "X-ORIGINAL-TO",
    "DATE",
    "AUTO-SUBMITTED",
    "X-AUTOREPLY",
    "X-AUTORESPOND",
    "PRECEDENCE",
    "RETURN-PATH",
    "X-FAILED-RECIPIENTS",
    "X-PRIORITY",
    "IMPORTANCE",
    "PRIORITY",
)
FETCH_HEADERS = f"BODY.PEEK[HEADER.FIELDS ({' '.join(HEADER_FIELDS)})]"
FETCH_ITEMS = ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "BODYSTRUCTURE", FETCH_HEADERS]
TEXT_BYTES = 64 * 1024  # most of a text part ever fetched
TITLE_MAX = 1000  # RFC 5322 allows 998 characters a line; folded subjects may be longer
BODY_MAX = 8000
FETCH_CHUNK = 200  # UIDs per FETCH command
SEARCH_CHUNK = 10  # Message-IDs per SEARCH command (three header keys each)
EXPAND_ROUNDS = 3  # searches outward from a reply whose thread the cursor no longer remembers
EXPAND_MAX = 500  # messages such a search may add to one page
OWN_RANGES_MAX = 20  # MODSEQ ranges of our own STOREs kept (more only costs re-reading a few messages)
REFERENCES_MAX = 10  # References kept for a reply: the root and the most recent ones
OWN_PREFIX = "<trackloop."  # Message-IDs of what trackloop itself sent (see connectors.smtp)
NO_SUBJECT = "(no subject)"

# Keywords that say something about a message's handling, not its topic: never labels.
IGNORED_KEYWORDS = frozenset({"junk", "nonjunk", "notjunk", "forwarded", "mdnsent"})


# -- config ------------------------------------------------------------------------------------
_EMAIL = re.compile(r"^[^@\s<>]+@[^@\s<>]+$")
_PERSON_KEY = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
_KEYWORD = re.compile(r'^[^\x00-\x20()\{\]%*"\\]+$')


class ImapFilter(BaseModel):
    """Which thread roots become tasks; replies join their thread whatever they look like."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    to: list[str] = Field(
        default_factory=list,
        description="Only mail addressed (To, Cc, Delivered-To) to one of these addresses; empty: any.",
    )
    subject_prefix: list[str] = Field(
        default_factory=list, description='Only subjects starting with one of these, e.g. "[IT]"; empty: any.'
    )

    @field_validator("to")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        for item in value:
            if not _EMAIL.match(item.strip()):
                raise ValueError(f"expected an email address, got {item!r}")
        return [item.strip().lower() for item in value]


class ImapConfig(ConnectorConfig):
    host: str = Field(description="IMAP server host name, e.g. imap.example.com.")
    port: int | None = Field(None, ge=1, le=65535, description="Server port; default 993 with ssl, else 143.")
    ssl: bool = Field(True, description="Implicit TLS (IMAPS, port 993); off when only starttls is set.")
    starttls: bool = Field(False, description="Plain connection upgraded with STARTTLS (port 143).")
    ssl_verify: bool = Field(True, description="Verify the server's TLS certificate (off: tests only).")
    username: str = Field(description="Login name, e.g. support@example.com.")
    password: SecretStr = Field(description='Login password; use "${IMAP_PASSWORD}".')
    folders: list[str] = Field(default_factory=lambda: ["INBOX"], description="Folders to read tasks from.")
    filter: ImapFilter = Field(default_factory=ImapFilter, description="Which thread roots become tasks.")
    mark_keyword: str = Field(
        "$Tracked", description="IMAP keyword set on every captured message (never \\Seen); empty: none."
    )
    done_phrases: list[str] = Field(
        default_factory=lambda: ["resolved", "[done]"],
        description="A later message whose subject or new text holds one moves the task to done.",
    )
    default_owner: str = Field("", description="Person key owning every task of this mailbox; empty: none.")
    reply_from: str | None = Field(None, description="From address of replies and emails sent by push.")
    sent_folder: str = Field(
        "Sent", description="Where sent replies are filed and looked for before sending."
    )
    smtp: SmtpConfig | None = Field(
        None, description="Outgoing mail; defaults to the top-level [smtp] table."
    )
    page_size: int = Field(100, ge=1, le=1000, description="New messages per page (one commit each).")
    timeout: Duration = Field(
        timedelta(seconds=60), description="Connect and read timeout of the IMAP socket."
    )
    thread_memory: int = Field(
        2000, ge=0, le=100_000, description="Messages of recently active threads remembered in the cursor."
    )
    thread_window: Duration = Field(
        timedelta(days=90), description="Threads quiet for longer are forgotten (found by search instead)."
    )

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        value = value.strip()
        if not value or any(c.isspace() or c in "/:@" for c in value):
            raise ValueError(f'expected a host name such as "imap.example.com", got {value!r}')
        return value

    @field_validator("folders")
    @classmethod
    def _folders(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError('expected at least one folder, e.g. ["INBOX"]')
        for name in value:
            if not name.strip():
                raise ValueError("folder names cannot be empty")
        if len(set(value)) != len(value):
            raise ValueError("a folder is listed twice")
        return value

    @field_validator("mark_keyword")
    @classmethod
    def _keyword(cls, value: str) -> str:
        if value and not _KEYWORD.match(value):
            raise ValueError(
                f'expected an IMAP keyword such as "$Tracked" (not a \\system flag), got {value!r}'
            )
        return value

    @field_validator("done_phrases")
    @classmethod
    def _phrases(cls, value: list[str]) -> list[str]:
        if any(not phrase.strip() for phrase in value):
            raise ValueError("done phrases cannot be empty")
        return [phrase.strip().lower() for phrase in value]

    @field_validator("default_owner")
    @classmethod
    def _owner(cls, value: str) -> str:
        if value and not _PERSON_KEY.match(value):
            raise ValueError(f'expected a person key such as "alice", got {value!r}')
        return value

    @field_validator("reply_from")
    @classmethod
    def _reply_from(cls, value: str | None) -> str | None:
        if value is not None and not _EMAIL.match(value.strip()):
            raise ValueError(f'expected an email address such as "support@example.com", got {value!r}')
        return value.strip() if value else value

    @model_validator(mode="after")
    def _tls(self) -> ImapConfig:
        one_tls_mode(self, "choose one: ssl = true (port 993) or starttls = true (port 143), not both")
        return self

    @property
    def effective_port(self) -> int:
        return self.port or (993 if self.ssl else 143)


# -- cursor ------------------------------------------------------------------------------------
class FolderState(BaseModel):
    """Where one folder's sync stands."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    uidvalidity: int
    last_uid: int = 0  # every message up to here is reflected in committed tasks
    modseq: int | None = None  # flag changes up to here are reflected (CONDSTORE servers)
    own: tuple[tuple[int, int], ...] = ()  # MODSEQ ranges (inclusive) only our keyword STOREs produced


class ThreadMemo(BaseModel):
    """A recently active thread: enough to re-fetch its earlier messages when a reply arrives."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    root: str  # the task's external id
    folder: str
    uids: tuple[int, ...]  # its messages, under the folder's current UIDVALIDITY
    keys: tuple[str, ...]  # hashes of its messages' Message-IDs and references (replies, late parents)
    subjects: tuple[str, ...]  # hashes of its subjects (the "Re:" fallback)
    last: datetime  # its newest message


class ImapCursor(Cursor):
    version: int = 1
    folders: dict[str, FolderState] = Field(default_factory=dict)
    threads: tuple[ThreadMemo, ...] = ()


# -- mapping: headers --------------------------------------------------------------------------
_FIELD = re.compile(rb"^([!-9;-~]+)[ \t]*:(.*)$", re.S)
_MSG_ID = re.compile(r"<[^<>\s]+>")


def _text(data: bytes, charset: str | None = None) -> str:
    """Bytes as text: the declared charset if it fits, else UTF-8, else Windows-1252, else Latin-1."""
    for candidate in (charset, "utf-8", "cp1252"):
        if not candidate:
            continue
        try:
            return data.decode(candidate)
        except (LookupError, UnicodeDecodeError):
            continue
    return data.decode("latin-1")


def parse_header_block(raw: bytes) -> dict[str, list[str]]:
    """Header fields by lower-case name, unfolded (CRLF dropped, the blank kept); 8-bit text decoded
    as UTF-8 or Windows-1252, never as U+FFFD. Lines that are not fields are ignored."""
    fields: dict[str, list[str]] = {}
    name: str | None = None
    value: list[bytes] = []

    def flush() -> None:
        if name is not None:
            fields.setdefault(name, []).append(_text(b"".join(value)).strip())

    for line in re.split(rb"\r?\n", raw):
        if line[:1] in (b" ", b"\t") and name is not None:
            value.append(line)
            continue
        flush()
        match = _FIELD.match(line)
        name, value = (match.group(1).decode("ascii").lower(), [match.group(2)]) if match else (None, [])
    flush()
    return fields


def decode_words(value: str) -> str:
    """Decode RFC 2047 encoded-words leniently (unknown charsets and bad bytes never raise)."""
    if "=?" not in value:
        return value
    try:
        parts = decode_header(value)
    except (ValueError, binascii.Error, AssertionError):
        return value
    out = []
    for chunk, charset in parts:
        if isinstance(chunk, str):
            out.append(chunk)
        elif charset is None or charset == "unknown-8bit":
            out.append(chunk.decode("raw-unicode-escape", "replace"))
        else:
            out.append(_text(chunk, charset))
    return "".join(out)


def collapse(text: str) -> str:
    return " ".join(text.split())


@dataclass(frozen=True, slots=True)
class Address:
    name: str
    address: str  # lower-cased


def parse_addresses(value: str | None) -> list[Address]:
    if not value:
        return []
    out = []
    for name, addr in getaddresses([value]):
        addr = addr.strip().lower()
        if "@" in addr:
            out.append(Address(collapse(decode_words(name)).strip('"'), addr))
    return out


def message_ids(value: str | None) -> list[str]:
    """Message-IDs in a header value, in order ("<a@b>"; comments and junk around them ignored)."""
    return _MSG_ID.findall(value or "")


def parse_message_id(value: str | None) -> str | None:
    found = message_ids(value)
    if found:
        return found[0]
    bare = (value or "").strip()
    if bare and "@" in bare and not any(c.isspace() for c in bare):
        return f"<{bare.strip('<>')}>"  # some mailers forget the brackets
    return None


def parse_date(value: str | None, received: datetime | None) -> datetime:
    """The Date header in UTC; unreadable, absent or more than a day after receipt: the receipt time."""
    parsed = None
    if value:
        try:
            parsed = parsedate_to_datetime(value.strip())
        except (TypeError, ValueError, IndexError, OverflowError):
            parsed = None
    if parsed is not None:
        parsed = parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    if received is not None:
        received = received.replace(tzinfo=UTC) if received.tzinfo is None else received.astimezone(UTC)
        if parsed is None or parsed > received + timedelta(days=1) or parsed.year < 1980:
            parsed = received
    return parsed or datetime(1970, 1, 1, tzinfo=UTC)


_PREFIX = re.compile(
    r"^\s*(re|aw|sv|antw|antwort|res|rif|odp|ynt|fwd?|wg|tr|rv|vb|vl|vs|enc|doorst)"
    r"\s*(?:\[\d+\]|\(\d+\))?\s*:\s*",
    re.I,
)
REPLY_TAGS = frozenset({"re", "aw", "sv", "antw", "antwort", "res", "rif", "odp", "ynt"})


def strip_prefixes(subject: str) -> tuple[str, list[str]]:
    """The subject without leading reply/forward prefixes ("Re:", "AW: WG:", "RE: Re:", "Fwd:")."""
    tags = []
    text = collapse(subject)
    while match := _PREFIX.match(text):
        tags.append(match.group(1).lower())
        text = text[match.end() :]
    return text, tags


def title_of(subject: str) -> str:
    text, _ = strip_prefixes(subject)
    return (text or NO_SUBJECT)[:TITLE_MAX]


def is_reply_subject(subject: str) -> bool:
    return any(tag in REPLY_TAGS for tag in strip_prefixes(subject)[1])


def subject_key(subject: str) -> str:
    """What "Re:" replies without headers are matched on: the bare subject, case-folded."""
    text, _ = strip_prefixes(subject)
    return collapse(re.sub(r"\[done\]", " ", text, flags=re.I)).casefold()


def digest(text: str) -> str:
    """A short hash that keeps the cursor small (collisions only cost an extra fetch)."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=6).hexdigest()


def external_id(key: str) -> str:
    """A task id from a Message-ID: without the angle brackets; very long ones hashed."""
    bare = key.strip().strip("<>")
    if len(bare) > 390:
        return "long." + hashlib.sha256(bare.encode("utf-8", "surrogatepass")).hexdigest()[:40]
    return bare


# -- mapping: MIME structure and text ----------------------------------------------------------
@dataclass(frozen=True, slots=True)
class TextPart:
    section: str  # "1", "1.1", ...
    subtype: str  # plain | html
    charset: str | None
    encoding: str


def _lower(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").lower()
    return str(value or "").lower()


def _params(value: Any) -> dict[str, str]:
    if not isinstance(value, list | tuple):
        return {}
    items = list(value)
    return {_lower(items[i]): _lower(items[i + 1]) for i in range(0, len(items) - 1, 2)}


def _is_multipart(node: Any) -> bool:
    return isinstance(node, list | tuple) and len(node) > 0 and isinstance(node[0], list)


def text_part(structure: Any) -> TextPart | None:
    """The part that holds the message's own text: the first text/plain that is not an attachment,
    else the first such text/html. Attached messages (message/rfc822) are not looked into."""
    found: list[TextPart] = []

    def walk(node: Any, number: str) -> None:
        if _is_multipart(node):
            for index, child in enumerate(node[0], 1):
                walk(child, f"{number}.{index}" if number else str(index))
            return
        if not isinstance(node, list | tuple) or len(node) < 7:
            return
        maintype, subtype = _lower(node[0]), _lower(node[1])
        if maintype != "text" or subtype not in ("plain", "html"):
            return
        disposition = node[9] if len(node) > 9 else None
        if isinstance(disposition, list | tuple) and disposition and _lower(disposition[0]) == "attachment":
            return
        charset = _params(node[2]).get("charset")
        found.append(TextPart(number or "1", subtype, charset, _lower(node[5]) or "7bit"))

    walk(structure, "")
    plain = [p for p in found if p.subtype == "plain"]
    return (plain or found or [None])[0]


def is_report(structure: Any) -> bool:
    """multipart/report: a delivery or read receipt, never a person writing."""
    return _is_multipart(structure) and len(structure) > 1 and _lower(structure[1]) == "report"


def decode_transfer(data: bytes, encoding: str) -> bytes:
    """Undo base64 / quoted-printable, leniently (a fetch cut at TEXT_BYTES may end mid-quantum)."""
    if encoding == "base64":
        cleaned = re.sub(rb"[^A-Za-z0-9+/=]", b"", data).rstrip(b"=")
        cleaned = cleaned[: len(cleaned) - 1] if len(cleaned) % 4 == 1 else cleaned
        try:
            return base64.b64decode(cleaned + b"=" * (-len(cleaned) % 4))
        except (binascii.Error, ValueError):
            return b""
    if encoding == "quoted-printable":
        return quopri.decodestring(data)
    return data


class _HtmlText(HTMLParser):
    """HTML to plain text with the stdlib: blocks become paragraphs, list items and rows lines,
    quoted blocks "> " lines (which strip_quotes then drops)."""

    SKIP = frozenset({"script", "style", "head", "title", "noscript", "template"})
    LINES = frozenset({"li", "tr", "dt", "dd"})
    BLOCKS = frozenset(
        {
            "p",
            "div",
            "table",
            "ul",
            "ol",
            "h1",
            "h2",
            "h3",
            "h4",
            "h5",
            "h6",
            "pre",
            "section",
            "article",
            "header",
            "footer",
            "hr",
            "blockquote",
        }
    )

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.lines: list[str] = []
        self.line = ""
        self.skip = 0
        self.quote = 0

    def _break(self, force: bool = False) -> None:
        if self.line.strip() or force:
            self.lines.append(self.line)
        self.line = ""

    def _paragraph(self) -> None:
        self._break()
        if self.lines and self.lines[-1].strip():
            self.lines.append("")

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.SKIP:
            self.skip += 1
        elif tag == "br":
            self._break(force=True)
        elif tag in self.LINES:
            self._break()
            self.line = "- " if tag == "li" else ""
        elif tag in self.BLOCKS:
            self._paragraph()
            self.quote += tag == "blockquote"

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag in self.LINES:
            self._break()
        elif tag in self.BLOCKS:
            self._paragraph()
            if tag == "blockquote":
                self.quote = max(0, self.quote - 1)

    def handle_data(self, data: str) -> None:
        if self.skip:
            return
        text = re.sub(r"\s+", " ", data)
        if not text.strip() and not self.line.strip():
            return
        if self.quote and not self.line:
            self.line = "> " * self.quote
        self.line += text

    def text(self) -> str:
        self._break()
        out = "\n".join(line.strip() for line in self.lines).strip()
        return re.sub(r"\n{3,}", "\n\n", out)


def html_to_text(html: str) -> str:
    parser = _HtmlText()
    try:
        parser.feed(html)
        parser.close()
    except (AssertionError, ValueError):  # hopeless markup: keep what was read
        pass
    return parser.text()


_ATTRIBUTION = re.compile(
    r"^(on\b.{0,240}\bwrote|am\b.{0,240}\bschrieb\b.{0,80}|le\b.{0,240}\ba écrit|el\b.{0,240}\bescribió"
    r"|op\b.{0,240}\bschreef\b.{0,80}|den\b.{0,240}\bskrev\b.{0,80})\s*:\s*$",
    re.I,
)
_ORIGINAL = re.compile(
    r"^-{2,}\s*(original message|ursprüngliche nachricht|message d'origine|mensaje original)\s*-{2,}$", re.I
)
_FORWARD = re.compile(
    r"^(-{2,}\s*forwarded message\s*-{2,}|begin forwarded message:"
    r"|-{2,}\s*weitergeleitete nachricht\s*-{2,})",
    re.I,
)
_OUTLOOK_FIELD = re.compile(r"^(sent|gesendet|envoyé|date|datum)\s*:", re.I)


def strip_quotes(text: str) -> str:
    """The new text of a message: quoted lines, the quoted reply after an attribution ("On ... wrote:")
    or an "Original Message" block, and the signature are cut; a forwarded message is kept."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    out: list[str] = []
    forwarded = False
    for i, line in enumerate(lines):
        bare = line.strip()
        if _FORWARD.match(bare):
            forwarded = True
        if not forwarded:
            if bare.startswith(">"):
                continue
            joined = f"{bare} {lines[i + 1].strip()}" if i + 1 < len(lines) else bare
            if _ATTRIBUTION.match(bare) or (bare and _ATTRIBUTION.match(joined)):
                break
            if _ORIGINAL.match(bare) or line in ("-- ", "--\u00a0"):
                break
            if bare.lower().startswith("from:") and any(
                _OUTLOOK_FIELD.match(n.strip()) for n in lines[i + 1 : i + 4]
            ):
                break
        out.append(line.rstrip())
    body = "\n".join(out).strip("\n")
    return re.sub(r"\n{3,}", "\n\n", body).strip()


def decode_text(data: bytes, part: TextPart) -> str:
    """A fetched text part as text: transfer encoding undone, charset guessed if need be, HTML
    turned to text, quotes stripped."""
    text = _text(decode_transfer(data, part.encoding), part.charset)
    if part.subtype == "html":
        text = html_to_text(text)
    return strip_quotes(text)


# -- mapping: messages and threads -------------------------------------------------------------
@dataclass(slots=True)
class Mail:
    """One message as far as trackloop cares: its threading headers, who, when, flags, and text."""

    uid: int
    key: str  # its Message-ID ("<...>"), or a stable id derived from its headers
    message_id: str | None
    in_reply_to: tuple[str, ...]
    references: tuple[str, ...]
    subject: str
    sender: Address | None
    reply_to: Address | None
    recipients: tuple[str, ...]
    date: datetime
    auto: bool  # auto-reply, bounce, receipt: never a task, never activity
    flags: tuple[str, ...]
    priority: Priority | None
    part: TextPart | None
    text: str | None = None  # its new text, once fetched

    @property
    def refs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(r for r in (*self.references, *self.in_reply_to) if r != self.key))

    @property
    def own(self) -> bool:
        return (self.message_id or "").startswith(OWN_PREFIX)

    @property
    def deleted(self) -> bool:
        return any(f.lower() == "\\deleted" for f in self.flags)

    @property
    def human(self) -> bool:
        return not self.auto and not self.own

    @property
    def subject_only_reply(self) -> bool:
        return not self.refs and is_reply_subject(self.subject)


class MalformedMail(ValueError):
    """A message with nothing to make a task of (no header fields at all)."""


def _flag_text(flag: Any) -> str:
    return flag.decode("utf-8", "replace") if isinstance(flag, bytes) else str(flag)


def _priority(fields: Mapping[str, list[str]]) -> Priority | None:
    x_priority = (fields.get("x-priority") or [""])[0].strip()[:1]
    importance = ((fields.get("importance") or fields.get("priority") or [""])[0]).strip().lower()
    if x_priority in ("1", "2") or importance in ("high", "urgent"):
        return Priority.HIGH
    if x_priority in ("4", "5") or importance in ("low", "non-urgent"):
        return Priority.LOW
    return None


def _is_auto(fields: Mapping[str, list[str]], sender: Address | None, structure: Any) -> bool:
    def first(name: str) -> str:
        return (fields.get(name) or [""])[0].strip().lower()

    if first("auto-submitted") not in ("", "no"):
        return True
    if "x-autoreply" in fields or "x-autorespond" in fields or "x-failed-recipients" in fields:
        return True
    if first("precedence") in ("auto_reply", "bulk", "junk"):
        return True
    if "return-path" in fields and re.fullmatch(r"<\s*>", first("return-path")):
        return True
    if sender is not None and sender.address.split("@")[0] in ("mailer-daemon", "postmaster"):
        return True
    return is_report(structure)


def derived_key(fields: Mapping[str, list[str]], size: int) -> str:
    """A stable stand-in for a missing Message-ID: a hash of the headers that identify the message."""
    parts = [name + ":" + "|".join(fields.get(name, [])) for name in ("date", "from", "to", "cc", "subject")]
    parts.append(f"size:{size}")
    return f"<derived.{digest(chr(10).join(parts))}{digest(str(parts))}@trackloop.invalid>"


def parse_mail(
    uid: int, header: bytes, structure: Any, flags: Iterable[Any], received: datetime | None, size: int
) -> Mail:
    """A Mail from what one FETCH returns: header fields, BODYSTRUCTURE, FLAGS, INTERNALDATE, size."""
    fields = parse_header_block(header)
    if not fields:
        raise MalformedMail("no header fields")

    def first(name: str) -> str | None:
        values = fields.get(name)
        return values[0] if values else None

    senders = parse_addresses(first("from"))
    sender = senders[0] if senders else None
    reply_to = (parse_addresses(first("reply-to")) or [None])[0]
    recipients = [
        a.address
        for name in ("to", "cc", "delivered-to", "x-original-to")
        for value in fields.get(name, [])
        for a in parse_addresses(value)
    ]
    message_id = parse_message_id(first("message-id"))
    return Mail(
        uid=uid,
        key=message_id or derived_key(fields, size),
        message_id=message_id,
        in_reply_to=tuple(message_ids(" ".join(fields.get("in-reply-to", [])))),
        references=tuple(message_ids(" ".join(fields.get("references", [])))),
        subject=collapse(decode_words(first("subject") or "")),
        sender=sender,
        reply_to=reply_to,
        recipients=tuple(dict.fromkeys(recipients)),
        date=parse_date(first("date"), received),
        auto=_is_auto(fields, sender, structure),
        flags=tuple(_flag_text(f) for f in flags),
        priority=_priority(fields),
        part=text_part(structure),
    )


def thread_groups(mails: Iterable[Mail]) -> list[list[Mail]]:
    """Split messages into threads: linked by Message-ID, In-Reply-To and References; a "Re:" message
    without any of those joins the thread that has its subject. Each thread sorted by date."""
    parent: dict[str, str] = {}

    def find(key: str) -> str:
        parent.setdefault(key, key)
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    def union(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    ordered = sorted(mails, key=lambda m: (m.date, m.uid))
    for mail in ordered:
        find(mail.key)
        for ref in mail.refs:
            union(mail.key, ref)
    anchors: dict[str, str] = {}
    for mail in ordered:
        if not mail.subject_only_reply:
            anchors.setdefault(subject_key(mail.subject), mail.key)
    for mail in ordered:
        if mail.subject_only_reply:
            key = subject_key(mail.subject)
            if key:
                union(mail.key, anchors.setdefault(key, mail.key))
    groups: dict[str, list[Mail]] = {}
    for mail in ordered:
        groups.setdefault(find(mail.key), []).append(mail)
    return list(groups.values())


@dataclass(frozen=True, slots=True)
class ThreadRules:
    """What turns a thread into a task, from the connector's config."""

    folder: str
    done_phrases: tuple[str, ...] = ("resolved", "[done]")
    default_owner: str = ""
    mark_keyword: str = ""
    to: frozenset[str] = frozenset()
    subject_prefixes: tuple[str, ...] = ()
    body_max: int = BODY_MAX

    def accepts(self, root: Mail) -> bool:
        if self.to and not self.to.intersection(root.recipients):
            return False
        if self.subject_prefixes:
            bare = strip_prefixes(root.subject)[0].lower()
            return any(bare.startswith(prefix.lower()) for prefix in self.subject_prefixes)
        return True

    def says_done(self, mail: Mail, root_subject: str = "") -> bool:
        """A done phrase in the message's new text, or in its subject unless the thread's own
        subject holds it ("Re: Is the VPN issue resolved?" closes nothing)."""
        for phrase in self.done_phrases:
            pattern = re.compile(rf"(?<!\w){re.escape(phrase)}(?!\w)", re.I)
            if pattern.search(mail.text or ""):
                return True
            if pattern.search(mail.subject) and not pattern.search(root_subject):
                return True
        return False


_OWNER_LINE = re.compile(r"^[ \t]*owner[ \t]*:[ \t]*(\S+)[ \t]*$", re.I | re.M)
_DUE_LINE = re.compile(r"^[ \t]*due[ \t]*:[ \t]*(\d{4}-\d{2}-\d{2})\b", re.I | re.M)


def owner_ref(value: str) -> IdentityRef | None:
    """An `Owner:` value: a person key or an email address."""
    value = value.strip("<>,.;@").lower()
    if _EMAIL.match(value):
        return IdentityRef(IdentityKind.EMAIL, value, email=value)
    if _PERSON_KEY.match(value) and value not in ("none", "nobody", "tbd", "team", "unassigned"):
        return IdentityRef(IdentityKind.PERSON, value)
    return None


def _address_ref(address: Address) -> IdentityRef:
    return IdentityRef(IdentityKind.EMAIL, address.address, address.name or None, email=address.address)


def pick_root(thread: Sequence[Mail]) -> Mail | None:
    """The first human message: one without a parent in the thread, earliest first."""
    keys = {m.key for m in thread}
    human = [m for m in thread if m.human]
    if not human:
        return None
    return min(human, key=lambda m: (any(r in keys for r in m.refs), m.date, m.uid))


def _reply_chain(latest: Mail, root: Mail) -> list[str]:
    """References for a reply to `latest` (RFC 5322 3.6.4), root first, at most REFERENCES_MAX."""
    chain = list(latest.references or latest.in_reply_to)
    if latest.message_id:
        chain.append(latest.message_id)
    if root.message_id and root.message_id not in chain:
        chain.insert(0, root.message_id)
    chain = list(dict.fromkeys(chain))
    return chain if len(chain) <= REFERENCES_MAX else [chain[0], *chain[-(REFERENCES_MAX - 1) :]]


def _labels(mails: Iterable[Mail], mark_keyword: str) -> tuple[str, ...]:
    found = set()
    for mail in mails:
        for flag in mail.flags:
            if flag.startswith(("\\", "$")) or flag == mark_keyword or flag.lower() in IGNORED_KEYWORDS:
                continue
            found.add(flag)
    return tuple(sorted(found))


def thread_record(thread: Sequence[Mail], rules: ThreadRules) -> TaskRecord | None:
    """The task of one thread (its messages with their text), or None when it is no task: only
    auto-replies and bounces, or a root the filter rejects."""
    unique = list({m.key: m for m in sorted(thread, key=lambda m: (m.uid, m.date), reverse=True)}.values())
    unique.sort(key=lambda m: (m.date, m.uid))  # one message per Message-ID: its first delivery
    root = pick_root(unique)
    if root is None or not rules.accepts(root):
        return None
    later = [m for m in unique if m.human and m is not root and not m.deleted]
    done = next((m for m in later if rules.says_done(m, root.subject)), None)
    talk = [root, *later]
    latest = max(talk, key=lambda m: (m.date, m.uid))
    owner: IdentityRef | None = (
        IdentityRef(IdentityKind.PERSON, rules.default_owner) if rules.default_owner else None
    )
    due: date | None = None
    for mail in talk:
        match = _OWNER_LINE.search(mail.text or "")
        if match and (named := owner_ref(match.group(1))) is not None:
            owner = named
        due_match = _DUE_LINE.search(mail.text or "")
        if due_match:
            try:
                due = date.fromisoformat(due_match.group(1))
            except ValueError:
                pass
    priority = Priority.HIGH if any("\\Flagged" in m.flags for m in talk) else root.priority or Priority.NONE
    body = root.text or ""
    if len(body) > rules.body_max:
        body = body[: rules.body_max - 1].rstrip() + "…"
    replyable = [m for m in unique if not m.auto and m.message_id and not m.deleted]
    last_message = max(replyable, key=lambda m: (m.date, m.uid)) if replyable else root
    if root.deleted:
        status, raw = Status.CANCELLED, "deleted"
    elif done is not None:
        status, raw = Status.DONE, "done"
    else:
        status, raw = Status.TODO, "open"
    return TaskRecord(
        external_id=external_id(root.key),
        title=title_of(root.subject),
        status=status,
        raw_status=raw,
        body=body,
        scope=rules.folder,
        assignees=(owner,) if owner else (),
        reporter=_address_ref(root.sender) if root.sender else None,
        due=due,
        priority=priority,
        labels=_labels(talk, rules.mark_keyword),
        created_at=root.date,
        updated_at=latest.date,
        last_activity_at=latest.date,
        closed_at=done.date if done is not None else None,
        status_changed_at=done.date if done is not None else None,
        extra={
            "folder": rules.folder,
            "message_id": root.key,
            "latest_message_id": last_message.message_id or root.key,
            "references": _reply_chain(last_message, root),
            "reporter": root.sender.address if root.sender else None,
            "reply_to": (root.reply_to or root.sender).address if (root.reply_to or root.sender) else None,
            "subject": strip_prefixes(root.subject)[0] or NO_SUBJECT,
            "messages": len(talk),
            "auto_messages": sum(1 for m in unique if m.auto),
        },
    )


def merged_record(old_root: Mail, new_root_id: str, rules: ThreadRules) -> TaskRecord:
    """The task of a thread that turned out to be part of another (its parent arrived later)."""
    return TaskRecord(
        external_id=external_id(old_root.key),
        title=title_of(old_root.subject),
        status=Status.CANCELLED,
        raw_status="merged",
        body=old_root.text or "",
        scope=rules.folder,
        reporter=_address_ref(old_root.sender) if old_root.sender else None,
        created_at=old_root.date,
        updated_at=old_root.date,
        links=(LinkRecord(LinkKind.DUPLICATE, TaskRef(new_root_id)),),
        extra={"folder": rules.folder, "message_id": old_root.key, "merged_into": new_root_id},
    )


# -- the connector -----------------------------------------------------------------------------
def merge_ranges(ranges: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Inclusive ranges, sorted, overlapping or adjacent ones joined."""
    out: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if out and low <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], high))
        else:
            out.append((low, high))
    return tuple(out)


def own_ranges(mine: Iterable[int], theirs: Iterable[int]) -> tuple[tuple[int, int], ...]:
    """Our own MODSEQs as ranges of consecutive values, leaving out any value another client's
    change also got (one STORE is atomic: its MODSEQs are one value or a run of values)."""
    return merge_ranges((value, value) for value in set(mine) - set(theirs) if value > 0)


class _MissingFolder(ConnectorError):
    pass


@dataclass
class _Work:
    """The cursor being built during one pull (pages carry frozen snapshots of it)."""

    folders: dict[str, FolderState]
    memos: dict[tuple[str, str], ThreadMemo]

    def cursor(self) -> ImapCursor:
        return ImapCursor(
            folders=dict(self.folders),
            threads=tuple(self.memos[k] for k in sorted(self.memos)),
        )

    def forget_folder(self, folder: str) -> None:
        for key in [k for k in self.memos if k[0] == folder]:
            del self.memos[key]

    def prune(self, now: datetime, window: timedelta, budget: int) -> None:
        """Forget threads quiet for longer than `window`, then the quietest beyond `budget` messages."""
        kept, total = {}, 0
        for key, memo in sorted(self.memos.items(), key=lambda kv: kv[1].last, reverse=True):
            if memo.last < now - window or total + len(memo.uids) > budget:
                continue
            kept[key] = memo
            total += len(memo.uids)
        self.memos = kept

    def lookup(self, folder: str) -> tuple[dict[str, ThreadMemo], dict[str, ThreadMemo]]:
        by_key: dict[str, ThreadMemo] = {}
        by_subject: dict[str, ThreadMemo] = {}
        for (where, _), memo in self.memos.items():
            if where == folder:
                by_key.update(dict.fromkeys(memo.keys, memo))
                by_subject.update(dict.fromkeys(memo.subjects, memo))
        return by_key, by_subject


@dataclass
class _Batch:
    """What one page of one folder produced."""

    tasks: list[TaskRecord] = field(default_factory=list)
    activities: list[ActivityRecord] = field(default_factory=list)
    capture: dict[int, tuple[str, ...]] = field(default_factory=dict)  # UID -> flags seen


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _any_of(criteria: Sequence[list[Any]]) -> list[Any]:
    """IMAP search keys OR-ed together, in prefix form: OR OR a b c."""
    out: list[Any] = ["OR"] * (len(criteria) - 1)
    for item in criteria:
        out.extend(item)
    return out


def _section_data(data: Mapping[bytes, Any], section: str) -> bytes:
    """The bytes of BODY[section] in a FETCH answer, partial (<0>) or with a field list alike."""
    exact, open_ = f"BODY[{section}]".encode(), f"BODY[{section} (".encode()
    for key, value in data.items():
        if isinstance(key, bytes) and key.upper().startswith((exact, open_)):
            return value or b""
    return b""


class ImapConnector(Connector[ImapConfig, ImapCursor]):
    kind = "imap"
    config_model = ImapConfig
    cursor_model = ImapCursor

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._client: IMAPClient | None = None
        self._selected: tuple[str, bool] | None = None
        self._info: dict[bytes, Any] = {}
        self._condstore = False
        self._uidvalidity: dict[str, int] = {}  # as seen at the start of this sync, per folder
        self._warned_plain = False
        cfg = self.config
        self.rules = {
            folder: ThreadRules(
                folder=folder,
                done_phrases=tuple(cfg.done_phrases),
                default_owner=cfg.default_owner,
                mark_keyword=cfg.mark_keyword,
                to=frozenset(cfg.filter.to),
                subject_prefixes=tuple(cfg.filter.subject_prefix),
            )
            for folder in cfg.folders
        }

    # -- connection ------------------------------------------------------------------------
    def translate_errors(self) -> Any:
        return self._translating()

    @contextmanager
    def _translating(self) -> Iterator[None]:
        where = f"imap {self.config.host}:{self.config.effective_port}"
        try:
            yield
        except TrackloopError:
            raise
        except LoginError as exc:
            self._drop()
            if "UNAVAILABLE" in str(exc).upper():
                raise TransientError(f"{where}: login temporarily unavailable") from None
            raise AuthError(
                f"imap connector {self.name!r}: {self.config.host} refused the login for "
                f"{self.config.username!r}; check username and password"
            ) from None
        except IMAPClientAbortError as exc:  # BYE, or the connection broke mid-command
            self._drop()
            raise TransientError(f"{where}: connection lost ({exc})") from None
        except ssl.SSLCertVerificationError as exc:
            self._drop()
            why = exc.verify_message
            raise ConnectorError(
                f"{where}: TLS certificate not trusted ({why}); fix it or set ssl_verify = false"
            ) from None
        except ssl.SSLError as exc:
            self._drop()
            raise ConnectorError(f"{where}: TLS failed ({exc.reason}); check port and ssl/starttls") from None
        except OSError as exc:  # refused, reset, timeout, DNS
            self._drop()
            raise TransientError(f"{where}: {exc.__class__.__name__}: {exc}") from None
        except IMAPClientError as exc:  # NO / BAD answers
            self._selected = None
            text = str(exc)
            if any(code in text.upper() for code in ("[UNAVAILABLE]", "[INUSE]", "[LIMIT]")):
                self._drop()
                raise TransientError(f"{where}: {text}") from None
            raise PayloadError(f"{where} answered: {text}") from None
        except (ValueError, TypeError, IndexError) as exc:  # imapclient could not parse an answer
            self._selected = None
            raise PayloadError(f"{where}: unreadable answer ({exc.__class__.__name__}: {exc})") from None

    def _drop(self) -> None:
        client, self._client, self._selected = self._client, None, None
        if client is not None:
            try:
                client.shutdown()
            except Exception:  # the socket may be gone already
                pass

    def close(self) -> None:
        client, self._client, self._selected = self._client, None, None
        if client is None:
            return
        self.stats.requests += 1
        try:
            client.logout()
        except Exception:
            try:
                client.shutdown()
            except Exception:
                pass

    def _connected(self) -> IMAPClient:
        if self._client is not None:
            return self._client
        cfg = self.config
        context = tls_context(cfg.ssl_verify) if cfg.ssl or cfg.starttls else None
        if not cfg.ssl and not cfg.starttls and not is_loopback(cfg.host) and not self._warned_plain:
            self._warned_plain = True
            self.log.warning("%s: plain IMAP to %s: password and mail go unencrypted", self.name, cfg.host)
        if (cfg.ssl or cfg.starttls) and not cfg.ssl_verify:
            self.log.warning(
                "%s: TLS certificate of %s is not verified (ssl_verify = false)", self.name, cfg.host
            )
        self.stats.requests += 1  # imaplib asks for CAPABILITY as soon as it connects
        client = IMAPClient(
            cfg.host,
            port=cfg.effective_port,
            ssl=cfg.ssl,
            ssl_context=context,
            timeout=cfg.timeout.total_seconds(),
        )
        self._client = client
        try:
            client.normalise_times = False  # aware INTERNALDATEs
            if cfg.starttls:
                self.stats.requests += 1
                client.starttls(context)
            self.stats.requests += 1
            client.login(cfg.username, cfg.password.get_secret_value())
            capabilities = client.capabilities()  # sent with the login reply: no round trip
            self._condstore = False
            if b"CONDSTORE" in capabilities and b"ENABLE" in capabilities:
                self.stats.requests += 1
                self._condstore = b"CONDSTORE" in [c.upper() for c in client.enable("CONDSTORE")]
        except BaseException:
            self._drop()
            raise
        return client

    def _select(
        self, client: IMAPClient, folder: str, readonly: bool, *, fresh: bool = False
    ) -> dict[bytes, Any]:
        if self._selected == (folder, readonly) and not fresh:
            return self._info
        self.stats.requests += 1
        self._selected = None
        try:
            info = client.select_folder(folder, readonly=readonly)
        except IMAPClientError as exc:
            if isinstance(exc, IMAPClientAbortError):
                raise
            text = str(exc)
            if "NONEXISTENT" in text.upper() or "exist" in text.lower():
                raise _MissingFolder(
                    f"{self.name}: folder {folder!r} does not exist on {self.config.host}"
                ) from None
            raise
        expected = self._uidvalidity.get(folder)
        if expected is not None and info.get(b"UIDVALIDITY") != expected:
            raise ConnectorError(
                f"{self.name}: UIDVALIDITY of {folder!r} changed during the sync; the next sync re-reads it"
            )
        self._selected, self._info = (folder, readonly), info
        return info

    def _read(self, folder: str | None, fn: Callable[[IMAPClient], T], *, readonly: bool = True) -> T:
        """One IMAP command on `folder`: reconnects and re-selects as needed; retried by the base."""

        def attempt() -> T:
            client = self._connected()
            if folder is not None:
                self._select(client, folder, readonly)
            self.stats.requests += 1
            return fn(client)

        return self.call(attempt)

    # -- doctor ----------------------------------------------------------------------------
    def check(self) -> CheckResult:
        folder = self.config.folders[0]

        def status() -> dict[bytes, Any]:
            client = self._connected()
            self.stats.requests += 1
            try:
                return client.folder_status(folder, [b"MESSAGES", b"UIDVALIDITY"])
            except IMAPClientError as exc:
                if isinstance(exc, IMAPClientAbortError) or "exist" not in str(exc).lower():
                    raise
                raise _MissingFolder(f"folder {folder!r} does not exist on {self.config.host}") from None

        try:
            info = self.once(status)
            detail = (
                f"{self.config.host}: logged in as {self.config.username}; {folder} holds {info[b'MESSAGES']}"
            )
            if self.config.smtp is not None:
                detail += "; " + SmtpSender(self.config.smtp, logger=self.log).check()
            return CheckResult(True, detail)
        except TrackloopError as exc:
            return CheckResult(False, str(exc))
        finally:
            self.close()

    # -- pull ------------------------------------------------------------------------------
    def pull(self, state: SyncState[ImapCursor]) -> Iterator[Page[ImapCursor]]:
        cursor = state.cursor or ImapCursor()
        work = _Work(dict(cursor.folders), {(m.folder, m.root): m for m in cursor.threads})
        work.prune(self.now(), self.config.thread_window, self.config.thread_memory)  # the limits may be new
        for folder in self.config.folders:
            yield from self._pull_folder(folder, work, full=state.full, dry_run=state.dry_run)

    def _pull_folder(
        self, folder: str, work: _Work, *, full: bool, dry_run: bool
    ) -> Iterator[Page[ImapCursor]]:
        info = self.call(lambda: self._select(self._connected(), folder, True, fresh=True))
        uidvalidity = int(info[b"UIDVALIDITY"])
        uidnext = info.get(b"UIDNEXT")
        highest = info.get(b"HIGHESTMODSEQ") if self._condstore else None
        self._uidvalidity[folder] = uidvalidity
        previous = work.folders.get(folder)
        if previous is not None and previous.uidvalidity != uidvalidity:
            self.log.warning(
                "%s: UIDVALIDITY of %s changed (%d -> %d): re-reading it; tasks keep their Message-ID ids",
                self.name,
                folder,
                previous.uidvalidity,
                uidvalidity,
            )
        rescan = full or previous is None or previous.uidvalidity != uidvalidity
        start = 0 if rescan or previous is None else previous.last_uid
        changed: list[int] = []
        if rescan:
            work.forget_folder(folder)
        elif previous is not None:
            changed = self._changed(folder, previous, highest)
        if isinstance(uidnext, int) and uidnext <= start + 1:
            new: list[int] = []
        else:
            found = self._read(folder, lambda c: c.search(["UID", f"{start + 1}:*"]))
            new = sorted(uid for uid in found if uid > start)  # "n:*" always holds the newest UID
        if not rescan and not new and not changed and highest == (previous.modseq if previous else None):
            self.stats.not_modified += 1  # the folder is as the cursor left it
        state = FolderState(uidvalidity=uidvalidity, last_uid=start, modseq=highest)
        windows = list(_chunks(new, self.config.page_size)) or [[]]
        for index, window in enumerate(windows):
            touched = sorted({*window, *(changed if index == 0 else ())})
            batch = self._build(folder, touched, set(window), work) if touched else _Batch()
            own = [] if dry_run else self._mark(folder, batch.capture)  # a dry run writes nothing remotely
            state = FolderState(
                uidvalidity=uidvalidity,
                last_uid=max(state.last_uid, window[-1] if window else 0),
                modseq=highest,
                own=merge_ranges([*state.own, *own])[-OWN_RANGES_MAX:] if highest is not None else (),
            )
            work.folders[folder] = state
            work.prune(self.now(), self.config.thread_window, self.config.thread_memory)
            last = index == len(windows) - 1
            if not (batch.tasks or batch.activities or state != previous or (rescan and last)):
                continue  # nothing new at all: no page, no write
            yield Page(
                tasks=batch.tasks,
                activities=batch.activities,
                cursor=work.cursor(),
                completed_scopes=[folder] if rescan and last else [],
            )
            previous = state

    def _changed(self, folder: str, previous: FolderState, highest: int | None) -> list[int]:
        """Old messages whose flags changed since the cursor, except changes we made ourselves
        (excluded by the server: NOT (MODSEQ lo NOT MODSEQ hi+1) for each of our ranges)."""
        if highest is None or previous.modseq is None or highest <= previous.modseq or previous.last_uid == 0:
            return []
        last = previous.last_uid
        criteria: list[Any] = ["MODSEQ", previous.modseq + 1, "UID", f"1:{last}"]
        for low, high in previous.own:
            criteria += ["NOT", ["MODSEQ", low, "NOT", "MODSEQ", high + 1]]
        return sorted(uid for uid in self._read(folder, lambda c: c.search(criteria)) if uid <= last)

    # -- one page of one folder --------------------------------------------------------------
    def _fetch_mails(self, folder: str, uids: Iterable[int]) -> dict[int, Mail]:
        """Headers, flags and structure of `uids`; a message that cannot be read is skipped."""
        wanted = sorted(set(uids))
        out: dict[int, Mail] = {}
        for chunk in _chunks(wanted, FETCH_CHUNK):
            try:
                data = self._read(folder, lambda c, chunk=chunk: c.fetch(list(chunk), FETCH_ITEMS))
            except PayloadError:
                if len(chunk) == 1:
                    self.log.warning("%s: %s UID %d cannot be read; skipped", self.name, folder, chunk[0])
                    continue
                data = {}
                for uid in chunk:  # one odd message must not cost the others
                    data.update(self._fetch_mails_raw_one(folder, uid))
            for uid, item in data.items():
                try:
                    out[uid] = parse_mail(
                        uid,
                        _section_data(item, "HEADER.FIELDS"),
                        item.get(b"BODYSTRUCTURE"),
                        item.get(b"FLAGS") or (),
                        item.get(b"INTERNALDATE"),
                        int(item.get(b"RFC822.SIZE") or 0),
                    )
                except (ValueError, TypeError, IndexError, KeyError) as exc:
                    self.log.warning("%s: %s UID %d skipped: %s", self.name, folder, uid, exc)
        return out

    def _fetch_mails_raw_one(self, folder: str, uid: int) -> dict[int, Any]:
        try:
            return self._read(folder, lambda c: c.fetch([uid], FETCH_ITEMS))
        except PayloadError as exc:
            self.log.warning("%s: %s UID %d cannot be read (%s); skipped", self.name, folder, uid, exc)
            return {}

    def _fetch_texts(self, folder: str, mails: Iterable[Mail]) -> None:
        """Fill in `text` from the chosen part only (never attachments), at most TEXT_BYTES of it."""
        by_part: dict[TextPart, list[Mail]] = {}
        for mail in mails:
            if mail.text is not None:
                continue
            if mail.part is None:
                mail.text = ""
            else:
                by_part.setdefault(mail.part, []).append(mail)
        by_section: dict[str, list[Mail]] = {}
        for part, group in by_part.items():
            by_section.setdefault(part.section, []).extend(group)
        for section, group in by_section.items():
            item = f"BODY.PEEK[{section}]<0.{TEXT_BYTES}>"
            for chunk in _chunks(group, FETCH_CHUNK):
                uids = [m.uid for m in chunk]
                data = self._read(folder, lambda c, uids=uids, item=item: c.fetch(uids, [item]))
                for mail in chunk:
                    raw = _section_data(data.get(mail.uid, {}), section)
                    assert mail.part is not None
                    mail.text = decode_text(raw, mail.part)

    def _search(self, folder: str, criteria: list[Any]) -> set[int]:
        text = " ".join(str(c) for c in criteria)
        charset = None if text.isascii() else "UTF-8"
        return set(self._read(folder, lambda c: c.search(criteria, charset=charset)))

    def _expand(
        self, folder: str, ids: set[str], subjects: set[str], known: Mapping[int, Mail]
    ) -> dict[int, Mail]:
        """Messages of threads the cursor forgot: search the folder outward from the given Message-IDs
        (ancestors by Message-ID, earlier replies by References/In-Reply-To) and subjects (for "Re:"
        replies without headers), round by round from what each round found."""
        found: dict[int, Mail] = {}
        asked_ids: set[str] = set()
        asked_subjects: set[str] = set()
        frontier = set(ids)
        topics = {subject_key(s): strip_prefixes(s)[0] for s in subjects}
        for _ in range(EXPAND_ROUNDS):
            frontier -= asked_ids
            topics = {k: v for k, v in topics.items() if k and k not in asked_subjects}
            if not frontier and not topics:
                break
            by_id: set[int] = set()
            for chunk in _chunks(sorted(frontier), SEARCH_CHUNK):
                keys = [
                    ["HEADER", name, mid]
                    for mid in chunk
                    for name in ("Message-ID", "References", "In-Reply-To")
                ]
                by_id |= self._search(folder, _any_of(keys))
            by_subject: set[int] = set()
            for bare in topics.values():
                by_subject |= self._search(folder, ["SUBJECT", bare])
            asked_ids |= frontier
            asked_subjects |= set(topics)
            fresh = sorted((by_id | by_subject) - set(known) - set(found))[:EXPAND_MAX]
            mails = {
                uid: mail
                for uid, mail in self._fetch_mails(folder, fresh).items()
                if uid in by_id or subject_key(mail.subject) in asked_subjects  # SUBJECT matches substrings
            }
            if not mails:
                break
            found.update(mails)
            frontier = {k for m in mails.values() for k in (m.key, *m.refs)}
            topics = {subject_key(m.subject): strip_prefixes(m.subject)[0] for m in mails.values()}
        return found

    def _build(self, folder: str, touched: Sequence[int], new: set[int], work: _Work) -> _Batch:
        rules = self.rules[folder]
        mails = self._fetch_mails(folder, touched)
        touched_set = set(mails)
        by_key, by_subject = work.lookup(folder)
        hit: dict[str, ThreadMemo] = {}
        for mail in mails.values():
            for ref in (mail.key, *mail.refs):
                memo = by_key.get(digest(ref))
                if memo is not None:
                    hit[memo.root] = memo
            if (
                mail.subject_only_reply
                and (memo := by_subject.get(digest(subject_key(mail.subject)))) is not None
            ):
                hit[memo.root] = memo
        earlier = {uid for memo in hit.values() for uid in memo.uids} - set(mails)
        mails.update(self._fetch_mails(folder, earlier))

        # Threads the cursor does not remember: look for their earlier messages on the server.
        remembered = {uid for memo in hit.values() for uid in memo.uids}
        ids: set[str] = set()
        subjects: set[str] = set()
        for group in thread_groups(mails.values()):
            if not touched_set.intersection(m.uid for m in group) or remembered.intersection(
                m.uid for m in group
            ):
                continue
            keys = {m.key for m in group}
            missing = {ref for m in group for ref in m.refs if ref not in keys}
            if missing or all(m.subject_only_reply for m in group):  # part of a thread we do not have
                ids |= missing
                subjects |= {m.subject for m in group}
        if ids or subjects:
            mails.update(self._expand(folder, ids, subjects, mails))

        groups = [g for g in thread_groups(mails.values()) if touched_set.intersection(m.uid for m in g)]
        self._fetch_texts(folder, [m for g in groups for m in g])
        batch = _Batch()
        grouped = {m.uid for g in groups for m in g}
        for memo in hit.values():  # rebuilt below (a hash collision leaves a memo alone)
            if grouped.intersection(memo.uids):
                work.memos.pop((folder, memo.root), None)
        for group in groups:
            record = thread_record(group, rules)
            if record is None:
                continue
            batch.tasks.append(record)
            root_key = record.extra["message_id"]
            for memo in hit.values():  # a remembered thread whose root is now a reply in this one
                old = next((m for m in group if external_id(m.key) == memo.root), None)
                if memo.root != record.external_id and old is not None and old.key != root_key:
                    batch.tasks.append(merged_record(old, record.external_id, rules))
            for mail in group:
                if mail.uid in new and mail.human and mail.key != root_key and not mail.deleted:
                    actor = _address_ref(mail.sender) if mail.sender else None
                    batch.activities.append(
                        ActivityRecord(TaskRef(record.external_id), mail.date, actor, "reply")
                    )
                if rules.mark_keyword and not mail.deleted and rules.mark_keyword not in mail.flags:
                    batch.capture[mail.uid] = mail.flags
            keys = {digest(k) for m in group for k in (m.key, *m.refs)}  # refs: for parents arriving late
            work.memos[(folder, record.external_id)] = ThreadMemo(
                root=record.external_id,
                folder=folder,
                uids=tuple(sorted(m.uid for m in group)),
                keys=tuple(sorted(keys)),
                subjects=tuple(sorted({digest(subject_key(m.subject)) for m in group if m.subject})),
                last=min(max(m.date for m in group), self.now()),
            )
        return batch

    def _mark(self, folder: str, capture: Mapping[int, tuple[str, ...]]) -> list[tuple[int, int]]:
        """Set the keyword on captured messages (read-write SELECT; STORE +FLAGS never touches \\Seen).
        Returns the MODSEQ ranges of changes that were ours alone, for the next sync to skip."""
        keyword = self.config.mark_keyword
        if not keyword or not capture:
            return []
        uids = sorted(capture)
        try:
            self._read(folder, lambda c: c.add_flags(uids, [keyword], silent=True), readonly=False)
            if not self._condstore:
                return []
            after = self._read(folder, lambda c: c.fetch(uids, ["FLAGS", "MODSEQ"]), readonly=False)
        except PayloadError as exc:
            self.log.warning(
                "%s: could not set %s on %d message(s) in %s: %s", self.name, keyword, len(uids), folder, exc
            )
            return []
        mine, theirs = set(), set()
        for uid, data in after.items():
            expected = {f.lower() for f in capture.get(uid, ())} | {keyword.lower(), "\\recent"}
            flags = {_flag_text(f).lower() for f in data.get(b"FLAGS", ())} | {"\\recent"}
            modseq = int((data.get(b"MODSEQ") or (0,))[0])
            (mine if flags == expected else theirs).add(modseq)  # else someone changed it meanwhile
        return list(own_ranges(mine, theirs))

    # -- push ------------------------------------------------------------------------------
    def push(self, action: Action) -> PushResult:
        """Send a reply in the task's thread (`reply`, `comment`) or a plain `email`, once per key."""
        if action.kind not in ("reply", "comment", "email"):
            raise PushError(f"the imap connector cannot deliver {action.kind!r} actions", permanent=True)
        cfg = self.config
        if cfg.smtp is None:
            raise PushError(f"{self.name}: no [smtp] configured, cannot send mail", permanent=True)
        if not cfg.reply_from:
            raise PushError(f"{self.name}: reply_from is not configured, cannot send mail", permanent=True)
        message_id = message_id_for(action.key, address_domain(cfg.reply_from))
        try:
            try:
                message, folder = self._compose(action, message_id)
            except ValueError as exc:  # an address or subject EmailMessage refuses (e.g. a line break)
                raise PushError(f"{self.name}: cannot compose the message: {exc}", permanent=True) from None
            places = [cfg.sent_folder] + ([folder] if folder and folder != cfg.sent_folder else [])
            for place in places:
                if self._holds(place, message_id):
                    return PushResult(message_id, already_delivered=True)
            sender = SmtpSender(cfg.smtp, logger=self.log)
            self.stats.requests += 1
            self.once(sender.send, message)
            self._file_sent(message)
            return PushResult(message_id)
        except PushError:
            raise
        except (TransientError, AuthError) as exc:
            raise PushError(f"{self.name}: {exc}", permanent=False) from exc
        except ConnectorError as exc:
            raise PushError(f"{self.name}: {exc}", permanent=True) from exc

    def _holds(self, folder: str, message_id: str) -> bool:
        try:
            return bool(self._read(folder, lambda c: c.search(["HEADER", "Message-ID", message_id])))
        except _MissingFolder:
            return False

    def _compose(self, action: Action, message_id: str) -> tuple[EmailMessage, str | None]:
        """The message for `action`, and the folder of the thread it replies to (if any)."""
        html = action.payload.get("html") if action.payload else None
        if action.kind == "email":
            if not action.target or not _EMAIL.match(action.target.strip()):
                raise PushError(f"an email needs a target address, got {action.target!r}", permanent=True)
            message = compose(self.config.reply_from, message_id, self.now(), to=action.target.strip(),
                              subject=collapse(action.subject or "trackloop"), text=action.text, html=html)
            return message, None
        context = dict(action.task_extra or {})
        if not context.get("message_id") and action.task_external_id:
            context = self._thread_context(action.task_external_id)
        to = action.target or context.get("reply_to") or context.get("reporter")
        if not to or not context.get("message_id"):
            raise PushError(f"no thread to reply to for task {action.task_external_id!r}", permanent=True)
        subject = action.subject or f"Re: {context.get('subject') or NO_SUBJECT}"
        message = compose(self.config.reply_from, message_id, self.now(), to=to, subject=collapse(subject),
                          text=action.text, html=html)
        message["In-Reply-To"] = context.get("latest_message_id") or context["message_id"]
        message["References"] = " ".join(context.get("references") or [context["message_id"]])
        return message, context.get("folder")

    def _thread_context(self, task_id: str) -> dict[str, Any]:
        """A reply's headers when the task's extra is missing: find the root message by Message-ID."""
        for folder in self.config.folders:
            try:
                uids = sorted(
                    self._read(folder, lambda c: c.search(["HEADER", "Message-ID", f"<{task_id}>"]))
                )
            except _MissingFolder:
                continue
            mails = self._fetch_mails(folder, uids[:1])
            if mails:
                root = next(iter(mails.values()))
                to = root.reply_to or root.sender
                return {
                    "folder": folder,
                    "message_id": root.key,
                    "latest_message_id": root.key,
                    "references": [root.key],
                    "reply_to": to.address if to else None,
                    "subject": strip_prefixes(root.subject)[0],
                }
        return {}

    def _file_sent(self, message: EmailMessage) -> None:
        """File a copy in the Sent folder (created if missing): it is what a retry finds, so it is
        retried like a read (a second copy costs less than a second send). A failure is only logged,
        since the mail itself went out and the outbox records that."""
        folder = self.config.sent_folder
        raw = message.as_bytes()

        def append() -> None:
            client = self._connected()
            self.stats.requests += 1
            try:
                client.append(folder, raw, flags=[b"\\Seen"], msg_time=self.now())
            except IMAPClientError as exc:
                if isinstance(exc, IMAPClientAbortError) or "TRYCREATE" not in str(exc).upper():
                    raise
                self.stats.requests += 2
                client.create_folder(folder)
                client.append(folder, raw, flags=[b"\\Seen"], msg_time=self.now())

        try:
            self.call(append)
        except ConnectorError as exc:
            self.log.warning(
                "%s: sent %s but could not file it in %s (%s); should the outbox not record this delivery "
                "(a crash, a lost store), a retry may send it again",
                self.name,
                message["Message-ID"],
                folder,
                exc,
            )
