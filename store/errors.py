"""The root of trackloop's error tree, on the ground floor so every room can subclass it.

    TrackloopError
    ├── ConfigError        a configuration problem; carries one (file, key path, message) per fault
    ├── StoreError         the database could not be opened, migrated or written
    ├── ConnectorError     (connectors/errors.py) TransientError, AuthError, PayloadError, RateLimited
    └── PushError          (connectors/errors.py) a push that cannot be delivered

Only the CLI turns these into exit statuses; library code raises and logs.
"""

from __future__ import annotations

from dataclasses import dataclass


class TrackloopError(Exception):
    """Base of every error trackloop raises on purpose."""


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    file: str
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}: " if self.file else ""
        return f"{where}{self.path}: {self.message}" if self.path else f"{where}{self.message}"


class ConfigError(TrackloopError):
    """One or more configuration problems, each printed on its own line."""

    def __init__(self, problems: list[ConfigProblem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class StoreError(TrackloopError):
    """The store could not be opened, migrated or written."""
