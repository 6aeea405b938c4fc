"""pytest plugin: a real Dovecot IMAP server and an in-process SMTP sink for mail tests.

Loaded from tests/conftest.py (`pytest_plugins = ["tests.mailrig"]`). Dovecot is started once per
session by tests/imap_rig/start.sh with USER '*', so every test gets its own empty mailbox just by
logging in under a new user name. Without root or apt the IMAP tests are skipped, except on CI
(`CI` set), where a missing server must fail loudly instead of silently testing nothing.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any, NoReturn

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from imapclient import IMAPClient

RIG = Path(__file__).parent / "imap_rig"
HOST = "127.0.0.1"
PASSWORD = "pw"  # with USER '*' any user name logs in with this password
START_TIMEOUT = 300  # the first run installs dovecot-imapd with apt (about 10 s on a warm mirror)

_account_numbers = itertools.count(1)


def _unavailable(reason: str) -> NoReturn:
    """Skip locally, fail on CI: there the IMAP tests are the point of the run."""
    if os.environ.get("CI"):
        pytest.fail(
            f"Dovecot IMAP rig did not start (CI is set, so this is an error): {reason}", pytrace=False
        )
    pytest.skip(f"Dovecot IMAP rig unavailable: {reason}")


@pytest.fixture(scope="session")
def imap_server() -> Iterator[dict[str, Any]]:
    """One Dovecot for the whole session (stopping one takes over a second): dict(host, port, password)."""
    # Not tmp_path nor $TMPDIR: Dovecot's mail processes run as `nobody` and must reach the
    # directory (/tmp/pytest-of-root is 0700), and its socket paths must stay short.
    rig_dir = tempfile.mkdtemp(prefix="imaprig.", dir="/tmp")
    try:
        try:
            proc = subprocess.run(
                ["bash", str(RIG / "start.sh"), rig_dir, str(_free_port()), "*", PASSWORD],
                capture_output=True,
                text=True,
                timeout=START_TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            _unavailable(f"start.sh took longer than {START_TIMEOUT} s")
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines()
            _unavailable(lines[-1] if lines else f"start.sh exited with {proc.returncode}")
        yield {"host": HOST, "port": int(proc.stdout), "password": PASSWORD}
    finally:
        subprocess.run(["bash", str(RIG / "stop.sh"), rig_dir], check=False)  # also after a half start
        shutil.rmtree(rig_dir, ignore_errors=True)


@pytest.fixture
def imap_account(imap_server: dict[str, Any], request: pytest.FixtureRequest) -> dict[str, Any]:
    """A fresh, empty mailbox: dict(host, port, user, password) with a user name unique to this test."""
    # Dovecot lower-cases user names and uses them as directory names: keep [a-z0-9-] and a counter.
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40]
    return {**imap_server, "user": f"{slug}-{next(_account_numbers)}"}


def append_message(
    account: dict[str, Any], folder: str, raw_bytes: bytes, flags: Iterable[str | bytes] = ()
) -> int:
    """Append one raw message (creating `folder` if missing) and return its UID (from APPENDUID)."""
    with IMAPClient(account["host"], port=account["port"], ssl=False, timeout=10) as client:
        client.login(account["user"], account["password"])
        if not client.folder_exists(folder):
            client.create_folder(folder)
        response = client.append(folder, raw_bytes, flags=tuple(flags))
    match = re.search(rb"\[APPENDUID \d+ (\d+)\]", response)
    assert match, f"server sent no APPENDUID: {response!r}"
    return int(match.group(1))


class SinkMessage(EmailMessage):
    """A message the SMTP sink received: the parsed email plus its SMTP envelope.

    It is parsed from the bytes as sent on the wire, so text parts keep CRLF line endings."""

    mail_from: str = ""
    rcpt_tos: tuple[str, ...] = ()


class SmtpSink:
    """aiosmtpd handler that keeps every message; `.host`/`.port` say where to send."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.messages: list[SinkMessage] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.content, bytes)  # Controller's default decode_data=False
        message = message_from_bytes(envelope.content, _class=SinkMessage, policy=policy.default)
        assert isinstance(message, SinkMessage)
        message.mail_from = envelope.mail_from or ""
        message.rcpt_tos = tuple(envelope.rcpt_tos)
        self.messages.append(message)
        return "250 OK"


def _free_port() -> int:
    """A free loopback port, for servers that cannot be told to take port 0 (aiosmtpd 1.4.6's
    Controller.start() then fails; start.sh would need python3 on PATH to pick one)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    """An SMTP server on loopback, in this process, collecting messages in `.messages`."""
    sink = SmtpSink(HOST, _free_port())
    controller = Controller(sink, hostname=sink.host, port=sink.port)
    controller.start()
    try:
        yield sink
    finally:
        controller.stop()
