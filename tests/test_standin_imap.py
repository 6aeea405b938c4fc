"""The IMAP stand-in must answer an imapclient-based connector the way Dovecot does.

One scenario (what an incremental email connector does: login, ENABLE CONDSTORE, APPEND, EXAMINE,
UID SEARCH n:*, FETCH BODYSTRUCTURE + body sections + FLAGS + MODSEQ, STORE, CHANGEDSINCE,
searches by MODSEQ, HEADER Message-ID and KEYWORD) runs against the stand-in and against a real
Dovecot (tests/mailrig.py; skipped without one unless CI is set), and what a connector would read
from each must agree. Absolute MODSEQ values differ between servers (Dovecot also counts internal
changes), so only their order and the CHANGEDSINCE/MODSEQ results are compared.
"""

from __future__ import annotations

import json
import smtplib
import socket
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError
from imapclient.response_types import BodyData

from sync.standins.imap import ImapStandin
from tests.mailrig import SmtpSink, append_message

CORPUS = Path(__file__).parent / "corpus" / "mail"
MANIFEST = json.loads((CORPUS / "manifest.json").read_text(encoding="utf-8"))
FOLDER = "Tasks"
RECEIVED = datetime(2024, 9, 18, 9, 30, 0, tzinfo=timezone(timedelta(hours=2)))
ROOT_ID = next(m["message_id"] for m in MANIFEST if m["file"].startswith("01-"))

Observation = dict[str, Any]


def _pairs(params: Any) -> dict[str, str]:
    """BODYSTRUCTURE parameter list (k1 v1 k2 v2 ...) as a dict with lower-case keys."""
    if not params:
        return {}
    return {params[i].decode().lower(): params[i + 1].decode() for i in range(0, len(params), 2)}


def _parts(body: BodyData, number: str) -> list[tuple[Any, ...]]:
    """What a connector reads from BODYSTRUCTURE, one row per part, in section numbering."""
    if body.is_multipart:
        rows = []
        for index, child in enumerate(body[0], 1):
            rows += _parts(child, f"{number}.{index}" if number else str(index))
        return rows
    number = number or "1"
    mime = f"{body[0].decode()}/{body[1].decode()}".lower()
    charset = _pairs(body[2]).get("charset")
    if mime == "message/rfc822":
        lines, disposition = body[9], body[11]
    elif body[0].lower() == b"text":
        lines, disposition = body[7], body[9]
    else:
        lines, disposition = None, body[8]
    filename = _pairs(disposition[1]).get("filename") if disposition else None
    kind = disposition[0].decode().lower() if disposition else None
    row = (number, mime, charset and charset.lower(), body[6], lines, kind, filename)
    if mime != "message/rfc822":
        return [row]
    inner = BodyData.create(body[8])  # imapclient leaves an encapsulated message's body unwrapped
    return [row, *_parts(inner, number if inner.is_multipart else f"{number}.1")]


def _flags(flags: tuple[bytes, ...]) -> list[bytes]:
    return sorted(f for f in flags if f != b"\\Recent")  # Dovecot adds \Recent; connectors ignore it


def run_scenario(host: str, port: int, user: str, password: str) -> Observation:
    """Drive one server the way the email connector does and record what it would read."""
    seen: Observation = {}
    client = IMAPClient(host, port=port, ssl=False, timeout=10)
    client.login(user, password)
    seen["capabilities"] = sorted(
        {b"CONDSTORE", b"ENABLE", b"UIDPLUS", b"UNSELECT", b"LITERAL+"} & set(client.capabilities())
    )
    seen["enabled"] = client.enable("CONDSTORE")
    if not client.folder_exists(FOLDER):
        client.create_folder(FOLDER)
    seen["folder_listed"] = client.folder_exists(FOLDER)

    files = [m["file"] for m in MANIFEST]
    appended = []
    for index, name in enumerate(files):
        flags = [b"\\Seen"] if index % 3 == 0 else []
        appended.append(client.append(FOLDER, (CORPUS / name).read_bytes(), flags=flags, msg_time=RECEIVED))
    uidvalidity = int(appended[0].split()[1])
    seen["append_uids"] = [int(response.split()[2].rstrip(b"]")) for response in appended]

    info = client.select_folder(FOLDER, readonly=True)
    seen["examine"] = {
        "exists": info[b"EXISTS"],
        "uidnext": info[b"UIDNEXT"],
        "uidvalidity_is_appenduid": info[b"UIDVALIDITY"] == uidvalidity,
        "read_only": b"READ-ONLY" in info,
        "permanentflags": info[b"PERMANENTFLAGS"],
        "has_highestmodseq": b"HIGHESTMODSEQ" in info,
    }
    uids = client.search(["UID", "1:*"])
    seen["search_from_5"] = client.search(["UID", "5:*"])
    # "n:*" always includes the highest UID, even past the end: a connector must filter it out.
    seen["search_past_end"] = client.search(["UID", f"{max(uids) + 10}:*"])

    fetched = client.fetch(
        uids, ["BODYSTRUCTURE", "BODY.PEEK[1]", "FLAGS", "MODSEQ", "RFC822.SIZE", "INTERNALDATE"]
    )
    seen["messages"] = {
        uid: {
            "file": files[uid - 1],
            "parts": _parts(data[b"BODYSTRUCTURE"], ""),
            "body_1": data[b"BODY[1]"],
            "flags": _flags(data[b"FLAGS"]),
            "size": data[b"RFC822.SIZE"],
            "internaldate": data[b"INTERNALDATE"],
        }
        for uid, data in fetched.items()
    }
    modseqs = [fetched[uid][b"MODSEQ"][0] for uid in uids]
    seen["modseq_rises_with_uid"] = modseqs == sorted(set(modseqs))

    sections: dict[int, dict[bytes, bytes]] = {}
    for uid in uids:
        numbers = [row[0] for row in seen["messages"][uid]["parts"]]
        wanted = [f"BODY.PEEK[{n}]" for n in numbers] + [f"BODY.PEEK[{n}.MIME]" for n in numbers if "." in n]
        wanted += ["BODY.PEEK[HEADER]", "BODY.PEEK[TEXT]", "BODY.PEEK[HEADER.FIELDS (Message-ID Subject)]"]
        data = client.fetch([uid], wanted)[uid]
        sections[uid] = {key: value for key, value in data.items() if key.startswith(b"BODY[")}
        assert (CORPUS / files[uid - 1]).read_bytes() == data[b"BODY[HEADER]"] + data[b"BODY[TEXT]"]
    seen["sections"] = sections
    seen["envelopes"] = {uid: data[b"ENVELOPE"] for uid, data in client.fetch(uids, ["ENVELOPE"]).items()}

    try:  # Dovecot answers OK and ignores it, the stand-in refuses: either way nothing changes
        client.add_flags([uids[1]], [b"\\Flagged"])
    except IMAPClientError:
        pass
    seen["flags_after_store_on_examine"] = _flags(client.get_flags([uids[1]])[uids[1]])

    info = client.select_folder(FOLDER)
    seen["select"] = {
        "read_write": info.get(b"READ-WRITE"),
        "may_create_keywords": b"\\*" in info[b"PERMANENTFLAGS"],
    }
    highest = info[b"HIGHESTMODSEQ"]
    tracked = [uids[2], uids[5]]
    stored = client.add_flags(tracked, [b"$Tracked"])
    seen["store_reply"] = {uid: _flags(flags) for uid, flags in stored.items()}
    changed = client.fetch(uids, ["FLAGS"], modifiers=[f"CHANGEDSINCE {highest}"])
    seen["changedsince"] = sorted(changed)
    seen["changedsince_modseqs_above"] = all(data[b"MODSEQ"][0] > highest for data in changed.values())
    seen["search_modseq"] = client.search(["MODSEQ", highest + 1])
    seen["search_keyword"] = client.search(["KEYWORD", "$Tracked"])
    seen["search_not_keyword"] = client.search(["NOT", "KEYWORD", "$Tracked"])
    seen["search_message_id"] = client.search(["HEADER", "Message-ID", ROOT_ID])  # 01 and its duplicate 03
    seen["search_unseen"] = client.search(["UNSEEN"])
    seen["search_encoded_subject"] = client.search(["SUBJECT", "Müller"], charset="utf-8")
    seen["search_8bit_subject"] = client.search(["HEADER", "Subject", "Kästchen"], charset="utf-8")

    unseen = seen["search_unseen"][0]
    client.fetch([unseen], ["BODY[TEXT]"])  # no PEEK: marks \Seen
    seen["seen_after_body_fetch"] = b"\\Seen" in client.get_flags([unseen])[unseen]
    client.create_folder(f"{FOLDER}.Done")  # '.' is Dovecot's (Maildir++) hierarchy delimiter
    client.copy(tracked, f"{FOLDER}.Done")  # imapclient drops the COPYUID code: see the wire test
    client.delete_messages([uids[0]])
    client.uid_expunge([uids[0]])
    seen["after_uid_expunge"] = client.search(["ALL"])
    status = client.folder_status(FOLDER, [b"MESSAGES", b"UIDNEXT", b"UIDVALIDITY"])
    seen["status"] = {key: value for key, value in status.items() if key != b"UIDVALIDITY"}
    seen["status_uidvalidity_stable"] = status[b"UIDVALIDITY"] == uidvalidity
    client.select_folder(f"{FOLDER}.Done", readonly=True)
    seen["copied"] = {
        uid: _flags(d[b"FLAGS"]) for uid, d in client.fetch(client.search("ALL"), ["FLAGS"]).items()
    }
    client.unselect_folder()
    client.logout()
    return seen


@pytest.fixture(scope="module")
def standin() -> Iterator[ImapStandin]:
    with ImapStandin(user="trackloop", password='p"w d\\') as server:
        yield server


@pytest.fixture(scope="module")
def standin_seen(standin: ImapStandin) -> Observation:
    return run_scenario(standin.host, standin.port, standin.user, standin.password)


def test_standin_scenario(standin_seen: Observation) -> None:
    """The stand-in alone (this runs without Dovecot): the facts the connector relies on."""
    count = len(MANIFEST)
    assert standin_seen["capabilities"] == [b"CONDSTORE", b"ENABLE", b"LITERAL+", b"UIDPLUS", b"UNSELECT"]
    assert standin_seen["append_uids"] == list(range(1, count + 1))
    assert standin_seen["examine"]["read_only"] and standin_seen["examine"]["permanentflags"] == ()
    assert standin_seen["search_past_end"] == [count]
    by_file = {m["file"]: m for m in standin_seen["messages"].values()}
    assert by_file["31-nested-rfc822.eml"]["parts"] == [
        ("1", "text/plain", "utf-8", 73, 0, None, None),
        ("2", "message/rfc822", None, 466, 17, "attachment", "VPN drops every hour.eml"),
        ("2.1", "text/plain", "utf-8", 45, 0, None, None),
        ("2.2", "text/html", "utf-8", 52, 0, None, None),
    ]
    assert by_file["13-big-attachment.eml"]["body_1"].startswith(b"Signed contract attached")
    assert standin_seen["changedsince"] == standin_seen["search_keyword"] == [3, 6]
    assert standin_seen["search_message_id"] == [1, 3]
    assert standin_seen["seen_after_body_fetch"]


@pytest.mark.imap
def test_standin_agrees_with_dovecot(imap_account: dict[str, Any], standin_seen: Observation) -> None:
    dovecot_seen = run_scenario(
        imap_account["host"], imap_account["port"], imap_account["user"], imap_account["password"]
    )
    # The stand-in advertises a subset of Dovecot's capabilities, and PERMANENTFLAGS after EXAMINE
    # may name keywords on Dovecot: compare everything else key by key for readable diffs.
    for key in dovecot_seen.keys() - {"capabilities"}:
        assert standin_seen[key] == dovecot_seen[key], key
    assert set(standin_seen["capabilities"]) <= set(dovecot_seen["capabilities"])


def test_other_clients_changes_reach_a_selected_client(standin: ImapStandin) -> None:
    """set_flags / append / expunge / rebuild stand in for other clients and server-side events."""
    standin.create_folder("Sync")
    first = standin.append("Sync", (CORPUS / "01-plain-task.eml").read_bytes())
    client = IMAPClient(standin.host, port=standin.port, ssl=False, timeout=5)
    client.login(standin.user, standin.password)
    highest = client.select_folder("Sync")[b"HIGHESTMODSEQ"]

    modseq = standin.set_flags("Sync", first, ["\\Seen", "$Tracked"])
    assert modseq > highest
    changed = client.fetch([first], ["FLAGS"], modifiers=[f"CHANGEDSINCE {highest}"])
    assert changed[first][b"FLAGS"] == (b"\\Seen", b"$Tracked")
    assert standin.flags("Sync", first) == ("\\Seen", "$Tracked")

    second = standin.append("Sync", (CORPUS / "02-no-message-id.eml").read_bytes())
    standin.expunge("Sync", first)
    assert client.noop()[1] == [(1, b"EXPUNGE"), (1, b"EXISTS")]
    assert client.search(["ALL"]) == [second]

    old = standin.uidvalidity("Sync")
    assert standin.rebuild("Sync") != old
    with pytest.raises((IMAPClientError, OSError)):  # BYE: the client must reconnect and resync
        client.noop()
    client.shutdown()
    client = IMAPClient(standin.host, port=standin.port, ssl=False, timeout=5)
    client.login(standin.user, standin.password)
    assert client.select_folder("Sync", readonly=True)[b"UIDVALIDITY"] == standin.uidvalidity("Sync")
    assert client.search(["ALL"]) == [1]
    client.logout()


def test_wire_syntax_quoting_and_literals(standin: ImapStandin) -> None:
    """Quoted strings with escapes, synchronizing literals and BAD/NO replies, on a raw socket."""
    with socket.create_connection((standin.host, standin.port), timeout=5) as sock:
        reader = sock.makefile("rb")

        def command(line: bytes, literal: bytes | None = None) -> list[bytes]:
            sock.sendall(line + (b"{%d}\r\n" % len(literal) if literal is not None else b"\r\n"))
            if literal is not None:
                assert reader.readline().startswith(b"+ ")
                sock.sendall(literal + b"\r\n")
            replies = [reader.readline()]
            while not replies[-1].startswith(line.split(b" ", 1)[0] + b" "):
                replies.append(reader.readline())
            return replies

        assert reader.readline().startswith(b"* OK")
        assert command(b'a1 LOGIN trackloop "p\\"w d\\\\"')[-1].startswith(b"a1 OK")
        assert command(b'a2 CREATE "Quote \\"me\\""')[-1].startswith(b"a2 OK")
        assert b'* LIST (\\HasNoChildren) "." "Quote \\"me\\""\r\n' in command(b'a3 LIST "" "Quote*"')
        assert command(b'a4 APPEND "Quote \\"me\\"" (\\Seen) ', b"Subject: hi\r\n\r\nbody\r\n")[
            -1
        ].startswith(b"a4 OK [APPENDUID ")
        assert command(b"a5 FETCH 1 (FLAGS)")[-1].startswith(b"a5 BAD")  # nothing selected
        assert command(b"a6 SELECT Nope")[-1].startswith(b"a6 NO")
        assert command(b'a7 EXAMINE "Quote \\"me\\""')[-1].startswith(b"a7 OK [READ-ONLY]")
        reply = command(b"a8 UID FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert reply[0] == b"* 1 FETCH (UID 1 BODY[HEADER.FIELDS (SUBJECT)] {15}\r\n"
        assert command(b'a9 UID COPY 1 "Quote \\"me\\""')[-1].startswith(b"a9 OK [COPYUID ")
        assert command(b"a10 UID STORE 1:* +FLAGS.SILENT (\\Deleted)")[-1].startswith(b"a10 NO [READ-ONLY]")
        assert command(b"a11 FROB")[-1].startswith(b"a11 BAD")
        assert command(b"a12 LOGOUT")[0].startswith(b"* BYE")


def test_mailrig_helpers(standin: ImapStandin, smtp_sink: SmtpSink) -> None:
    """tests/mailrig.py's append_message (pointed at the stand-in here) and its SMTP sink."""
    account = {"host": standin.host, "port": standin.port, "user": standin.user, "password": standin.password}
    uid = append_message(
        account, "Helpers.Done", (CORPUS / "24-owner-line.eml").read_bytes(), flags=["\\Seen"]
    )
    assert standin.flags("Helpers.Done", uid) == ("\\Seen",)

    reply = EmailMessage()
    reply["From"], reply["To"], reply["Subject"] = (
        "trackloop@corp.example",
        "Zoë <zoe@corp.example>",
        "Re: Grüße",
    )
    reply["In-Reply-To"] = ROOT_ID
    reply.set_content("Done.\n")
    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=5) as smtp:
        smtp.send_message(reply, to_addrs=["zoe@corp.example"])
    [got] = smtp_sink.messages
    assert (got.mail_from, got.rcpt_tos) == ("trackloop@corp.example", ("zoe@corp.example",))
    assert got["Subject"] == "Re: Grüße" and got["In-Reply-To"] == ROOT_ID
    assert got.get_content() == "Done.\r\n"  # parsed from the wire bytes: CRLF line endings stay
