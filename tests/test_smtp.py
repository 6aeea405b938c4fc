"""Sending mail (connectors/smtp.py) and the shared top-level `[smtp]` table of the config."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from email.message import EmailMessage
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from connectors.errors import AuthError, PushError, TransientError
from connectors.imap import ImapConfig, ImapConnector
from connectors.smtp import SmtpConfig, SmtpSender, message_id_for
from store.errors import ConfigError
from sync.config import parse_config
from tests.mailrig import SmtpSink, _free_port


def message(to: str = "alice@example.com") -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "trackloop@example.com", to, "Digest"
    msg.set_content("Three tasks need an owner.\n")
    return msg


def plain(sink: Any, **more: Any) -> SmtpConfig:
    return SmtpConfig(host=sink.host, port=sink.port, starttls=False, **more)


def test_send_returns_the_message_id_and_fills_date(smtp_sink: SmtpSink) -> None:
    msg = message()
    msg["Message-ID"] = message_id_for("digest:alice:2026-11-02", "example.com")
    assert SmtpSender(plain(smtp_sink)).send(msg) == msg["Message-ID"]
    [got] = smtp_sink.messages
    assert got["Message-ID"] == message_id_for("digest:alice:2026-11-02", "example.com")
    assert got["Date"] is not None and got.rcpt_tos == ("alice@example.com",)
    fresh = SmtpSender(plain(smtp_sink)).send(message())
    assert fresh.startswith("<") and fresh.endswith("@example.com>") and fresh != got["Message-ID"]


def test_message_ids_are_a_function_of_the_key() -> None:
    one = message_id_for("k", "example.com")
    assert one == message_id_for("k", "example.com") != message_id_for("k2", "example.com")
    assert one.startswith("<trackloop.") and one.endswith("@example.com>")


class _Refusing:
    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        return "550 5.1.1 no such user" if address.startswith("gone") else "450 4.2.1 try later"


class _Authenticator:
    def __call__(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        ok = isinstance(data, LoginPassword) and data.password == b"right"
        return AuthResult(success=ok, handled=False)  # handled=False: aiosmtpd answers 535 itself


@pytest.fixture
def strict_server() -> Iterator[Any]:
    port = _free_port()
    controller = Controller(
        _Refusing(), hostname="127.0.0.1", port=port, authenticator=_Authenticator(), auth_require_tls=False
    )
    controller.start()
    try:
        yield type("Server", (), {"host": "127.0.0.1", "port": port})
    finally:
        controller.stop()


def test_errors_are_translated_at_one_boundary(strict_server: Any) -> None:
    with pytest.raises(AuthError, match="refused the login for 'bot'") as auth:
        SmtpSender(plain(strict_server, username="bot", password="wrong")).send(message())
    assert "wrong" not in str(auth.value)
    sender = SmtpSender(plain(strict_server, username="bot", password="right"))
    with pytest.raises(PushError, match="refused every recipient: gone@example.com \\(550\\)") as refused:
        sender.send(message("gone@example.com"))
    assert refused.value.permanent
    with pytest.raises(TransientError, match="deferred every recipient"):
        sender.send(message("later@example.com"))
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with pytest.raises(TransientError, match="ConnectionRefusedError"):
        SmtpSender(SmtpConfig(host="127.0.0.1", port=port, starttls=False)).send(message())


def test_check_is_one_cheap_round(smtp_sink: SmtpSink) -> None:
    assert SmtpSender(plain(smtp_sink)).check() == f"smtp 127.0.0.1:{smtp_sink.port} (plain)"
    assert smtp_sink.messages == []


def test_config_rules() -> None:
    assert SmtpConfig(host="smtp.example.com").effective_port == 587
    assert SmtpConfig(host="smtp.example.com", ssl=True, starttls=False).effective_port == 465
    implicit = SmtpConfig(host="smtp.example.com", ssl=True)  # ssl alone turns the starttls default off
    assert (implicit.starttls, implicit.effective_port) == (False, 465)
    with pytest.raises(ValueError, match="choose one: ssl = true"):
        SmtpConfig(host="smtp.example.com", ssl=True, starttls=True)
    with pytest.raises(ValueError, match="password is set but username is missing"):
        SmtpConfig(host="smtp.example.com", password="x")
    assert all(f.description for f in SmtpConfig.model_fields.values())


# -- the shared [smtp] table ----------------------------------------------------------------------
IMAP = {"type": "imap", "host": "imap.example.com", "username": "support@example.com", "password": "pw"}


def load(data: dict[str, Any], env: dict[str, str] | None = None) -> Any:
    return parse_config(data, env=env or {}, connector_types={"imap": ImapConnector})


def test_connectors_inherit_the_top_level_smtp_table() -> None:
    config = load(
        {
            "smtp": {"host": "smtp.example.com", "username": "bot", "password": "${SMTP_PW}"},
            "connectors": {"mail": IMAP},
        },
        env={"SMTP_PW": "hunter2", "TRACKLOOP_SMTP__PORT": "2525"},
    )
    assert config.smtp is not None and config.smtp.effective_port == 2525
    mail = config.connectors["mail"]
    assert isinstance(mail, ImapConfig) and mail.smtp == config.smtp
    assert "hunter2" in config.secrets()
    own = load(
        {"smtp": {"host": "smtp.example.com"}, "connectors": {"mail": {**IMAP, "smtp": {"host": "mx.local"}}}}
    )
    assert own.connectors["mail"].smtp.host == "mx.local"  # a section's own table wins
    none = load({"connectors": {"mail": IMAP}})
    assert none.smtp is None and none.connectors["mail"].smtp is None


def test_ssl_alone_in_the_smtp_table_means_implicit_tls() -> None:
    config = load({"smtp": {"host": "smtp.example.com", "ssl": True}, "connectors": {"mail": IMAP}})
    assert config.smtp is not None and (config.smtp.ssl, config.smtp.starttls) == (True, False)
    assert config.connectors["mail"].smtp == config.smtp
    with pytest.raises(ConfigError) as info:
        load({"smtp": {"host": "smtp.example.com", "ssl": True, "starttls": True}, "connectors": {"mail": IMAP}})
    [problem] = info.value.problems
    assert problem.path == "smtp" and problem.message.startswith("choose one: ssl = true")


def test_a_bad_smtp_table_is_reported_where_it_is() -> None:
    with pytest.raises(ConfigError) as info:
        load({"smtp": {"host": "smtp.example.com", "prot": 25}, "connectors": {"mail": IMAP}})
    assert [(p.path, p.message) for p in info.value.problems] == [("smtp.prot", "unknown key")]
