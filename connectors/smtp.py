"""Sending mail over SMTP: replies of the `imap` connector now, email digests later.

One top-level `[smtp]` table configures it (a connector section may carry its own `smtp`
table instead). `SmtpSender.send()` delivers one `EmailMessage` and returns its Message-ID; a
caller that needs idempotency derives that Message-ID from its key with `message_id_for()`,
and looks for it (in a Sent folder, say) before sending again.

Errors are translated here, at one boundary: a refused login is an `AuthError`, a 4xx answer or
a dropped connection a `TransientError`, a 5xx refusal of the message or its recipients a
permanent `PushError`. Nothing is retried here: for writes the outbox is the only retry layer.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import smtplib
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid, parseaddr
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from connectors.errors import AuthError, ConnectorError, PushError, TransientError
from store.durations import Duration

log = logging.getLogger("trackloop.smtp")


class SmtpConfig(BaseModel):
    """How trackloop sends mail (`[smtp]`, shared by email replies and digests)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(description="SMTP server host name, e.g. smtp.example.com.")
    port: int | None = Field(
        None, ge=1, le=65535, description="Server port; default 465 with ssl, 587 with starttls, else 25."
    )
    starttls: bool = Field(
        True, description="Upgrade the connection with STARTTLS (port 587 style); off when only ssl is set."
    )
    ssl: bool = Field(False, description="Implicit TLS from the first byte (port 465 style).")
    ssl_verify: bool = Field(True, description="Verify the server's TLS certificate (off: tests only).")
    username: str | None = Field(None, description="Login name; no login when absent.")
    password: SecretStr | None = Field(None, description='Login password; use "${SMTP_PASSWORD}".')
    timeout: Duration = Field(timedelta(seconds=30), description="Connect and read timeout per message.")
    sender: str | None = Field(
        None, description="From address of mail sent without an imap connector (email digests); default: username."
    )

    @model_validator(mode="after")
    def _consistent(self) -> SmtpConfig:
        one_tls_mode(self, "choose one: ssl = true (implicit TLS, port 465) or starttls = true (port 587)")
        if self.password is not None and not self.username:
            raise ValueError("password is set but username is missing")
        return self

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        value = value.strip()
        if not value or any(c.isspace() or c in "/:@" for c in value):
            raise ValueError(f'expected a host name such as "smtp.example.com", got {value!r}')
        return value

    @property
    def from_address(self) -> str | None:
        """Who mail sent straight through `[smtp]` is from: `sender`, else a login that is an address."""
        return self.sender or (self.username if self.username and "@" in self.username else None)

    @property
    def effective_port(self) -> int:
        return self.port or (465 if self.ssl else 587 if self.starttls else 25)


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class TlsChoice(Protocol):
    ssl: bool
    starttls: bool
    model_fields_set: set[str]


def one_tls_mode(config: TlsChoice, conflict: str) -> None:
    """`ssl` and `starttls` exclude each other. The one a config sets turns the other's default off
    (`starttls = true` alone means no implicit TLS); both set true is the `conflict` error."""
    if not (config.ssl and config.starttls):
        return
    given = config.model_fields_set & {"ssl", "starttls"}
    if len(given) != 1:
        raise ValueError(conflict)
    defaulted = "starttls" if "ssl" in given else "ssl"
    object.__setattr__(config, defaulted, False)  # during validation, before the model is handed out


def tls_context(verify: bool) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def address_domain(address: str) -> str:
    """The domain of an address, for Message-IDs (RFC 5322 id-right)."""
    _, addr = parseaddr(address)
    return (addr.rpartition("@")[2] or "trackloop.invalid").lower()


def message_id_for(key: str, domain: str) -> str:
    """A Message-ID that is a function of an idempotency key: the same key, the same id."""
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]
    return f"<trackloop.{digest}@{domain}>"


def compose(
    sender: str, message_id: str, sent_at: datetime, *, to: str, subject: str, text: str, html: object = None
) -> EmailMessage:
    """A message from trackloop, marked `Auto-Submitted` (RFC 3834: no out-of-office answers to
    us); raises ValueError for an address or subject EmailMessage refuses (e.g. a line break)."""
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = sender, to, subject
    message["Date"], message["Message-ID"] = format_datetime(sent_at), message_id
    message["Auto-Submitted"] = "auto-generated"
    message.set_content(text)
    if html:
        message.add_alternative(str(html), subtype="html")
    return message


class SmtpSender:
    """Sends messages one connection each (digests and replies are rare; no pooling needed)."""

    def __init__(self, config: SmtpConfig, *, logger: logging.Logger | None = None) -> None:
        self.config = config
        self.log = logger or log
        self._warned_plain = False

    def send(self, message: EmailMessage) -> str:
        """Deliver `message` to its To/Cc/Bcc recipients; return its Message-ID (set when missing)."""
        if message["Message-ID"] is None:
            sender = message["From"] or ""
            message["Message-ID"] = make_msgid(domain=address_domain(str(sender)))
        if message["Date"] is None:
            message["Date"] = format_datetime(datetime.now(UTC))
        with self._translating(), self._connect() as smtp:
            refused = smtp.send_message(message)
        if refused:  # some recipients were refused, the others got it: not worth failing over
            self.log.warning("smtp: %s refused %s", self.config.host, ", ".join(sorted(refused)))
        return str(message["Message-ID"])

    def check(self) -> str:
        """Connect, greet, log in and quit: one cheap round for `trackloop doctor`."""
        with self._translating(), self._connect() as smtp:
            smtp.noop()
        how = "TLS" if self.config.ssl else "STARTTLS" if self.config.starttls else "plain"
        who = f", logged in as {self.config.username}" if self.config.username else ""
        return f"smtp {self.config.host}:{self.config.effective_port} ({how}{who})"

    # -- helpers ---------------------------------------------------------------------------
    @contextmanager
    def _connect(self) -> Iterator[smtplib.SMTP]:
        cfg = self.config
        timeout = cfg.timeout.total_seconds()
        if cfg.ssl:
            smtp: smtplib.SMTP = smtplib.SMTP_SSL(
                cfg.host, cfg.effective_port, timeout=timeout, context=tls_context(cfg.ssl_verify)
            )
        else:
            if not cfg.starttls and not is_loopback(cfg.host) and not self._warned_plain:
                self._warned_plain = True
                self.log.warning("smtp: plain connection to %s: mail and password go unencrypted", cfg.host)
            smtp = smtplib.SMTP(cfg.host, cfg.effective_port, timeout=timeout)
        try:
            if cfg.starttls:
                smtp.starttls(context=tls_context(cfg.ssl_verify))
            if cfg.username:
                smtp.login(cfg.username, cfg.password.get_secret_value() if cfg.password else "")
            yield smtp
        finally:
            try:
                smtp.quit()
            except (smtplib.SMTPException, OSError):
                smtp.close()

    @contextmanager
    def _translating(self) -> Iterator[None]:
        where = f"smtp {self.config.host}:{self.config.effective_port}"
        try:
            yield
        except smtplib.SMTPAuthenticationError as exc:
            user = self.config.username
            message = f"{where} refused the login for {user!r} ({exc.smtp_code}); check username/password"
            raise AuthError(message) from None
        except smtplib.SMTPNotSupportedError:
            raise ConnectorError(f"{where} does not offer STARTTLS; set ssl = true or fix the port") from None
        except smtplib.SMTPRecipientsRefused as exc:
            codes = [code for code, _ in exc.recipients.values()]
            detail = ", ".join(f"{addr} ({code})" for addr, (code, _) in sorted(exc.recipients.items()))
            if codes and all(400 <= code < 500 for code in codes):
                raise TransientError(f"{where} deferred every recipient: {detail}") from None
            raise PushError(f"{where} refused every recipient: {detail}", permanent=True) from None
        except smtplib.SMTPResponseException as exc:  # sender refused, data refused, connect refused...
            error = exc.smtp_error
            text = error.decode("utf-8", "replace") if isinstance(error, bytes) else str(error)
            if 400 <= exc.smtp_code < 500:
                raise TransientError(f"{where} answered {exc.smtp_code} {text}") from None
            raise PushError(f"{where} refused the message: {exc.smtp_code} {text}", permanent=True) from None
        except ssl.SSLCertVerificationError as exc:
            why = exc.verify_message
            message = f"{where}: TLS certificate not trusted ({why}); fix it or set ssl_verify = false"
            raise ConnectorError(message) from None
        except ssl.SSLError as exc:
            raise ConnectorError(f"{where}: TLS failed ({exc.reason}); check port and ssl/starttls") from None
        except (TimeoutError, smtplib.SMTPServerDisconnected, OSError) as exc:
            raise TransientError(f"{where}: {exc.__class__.__name__}: {exc}") from None
        except smtplib.SMTPException as exc:
            raise ConnectorError(f"{where}: {exc}") from None
