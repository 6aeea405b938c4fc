"""The `imap` connector: pure mapping units, then end-to-end runs against a real Dovecot.

Mapping tests feed doc-shaped payloads (RFC 3501 BODYSTRUCTURE answers parsed by imapclient's
own parser, the odd-mail corpus's headers) to the pure functions. Scenario tests drive the real
imapclient against the Dovecot of tests/mailrig.py (skipped without it, failing on CI) through
the SyncEngine into a real store; pushes go to the in-process SMTP sink.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
from imapclient import IMAPClient
from imapclient.response_parser import parse_fetch_response
from sqlalchemy import select

from connectors.errors import PushError
from connectors.imap import (
    ImapConfig,
    ImapConnector,
    ImapCursor,
    Mail,
    TextPart,
    ThreadRules,
    decode_text,
    decode_transfer,
    decode_words,
    external_id,
    html_to_text,
    is_reply_subject,
    merge_ranges,
    own_ranges,
    parse_date,
    parse_header_block,
    parse_mail,
    strip_quotes,
    subject_key,
    text_part,
    thread_groups,
    thread_record,
    title_of,
)
from connectors.smtp import message_id_for
from store.canonical import Action, IdentityKind, IdentityRef, Priority, Status
from store.db import Store
from store.errors import ConfigError
from store.models import Task, TaskEvent
from sync.config import parse_config
from sync.engine import SyncEngine, SyncResult
from sync.pipeline import Pipeline
from sync.standins.imap import ImapStandin
from tests.conftest import Clock
from tests.contract import ConnectorContract
from tests.mailrig import SmtpSink, append_message

CORPUS = Path(__file__).parent / "corpus" / "mail"
MANIFEST = json.loads((CORPUS / "manifest.json").read_text(encoding="utf-8"))
TYPES = {"imap": ImapConnector}
FOLDER = "Tasks"
RECEIVED = datetime(2024, 9, 20, 12, 0, tzinfo=UTC)


# -- helpers ----------------------------------------------------------------------------------
def corpus_mail(name: str, uid: int) -> Mail:
    """A corpus message as the connector sees it, without a server: headers parsed, the whole
    body taken as its (plain, 8-bit) text part."""
    raw = (CORPUS / name).read_bytes()
    match = re.search(rb"\r?\n\r?\n", raw)
    header, body = (raw[: match.end()], raw[match.end() :]) if match else (raw, b"")
    mail = parse_mail(uid, header, None, (), RECEIVED, len(raw))
    mail.text = decode_text(body, TextPart("1", "plain", "utf-8", "8bit"))
    return mail


def mail(
    uid: int,
    subject: str,
    *,
    sender: str = "Client <client@example.org>",
    at: datetime = datetime(2026, 10, 30, 9, 0, tzinfo=UTC),
    msgid: str | None = None,
    in_reply_to: str | None = None,
    references: tuple[str, ...] = (),
    text: str = "Please have a look.",
    headers: dict[str, str] | None = None,
    flags: tuple[str, ...] = (),
) -> Mail:
    lines = [
        f"From: {sender}",
        "To: support@example.com",
        f"Subject: {subject}",
        f"Date: {format_datetime(at)}",
    ]
    lines.append(f"Message-ID: {msgid or f'<m{uid}@example.org>'}")
    if in_reply_to:
        lines.append(f"In-Reply-To: {in_reply_to}")
    if references:
        lines.append(f"References: {' '.join(references)}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    parsed = parse_mail(uid, ("\r\n".join(lines) + "\r\n\r\n").encode(), None, flags, at, 100)
    parsed.text = strip_quotes(text)  # as decode_text leaves it
    return parsed


RULES = ThreadRules(folder=FOLDER)


def raw_mail(
    subject: str,
    *,
    msgid: str,
    sender: str = "Priya Shah <priya@client.example>",
    to: str = "support@example.com",
    at: datetime,
    in_reply_to: str | None = None,
    references: tuple[str, ...] = (),
    body: str = "Could you please look into this?\n",
    headers: dict[str, str] | None = None,
) -> bytes:
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = sender, to, subject
    message["Date"] = format_datetime(at)
    message["Message-ID"] = msgid
    if in_reply_to:
        message["In-Reply-To"] = in_reply_to
    if references:
        message["References"] = " ".join(references)
    for name, value in (headers or {}).items():
        message[name] = value
    message.set_content(body)
    return message.as_bytes(policy=SMTP_POLICY)


class Mailbox:
    """One test's Dovecot account, seen from outside the connector (another mail client)."""

    def __init__(self, account: dict[str, Any]) -> None:
        self.account = account

    def client(self) -> IMAPClient:
        client = IMAPClient(self.account["host"], port=self.account["port"], ssl=False, timeout=10)
        client.login(self.account["user"], self.account["password"])
        return client

    def append(self, raw: bytes, flags: tuple[str, ...] = (), folder: str = FOLDER) -> int:
        return append_message(self.account, folder, raw, flags)

    def flags(self, folder: str = FOLDER) -> dict[int, set[str]]:
        with self.client() as client:
            client.select_folder(folder, readonly=True)
            found = client.fetch(client.search(["ALL"]), ["FLAGS"])
        return {uid: {f.decode() for f in data[b"FLAGS"]} - {"\\Recent"} for uid, data in found.items()}

    def set_flags(self, uid: int, flags: list[str], folder: str = FOLDER) -> None:
        with self.client() as client:
            client.enable("CONDSTORE")
            client.select_folder(folder)
            client.add_flags([uid], flags)

    def uidvalidity(self, folder: str = FOLDER) -> int:
        with self.client() as client:
            return int(client.folder_status(folder, [b"UIDVALIDITY"])[b"UIDVALIDITY"])

    def recreate(self, folder: str = FOLDER) -> None:
        with self.client() as client:
            client.delete_folder(folder)
            client.create_folder(folder)

    def search(self, folder: str, *criteria: Any) -> list[int]:
        with self.client() as client:
            client.select_folder(folder, readonly=True)
            return list(client.search(list(criteria)))


def section(account: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    base = {
        "type": "imap",
        "host": account["host"],
        "port": account["port"],
        "ssl": False,
        "username": account["user"],
        "password": account["password"],
        "folders": [FOLDER],
        "reply_from": "support@example.com",
        "retry": {"attempts": 3, "max_wait": "0s"},
    }
    return {**base, **overrides}


class Env:
    """A store, the connector's config and an engine on an injected clock."""

    def __init__(self, url: str, account: dict[str, Any], clock: Clock, **overrides: Any) -> None:
        self.store = Store(url)
        self.clock = clock
        self.account = account
        self.overrides = overrides
        self.box = Mailbox(account)

    def config(self, **more: Any) -> Any:
        data = {
            "store": {"url": self.store.url},
            "connectors": {"mail": section(self.account, **{**self.overrides, **more})},
        }
        return parse_config(data, env={}, connector_types=TYPES)

    def sync(self, *, full: bool = False, **more: Any) -> SyncResult:
        [result] = SyncEngine(self.store, self.config(**more), TYPES, clock=self.clock).run(full=full)
        return result

    def connector(self, **more: Any) -> ImapConnector:
        return ImapConnector("mail", self.config(**more).connectors["mail"], clock=self.clock)

    def tasks(self) -> dict[str, Task]:
        with self.store.transaction() as session:
            rows = session.scalars(select(Task).where(Task.source == "mail")).all()
            for row in rows:
                session.expunge(row)
        return {row.external_id: row for row in rows}

    def cursor(self) -> ImapCursor:
        from store.sync_state import load_state

        with self.store.transaction() as session:
            row = load_state(session, "mail")
            assert row is not None
            return ImapCursor.model_validate(row.cursor)

    def events(self, external_id: str, field: str) -> list[TaskEvent]:
        with self.store.transaction() as session:
            task_id = session.scalar(select(Task.id).where(Task.external_id == external_id))
            rows = session.scalars(
                select(TaskEvent)
                .where(TaskEvent.task_id == task_id, TaskEvent.field == field)
                .order_by(TaskEvent.at)
            ).all()
            for row in rows:
                session.expunge(row)
        return list(rows)


@pytest.fixture
def env(tmp_path: Path, imap_account: dict[str, Any], clock: Clock) -> Iterator[Env]:
    e = Env(f"sqlite:///{tmp_path / 'mail.db'}", imap_account, clock)
    yield e
    e.store.close()


@pytest.fixture
def pg_env(db_url: str, imap_account: dict[str, Any], clock: Clock) -> Iterator[Env]:
    e = Env(db_url, imap_account, clock)
    yield e
    e.store.close()


T0 = datetime(2026, 10, 30, 9, 0, tzinfo=UTC)  # seeded mail is a few days before the clock's now


# == pure mapping ==============================================================================
def test_header_block_unfolds_and_decodes_8bit_without_replacement_characters() -> None:
    raw = (
        b"Subject: =?UTF-8?B?U2VydmVyIGluIELDvHJvIDMgw7xiZXJoaXR6dCDwn5Sl?=\r\n =?UTF-8?B?IGRyaW5nZW5k?=\r\n"
        b"From: Zo\xc3\xab N\xc3\xb8rgaard <zoe@corp.example>\r\n"
        b"X-Latin: K\xf6ln\r\n"
        b"not a header line\r\n"
        b"References: <a@x>\r\n\t<b@x>\r\n\r\n"
    )
    fields = parse_header_block(raw)
    assert decode_words(fields["subject"][0]) == "Server in Büro 3 überhitzt 🔥 dringend"
    assert fields["from"] == ["Zoë Nørgaard <zoe@corp.example>"]
    assert fields["x-latin"] == ["Köln"]  # not UTF-8: Windows-1252, never U+FFFD
    assert fields["references"] == ["<a@x>\t<b@x>"]
    assert "not a header line" not in json.dumps(fields)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("=?ISO-8859-1?Q?Angebot_f=FCr_M=FCller_GmbH_pr=FCfen?=", "Angebot für Müller GmbH prüfen"),
        ("AW: WG: =?ISO-8859-1?Q?Angebot_f=FCr?= x", "AW: WG: Angebot für x"),
        ("=?x-unknown?Q?caf=E9?=", "café"),  # unknown charset: lenient fallback, no LookupError
        ("=?utf-8?B?SGVsbG8?=", "Hello"),  # missing base64 padding
        ("plain text", "plain text"),
    ],
)
def test_encoded_words_decode_leniently(value: str, expected: str) -> None:
    assert decode_words(value) == expected


@pytest.mark.parametrize(
    ("subject", "title", "reply"),
    [
        ("RE: Re: Billing deploy status", "Billing deploy status", True),
        ("AW: WG: Angebot prüfen", "Angebot prüfen", True),
        ("SV: Fix the flaky login test", "Fix the flaky login test", True),
        ("Re[2]:  Deploy   the  service", "Deploy the service", True),
        ("Fwd: Printer on 3rd floor is broken", "Printer on 3rd floor is broken", False),
        ("Automatic reply: Deploy", "Automatic reply: Deploy", False),
        ("Re: [done] Renew the cert", "[done] Renew the cert", True),
        ("Re: ", "(no subject)", True),
        ("Regarding the budget", "Regarding the budget", False),
    ],
)
def test_subject_prefixes(subject: str, title: str, reply: bool) -> None:
    assert title_of(subject) == title
    assert is_reply_subject(subject) is reply


def test_subject_key_ignores_prefixes_case_and_done_tags() -> None:
    assert (
        subject_key("RE: [done]  Deploy the SERVICE")
        == subject_key("Deploy the service")
        == "deploy the service"
    )
    assert len(title_of("x" * 2000)) == 1000


def test_dates_fall_back_to_the_receipt_time() -> None:
    received = datetime(2024, 9, 18, 7, 30, tzinfo=UTC)
    assert parse_date("Mon, 02 Sep 2024 09:14:00 +0200", received) == datetime(2024, 9, 2, 7, 14, tzinfo=UTC)
    assert parse_date("32/13/2024 25:61 +9999", received) == received
    assert parse_date(None, received) == received
    assert parse_date("Mon, 02 Sep 2099 09:14:00 +0000", received) == received  # from the future
    assert parse_date("Mon, 02 Sep 2024 09:14:00 -0000", None) == datetime(2024, 9, 2, 9, 14, tzinfo=UTC)


def structure(response: bytes) -> Any:
    """BODYSTRUCTURE as imapclient parses a server's FETCH answer."""
    [data] = parse_fetch_response([response]).values()
    return data[b"BODYSTRUCTURE"]


def test_text_part_from_rfc3501_bodystructures() -> None:
    # RFC 3501 7.4.2's example: multipart/mixed of two text/plain parts (the second an attachment).
    mixed = structure(
        b'1 (UID 1 BODYSTRUCTURE (("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 1152 23)'
        b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII" "NAME" "cc.diff") "<960723163407.20117h@cac.washington.edu>"'
        b' "Compiler diff" "BASE64" 4554 73) "MIXED"))'
    )
    assert text_part(mixed) == TextPart("1", "plain", "us-ascii", "7bit")
    # mixed > (alternative: html before plain) + pdf attachment: the plain part, 1.2.
    nested = structure(
        b'2 (UID 2 BODYSTRUCTURE ((("TEXT" "HTML" ("CHARSET" "utf-8")'
        b' NIL NIL "QUOTED-PRINTABLE" 300 8 NIL NIL NIL NIL)'
        b'("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL "BASE64" 200 3'
        b' NIL NIL NIL NIL) "ALTERNATIVE" ("BOUNDARY" "b2")'
        b' NIL NIL NIL)("APPLICATION" "PDF" ("NAME" "x.pdf") NIL NIL "BASE64" 2000000 NIL ("ATTACHMENT"'
        b' ("FILENAME" "x.pdf")) NIL NIL) "MIXED" ("BOUNDARY" "b1") NIL NIL NIL))'
    )
    assert text_part(nested) == TextPart("1.2", "plain", "utf-8", "base64")
    html_only = structure(
        b'3 (UID 3 BODYSTRUCTURE ("TEXT" "HTML" ("CHARSET" "utf-8") NIL NIL "7BIT" 300 8 NIL NIL NIL NIL))'
    )
    assert text_part(html_only) == TextPart("1", "html", "utf-8", "7bit")
    # a text file attached, and a forwarded message: neither is the message's own text
    attached = structure(
        b'4 (UID 4 BODYSTRUCTURE (("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL "7BIT" 10 1 NIL ("ATTACHMENT"'
        b' ("FILENAME" "log.txt")) NIL NIL)("MESSAGE" "RFC822" NIL'
        b' NIL NIL "7BIT" 466 ("Tue, 17 Sep 2024 18:00:00'
        b' +0200" "Inner" NIL NIL NIL NIL NIL NIL NIL "<inner@x>")'
        b' ("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL'
        b' "7BIT" 45 1 NIL NIL NIL NIL) 17 NIL ("ATTACHMENT" ("FILENAME" "fwd.eml")) NIL NIL) "MIXED"'
        b' ("BOUNDARY" "x") NIL NIL NIL))'
    )
    assert text_part(attached) is None


def test_transfer_encodings_and_charsets_decode_leniently() -> None:
    text = "Grüße aus Köln\n" * 3
    encoded = __import__("base64").encodebytes(text.encode())
    assert decode_transfer(encoded, "base64").decode() == text
    assert (
        decode_transfer(encoded[:-7], "base64").decode("utf-8", "ignore").startswith("Grüße aus Köln\nGrüße")
    )
    assert decode_transfer(b"caf=C3=A9 techn=\r\nician", "quoted-printable") == "café technician".encode()
    latin = TextPart("1", "plain", "utf-8", "8bit")
    assert decode_text("Viele Grüße".encode("latin-1"), latin) == "Viele Grüße"  # declared wrong
    assert decode_text("Café".encode(), TextPart("1", "plain", "us-ascii", "8bit")) == "Café"
    assert decode_text(b"export failed", TextPart("1", "plain", "x-unknown", "7bit")) == "export failed"


def test_html_becomes_text_without_markup_scripts_or_quotes() -> None:
    html = (
        "<html><head><style>p{color:red}</style><title>t</title></head><body><p>Please <b>renew</b> the"
        " cert &amp; key.</p><ul><li>one</li><li>two</li></ul><script>track();</script>"
        "<div>On Mon, 2 Sep 2024, Alice wrote:</div><blockquote><p>old text</p></blockquote></body></html>"
    )
    text = html_to_text(html)
    assert "Please renew the cert & key." in text and "- one" in text and "- two" in text
    assert "color" not in text and "track()" not in text and "<" not in text
    assert strip_quotes(text) == "Please renew the cert & key.\n\n- one\n- two"


def test_quotes_attributions_and_signatures_are_stripped_but_forwards_kept() -> None:
    reply = (
        "Deployed, all green.\n\nOn Mon, 2 Sep 2024 at 09:14, Alice Example\n<alice@corp.example> wrote:\n"
        "> please deploy\n"
    )
    assert strip_quotes(reply) == "Deployed, all green."
    outlook = "Done on our side.\n\nFrom: Alice\nSent: Monday\nTo: Ops\nSubject: x\n\nold"
    assert strip_quotes(outlook) == "Done on our side."
    original = "See below.\n-----Original Message-----\nold stuff"
    assert strip_quotes(original) == "See below."
    signed = "Thanks!\n-- \nBob\nACME Corp"
    assert strip_quotes(signed) == "Thanks!"
    forward = (
        "Can someone take this?\n\n---------- Forwarded message ---------\nFrom: Ken\nDate: Wed\n\n> jam\nKen"
    )
    assert "From: Ken" in strip_quotes(forward) and "> jam" in strip_quotes(forward)
    inline = "> quoted\nmy answer\n> more quoted\nand more"
    assert strip_quotes(inline) == "my answer\nand more"


def test_corpus_threads_group_by_headers_and_subject() -> None:
    mails = [corpus_mail(m["file"], uid) for uid, m in enumerate(MANIFEST, 1)]
    groups = thread_groups(mails)
    by_file = {m["file"]: mail for m, mail in zip(MANIFEST, mails, strict=True)}
    group_of = {id(mail): index for index, group in enumerate(groups) for mail in group}
    for entry in MANIFEST:
        if entry["thread_of"]:
            assert group_of[id(by_file[entry["file"]])] == group_of[id(by_file[entry["thread_of"]])], entry[
                "file"
            ]
    roots = [e for e in MANIFEST if not e["thread_of"]]
    assert len(groups) == len(roots)


def test_thread_record_of_the_billing_thread() -> None:
    mails = [
        corpus_mail(name, uid)
        for uid, name in enumerate(
            [
                "01-plain-task.eml",
                "03-duplicate-message-id.eml",
                "16-auto-replied.eml",
                "17-out-of-office.eml",
                "18-reply-in-reply-to-only.eml",
                "19-reply-references-only.eml",
                "20-reply-subject-only.eml",
                "23-quoted-reply.eml",
            ],
            1,
        )
    ]
    [group] = thread_groups(mails)
    record = thread_record(group, RULES)
    assert record is not None
    assert record.external_id == "CAH7x9kP2b1w@mail.corp.example"
    assert record.title == "Deploy the new billing service"
    assert record.body.startswith("Hi team,\n\nplease deploy billing v2 to production by Friday.")
    assert record.reporter == IdentityRef(
        IdentityKind.EMAIL, "alice@corp.example", "Alice Example", "alice@corp.example"
    )
    assert record.status is Status.TODO and record.assignees == ()
    assert record.created_at == datetime(2024, 9, 2, 7, 14, tzinfo=UTC)
    # 23 is the latest human message; the auto-replies (16, 17) never count as activity
    assert record.updated_at == record.last_activity_at == datetime(2024, 9, 5, 7, 0, tzinfo=UTC)
    assert record.extra["messages"] == 5 and record.extra["auto_messages"] == 2
    assert record.extra["latest_message_id"] == "<quoted.23@corp.example>"
    assert record.extra["references"] == ["<CAH7x9kP2b1w@mail.corp.example>", "<quoted.23@corp.example>"]
    assert record.extra["reply_to"] == record.extra["reporter"] == "alice@corp.example"
    assert record.extra["subject"] == "Deploy the new billing service"


def test_done_phrases_owner_and_due_lines() -> None:
    root = corpus_mail("24-owner-line.eml", 1)
    resolved = corpus_mail("26-resolved-reply.eml", 2)
    open_record = thread_record([root], RULES)
    assert open_record is not None
    assert open_record.assignees == (IdentityRef(IdentityKind.PERSON, "alice"),)
    assert open_record.due == date(2024, 9, 20) and open_record.status is Status.TODO
    record = thread_record([root, resolved], RULES)
    assert record is not None and record.status is Status.DONE
    assert record.closed_at == record.status_changed_at == datetime(2024, 9, 16, 7, 0, tzinfo=UTC)
    html = corpus_mail("11-html-only.eml", 3)
    tagged = corpus_mail("25-done-tag.eml", 4)
    record = thread_record([html, tagged], RULES)
    assert record is not None and record.status is Status.DONE and record.raw_status == "done"
    # the phrase must be in a later message, not the root, and not just inherited from the subject
    question = mail(1, "Is the VPN issue resolved?", text="It drops every hour. Owner: bob@example.com")
    answer = mail(
        2,
        "Re: Is the VPN issue resolved?",
        in_reply_to="<m1@example.org>",
        text="Not yet.",
        at=T0 + timedelta(hours=1),
    )
    record = thread_record([question, answer], RULES)
    assert record is not None and record.status is Status.TODO
    fixed = mail(
        3,
        "Re: Is the VPN issue resolved?",
        in_reply_to="<m2@example.org>",
        at=T0 + timedelta(hours=2),
        text="Resolved now.\n\nOn Mon, Bob wrote:\n> resolved?",
    )
    assert thread_record([question, answer, fixed], RULES).status is Status.DONE  # type: ignore[union-attr]
    quoted_only = replace(fixed, text=strip_quotes("Thanks\n> is it resolved?"))
    assert thread_record([question, answer, quoted_only], RULES).status is Status.TODO  # type: ignore[union-attr]


def test_owner_values_default_owner_and_inline_owner_lines() -> None:
    rules = replace(RULES, default_owner="dan")
    assert thread_record([mail(1, "Printer")], rules).assignees == (  # type: ignore[union-attr]
        IdentityRef(IdentityKind.PERSON, "dan"),
    )
    by_address = mail(1, "Printer", text="Owner: <Carol@Example.com>\nplease")
    assert thread_record([by_address], rules).assignees == (  # type: ignore[union-attr]
        IdentityRef(IdentityKind.EMAIL, "carol@example.com", email="carol@example.com"),
    )
    nobody = mail(1, "Printer", text="Owner: TBD")
    assert thread_record([nobody], RULES).assignees == ()  # type: ignore[union-attr]
    handover = mail(
        2, "Re: Printer", in_reply_to="<m1@example.org>", at=T0 + timedelta(days=1), text="Owner: bob"
    )
    assert thread_record([by_address, handover], RULES).assignees == (  # type: ignore[union-attr]
        IdentityRef(IdentityKind.PERSON, "bob"),
    )


def test_auto_replies_bounces_and_own_messages_are_never_tasks_or_activity() -> None:
    bounce = corpus_mail("15-bounce-dsn.eml", 1)
    assert bounce.auto and thread_record([bounce], RULES) is None
    root = mail(1, "VPN")
    ooo = mail(
        2,
        "Out of office",
        in_reply_to="<m1@example.org>",
        at=T0 + timedelta(days=2),
        headers={"Auto-Submitted": "auto-replied"},
    )
    bulk = mail(
        3,
        "Re: VPN",
        in_reply_to="<m1@example.org>",
        at=T0 + timedelta(days=3),
        headers={"Precedence": "bulk"},
    )
    null_sender = mail(
        4, "Re: VPN", in_reply_to="<m1@example.org>", at=T0 + timedelta(days=3), headers={"Return-Path": "<>"}
    )
    ours = mail(
        5,
        "Re: VPN",
        in_reply_to="<m1@example.org>",
        msgid="<trackloop.abc@example.com>",
        at=T0 + timedelta(days=4),
        text="resolved?",
    )
    record = thread_record([root, ooo, bulk, null_sender, ours], RULES)
    assert record is not None
    assert record.last_activity_at == T0 and record.status is Status.TODO
    assert record.extra["auto_messages"] == 3
    assert record.extra["latest_message_id"] == "<trackloop.abc@example.com>"  # replies go after ours


def test_flags_keywords_priority_and_deletion() -> None:
    root = mail(1, "VPN", flags=("\\Seen", "$Tracked", "billing", "$label1", "Junk"))
    reply = mail(
        2, "Re: VPN", in_reply_to="<m1@example.org>", flags=("\\Flagged", "urgent"), at=T0 + timedelta(1)
    )
    record = thread_record([root, reply], replace(RULES, mark_keyword="$Tracked"))
    assert record is not None and record.priority is Priority.HIGH and record.labels == ("billing", "urgent")
    important = mail(1, "VPN", headers={"X-Priority": "1 (Highest)"})
    assert thread_record([important], RULES).priority is Priority.HIGH  # type: ignore[union-attr]
    gone = mail(1, "VPN", flags=("\\Deleted",))
    assert thread_record([gone], RULES).status is Status.CANCELLED  # type: ignore[union-attr]


def test_filter_and_missing_ids() -> None:
    rules = replace(RULES, to=frozenset({"support@example.com"}), subject_prefixes=("[IT]",))
    assert thread_record([mail(1, "[IT] Laptop")], rules) is not None
    assert thread_record([mail(1, "Lunch?")], rules) is None
    assert thread_record(
        [mail(1, "[it] Laptop", headers={"Cc": "x@y.z"})], replace(rules, to=frozenset({"x@y.z"}))
    )
    no_id = corpus_mail("02-no-message-id.eml", 1)
    again = corpus_mail("02-no-message-id.eml", 7)
    assert no_id.key == again.key and no_id.key.startswith("<derived.")
    assert external_id("<" + "x" * 500 + "@y>").startswith("long.") and external_id("<a@b>") == "a@b"


def test_body_is_capped() -> None:
    long = mail(1, "Logs", text="line\n" * 5000)
    record = thread_record([long], RULES)
    assert record is not None and len(record.body) == 8000 and record.body.endswith("…")


# -- config ---------------------------------------------------------------------------------
def load(section_: dict[str, Any], **top: Any) -> Any:
    return parse_config(
        {"connectors": {"mail": section_}, **top}, env={"PW": "s3cret"}, connector_types=TYPES
    )


BASE = {"type": "imap", "host": "imap.example.com", "username": "support@example.com", "password": "${PW}"}


@pytest.mark.parametrize(
    ("extra", "path", "message"),
    [
        (
            {"starttls": True, "ssl": True},
            "connectors.mail",
            "choose one: ssl = true (port 993) or starttls = true",
        ),
        (
            {"mark_keyword": "\\Seen"},
            "connectors.mail.mark_keyword",
            'expected an IMAP keyword such as "$Tracked"',
        ),
        (
            {"default_owner": "Alice Kim"},
            "connectors.mail.default_owner",
            'expected a person key such as "alice"',
        ),
        ({"reply_from": "support"}, "connectors.mail.reply_from", "expected an email address"),
        ({"filter": {"to": ["ops"]}}, "connectors.mail.filter.to", "expected an email address, got 'ops'"),
        ({"folders": []}, "connectors.mail.folders", "expected at least one folder"),
        ({"host": "imaps://imap.example.com"}, "connectors.mail.host", "expected a host name such as"),
        ({"fodlers": ["x"]}, "connectors.mail.fodlers", "unknown key"),
    ],
)
def test_config_errors_are_readable(extra: dict[str, Any], path: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load({**BASE, **extra})
    [problem] = info.value.problems
    assert problem.path == path and message in problem.message


def test_config_defaults_and_secrets() -> None:
    config = load(BASE)
    cfg = config.connectors["mail"]
    assert isinstance(cfg, ImapConfig)
    assert (cfg.effective_port, cfg.ssl, cfg.folders, cfg.mark_keyword) == (993, True, ["INBOX"], "$Tracked")
    assert "s3cret" in config.secrets() and "s3cret" not in repr(cfg)
    assert load({**BASE, "ssl": False, "starttls": True}).connectors["mail"].effective_port == 143


def test_starttls_alone_turns_the_implicit_tls_default_off() -> None:
    alone = load({**BASE, "starttls": True}).connectors["mail"]
    assert (alone.ssl, alone.starttls, alone.effective_port) == (False, True, 143)
    by_env = parse_config(
        {"connectors": {"mail": BASE}},
        env={"PW": "s3cret", "TRACKLOOP_CONNECTORS__MAIL__STARTTLS": "true"},
        connector_types=TYPES,
    ).connectors["mail"]
    assert (by_env.ssl, by_env.starttls) == (False, True)
    kept = load({**BASE, "starttls": False}).connectors["mail"]
    assert (kept.ssl, kept.effective_port) == (True, 993)
    assert all(f.description for f in ImapConfig.model_fields.values())


# == against Dovecot ===========================================================================
def seed_thread(box: Mailbox, n: int, *, at: datetime = T0, **kwargs: Any) -> tuple[str, int]:
    msgid = f"<req-{n}@client.example>"
    uid = box.append(
        raw_mail(f"Request {n}: laptop does not boot", msgid=msgid, at=at + timedelta(minutes=n), **kwargs)
    )
    return msgid, uid


def reply_to(
    box: Mailbox,
    parent: str,
    n: int,
    *,
    at: datetime,
    body: str = "Any news?\n",
    refs: tuple[str, ...] | None = None,
    subject: str = "Re: Request",
    sender: str = "Priya Shah <priya@client.example>",
    headers: dict[str, str] | None = None,
) -> int:
    return box.append(
        raw_mail(
            subject,
            msgid=f"<reply-{n}@client.example>",
            at=at,
            in_reply_to=parent,
            references=refs if refs is not None else (parent,),
            body=body,
            sender=sender,
            headers=headers,
        )
    )


@pytest.mark.imap
def test_first_incremental_and_idle_syncs_with_request_counts(pg_env: Env) -> None:
    env, box = pg_env, pg_env.box
    roots = [seed_thread(box, n) for n in range(1, 4)]
    cold = env.sync()
    assert cold.ok, cold.error
    assert (cold.upserts.inserted, cold.pages) == (3, 1)
    # CAPABILITY (on connect), LOGIN, ENABLE, EXAMINE, UID SEARCH, FETCH headers, FETCH text,
    # SELECT, STORE, FETCH MODSEQ, LOGOUT
    assert cold.requests.requests == 11
    tasks = env.tasks()
    assert set(tasks) == {"req-1@client.example", "req-2@client.example", "req-3@client.example"}
    assert tasks["req-1@client.example"].title == "Request 1: laptop does not boot"
    assert tasks["req-1@client.example"].scope == FOLDER

    env.clock.advance(minutes=5)
    reply_to(box, roots[0][0], 1, at=T0 + timedelta(days=1))
    seed_thread(box, 4)
    incremental = env.sync()
    assert incremental.ok, incremental.error
    assert (incremental.upserts.inserted, incremental.upserts.updated) == (1, 1)
    # + SEARCH MODSEQ (our own keyword changes excluded by the server), FETCH of the earlier message
    assert incremental.requests.requests == 13
    assert env.tasks()["req-1@client.example"].last_activity_at == T0 + timedelta(days=1)

    after_marks = env.sync()
    assert after_marks.ok and after_marks.pages == 1 and after_marks.upserts.updated == 0
    assert after_marks.requests.requests == 6  # the idle sync's 5 + SEARCH MODSEQ (finding nothing)
    idle = env.sync()
    assert idle.ok and idle.pages == 0
    assert idle.requests.requests == 5  # CAPABILITY, LOGIN, ENABLE, EXAMINE, LOGOUT
    assert idle.requests.not_modified == 1 and after_marks.requests.not_modified == 0


@pytest.mark.imap
def test_a_reply_in_a_later_sync_updates_its_thread(pg_env: Env) -> None:
    env, box = pg_env, pg_env.box
    root, _ = seed_thread(box, 1, headers={"Cc": "carol@example.com"})
    assert env.sync().upserts.inserted == 1
    reply_to(
        box,
        root,
        1,
        at=T0 + timedelta(hours=3),
        sender="Carol Diaz <carol@example.com>",
        body="On it.\n\nOn Fri, Priya wrote:\n> Could you please look into this? resolved\n",
    )
    result = env.sync()
    assert (result.upserts.inserted, result.upserts.updated) == (0, 1)
    [task] = env.tasks().values()
    assert task.external_id == "req-1@client.example" and task.status == "todo"
    assert task.last_activity_at == T0 + timedelta(hours=3)
    assert task.extra["latest_message_id"] == "<reply-1@client.example>"
    [event] = env.events(task.external_id, "activity")
    assert (event.at, event.actor, event.new) == (T0 + timedelta(hours=3), "carol@example.com", "reply")
    # a "Re:" reply without any threading header, one sync later still, and then a resolution
    box.append(
        raw_mail(
            "RE: Request 1: laptop does not boot",
            msgid="<webmail-1@client.example>",
            at=T0 + timedelta(hours=5),
            body="Tried again, same.\n",
        )
    )
    reply_to(
        box,
        "<reply-1@client.example>",
        2,
        at=T0 + timedelta(hours=6),
        refs=(root, "<reply-1@client.example>"),
        subject="Re: Request 1: laptop does not boot",
        body="Resolved: new SSD fitted.\n",
    )
    result = env.sync()
    assert (result.upserts.inserted, result.upserts.updated) == (0, 1)
    [task] = env.tasks().values()
    assert task.status == "done" and task.closed_at == T0 + timedelta(hours=6)
    assert task.extra["messages"] == 4


@pytest.mark.imap
def test_a_reply_to_a_thread_older_than_the_cursors_memory_is_found_by_search(env: Env) -> None:
    box = env.box
    old_root, _ = seed_thread(box, 1)
    reply_to(box, old_root, 1, at=T0 + timedelta(hours=1), body="Resolved, it was the charger.\n")
    assert env.sync(thread_memory=2).upserts.inserted == 1
    assert [m.root for m in env.cursor().threads] == ["req-1@client.example"]
    for n in (2, 3):  # two newer threads push the old one out of a 2-message memory
        newer, _ = seed_thread(box, n, at=T0 + timedelta(days=1))
        reply_to(box, newer, n, at=T0 + timedelta(days=1, hours=n))
        env.sync(thread_memory=2)
    assert "req-1@client.example" not in {m.root for m in env.cursor().threads}

    # The new reply names only the root (not the earlier "resolved" sibling), or nothing at all.
    reply_to(box, old_root, 9, at=T0 + timedelta(days=2), body="Thanks, works.\n")
    box.append(
        raw_mail(
            "Re: Request 1: laptop does not boot",
            msgid="<bare@client.example>",
            at=T0 + timedelta(days=2, hours=1),
            body="Me too.\n",
        )
    )
    result = env.sync(thread_memory=2)
    assert result.ok, result.error
    assert (result.upserts.inserted, result.upserts.updated) == (0, 1)
    task = env.tasks()["req-1@client.example"]
    assert task.status == "done"  # the forgotten "resolved" reply was fetched again
    assert task.extra["messages"] == 4 and task.last_activity_at == T0 + timedelta(days=2, hours=1)
    assert len(env.tasks()) == 3


@pytest.mark.imap
def test_uidvalidity_change_rescans_by_message_id_without_duplicates(pg_env: Env) -> None:
    env, box = pg_env, pg_env.box
    raws = [
        raw_mail(f"Request {n}", msgid=f"<req-{n}@client.example>", at=T0 + timedelta(minutes=n))
        for n in (1, 2, 3)
    ]
    reply = raw_mail(
        "Re: Request 1",
        msgid="<r@client.example>",
        in_reply_to="<req-1@client.example>",
        at=T0 + timedelta(hours=1),
        body="Resolved.\n",
    )
    for raw in [*raws, reply]:
        box.append(raw)
    assert env.sync().upserts.inserted == 3
    before = box.uidvalidity()
    box.recreate()  # a rebuilt mailbox: same mail (but request 3), new UIDs, new UIDVALIDITY
    for raw in [reply, raws[1], raws[0]]:
        box.append(raw)
    assert box.uidvalidity() != before
    result = env.sync()
    assert result.ok, result.error
    assert (result.upserts.inserted, result.upserts.cancelled) == (0, 1)
    tasks = env.tasks()
    assert len(tasks) == 3 and tasks["req-3@client.example"].status == "cancelled"
    assert tasks["req-1@client.example"].status == "done" and tasks["req-2@client.example"].status == "todo"
    assert env.cursor().folders[FOLDER].uidvalidity == box.uidvalidity()


@pytest.mark.imap
def test_flag_changes_arrive_through_condstore(env: Env) -> None:
    box = env.box
    _, uid = seed_thread(box, 1)
    seed_thread(box, 2)
    env.sync()
    env.sync()  # the first sync's own keyword changes are recognised and skipped
    box.set_flags(uid, ["\\Flagged", "billing"])
    result = env.sync()
    assert (result.upserts.inserted, result.upserts.updated) == (0, 1)
    task = env.tasks()["req-1@client.example"]
    assert task.priority == "high" and task.labels == ["billing"]
    assert env.tasks()["req-2@client.example"].priority == "none"
    assert env.sync().upserts.updated == 0


@pytest.mark.imap
def test_messages_are_never_marked_seen_and_captured_ones_get_the_keyword(env: Env) -> None:
    box = env.box
    root, uid = seed_thread(box, 1)
    seen = reply_to(box, root, 1, at=T0 + timedelta(hours=1))
    box.set_flags(seen, ["\\Seen"])
    bounce = box.append((CORPUS / "15-bounce-dsn.eml").read_bytes())
    assert env.sync().ok
    flags = box.flags()
    assert "\\Seen" not in flags[uid] and "\\Seen" not in flags[bounce]
    assert flags[uid] == {"$Tracked"} and flags[seen] == {"\\Seen", "$Tracked"}
    assert "$Tracked" not in flags[bounce]  # not captured: a bounce is no task
    assert env.sync(mark_keyword="").ok and box.flags() == flags


@pytest.mark.imap
def test_a_dry_run_sets_no_keyword_on_the_server(env: Env) -> None:
    """`sync --dry-run` writes nothing, locally or remotely: no STORE of mark_keyword either."""
    box = env.box
    root, _ = seed_thread(box, 1)
    reply_to(box, root, 1, at=T0 + timedelta(hours=1))
    before = box.flags()
    report = Pipeline(env.store, env.config(), TYPES, clock=env.clock).sync(dry_run=True)
    [result] = report.syncs
    assert result.ok and result.upserts.inserted == 1, result.error
    assert box.flags() == before and not any("$Tracked" in flags for flags in before.values())
    assert env.tasks() == {}
    assert env.sync().ok and all("$Tracked" in flags for flags in box.flags().values())


@pytest.mark.imap
@pytest.mark.parametrize("page_size", [100, 5])
def test_the_odd_mail_corpus_against_its_manifest(pg_env: Env, page_size: int) -> None:
    """Every corpus message in one folder; with 5 per page and no thread memory, every later page
    has to find its threads by searching the server, and must end in the same tasks."""
    env, box = pg_env, pg_env.box
    uids = {entry["file"]: box.append((CORPUS / entry["file"]).read_bytes()) for entry in MANIFEST}
    memory = {"thread_memory": 0} if page_size == 5 else {"thread_window": "3650d"}
    result = env.sync(page_size=page_size, **memory)
    assert result.ok, result.error
    tasks = env.tasks()
    roots = [e for e in MANIFEST if not e["thread_of"] and not e["auto"]]
    assert len(tasks) == len(roots) == result.upserts.inserted
    by_title = {t.title: t for t in tasks.values()}
    for entry in roots:
        task = (
            tasks.get(external_id(entry["message_id"]))
            if entry["message_id"]
            else by_title[entry["expected_title"]]
        )
        assert task is not None, entry["file"]
        assert task.title == entry["expected_title"], entry["file"]
        if entry["body_contains"]:
            assert entry["body_contains"] in task.body, entry["file"]
        assert "\ufffd" not in task.title + task.body, entry["file"]
        replies = [
            e for e in MANIFEST if e["thread_of"] == entry["file"] and e["message_id"] != entry["message_id"]
        ]
        assert task.extra["messages"] == 1 + sum(not e["auto"] for e in replies), entry["file"]
        assert task.extra["auto_messages"] == sum(e["auto"] for e in replies), entry["file"]
    assert tasks["owner.24@corp.example"].status == "done"  # 26: "Resolved:"
    assert tasks["html-only.11@corp.example"].status == "done"  # 25: "[done]"
    assert tasks["CAH7x9kP2b1w@mail.corp.example"].status == "todo"
    assert (
        "<" not in tasks["html-only.11@corp.example"].body
        and "trackPixel" not in tasks["html-only.11@corp.example"].body
    )
    with IMAPClient(box.account["host"], port=box.account["port"], ssl=False) as client:
        client.login(box.account["user"], box.account["password"])
        client.select_folder(FOLDER, readonly=True)
        received = client.fetch([uids["29-malformed-date.eml"]], ["INTERNALDATE"])[
            uids["29-malformed-date.eml"]
        ]
    assert tasks["bad-date.29@corp.example"].created_at == received[b"INTERNALDATE"].astimezone(UTC)
    again = env.sync(page_size=page_size, **memory)
    assert again.ok and again.upserts.updated == 0 and again.upserts.inserted == 0


@pytest.mark.imap
def test_full_sync_cancels_threads_whose_mail_was_expunged(env: Env) -> None:
    box = env.box
    _, first = seed_thread(box, 1)
    seed_thread(box, 2)
    env.sync()
    with box.client() as client:
        client.select_folder(FOLDER)
        client.delete_messages([first])
        client.expunge()
    assert env.sync().upserts.cancelled == 0  # an incremental sync cannot see what is gone
    full = env.sync(full=True)
    assert full.ok and full.upserts.cancelled == 1
    assert env.tasks()["req-1@client.example"].status == "cancelled"


@pytest.mark.imap
def test_attachments_are_never_downloaded(env: Env) -> None:
    """A 2 MB attachment next to a one-line text part: the bytes on the wire stay far below it."""
    raw = (CORPUS / "13-big-attachment.eml").read_bytes()
    assert len(raw) > 2_000_000
    env.box.append(raw)
    relay = Relay(env.account["host"], env.account["port"])
    try:
        for full in (False, True):  # the first sync and a --full re-read alike
            before = relay.received
            result = env.sync(full=full, port=relay.port)
            assert result.ok, result.error
            assert relay.received - before < 200_000
    finally:
        relay.close()
    [task] = env.tasks().values()
    assert "Signed contract attached" in task.body


@pytest.mark.imap
def test_an_unreadable_message_is_skipped_with_a_warning(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    seed_thread(env.box, 1)
    env.box.append(b"this is not an email at all\r\n")
    seed_thread(env.box, 2)
    with caplog.at_level(logging.WARNING, logger="trackloop.connector.mail"):
        result = env.sync()
    assert result.ok and result.upserts.inserted == 2
    assert any("UID 2 skipped: no header fields" in r.getMessage() for r in caplog.records)


@pytest.mark.imap
def test_auth_failure_is_one_clear_line_without_the_password(env: Env) -> None:
    seed_thread(env.box, 1)
    relays = [Relay(env.account["host"], env.account["port"]) for _ in range(2)]
    try:
        result = env.sync(password="wrong-password-123", port=relays[0].port)
        assert not result.ok
        assert result.error == (
            f"imap connector 'mail': 127.0.0.1 refused the login for {env.account['user']!r}; "
            "check username and password"
        )
        assert "wrong-password-123" not in result.error and result.requests.retries == 0
        assert result.requests.requests == relays[0].commands == 2  # CAPABILITY, LOGIN
        check = env.connector(password="wrong-password-123", port=relays[1].port).check()
        assert not check.ok and "refused the login" in check.detail
    finally:
        for relay in relays:
            relay.close()


@pytest.mark.imap
def test_check_reports_the_folder_and_smtp(env: Env, smtp_sink: SmtpSink) -> None:
    seed_thread(env.box, 1)
    smtp = {"host": smtp_sink.host, "port": smtp_sink.port, "starttls": False}
    result = env.connector(smtp=smtp).check()
    assert result.ok and result.detail == (
        f"127.0.0.1: logged in as {env.account['user']}; Tasks holds 1; "
        f"smtp 127.0.0.1:{smtp_sink.port} (plain)"
    )
    missing = env.connector(folders=["Nope"]).check()
    assert not missing.ok and "folder 'Nope' does not exist" in missing.detail


def test_plain_imap_off_loopback_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as probe:  # a closed port on a non-loopback name: the login fails at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = load({**BASE, "host": "localhost.invalid", "port": port, "ssl": False}).connectors["mail"]
    with caplog.at_level(logging.WARNING, logger="trackloop.connector.mail"):
        assert not ImapConnector("mail", config).check().ok
    assert "plain IMAP to localhost.invalid: password and mail go unencrypted" in caplog.text
    caplog.clear()
    loopback = load({**BASE, "host": "127.0.0.1", "port": port, "ssl": False}).connectors["mail"]
    with caplog.at_level(logging.WARNING, logger="trackloop.connector.mail"):
        assert not ImapConnector("mail", loopback).check().ok
    assert "unencrypted" not in caplog.text


# -- push -------------------------------------------------------------------------------------
def smtp_of(sink: SmtpSink) -> dict[str, Any]:
    return {"host": sink.host, "port": sink.port, "starttls": False}


@pytest.mark.imap
def test_a_reply_is_sent_once_across_a_crash(env: Env, smtp_sink: SmtpSink) -> None:
    box = env.box
    root, _ = seed_thread(box, 1)
    reply_to(box, root, 1, at=T0 + timedelta(hours=1), body="Any news?\n")
    env.sync()
    task = env.tasks()["req-1@client.example"]
    action = Action(
        key="nudge:req-1:1",
        kind="reply",
        text="We are on it; a new SSD arrives tomorrow.",
        task_external_id=task.external_id,
        task_extra=task.extra,
    )
    first = env.connector(smtp=smtp_of(smtp_sink)).push(action)
    expected_id = message_id_for("nudge:req-1:1", "example.com")
    assert first.remote_id == expected_id and not first.already_delivered
    [sent] = smtp_sink.messages
    assert sent["Message-ID"] == expected_id and sent["To"] == "priya@client.example"
    assert sent["Subject"] == "Re: Request 1: laptop does not boot"
    assert sent["In-Reply-To"] == "<reply-1@client.example>"
    assert sent["References"] == "<req-1@client.example> <reply-1@client.example>"
    assert sent["Auto-Submitted"] == "auto-generated" and sent.rcpt_tos == ("priya@client.example",)
    assert "new SSD" in sent.get_content()
    assert box.search("Sent", "HEADER", "Message-ID", expected_id)  # filed, marked \Seen
    # The process dies before the outbox records the delivery; a new one tries again.
    again = env.connector(smtp=smtp_of(smtp_sink)).push(action)
    assert again.already_delivered and again.remote_id == expected_id
    assert len(smtp_sink.messages) == 1
    # trackloop's own reply, once it shows up in the folder, is not activity of the client
    box.append(sent.as_bytes())
    result = env.sync()
    assert result.ok and env.tasks()["req-1@client.example"].last_activity_at == T0 + timedelta(hours=1)


@pytest.mark.imap
def test_the_sent_copy_survives_a_dropped_connection_and_a_failed_one_warns_of_a_resend(
    env: Env, smtp_sink: SmtpSink, caplog: pytest.LogCaptureFixture
) -> None:
    root, _ = seed_thread(env.box, 1)
    env.sync()
    extra = env.tasks()["req-1@client.example"].extra
    relay = Relay(env.account["host"], env.account["port"])
    try:
        connector = env.connector(smtp=smtp_of(smtp_sink), port=relay.port)
        relay.drop_appends = 1  # the connection breaks as the copy is filed: it is filed again
        action = Action(key="k5", kind="reply", text="Fixed?", task_external_id=root, task_extra=extra)
        assert not connector.push(action).already_delivered
        assert env.box.search("Sent", "HEADER", "Message-ID", message_id_for("k5", "example.com"))
        assert connector.push(action).already_delivered and len(smtp_sink.messages) == 1

        relay.drop_appends = 100  # filing fails for good: the mail went out, and the log says what that risks
        lost = replace(action, key="k6")
        with caplog.at_level(logging.WARNING, logger="trackloop.connector.mail"):
            assert not connector.push(lost).already_delivered
        assert "could not file it in Sent" in caplog.text and "a retry may send it again" in caplog.text
        assert not env.box.search("Sent", "HEADER", "Message-ID", message_id_for("k6", "example.com"))
        assert not connector.push(lost).already_delivered  # the window SMTP leaves open: sent twice
        assert len(smtp_sink.messages) == 3
    finally:
        connector.close()
        relay.close()


@pytest.mark.imap
def test_a_reply_found_in_the_thread_folder_is_not_sent_again(env: Env, smtp_sink: SmtpSink) -> None:
    root, _ = seed_thread(env.box, 1)
    env.sync()
    extra = env.tasks()["req-1@client.example"].extra
    action = Action(
        key="k2", kind="comment", text="Done?", task_external_id="req-1@client.example", task_extra=extra
    )
    env.box.append(
        raw_mail("Re: x", msgid=message_id_for("k2", "example.com"), at=T0, sender="support@example.com")
    )
    result = env.connector(smtp=smtp_of(smtp_sink), sent_folder="Sent Items").push(action)
    assert result.already_delivered and smtp_sink.messages == []


@pytest.mark.imap
def test_an_email_with_html_and_refusals(env: Env, smtp_sink: SmtpSink) -> None:
    connector = env.connector(smtp=smtp_of(smtp_sink))
    action = Action(
        key="digest:2026-11-02",
        kind="email",
        target="alice@example.com",
        subject="Weekly digest",
        text="3 tasks need an owner.",
        payload={"html": "<p>3 tasks need an <b>owner</b>.</p>"},
    )
    result = connector.push(action)
    [sent] = smtp_sink.messages
    assert result.remote_id == sent["Message-ID"] == message_id_for("digest:2026-11-02", "example.com")
    assert sent.get_content_type() == "multipart/alternative" and sent["Subject"] == "Weekly digest"
    assert sent.get_body(("html",)).get_content().strip() == "<p>3 tasks need an <b>owner</b>.</p>"  # type: ignore[union-attr]
    assert connector.push(action).already_delivered
    with pytest.raises(PushError) as info:
        connector.push(Action(key="k", kind="dm", text="hi", target="alice"))
    assert info.value.permanent
    with pytest.raises(PushError, match="needs a target address") as info:
        connector.push(Action(key="k", kind="email", text="hi"))
    assert info.value.permanent
    with pytest.raises(PushError, match="cannot compose the message") as info:
        connector.push(
            Action(
                key="k",
                kind="reply",
                text="hi",
                task_extra={"message_id": "<r@x>", "reply_to": "a@b.c\nBcc: z@x"},
            )
        )
    assert info.value.permanent
    with pytest.raises(PushError, match="no \\[smtp\\] configured") as info:
        env.connector().push(action)
    assert info.value.permanent


@pytest.mark.imap
def test_a_reply_without_the_tasks_extra_finds_its_thread(env: Env, smtp_sink: SmtpSink) -> None:
    seed_thread(env.box, 1, headers={"Reply-To": "helpdesk@client.example"})
    action = Action(key="k3", kind="reply", text="Update?", task_external_id="req-1@client.example")
    assert not env.connector(smtp=smtp_of(smtp_sink)).push(action).already_delivered
    [sent] = smtp_sink.messages
    assert sent["To"] == "helpdesk@client.example" and sent["In-Reply-To"] == "<req-1@client.example>"
    with pytest.raises(PushError, match="no thread to reply to") as info:
        env.connector(smtp=smtp_of(smtp_sink)).push(replace(action, key="k4", task_external_id="nope@x"))
    assert info.value.permanent


# -- the shared contract ----------------------------------------------------------------------
_SOURCES = itertools.count(10)


class Relay:
    """A TCP relay in front of Dovecot that counts IMAP commands and the bytes the server sends,
    and can drop a connection the moment a listing command (UID SEARCH / UID FETCH) or an APPEND
    arrives, as a flaky network would.

    Each relay talks to Dovecot from its own loopback address (127.0.0.N): Dovecot delays logins
    from an address that recently failed one, and that must not slow down the next test."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.source = f"127.0.0.{next(_SOURCES) % 250 + 2}"
        self.commands = 0
        self.received = 0  # bytes from the server to the client
        self.drop_listings = 0
        self.drop_appends = 0
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.server.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.upstream, source_address=(self.source, 0))

        def downstream() -> None:
            try:
                while data := upstream.recv(65536):
                    with self.lock:
                        self.received += len(data)
                    client.sendall(data)
            except OSError:
                pass
            finally:
                client.close()

        threading.Thread(target=downstream, daemon=True).start()
        buffer, literal = b"", 0
        try:
            while data := client.recv(65536):
                buffer += data
                out = b""
                while buffer:
                    if literal:
                        take = min(literal, len(buffer))
                        out, buffer, literal = out + buffer[:take], buffer[take:], literal - take
                        continue
                    line, sep, rest = buffer.partition(b"\r\n")
                    if not sep:
                        break
                    buffer = rest
                    with self.lock:
                        self.commands += 1
                        drop = bool(self.drop_listings > 0 and re.match(rb"^\S+ UID (SEARCH|FETCH)", line))
                        if drop:
                            self.drop_listings -= 1
                        elif self.drop_appends > 0 and re.match(rb"^\S+ APPEND", line):
                            drop, self.drop_appends = True, self.drop_appends - 1
                    if drop:
                        raise ConnectionResetError
                    size = re.search(rb"\{(\d+)\+?\}$", line)
                    literal = int(size.group(1)) if size else 0
                    if literal:
                        self.commands -= 1  # the command goes on after its literal
                    out += line + sep
                upstream.sendall(out)
        except OSError:
            pass
        finally:
            client.close()
            upstream.close()


class DovecotWorld:
    kind = "imap"
    connector_type = ImapConnector
    page_size = 4

    def __init__(self, account: dict[str, Any], sink: SmtpSink) -> None:
        self.box = Mailbox(account)
        self.account = account
        self.sink = sink
        self.relay = Relay(account["host"], account["port"])
        self.password = account["password"]
        self.seeded: list[str] = []
        self.now = datetime.now(UTC).replace(microsecond=0)

    def section(self) -> dict[str, Any]:
        return section(
            {**self.account, "port": self.relay.port, "password": self.password},
            page_size=self.page_size,
            smtp=smtp_of(self.sink),
        )

    def seed(self, n: int) -> None:
        for i in range(len(self.seeded), len(self.seeded) + n):
            msgid = f"<seed-{i}@client.example>"
            self.box.append(
                raw_mail(f"Seeded request {i}", msgid=msgid, at=self.now - timedelta(days=2, minutes=-i))
            )
            self.seeded.append(msgid)

    def modify(self, count: int) -> None:
        for i, msgid in enumerate(self.seeded[:count]):
            reply_to(self.box, msgid, 100 + i, at=self.now - timedelta(hours=1))

    def break_auth(self) -> None:
        self.password = "not-the-password"

    def inject_transient(self, times: int) -> None:
        self.relay.drop_listings += times

    def add_malformed(self) -> None:
        self.box.append(b"this is not an email at all\r\n")

    def request_count(self) -> int:
        return self.relay.commands

    def push_action(self, key: str) -> Action:
        return Action(key=key, kind="reply", text="Any update?", task_external_id=external_id(self.seeded[0]))

    def deliveries(self, key: str) -> int:
        return sum(m["Message-ID"] == message_id_for(key, "example.com") for m in self.sink.messages)

    def secret(self) -> str:
        return self.account["password"] if self.password == self.account["password"] else self.password


@pytest.mark.imap
class TestImapContract(ConnectorContract):
    @pytest.fixture
    def world(self, imap_account: dict[str, Any], smtp_sink: SmtpSink) -> Iterator[DovecotWorld]:
        world = DovecotWorld(imap_account, smtp_sink)
        yield world
        world.relay.close()


@pytest.mark.imap
def test_relay_counts_match_the_connectors_request_stats(env: Env, smtp_sink: SmtpSink) -> None:
    """stats.requests counts IMAP commands exactly (checked on the wire through the relay)."""
    world = DovecotWorld(env.account, smtp_sink)
    try:
        world.seed(3)
        world.modify(1)
        config = parse_config(
            {"store": {"url": env.store.url}, "connectors": {"mail": world.section()}},
            env={},
            connector_types=TYPES,
        )
        for _ in range(3):
            before = world.request_count()
            [result] = SyncEngine(env.store, config, TYPES, clock=env.clock).run()
            assert result.ok and result.requests.requests == world.request_count() - before
    finally:
        world.relay.close()


# -- against the stdlib stand-in (runs without Dovecot) ---------------------------------------
@pytest.fixture
def standin() -> Iterator[ImapStandin]:
    with ImapStandin(user="support@example.com", password="pw") as server:
        yield server


def standin_config(tmp_path: Path, server: ImapStandin, **overrides: Any) -> Any:
    account = {"host": server.host, "port": server.port, "user": server.user, "password": server.password}
    data = {
        "store": {"url": f"sqlite:///{tmp_path / 'mail.db'}"},
        "connectors": {"mail": section(account, **overrides)},
    }
    return parse_config(data, env={}, connector_types=TYPES)


def seed_standin(server: ImapStandin, count: int) -> None:
    for n in range(1, count + 1):
        server.append(
            FOLDER, raw_mail(f"Request {n}", msgid=f"<req-{n}@client.example>", at=T0 + timedelta(minutes=n))
        )


def external_ids(store: Store) -> list[str]:
    with store.transaction() as session:
        return sorted(session.scalars(select(Task.external_id)))


def test_a_crash_between_pages_resumes_from_the_committed_cursor(
    tmp_path: Path, standin: ImapStandin, clock: Clock
) -> None:
    seed_standin(standin, 5)
    config = standin_config(tmp_path, standin, page_size=2)
    store = Store(config.store.url)

    def crash(name: str, result: SyncResult) -> None:
        raise RuntimeError("killed after the first page")

    [failed] = SyncEngine(store, config, TYPES, clock=clock, on_page=crash).run()
    assert not failed.ok and failed.pages == 1
    assert external_ids(store) == ["req-1@client.example", "req-2@client.example"]  # page 1 was committed
    [resumed] = SyncEngine(store, config, TYPES, clock=clock).run()
    assert resumed.ok and resumed.upserts.inserted == 3 and resumed.upserts.updated == 0
    assert len(external_ids(store)) == 5
    store.close()


def test_a_bye_from_a_rebuilt_mailbox_is_retried_and_the_next_sync_rescans(
    tmp_path: Path, standin: ImapStandin, clock: Clock
) -> None:
    seed_standin(standin, 5)
    config = standin_config(tmp_path, standin, page_size=2)
    store = Store(config.store.url)
    old = standin.uidvalidity(FOLDER)

    def rebuild(name: str, result: SyncResult) -> None:
        if result.pages == 1:
            standin.rebuild(FOLDER)  # the selected client gets BYE on its next command

    [first] = SyncEngine(store, config, TYPES, clock=clock, on_page=rebuild).run()
    assert not first.ok and first.requests.retries == 1  # BYE -> reconnect -> the UIDVALIDITY moved
    assert first.error == "mail: UIDVALIDITY of 'Tasks' changed during the sync; the next sync re-reads it"
    [second] = SyncEngine(store, config, TYPES, clock=clock).run()
    assert second.ok and (second.upserts.inserted, second.upserts.cancelled) == (3, 0)
    assert len(external_ids(store)) == 5 and standin.uidvalidity(FOLDER) != old
    store.close()


def test_the_demo_source(tmp_path: Path) -> None:
    from contextlib import ExitStack

    from sync.demo import demo_config
    from sync.demo import imap as demo_imap

    today = date(2026, 11, 2)
    with ExitStack() as stack:
        name, section_ = demo_imap.source(stack, tmp_path, today)
        config = demo_config(tmp_path / "demo.db", {name: section_})
        store = Store(config.store.url)
        [result] = SyncEngine(store, config, TYPES).run()
        assert result.ok, result.error
        with store.transaction() as session:
            tasks = {
                t.external_id: (t.status, t.owner_id is not None, t.title)
                for t in session.scalars(select(Task))
            }
        store.close()
    assert tasks["vpn-berlin.1@client.example"][:2] == ("todo", True)  # Owner: carol in a reply
    assert tasks["cert-shop.1@client.example"][0] == "done"
    assert tasks["laptop.1@client.example"][:2] == ("todo", True)
    assert tasks["printer.1@example.com"][:2] == ("todo", False)
    assert len(tasks) == 4


def test_a_parent_arriving_after_its_reply_merges_the_two_tasks(
    tmp_path: Path, standin: ImapStandin, clock: Clock
) -> None:
    config = standin_config(tmp_path, standin)
    store = Store(config.store.url)
    standin.append(
        FOLDER,
        raw_mail(
            "Re: Access to the shared drive",
            msgid="<late-reply@client.example>",
            at=T0 + timedelta(hours=2),
            in_reply_to="<late-root@client.example>",
            body="Same problem here.\n",
        ),
    )
    [first] = SyncEngine(store, config, TYPES, clock=clock).run()
    assert first.ok and external_ids(store) == ["late-reply@client.example"]
    standin.append(
        FOLDER,
        raw_mail(
            "Access to the shared drive",
            msgid="<late-root@client.example>",
            at=T0,
            body="I cannot open the shared drive.\n",
        ),
    )  # delayed delivery
    [second] = SyncEngine(store, config, TYPES, clock=clock).run()
    assert second.ok and (second.upserts.inserted, second.upserts.updated) == (1, 1)
    with store.transaction() as session:
        tasks = {t.external_id: t for t in session.scalars(select(Task))}
        merged, root = tasks["late-reply@client.example"], tasks["late-root@client.example"]
        assert (merged.status, merged.raw_status, merged.extra["merged_into"]) == (
            "cancelled",
            "merged",
            "late-root@client.example",
        )
        assert (
            root.status == "todo"
            and root.extra["messages"] == 2
            and root.body == "I cannot open the shared drive."
        )
    store.close()


def test_own_modseq_ranges_leave_out_other_clients_changes() -> None:
    assert own_ranges({9}, set()) == ((9, 9),)  # Dovecot: one MODSEQ for the whole STORE
    assert own_ranges({5, 6, 7, 8}, {7}) == ((5, 6), (8, 8))  # 7 was also changed by someone else
    assert merge_ranges([(8, 9), (1, 3), (4, 4), (12, 12)]) == ((1, 4), (8, 9), (12, 12))


def test_many_pages_of_own_keyword_changes_cost_one_search_later(
    tmp_path: Path, standin: ImapStandin, clock: Clock
) -> None:
    """The stand-in gives every flagged message its own MODSEQ (Dovecot one per STORE): either way
    the ranges recorded in the cursor let the server leave all of them out."""
    seed_standin(standin, 7)
    config = standin_config(tmp_path, standin, page_size=2)
    store = Store(config.store.url)
    [cold] = SyncEngine(store, config, TYPES, clock=clock).run()
    assert cold.ok and cold.pages == 4 and cold.upserts.inserted == 7
    [after] = SyncEngine(store, config, TYPES, clock=clock).run()
    assert after.ok and after.upserts.updated == 0
    assert after.requests.requests == 6  # CAPABILITY, LOGIN, ENABLE, EXAMINE, SEARCH MODSEQ, LOGOUT
    [idle] = SyncEngine(store, config, TYPES, clock=clock).run()
    assert idle.ok and idle.pages == 0 and idle.requests.requests == 5
    standin.set_flags(FOLDER, 3, ["$Tracked", "\\Flagged"])
    [flagged] = SyncEngine(store, config, TYPES, clock=clock).run()
    assert flagged.ok and flagged.upserts.updated == 1
    store.close()
