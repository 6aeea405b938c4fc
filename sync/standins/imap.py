"""A minimal IMAP4rev1 server in pure stdlib, for the offline `trackloop demo`.

The demo must run without root, apt or network, so it cannot start Dovecot. This stand-in speaks
just enough IMAP4rev1 + LITERAL+ + ENABLE + CONDSTORE + UIDPLUS + UNSELECT for an imapclient-based
incremental connector: CAPABILITY, LOGIN, ENABLE, LIST, CREATE, SELECT/EXAMINE, STATUS, APPEND,
[UID] SEARCH, [UID] FETCH (flags, modseqs, ENVELOPE, BODYSTRUCTURE, body sections, CHANGEDSINCE),
[UID] STORE, [UID] COPY, [UID] EXPUNGE, NOOP, CLOSE, UNSELECT, LOGOUT. Tests of the real connector
use Dovecot (tests/mailrig.py); tests/test_standin_imap.py runs one imapclient scenario against
both so the two cannot drift apart unnoticed.

Messages are kept byte for byte. MIME parts are cut out of the raw bytes (so sizes, line counts
and BODY[n] sections are exact) and their headers are read with the stdlib `email` package.
"""

from __future__ import annotations

import re
import socket
import socketserver
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from email.header import decode_header, make_header
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import Compat32
from email.utils import collapse_rfc2231_value, getaddresses
from functools import cached_property
from itertools import count
from typing import Any

__all__ = ["ImapStandin"]

CAPABILITIES = b"IMAP4rev1 LITERAL+ ENABLE CONDSTORE UIDPLUS UNSELECT"
DELIMITER = "."
SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
MAX_LITERAL = 64 * 1024 * 1024
QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only

Token = str | bytes | list["Token"]  # atom or quoted string | literal | parenthesized list


class _Bad(Exception):
    """Answer the command with BAD (syntax, wrong state)."""


class _No(Exception):
    """Answer the command with NO (well-formed but refused)."""


# -- wire encoding --------------------------------------------------------------------------------
def _bytes(value: str | bytes) -> bytes:
    # Header text parsed from bytes carries 8-bit octets as surrogates: give back the original octets.
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")


def _literal(data: bytes) -> bytes:
    return b"{%d}\r\n%s" % (len(data), data)


def _nstring(value: str | bytes | None) -> bytes:
    """NIL, a quoted string, or a literal when quoting is not allowed (8-bit, CR/LF, NUL)."""
    if value is None:
        return b"NIL"
    data = _bytes(value)
    if re.fullmatch(rb"[\x01-\x09\x0b\x0c\x0e-\x7f]*", data):
        return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return _literal(data)


def _plist(items: Iterable[bytes]) -> bytes:
    return b"(" + b" ".join(items) + b")"


def _internaldate(when: datetime) -> bytes:
    """RFC 3501 date-time; month names spelled out here, as %b follows the locale."""
    return _nstring(f"{when.day:02d}-{MONTHS[when.month - 1]}-{when:%Y %H:%M:%S %z}")


# -- command parsing ------------------------------------------------------------------------------
_ATOM = re.compile(rb'(?:[^\x00-\x20()"{\[]|\[[^\]]*\])+')  # BODY.PEEK[HEADER.FIELDS (A B)]<0.9> is one
_LITERAL_MARK = re.compile(rb"\{(\d+)(\+?)\}\r\n")
_QUOTED = re.compile(rb'"((?:[^"\\\r\n]|\\.)*)"')


def _tokenize(data: bytes) -> list[Token]:
    """Split a whole command (literals inlined after their {n}CRLF) into nested tokens."""
    stack: list[list[Token]] = [[]]
    pos = 0
    while pos < len(data):
        char = data[pos : pos + 1]
        if char in b" \r\n":
            pos += 1
        elif char == b"(":
            stack.append([])
            pos += 1
        elif char == b")":
            if len(stack) == 1:
                raise _Bad("unbalanced ')'")
            done = stack.pop()
            stack[-1].append(done)
            pos += 1
        elif char == b'"':
            match = _QUOTED.match(data, pos)
            if not match:
                raise _Bad("unterminated quoted string")
            stack[-1].append(re.sub(rb"\\(.)", rb"\1", match.group(1)).decode("utf-8", "surrogateescape"))
            pos = match.end()
        elif char == b"{":
            match = _LITERAL_MARK.match(data, pos)
            if not match:
                raise _Bad("malformed literal")
            end = match.end() + int(match.group(1))
            stack[-1].append(data[match.end() : end])
            pos = end
        else:
            match = _ATOM.match(data, pos)
            if not match:
                raise _Bad(f"unexpected character {char!r}")
            stack[-1].append(match.group().decode("utf-8", "surrogateescape"))
            pos = match.end()
    if len(stack) != 1:
        raise _Bad("unbalanced '('")
    return stack[0]


def _text(token: Token) -> str:
    """An astring argument (atom, quoted string or literal) as text."""
    if isinstance(token, list):
        raise _Bad("expected a string, got a list")
    return token.decode("utf-8", "surrogateescape") if isinstance(token, bytes) else token


def _number(token: Token) -> int:
    text = _text(token)
    if not text.isdigit():
        raise _Bad(f"expected a number, got {text!r}")
    return int(text)


def _ranges(spec: str, largest: int) -> list[tuple[int, int]]:
    """A sequence set ("1:3,7,9:*"); '*' is the largest number in use, so "n:*" always
    includes it, even when n is larger (RFC 3501 9: n:* equals *:n)."""
    if not re.fullmatch(r"(?:\d+|\*)(?::(?:\d+|\*))?(?:,(?:\d+|\*)(?::(?:\d+|\*))?)*", spec):
        raise _Bad(f"invalid sequence set {spec!r}")
    out = []
    for item in spec.split(","):
        low, _, high = item.partition(":")
        first = largest if low == "*" else int(low)
        last = first if not high else largest if high == "*" else int(high)
        out.append((min(first, last), max(first, last)))
    return out


def _in(ranges: list[tuple[int, int]], number: int) -> bool:
    return any(low <= number <= high for low, high in ranges)


def _search_date(token: Token) -> date:
    try:
        return datetime.strptime(_text(token), "%d-%b-%Y").date()
    except ValueError:
        raise _Bad("invalid date") from None


def _append_date(text: str) -> datetime:
    try:
        return datetime.strptime(text.strip(), "%d-%b-%Y %H:%M:%S %z")
    except ValueError:
        raise _Bad("invalid date-time") from None


def _flag(token: Token) -> str:
    """Canonical spelling of a flag: system flags as in RFC 3501, keywords as given."""
    text = _text(token)
    for system in SYSTEM_FLAGS:
        if text.lower() == system.lower():
            return system
    if text.startswith("\\") or not re.fullmatch(r"[^\x00-\x20()\"{%*\]\\]+", text):
        raise _Bad(f"invalid flag {text!r}")
    return text


def _flag_list(token: Token) -> list[str]:
    return [_flag(item) for item in (token if isinstance(token, list) else [token])]


def _unique(flags: Iterable[str]) -> list[str]:
    """Flags are case-insensitive (RFC 3501 2.3.2): keep the first spelling of each."""
    seen: dict[str, str] = {}
    for flag in flags:
        seen.setdefault(flag.lower(), flag)
    return list(seen.values())


# -- MIME structure -------------------------------------------------------------------------------
@dataclass
class _Entity:
    """One MIME entity cut out of the raw bytes: header block (with its blank line) and body."""

    header: bytes
    body: bytes
    fields: Message
    parts: list[_Entity] = field(default_factory=list)  # children of a multipart
    inner: _Entity | None = None  # the message inside a message/rfc822 part


class _RawHeaders(Compat32):
    """compat32 turns 8-bit header values into Header objects that read back as U+FFFD; servers
    send the raw octets, so keep values as parsed (8-bit octets as surrogates, see `_bytes`)."""

    def header_fetch_parse(self, name: str, value: str) -> str:
        return value


_POLICY = _RawHeaders()


def _split_header(raw: bytes) -> tuple[bytes, bytes]:
    match = re.search(rb"(?:\A|\n)(\r?\n)", raw)
    if not match:
        return raw, b""
    return raw[: match.end()], raw[match.end() :]


def _split_multipart(body: bytes, boundary: str) -> list[bytes]:
    """Part bodies between delimiter lines; the line break before a delimiter belongs to it."""
    delimiter = re.compile(rb"(?:\A|\r?\n)--" + re.escape(_bytes(boundary)) + rb"(--)?[ \t]*(?:\r?\n|\Z)")
    parts, start = [], None
    for match in delimiter.finditer(body):
        if start is not None:
            parts.append(body[start : match.start()])
        if match.group(1):
            return parts
        start = match.end()
    if start is not None:  # no closing delimiter: the last part runs to the end
        parts.append(body[start:])
    return parts


def _entity(raw: bytes, default_type: str = "text/plain") -> _Entity:
    header, body = _split_header(raw)
    fields = BytesHeaderParser(policy=_POLICY).parsebytes(header)
    fields.set_default_type(default_type)
    node = _Entity(header, body, fields)
    boundary = fields.get_boundary()
    if fields.get_content_maintype() == "multipart" and boundary:
        child_type = "message/rfc822" if fields.get_content_subtype() == "digest" else "text/plain"
        node.parts = [_entity(part, child_type) for part in _split_multipart(body, boundary)]
    elif fields.get_content_type() == "message/rfc822":
        node.inner = _entity(body)
    return node


def _part(message: _Entity, path: list[int]) -> _Entity | None:
    """Section numbering of RFC 3501 6.4.5: a non-multipart message's body is part 1."""
    node, is_message = message, True
    for number in path:
        if not is_message and node.inner is not None:
            node, is_message = node.inner, True
        children = node.parts or ([node] if is_message else [])
        if not 1 <= number <= len(children):
            return None
        node, is_message = children[number - 1], False
    return node


def _header(fields: Message, name: str) -> str | None:
    """Unfolded raw header value (encoded-words left as they are, like a server sends them)."""
    value = fields.get(name)
    return None if value is None else re.sub(r"\r?\n(?=[ \t])", "", str(value)).lstrip()


def _collapsed(text: str | None) -> str | None:
    """Dovecot's ENVELOPE squeezes runs of blanks in subjects and display names to one space."""
    return None if text is None else re.sub(r"[ \t]+", " ", text).strip()


def _decoded(value: str) -> str:
    """Header text for SEARCH: undeclared 8-bit read as UTF-8 (else latin-1), RFC 2047 decoded."""
    raw = re.sub(rb"\r?\n(?=[ \t])", b"", _bytes(value))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    try:
        return str(make_header(decode_header(text)))
    except (LookupError, UnicodeDecodeError, ValueError):
        return text


def _params(pairs: list[tuple[str, Any]]) -> bytes:
    if not pairs:
        return b"NIL"
    return _plist(_nstring(name) + b" " + _nstring(collapse_rfc2231_value(value)) for name, value in pairs)


def _addresses(fields: Message, name: str) -> bytes:
    value = _header(fields, name)
    if not value:
        return b"NIL"
    out = []
    for display, address in getaddresses([value]):
        if not address and not display:
            continue
        mailbox, at, host = address.rpartition("@") if "@" in address else (address, "", "")
        display_name = _nstring(_collapsed(display) or None)
        out.append(_plist([display_name, b"NIL", _nstring(mailbox), _nstring(host if at else None)]))
    return _plist(out) if out else b"NIL"


def _envelope(fields: Message) -> bytes:
    sender = _addresses(fields, "From")
    return _plist(
        [
            _nstring(_header(fields, "Date")),
            _nstring(_collapsed(_header(fields, "Subject"))),
            sender,
            _addresses(fields, "Sender") if fields.get("Sender") else sender,
            _addresses(fields, "Reply-To") if fields.get("Reply-To") else sender,
            _addresses(fields, "To"),
            _addresses(fields, "Cc"),
            _addresses(fields, "Bcc"),
            _nstring(_header(fields, "In-Reply-To")),
            _nstring(_header(fields, "Message-ID")),
        ]
    )


def _disposition(fields: Message) -> bytes:
    kind = fields.get_content_disposition()
    if kind is None:
        return b"NIL"
    return _plist([_nstring(kind), _params(fields.get_params(header="content-disposition")[1:])])


def _bodystructure(node: _Entity, extended: bool) -> bytes:
    """BODYSTRUCTURE (extended) or BODY of RFC 3501 7.4.2, the way Dovecot lays it out."""
    fields = node.fields
    language = _header(fields, "Content-Language")
    extension = [
        _disposition(fields),
        _plist(_nstring(tag.strip()) for tag in language.split(",")) if language else b"NIL",
        _nstring(_header(fields, "Content-Location")),
    ]
    if node.parts:
        out = b"".join(_bodystructure(part, extended) for part in node.parts)
        out += b" " + _nstring(fields.get_content_subtype())
        if extended:
            out += b" " + b" ".join([_params(fields.get_params()[1:]), *extension])
        return b"(" + out + b")"
    maintype, subtype = fields.get_content_maintype(), fields.get_content_subtype()
    params = fields.get_params(failobj=[("", "")])[1:]
    if maintype == "text" and not any(name.lower() == "charset" for name, _ in params):
        params.insert(0, ("charset", "us-ascii"))  # RFC 2045 5.2 default
    items = [
        _nstring(maintype),
        _nstring(subtype),
        _params(params),
        _nstring(_header(fields, "Content-ID")),
        _nstring(_header(fields, "Content-Description")),
        _nstring(_header(fields, "Content-Transfer-Encoding") or "7bit"),
        b"%d" % len(node.body),
    ]
    if node.inner is not None:
        items += [_envelope(node.inner.fields), _bodystructure(node.inner, extended)]
    if maintype == "text" or node.inner is not None:
        items.append(b"%d" % node.body.count(b"\n"))
    if extended:
        items += [_nstring(_header(fields, "Content-MD5")), *extension]
    return _plist(items)


# -- mailbox state --------------------------------------------------------------------------------
@dataclass
class _Message:
    uid: int
    raw: bytes
    flags: list[str]
    modseq: int
    internaldate: datetime

    @cached_property
    def mime(self) -> _Entity:
        return _entity(self.raw)

    def has_flag(self, flag: str) -> bool:
        return flag.lower() in (f.lower() for f in self.flags)


@dataclass
class _Folder:
    name: str
    uidvalidity: int
    messages: dict[int, _Message] = field(default_factory=dict)  # by UID, in UID order
    uidnext: int = 1
    highestmodseq: int = 1

    def set_flags(self, message: _Message, flags: Iterable[str]) -> bool:
        """Replace the flags; a real change gets a new MODSEQ (RFC 7162)."""
        wanted = _unique(flags)
        if {f.lower() for f in wanted} == {f.lower() for f in message.flags}:
            return False
        self.highestmodseq += 1
        message.flags, message.modseq = wanted, self.highestmodseq
        return True


# -- one client connection ------------------------------------------------------------------------
_FETCH_ATT = re.compile(r"(BODY(?:\.PEEK)?)\[([^\]]*)\](?:<(\d+)(?:\.(\d+))?>)?\Z", re.I)
_SECTION = re.compile(
    r"(?P<path>\d+(?:\.\d+)*)?\.?(?P<spec>HEADER\.FIELDS\.NOT|HEADER\.FIELDS|HEADER|TEXT|MIME)?"
    r"\s*(?:\((?P<fields>[^)]*)\))?\Z",
    re.I,
)
_HEADER_LINE = re.compile(rb"[^\r\n]*\r?\n(?:[ \t][^\r\n]*\r?\n)*")


class _Session(socketserver.StreamRequestHandler):
    """IMAP state machine for one connection; every command runs under the stand-in's lock."""

    server: _Server

    def setup(self) -> None:
        super().setup()
        self.standin = self.server.standin
        self.out: list[bytes] = []
        self.logged_in = False
        self.condstore = False
        self.selected: _Folder | None = None
        self.selected_uidvalidity = 0
        self.readonly = False
        self.view: list[int] = []  # UIDs by sequence number, as this client was told
        self.view_uidnext = 1
        self.command = ""  # the command being run, e.g. "UID FETCH"
        self.search_modseq = False  # the running SEARCH used MODSEQ, so its answer carries one
        self.standin._connections.add(self.connection)

    def finish(self) -> None:
        self.standin._connections.discard(self.connection)
        super().finish()

    def handle(self) -> None:
        try:
            self._send(b"* OK [CAPABILITY " + CAPABILITIES + b"] trackloop IMAP stand-in ready\r\n")
            while (data := self._read_command()) is not None:
                tag, _, rest = data.partition(b" ")
                with self.standin._lock:
                    done = self._run(tag.decode("ascii", "replace").strip() or "*", rest)
                self._send(b"".join(self.out))
                self.out.clear()
                if done:
                    return
        except OSError:  # the client went away, or stop() shut the socket down
            return

    def _read_command(self) -> bytes | None:
        """One command with its literals inlined, sending '+' before each synchronizing literal."""
        data = b""
        while True:
            line = self.rfile.readline()
            if not line.endswith(b"\n"):
                return None
            data += line
            match = re.search(rb"\{(\d+)(\+?)\}\r?\n\Z", line)
            if not match:
                return data
            size = int(match.group(1))
            if size > MAX_LITERAL:
                return None
            if not match.group(2):
                self._send(b"+ Ready for literal data\r\n")
            data = data[: -len(line)] + line.rstrip(b"\r\n") + b"\r\n" + self.rfile.read(size)

    def _send(self, data: bytes) -> None:
        """Write, then ACK the client's next bytes at once (as Dovecot does). imapclient sends a
        command and its CRLF in two writes; with a delayed ACK, Nagle holds the CRLF for 40 ms."""
        self.wfile.write(data)
        if QUICKACK is not None:
            self.connection.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)

    def _untagged(self, line: bytes) -> None:
        self.out.append(b"* " + line + b"\r\n")

    def _run(self, tag: str, rest: bytes) -> bool:
        """Execute one command; True when the connection must close."""
        reply = b"OK completed"
        try:
            tokens = _tokenize(rest)
            if not tokens or not isinstance(tokens[0], str):
                raise _Bad("missing command")
            name = tokens[0].upper()
            args = tokens[1:]
            if name == "UID":
                if not args or not isinstance(args[0], str):
                    raise _Bad("UID needs a command")
                name, args = "UID " + args[0].upper(), args[1:]
            if self.selected is not None and self.selected.uidvalidity != self.selected_uidvalidity:
                self._untagged(b"BYE [UNAVAILABLE] mailbox was rebuilt, UIDVALIDITY changed")
                return True
            handler = self._handler(name)
            reply = handler(args) or reply
            if self.selected is not None:
                self._announce(expunges=name in ("NOOP", "EXPUNGE", "UID EXPUNGE"))
            self.out.append(tag.encode() + b" " + reply + b"\r\n")
            return name == "LOGOUT"
        except _Bad as exc:
            self.out.append(f"{tag} BAD {exc}\r\n".encode())
        except _No as exc:
            self.out.append(f"{tag} NO {exc}\r\n".encode())
        except Exception as exc:  # a stand-in bug must reach the client as an error, not a hang
            self.out.append(f"{tag} BAD stand-in error: {exc!r}\r\n".encode())
        return False

    def _handler(self, name: str) -> Callable[[list[Token]], bytes | None]:
        anytime = {"CAPABILITY": self._capability, "NOOP": self._noop, "LOGOUT": self._logout}
        authenticated = {
            "ENABLE": self._enable,
            "LIST": self._list,
            "CREATE": self._create,
            "SELECT": self._select,
            "EXAMINE": self._select,
            "STATUS": self._status,
            "APPEND": self._append,
        }
        selected = {
            "CLOSE": self._close,
            "UNSELECT": self._close,
            "FETCH": self._fetch,
            "UID FETCH": self._fetch,
            "STORE": self._store,
            "UID STORE": self._store,
            "SEARCH": self._search,
            "UID SEARCH": self._search,
            "COPY": self._copy,
            "UID COPY": self._copy,
            "EXPUNGE": self._expunge,
            "UID EXPUNGE": self._expunge,
        }
        self.command = name
        if name in anytime:
            return anytime[name]
        if name == "LOGIN":
            if self.logged_in:
                raise _Bad("already logged in")
            return self._login
        if name in authenticated or name in selected:
            if not self.logged_in:
                raise _Bad("log in first")
            if name in selected and self.selected is None:
                raise _Bad("no mailbox selected")
            return (authenticated | selected)[name]
        raise _Bad(f"unknown command {name}")

    # -- any state --
    def _capability(self, args: list[Token]) -> None:
        self._untagged(b"CAPABILITY " + CAPABILITIES)

    def _noop(self, args: list[Token]) -> None:
        return None  # _run reports new and expunged messages afterwards

    def _logout(self, args: list[Token]) -> None:
        self._untagged(b"BYE logging out")

    def _login(self, args: list[Token]) -> bytes:
        if len(args) != 2:
            raise _Bad("LOGIN user password")
        if (_text(args[0]), _text(args[1])) != (self.standin.user, self.standin.password):
            raise _No("[AUTHENTICATIONFAILED] Authentication failed.")
        self.logged_in = True
        return b"OK [CAPABILITY " + CAPABILITIES + b"] Logged in"

    # -- authenticated --
    def _enable(self, args: list[Token]) -> None:
        if any(_text(arg).upper() == "CONDSTORE" for arg in args):
            self.condstore = True
            self._untagged(b"ENABLED CONDSTORE")

    def _list(self, args: list[Token]) -> None:
        if len(args) != 2:
            raise _Bad("LIST reference pattern")
        reference, pattern = _text(args[0]), _text(args[1])
        if not pattern:
            self._untagged(b'LIST (\\Noselect) "." ""')
            return
        regex = "".join(
            "[^.]*" if char == "%" else ".*" if char == "*" else re.escape(char)
            for char in reference + pattern
        )
        names = list(self.standin._folders)
        for name in names:
            if re.fullmatch(regex, name, re.I if name == "INBOX" else 0):
                children = any(other.startswith(name + DELIMITER) for other in names)
                attr = b"\\HasChildren" if children else b"\\HasNoChildren"
                self._untagged(b"LIST (" + attr + b') "." ' + _nstring(name))

    def _create(self, args: list[Token]) -> None:
        if len(args) != 1:
            raise _Bad("CREATE mailbox")
        name = _text(args[0]).rstrip(DELIMITER)
        if self.standin._find_folder(name) is not None:
            raise _No("[ALREADYEXISTS] Mailbox already exists")
        self.standin.create_folder(name)

    def _select(self, args: list[Token]) -> bytes:
        if len(args) != 1:
            raise _Bad("SELECT mailbox")
        if self.selected is not None:
            self._untagged(b"OK [CLOSED] Previous mailbox closed.")
        self.selected = None
        folder = self.standin._find_folder(_text(args[0]))
        if folder is None:
            raise _No("Mailbox doesn't exist")
        readonly = self.command == "EXAMINE"
        self.selected, self.selected_uidvalidity, self.readonly = folder, folder.uidvalidity, readonly
        self.view, self.view_uidnext = list(folder.messages), folder.uidnext
        keywords = [f for m in folder.messages.values() for f in m.flags if not f.startswith("\\")]
        flags = [flag.encode() for flag in dict.fromkeys([*SYSTEM_FLAGS, *keywords])]
        self._untagged(b"FLAGS " + _plist(flags))
        permanent = b"()" if readonly else _plist([*flags, b"\\*"])
        self._untagged(b"OK [PERMANENTFLAGS " + permanent + b"] Flags permitted.")
        self._untagged(b"%d EXISTS" % len(self.view))
        self._untagged(b"0 RECENT")
        self._untagged(b"OK [UIDVALIDITY %d] UIDs valid" % folder.uidvalidity)
        self._untagged(b"OK [UIDNEXT %d] Predicted next UID" % folder.uidnext)
        self._untagged(b"OK [HIGHESTMODSEQ %d] Highest" % folder.highestmodseq)
        return b"OK [READ-ONLY] Examine completed" if readonly else b"OK [READ-WRITE] Select completed"

    def _status(self, args: list[Token]) -> None:
        if len(args) != 2 or not isinstance(args[1], list):
            raise _Bad("STATUS mailbox (items)")
        folder = self.standin._find_folder(_text(args[0]))
        if folder is None:
            raise _No("Mailbox doesn't exist")
        values = {
            "MESSAGES": len(folder.messages),
            "RECENT": 0,
            "UIDNEXT": folder.uidnext,
            "UIDVALIDITY": folder.uidvalidity,
            "UNSEEN": sum(not m.has_flag("\\Seen") for m in folder.messages.values()),
            "HIGHESTMODSEQ": folder.highestmodseq,
        }
        items = []
        for item in args[1]:
            key = _text(item).upper()
            if key not in values:
                raise _Bad(f"unknown STATUS item {key}")
            items.append(b"%s %d" % (key.encode(), values[key]))
        self._untagged(b"STATUS " + _nstring(folder.name) + b" " + _plist(items))

    def _append(self, args: list[Token]) -> bytes:
        if len(args) < 2 or not isinstance(args[-1], bytes):
            raise _Bad("APPEND mailbox [(flags)] [date-time] {literal}")
        folder = self.standin._find_folder(_text(args[0]))
        options = args[1:-1]
        flags = _flag_list(options.pop(0)) if options and isinstance(options[0], list) else []
        when = _append_date(_text(options.pop(0))) if options else None
        if options:
            raise _Bad("unexpected APPEND arguments")
        if folder is None:
            raise _No("[TRYCREATE] Mailbox doesn't exist")
        uid = self.standin._store_message(folder, args[-1], flags, when)
        return b"OK [APPENDUID %d %d] Append completed." % (folder.uidvalidity, uid)

    # -- selected --
    def _close(self, args: list[Token]) -> None:
        folder = self.selected
        assert folder is not None
        if self.command == "CLOSE" and not self.readonly:  # CLOSE expunges \Deleted silently
            for uid in [uid for uid, m in folder.messages.items() if m.has_flag("\\Deleted")]:
                self.standin._remove_message(folder, uid)
        self.selected = None

    def _announce(self, expunges: bool) -> None:
        """Tell the client about messages added (EXISTS) or, where allowed, removed (EXPUNGE)."""
        folder = self.selected
        assert folder is not None
        if expunges:
            for seq in range(len(self.view), 0, -1):
                if self.view[seq - 1] not in folder.messages:
                    del self.view[seq - 1]
                    self._untagged(b"%d EXPUNGE" % seq)
        new = [uid for uid in folder.messages if uid >= self.view_uidnext]
        self.view_uidnext = folder.uidnext
        if new:
            self.view.extend(new)
            self._untagged(b"%d EXISTS" % len(self.view))

    def _targets(self, spec: Token) -> Iterator[tuple[int, _Message]]:
        """(sequence number, message) for a sequence set, or a UID set in UID commands."""
        folder = self.selected
        assert folder is not None
        by_uid = self.command.startswith("UID ")
        largest = (self.view[-1] if self.view else 0) if by_uid else len(self.view)
        ranges = _ranges(_text(spec), largest)
        for seq, uid in enumerate(self.view, 1):
            message = folder.messages.get(uid)
            if message is not None and _in(ranges, uid if by_uid else seq):
                yield seq, message

    def _fetch(self, args: list[Token]) -> None:
        if len(args) not in (2, 3):
            raise _Bad("FETCH set (items) [(modifiers)]")
        items = [_text(item).upper() for item in (args[1] if isinstance(args[1], list) else [args[1]])]
        changedsince = None
        if len(args) == 3:
            modifiers = args[2] if isinstance(args[2], list) else [args[2]]
            if len(modifiers) != 2 or _text(modifiers[0]).upper() != "CHANGEDSINCE":
                raise _Bad("only the CHANGEDSINCE modifier is supported")
            changedsince = _number(modifiers[1])
        if changedsince is not None or "MODSEQ" in items:
            self.condstore = True
        if changedsince is not None and "MODSEQ" not in items:
            items.append("MODSEQ")
        if self.command == "UID FETCH" and "UID" not in items:
            items.insert(0, "UID")
        for item in items:
            if item not in _SIMPLE_ITEMS and not _FETCH_ATT.match(item):
                raise _Bad(f"unknown FETCH item {item}")
        for seq, message in list(self._targets(args[0])):
            if changedsince is None or message.modseq > changedsince:
                self._untagged(b"%d FETCH " % seq + _plist(self._fetch_items(message, items)))

    def _fetch_items(self, message: _Message, items: list[str]) -> list[bytes]:
        marks_seen = any(
            item in ("RFC822", "RFC822.TEXT") or item.startswith("BODY[") for item in items
        ) and not message.has_flag("\\Seen")
        if marks_seen and not self.readonly:
            assert self.selected is not None
            self.selected.set_flags(message, [*message.flags, "\\Seen"])
            if "FLAGS" not in items:
                items = [*items[:1], "FLAGS", *items[1:]] if items[0] == "UID" else ["FLAGS", *items]
        out = []
        for item in items:
            simple = _SIMPLE_ITEMS.get(item)
            if simple is not None:
                out.append(item.encode() + b" " + simple(message))
            else:
                out.append(self._body_item(message, item))
        return out

    def _body_item(self, message: _Message, item: str) -> bytes:
        match = _FETCH_ATT.match(item)
        assert match is not None
        section = _SECTION.match(match.group(2))
        if not section:
            raise _Bad(f"invalid section {match.group(2)}")
        path = [int(n) for n in section.group("path").split(".")] if section.group("path") else []
        spec = (section.group("spec") or "").upper()
        names = [n.strip('"').upper() for n in (section.group("fields") or "").split()]
        if spec.startswith("HEADER.FIELDS") != bool(names) or (spec == "MIME" and not path):
            raise _Bad(f"invalid section {match.group(2)}")
        data = _section(message.mime, path, spec, names)
        label = ".".join([*(str(n) for n in path), *([spec] if spec else [])])
        if names:
            label += " (" + " ".join(names) + ")"
        key = f"BODY[{label}]"
        if match.group(3) is not None:
            start = int(match.group(3))
            end = start + int(match.group(4)) if match.group(4) is not None else len(data)
            data, key = data[start:end], f"{key}<{start}>"
        return key.encode() + b" " + _literal(data)

    def _store(self, args: list[Token]) -> None:
        if len(args) != 3:
            raise _Bad("STORE set +FLAGS|-FLAGS|FLAGS[.SILENT] (flags)")
        if self.readonly:
            raise _No("[READ-ONLY] Mailbox is read-only")
        action = _text(args[1]).upper()
        if action.removesuffix(".SILENT") not in ("FLAGS", "+FLAGS", "-FLAGS"):
            raise _Bad(f"unknown STORE action {action}")
        flags = _flag_list(args[2])
        folder = self.selected
        assert folder is not None
        for seq, message in list(self._targets(args[0])):
            if action.startswith("+"):
                wanted = [*message.flags, *flags]
            elif action.startswith("-"):
                wanted = [f for f in message.flags if f.lower() not in {g.lower() for g in flags}]
            else:
                wanted = flags
            if not folder.set_flags(message, wanted):
                continue
            items = [b"UID %d" % message.uid] if self.command == "UID STORE" else []
            if self.condstore:
                items.append(b"MODSEQ (%d)" % message.modseq)
            if not action.endswith(".SILENT"):
                items.append(b"FLAGS " + _flags(message))
            if items:
                self._untagged(b"%d FETCH " % seq + _plist(items))

    def _copy(self, args: list[Token]) -> bytes:
        if len(args) != 2:
            raise _Bad("COPY set mailbox")
        target = self.standin._find_folder(_text(args[1]))
        if target is None:
            raise _No("[TRYCREATE] Mailbox doesn't exist")
        pairs = [
            (m.uid, self.standin._store_message(target, m.raw, m.flags, m.internaldate))
            for _, m in list(self._targets(args[0]))
        ]
        if not pairs:
            return b"OK No messages copied."
        old, new = (",".join(str(uid) for uid in uids).encode() for uids in zip(*pairs, strict=True))
        return b"OK [COPYUID %d %s %s] Copy completed." % (target.uidvalidity, old, new)

    def _expunge(self, args: list[Token]) -> None:
        """EXPUNGE, or UID EXPUNGE with a UID set (UIDPLUS); _run then reports what went."""
        if len(args) != (1 if self.command == "UID EXPUNGE" else 0):
            raise _Bad("EXPUNGE takes no arguments, UID EXPUNGE a UID set")
        if self.readonly:
            raise _No("[READ-ONLY] Mailbox is read-only")
        folder = self.selected
        assert folder is not None
        for _, message in list(self._targets(args[0] if args else "1:*")):
            if message.has_flag("\\Deleted"):
                self.standin._remove_message(folder, message.uid)

    def _search(self, args: list[Token]) -> None:
        if len(args) >= 2 and isinstance(args[0], str) and args[0].upper() == "CHARSET":
            if _text(args[1]).upper() not in ("UTF-8", "US-ASCII"):
                raise _No("[BADCHARSET (UTF-8 US-ASCII)] unsupported charset")
            args = args[2:]
        if not args:
            raise _Bad("SEARCH needs criteria")
        self.search_modseq = False
        tokens = iter(args)
        tests = [self._criterion(token, tokens) for token in tokens]
        hits = [(seq, m) for seq, m in self._targets("1:*") if all(test(seq, m) for test in tests)]
        numbers = b"".join(b" %d" % (m.uid if self.command == "UID SEARCH" else seq) for seq, m in hits)
        if self.search_modseq and hits:
            numbers += b" (MODSEQ %d)" % max(m.modseq for _, m in hits)
        self._untagged(b"SEARCH" + numbers)

    def _criterion(self, token: Token, rest: Iterator[Token]) -> Callable[[int, _Message], bool]:
        """One search key (RFC 3501 6.4.4 subset + MODSEQ of RFC 7162) as a predicate."""

        def arg() -> Token:
            value = next(rest, None)
            if value is None:
                raise _Bad("search key is missing its argument")
            return value

        if isinstance(token, list):
            inner = iter(token)
            tests = [self._criterion(item, inner) for item in inner]
            return lambda seq, m: all(test(seq, m) for test in tests)
        key = _text(token).upper()
        flag_keys = {"ANSWERED", "DELETED", "DRAFT", "FLAGGED", "SEEN"}
        if key == "ALL":
            return lambda seq, m: True
        if re.fullmatch(r"[\d*:,]+", key):
            ranges = _ranges(key, len(self.view))
            return lambda seq, m: _in(ranges, seq)
        if key == "UID":
            uid_ranges = _ranges(_text(arg()), self.view[-1] if self.view else 0)
            return lambda seq, m: _in(uid_ranges, m.uid)
        if key in flag_keys or (key.startswith("UN") and key[2:] in flag_keys):
            flag = "\\" + key.removeprefix("UN").title()
            want = not key.startswith("UN")
            return lambda seq, m: m.has_flag(flag) == want
        if key in ("KEYWORD", "UNKEYWORD"):
            keyword, want = _flag(arg()), key == "KEYWORD"
            return lambda seq, m: m.has_flag(keyword) == want
        if key in ("HEADER", "SUBJECT", "FROM", "TO", "CC", "BCC"):
            name = _text(arg()) if key == "HEADER" else key
            needle = _text(arg()).casefold()
            return lambda seq, m: any(
                needle in _decoded(value).casefold() for value in m.mime.fields.get_all(name, [])
            )
        if key == "MODSEQ":
            self.search_modseq = True
            threshold = _number(arg())
            return lambda seq, m: m.modseq >= threshold
        if key in ("SINCE", "BEFORE", "ON"):
            day = _search_date(arg())
            compare = {"SINCE": date.__ge__, "BEFORE": date.__lt__, "ON": date.__eq__}[key]
            return lambda seq, m: compare(m.internaldate.date(), day)
        if key == "NOT":
            negated = self._criterion(arg(), rest)
            return lambda seq, m: not negated(seq, m)
        if key == "OR":
            left, right = self._criterion(arg(), rest), self._criterion(arg(), rest)
            return lambda seq, m: left(seq, m) or right(seq, m)
        raise _Bad(f"unsupported search key {key}")


def _flags(message: _Message) -> bytes:
    return _plist(_bytes(flag) for flag in message.flags)


def _section(top: _Entity, path: list[int], spec: str, names: list[str]) -> bytes:
    """The bytes of BODY[path.spec]; a part that does not exist is empty, as Dovecot answers."""
    node = _part(top, path) if path else top
    if node is None:
        return b""
    if spec == "MIME":
        return node.header
    if not spec:
        return node.body if path else top.header + top.body
    message = node if not path else node.inner  # HEADER/TEXT of a part need a message/rfc822 part
    if message is None:
        return b""
    if spec == "TEXT":
        return message.body
    if spec == "HEADER":
        return message.header
    wanted = {name.lower() for name in names}
    lines = _HEADER_LINE.findall(message.header)
    keep = [
        line
        for line in lines
        if line.strip()
        and (line.split(b":", 1)[0].strip().decode("latin-1").lower() in wanted) != spec.endswith("NOT")
    ]
    return b"".join(keep) + b"\r\n"


_SIMPLE_ITEMS: dict[str, Callable[[_Message], bytes]] = {
    "UID": lambda m: b"%d" % m.uid,
    "FLAGS": _flags,
    "MODSEQ": lambda m: b"(%d)" % m.modseq,
    "RFC822.SIZE": lambda m: b"%d" % len(m.raw),
    "INTERNALDATE": lambda m: _internaldate(m.internaldate),
    "ENVELOPE": lambda m: _envelope(m.mime.fields),
    "BODYSTRUCTURE": lambda m: _bodystructure(m.mime, extended=True),
    "BODY": lambda m: _bodystructure(m.mime, extended=False),
    "RFC822": lambda m: _literal(m.raw),
    "RFC822.HEADER": lambda m: _literal(m.mime.header),
    "RFC822.TEXT": lambda m: _literal(m.mime.body),
}


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, standin: ImapStandin) -> None:
        self.standin = standin
        super().__init__(("127.0.0.1", 0), _Session)


# -- public API -----------------------------------------------------------------------------------
class ImapStandin:
    """IMAP server on 127.0.0.1 with one account: `with ImapStandin(user=.., password=..) as s:`.

    Mail is put in with `append` (or by clients with APPEND); `set_flags`, `expunge` and
    `rebuild` (a new UIDVALIDITY) simulate what other mail clients and servers do meanwhile.
    """

    host = "127.0.0.1"

    def __init__(self, *, user: str, password: str) -> None:
        self.user = user
        self.password = password
        self._lock = threading.RLock()
        self._folders: dict[str, _Folder] = {}
        self._connections: set[socket.socket] = set()
        self._uidvalidities = count(int(datetime.now(UTC).timestamp()))
        self._server: _Server | None = None
        self.create_folder("INBOX")

    @property
    def port(self) -> int:
        assert self._server is not None, "stand-in not started"
        return int(self._server.server_address[1])

    def start(self) -> int:
        self._server = _Server(self)
        threading.Thread(target=self._server.serve_forever, args=(0.1,), daemon=True).start()
        return self.port

    def stop(self) -> None:
        """Stop listening and drop connected clients (they see the connection close)."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        for sock in list(self._connections):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._server = None

    def __enter__(self) -> ImapStandin:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- folders --
    def _find_folder(self, name: str) -> _Folder | None:
        with self._lock:
            return self._folders.get("INBOX" if name.upper() == "INBOX" else name)

    def create_folder(self, name: str) -> None:
        """Create `name` (a no-op if it exists); '.' separates levels as in Dovecot's Maildir++."""
        with self._lock:
            if self._find_folder(name) is None:
                name = "INBOX" if name.upper() == "INBOX" else name
                self._folders[name] = _Folder(name, next(self._uidvalidities))

    def _folder(self, name: str) -> _Folder:
        folder = self._find_folder(name)
        if folder is None:
            raise KeyError(f"no folder {name!r}")
        return folder

    def uidvalidity(self, folder: str) -> int:
        with self._lock:
            return self._folder(folder).uidvalidity

    def rebuild(self, folder: str) -> int:
        """Renumber the folder from UID 1 under a new UIDVALIDITY, as after a server-side rebuild;
        clients that have it selected get BYE on their next command. Returns the new UIDVALIDITY."""
        with self._lock:
            box = self._folder(folder)
            box.uidvalidity = next(self._uidvalidities)
            messages = list(box.messages.values())
            for uid, message in enumerate(messages, 1):
                message.uid = uid
            box.messages = {m.uid: m for m in messages}
            box.uidnext = len(messages) + 1
            return box.uidvalidity

    # -- messages --
    def _store_message(self, folder: _Folder, raw: bytes, flags: list[str], when: datetime | None) -> int:
        with self._lock:
            folder.highestmodseq += 1
            uid = folder.uidnext
            folder.uidnext += 1
            internaldate = when or datetime.now(UTC).replace(microsecond=0)
            folder.messages[uid] = _Message(uid, raw, _unique(flags), folder.highestmodseq, internaldate)
            return uid

    def _remove_message(self, folder: _Folder, uid: int) -> None:
        with self._lock:
            del folder.messages[uid]
            folder.highestmodseq += 1

    def append(self, folder: str, raw_bytes: bytes, flags: Iterable[str] = ()) -> int:
        """Deliver a message into `folder` (created if missing); returns its UID."""
        with self._lock:
            self.create_folder(folder)
            return self._store_message(self._folder(folder), raw_bytes, [_flag(f) for f in flags], None)

    def set_flags(self, folder: str, uid: int, flags: Iterable[str]) -> int:
        """Replace a message's flags as another client would; returns its (new) MODSEQ."""
        with self._lock:
            box = self._folder(folder)
            message = box.messages[uid]
            box.set_flags(message, [_flag(f) for f in flags])
            return message.modseq

    def flags(self, folder: str, uid: int) -> tuple[str, ...]:
        with self._lock:
            return tuple(self._folder(folder).messages[uid].flags)

    def expunge(self, folder: str, uid: int) -> None:
        """Remove a message as another client would; selected clients learn it on NOOP."""
        self._remove_message(self._folder(folder), uid)
