"""The demo's email source: client requests in a support mailbox, read by the real `imap` connector.

The demo runs offline without root, so the mailbox is the stdlib IMAP stand-in
(sync/standins/imap.py), not Dovecot. Seeded: a thread with replies (and an out-of-office that
does not count as activity), a request closed by a "[done]" reply, one with an `Owner:` line,
and an internal one nobody has picked up.
"""

from __future__ import annotations

from contextlib import ExitStack
from datetime import UTC, date, datetime, time, timedelta
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime
from pathlib import Path
from typing import Any

from sync.standins.imap import ImapStandin

USER, PASSWORD, FOLDER = "support@example.com", "demo", "Support"


def _mail(
    subject: str,
    sender: str,
    when: datetime,
    msgid: str,
    body: str,
    *,
    parent: str | None = None,
    thread: tuple[str, ...] = (),
    headers: dict[str, str] | None = None,
) -> bytes:
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = sender, USER, subject
    message["Date"] = format_datetime(when)
    message["Message-ID"] = msgid
    if parent:
        message["In-Reply-To"] = parent
        message["References"] = " ".join(thread or (parent,))
    for name, value in (headers or {}).items():
        message[name] = value
    message.set_content(body)
    return message.as_bytes(policy=SMTP)


def messages(today: date) -> list[bytes]:
    def day(offset: int, hour: int = 9) -> datetime:
        return datetime.combine(today + timedelta(days=offset), time(hour), tzinfo=UTC)

    vpn = "<vpn-berlin.1@client.example>"
    cert = "<cert-shop.1@client.example>"
    return [
        _mail(
            "VPN drops every hour for the Berlin office",
            "Priya Shah <priya@client.example>",
            day(-3),
            vpn,
            "Hi,\n\nsince Monday the VPN drops every hour on the hour for everyone in Berlin.\n\nPriya\n",
        ),
        _mail(
            "Automatic reply: VPN drops every hour for the Berlin office",
            "Frank Ops <frank@example.com>",
            day(-3, 10),
            "<ooo.1@example.com>",
            "I am out of the office until Friday.\n",
            parent=vpn,
            headers={"Auto-Submitted": "auto-replied"},
        ),
        _mail(
            "Re: VPN drops every hour for the Berlin office",
            "Carol Diaz <carol@example.com>",
            day(-2),
            "<vpn-berlin.2@example.com>",
            "Owner: carol\n\nLooking into it; the tunnel lifetime looks wrong.\n"
            "\nOn Mon, Priya Shah wrote:\n> since Monday the VPN drops every hour\n",
            parent=vpn,
        ),
        _mail(
            "Re: VPN drops every hour for the Berlin office",
            "Priya Shah <priya@client.example>",
            day(-1),
            "<vpn-berlin.3@client.example>",
            "Still happening this morning at 09:00 and 10:00.\n",
            parent="<vpn-berlin.2@example.com>",
            thread=(vpn, "<vpn-berlin.2@example.com>"),
        ),
        _mail(
            "Please renew the TLS certificate for shop.client.example",
            "Tom Berg <tom@client.example>",
            day(-6),
            cert,
            "Our shop certificate expires next week, could you renew it?\n",
        ),
        _mail(
            "Re: [done] Please renew the TLS certificate for shop.client.example",
            "Bob Otieno <bob@example.com>",
            day(-1, 15),
            "<cert-shop.2@example.com>",
            "Renewed, valid for another year.\n",
            parent=cert,
        ),
        _mail(
            "Laptop for our new hire starting Monday",
            "Lena Vogel <lena@client.example>",
            day(-1, 11),
            "<laptop.1@client.example>",
            "Owner: dan\nDue: "
            + (today + timedelta(days=4)).isoformat()
            + "\n\nPlease prepare a laptop with the standard image for Jonas.\n",
        ),
        _mail(
            "Printer in meeting room 2 shows a paper jam",
            "Alice Kim <alice@example.com>",
            day(-8),
            "<printer.1@example.com>",
            "The printer in meeting room 2 has been jammed since this morning.\n",
        ),
    ]


def source(stack: ExitStack, folder: Path, today: date) -> tuple[str, dict[str, Any]]:
    """Start the IMAP stand-in on `stack`, deliver the mail, and point an `imap` connector at it."""
    del folder  # the mailbox lives in the stand-in's memory
    standin = stack.enter_context(ImapStandin(user=USER, password=PASSWORD))
    for raw in messages(today):
        standin.append(FOLDER, raw)
    return "mail", {
        "type": "imap",
        "host": standin.host,
        "port": standin.port,
        "ssl": False,  # a loopback stand-in: plain IMAP, and no warning about it
        "username": USER,
        "password": PASSWORD,
        "folders": [FOLDER],
        "reply_from": USER,
    }
