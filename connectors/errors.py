"""Errors raised by connectors, translated from each client library at one boundary.

    ConnectorError          something went wrong talking to a source
    ├── TransientError      429, 5xx, timeouts, dropped connections: retried by the base
    │   └── RateLimited     the source's budget is spent until `reset_at`; stop and resume later
    ├── AuthError           bad or insufficient credentials: a configuration problem, never retried
    └── PayloadError        the source answered something we cannot read
    PushError               an action could not be delivered (carries whether a retry may help)

Messages never contain tokens or passwords: connectors build them from what they know, not
from request dumps.
"""

from __future__ import annotations

from datetime import datetime

from store.errors import TrackloopError


class ConnectorError(TrackloopError):
    """A failure talking to a source."""


class TransientError(ConnectorError):
    """Worth retrying; `retry_after` is the server's own hint in seconds, when it gave one."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimited(TransientError):
    """The rate-limit budget is exhausted until `reset_at`; the sync stops cleanly."""

    def __init__(self, message: str, *, reset_at: datetime | None = None, retry_after: float | None = None):
        super().__init__(message, retry_after=retry_after)
        self.reset_at = reset_at


class AuthError(ConnectorError):
    """Credentials were refused; the admin has to fix the config."""


class PayloadError(ConnectorError):
    """The source's answer could not be understood."""


class PushError(TrackloopError):
    """An action could not be delivered; `permanent` means retrying cannot help."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent
