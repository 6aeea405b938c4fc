"""Push-back by email: an in-thread follow-up and a lead digest, through Dovecot and an SMTP sink."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import format_datetime
from typing import Any

import pytest
from imapclient import IMAPClient

from connectors.registry import connector_types
from store.db import Store
from sync.config import parse_config
from sync.pipeline import Pipeline
from tests.mailrig import append_message

NOW = datetime(2026, 11, 3, 10, 0, tzinfo=UTC)
pytestmark = pytest.mark.imap


def mail(subject: str, msgid: str, at: datetime) -> bytes:
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = "Priya Shah <priya@client.example>", "support@example.com", subject
    m["Date"], m["Message-ID"] = format_datetime(at), msgid
    m.set_content("The printer on floor 2 jams on every job.\n")
    return m.as_bytes(policy=SMTP_POLICY)


def make(store: Store, account: dict[str, Any], sink: Any, **extra: Any) -> Pipeline:
    data: dict[str, Any] = {
        "store": {"url": store.url},
        "people": {"alice": {"email": "alice@example.com", "lead": True}},
        "smtp": {"host": sink.host, "port": sink.port, "starttls": False},
        "connectors": {"mail": {
            "type": "imap", "host": account["host"], "port": account["port"], "ssl": False,
            "username": account["user"], "password": account["password"], "folders": ["Tasks"],
            "reply_from": "support@example.com", "retry": {"attempts": 2, "max_wait": "0s"},
        }},
        "rules": {"missing_context": {"enabled": False}, "stale_status": {"enabled": False}},
        **extra,
    }
    config = parse_config(data, env={}, connector_types=connector_types())
    return Pipeline(store, config, connector_types(), clock=lambda: NOW, worker="t")


def sent_folder(account: dict[str, Any]) -> list[bytes]:
    with IMAPClient(account["host"], port=account["port"], ssl=False, timeout=10) as client:
        client.login(account["user"], account["password"])
        if not client.folder_exists("Sent"):
            return []
        client.select_folder("Sent", readonly=True)
        uids = client.search("ALL")
        return [data[b"BODY[]"] for data in client.fetch(uids, ["BODY.PEEK[]"]).values()] if uids else []


def test_follow_up_is_an_in_thread_reply_sent_once_even_if_the_store_is_lost(
    imap_account: dict[str, Any], smtp_sink: Any, tmp_path: Any
) -> None:
    append_message(imap_account, "Tasks", mail("Printer on floor 2 is broken", "<p2@client.example>",
                                               NOW - timedelta(days=2)))
    notify = {"notify": {"comment_on_source": ["missing_owner"]}}
    first = Store(f"sqlite:///{tmp_path / 'a.db'}")
    pipeline = make(first, imap_account, smtp_sink, **notify)
    pipeline.sync()
    report = pipeline.deliver_outbox()
    assert report.sent == 1
    [reply] = smtp_sink.messages
    assert reply["In-Reply-To"] == "<p2@client.example>" and "<p2@client.example>" in reply["References"]
    assert reply["Subject"] == "Re: Printer on floor 2 is broken"
    assert "no owner" in reply.get_content()
    assert len(sent_folder(imap_account)) == 1

    lost = Store(f"sqlite:///{tmp_path / 'b.db'}")  # a rebuilt store plans the same key again
    again = make(lost, imap_account, smtp_sink, **notify)
    again.sync()
    assert again.deliver_outbox().already_delivered == 1
    assert len(smtp_sink.messages) == 1
    first.close()
    lost.close()


def test_email_digest_is_multipart_html_and_text(imap_account: dict[str, Any], smtp_sink: Any, tmp_path: Any) -> None:
    append_message(imap_account, "Tasks", mail("VPN drops every hour <script>", "<vpn@client.example>",
                                               NOW - timedelta(days=3)))
    store = Store(f"sqlite:///{tmp_path / 'd.db'}")
    pipeline = make(store, imap_account, smtp_sink,
                    digests={"leads": {"to": ["alice"], "via": ["email"], "schedule": "0 9 * * *"}})
    pipeline.sync()
    [run] = pipeline.send_due_digests()
    assert run.missed == []
    [digest] = [m for m in smtp_sink.messages if m["To"] == "alice@example.com"]
    assert digest["Subject"].startswith("trackloop digest “leads”")
    assert digest.get_content_type() == "multipart/alternative"
    text = digest.get_body(("plain",)).get_content()
    html = digest.get_body(("html",)).get_content()
    assert "Unowned: 1" in text.splitlines() and "VPN drops every hour <script>" in text
    assert "VPN drops every hour &lt;script&gt;" in html and "<script>" not in html
    assert pipeline.send_due_digests() == []  # once per slot
    assert len([m for m in smtp_sink.messages if m["To"] == "alice@example.com"]) == 1
    raw = sent_folder(imap_account)
    assert any(message_from_bytes(r)["To"] == "alice@example.com" for r in raw)
    store.close()
