"""The `csv` connector: tasks from a CSV/TSV file, such as a spreadsheet export.

Every pull whose file changed reads the whole file, so the listing is complete and a row that
disappeared marks its task `cancelled`. An unchanged file (same size, mtime and digest) costs
one stat and one hash, and writes nothing.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import TextIO

from dateutil import parser as dateparser
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from connectors.base import Connector, ConnectorConfig
from connectors.errors import ConnectorError, PayloadError
from store.canonical import (
    CheckResult,
    Cursor,
    IdentityKind,
    IdentityRef,
    Page,
    Priority,
    Status,
    SyncState,
    TaskRecord,
)

PAGE_SIZE = 1000
SCOPE = "file"

DEFAULT_STATUS_MAP: dict[str, Status] = {
    "todo": Status.TODO, "to do": Status.TODO, "open": Status.TODO, "new": Status.TODO, "backlog": Status.TODO,
    "in progress": Status.IN_PROGRESS, "in_progress": Status.IN_PROGRESS, "doing": Status.IN_PROGRESS,
    "started": Status.IN_PROGRESS, "blocked": Status.BLOCKED, "waiting": Status.BLOCKED,
    "done": Status.DONE, "closed": Status.DONE, "complete": Status.DONE, "completed": Status.DONE,
    "resolved": Status.DONE, "cancelled": Status.CANCELLED, "canceled": Status.CANCELLED,
    "won't do": Status.CANCELLED, "wontfix": Status.CANCELLED,
}
PRIORITY_WORDS: dict[str, Priority] = {
    "high": Priority.HIGH, "urgent": Priority.HIGH, "critical": Priority.HIGH, "p1": Priority.HIGH,
    "highest": Priority.HIGH, "medium": Priority.MEDIUM, "normal": Priority.MEDIUM, "p2": Priority.MEDIUM,
    "low": Priority.LOW, "lowest": Priority.LOW, "p3": Priority.LOW, "p4": Priority.LOW,
}
# Owner cells that name a group rather than a person: the task has no owner.
GROUP_OWNERS = frozenset({"team", "the team", "everyone", "all", "tbd", "unassigned", "none", "-", "?"})


class CsvColumns(BaseModel):
    """Maps canonical fields to column headers; only `title` is required."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    title: str = Field(description="Header of the title column.")
    status: str | None = Field(None, description="Header of the status column.")
    owner: str | None = Field(None, description="Header of the owner column (a person key or an email).")
    due: str | None = Field(None, description="Header of the due date column (ISO dates are safest).")
    priority: str | None = Field(None, description="Header of the priority column (high/medium/low, p1-p3).")
    labels: str | None = Field(None, description="Header of the labels column.")
    url: str | None = Field(None, description="Header of a link to the task elsewhere.")
    body: str | None = Field(None, description="Header of a description column.")


class CsvConfig(ConnectorConfig):
    path: Path = Field(description="The CSV or TSV file; relative paths are relative to the working directory.")
    id_column: str = Field(description="Header of the column holding a stable id per row.")
    columns: CsvColumns = Field(description="Canonical field -> column header.")
    status_map: dict[str, Status] = Field(
        default_factory=dict,
        description="Extra source status values -> canonical status (todo, in_progress, blocked, done, cancelled).",
    )
    labels_separator: str = Field(",", min_length=1, description="Separator inside the labels cell.")
    delimiter: str | None = Field(None, description="Field delimiter; sniffed from the file when absent.")
    encoding: str = Field("utf-8-sig", description="File encoding.")

    @field_validator("delimiter")
    @classmethod
    def _one_char(cls, value: str | None) -> str | None:
        if value is not None and len(value) != 1:
            raise ValueError(f"expected a single character, got {value!r}")
        return value

    @model_validator(mode="after")
    def _status_keys_lower(self) -> CsvConfig:
        object.__setattr__(self, "status_map", {k.strip().lower(): v for k, v in self.status_map.items()})
        return self


class CsvCursor(Cursor):
    version: int = 1
    digest: str = ""


def parse_due(text: str) -> date | None:
    """A due date from a spreadsheet cell; ISO first, then what dateutil understands."""
    text = text.strip()
    if not text:
        return None
    try:
        return date.fromisoformat(text[:10])
    except ValueError:
        pass
    try:
        return dateparser.parse(text, dayfirst=False).date()
    except (ValueError, OverflowError):
        raise ValueError(f"unreadable due date {text!r}") from None


def owner_ref(cell: str) -> IdentityRef | None:
    value = cell.strip()
    if not value or value.lower() in GROUP_OWNERS:
        return None
    if "@" in value:
        return IdentityRef(IdentityKind.EMAIL, value, email=value)
    return IdentityRef(IdentityKind.PERSON, value)


class CsvConnector(Connector[CsvConfig, CsvCursor]):
    kind = "csv"
    config_model = CsvConfig
    cursor_model = CsvCursor

    def check(self) -> CheckResult:
        try:
            with self._open() as fh:
                header = next((row for _, row in self._rows(fh)), None)
        except ConnectorError as exc:
            return CheckResult(False, str(exc))
        if header is None:
            return CheckResult(False, f"{self.config.path} is empty")
        missing = self._missing_columns(header)
        if missing:
            return CheckResult(False, f"{self.config.path}: missing column(s) {', '.join(missing)}")
        return CheckResult(True, f"{self.config.path}: {len(header)} columns")

    def pull(self, state: SyncState[CsvCursor]) -> Iterator[Page[CsvCursor]]:
        digest = self._digest()
        if state.cursor is not None and state.cursor.digest == digest and not state.full:
            return
        cursor = CsvCursor(digest=digest)
        batch: list[TaskRecord] = []
        with self._open() as fh:
            rows = self._rows(fh)
            header = next(rows, (0, []))[1]
            missing = self._missing_columns(header)
            if missing:
                raise PayloadError(f"{self.config.path}: missing column(s) {', '.join(missing)}")
            for line_no, row in rows:
                record = self._record(dict(zip(header, row, strict=False)), line_no)
                if record is not None:
                    batch.append(record)
                if len(batch) >= PAGE_SIZE:
                    yield Page(tasks=batch, cursor=state.cursor)
                    batch = []
        yield Page(tasks=batch, cursor=cursor, completed_scopes=[SCOPE])

    # -- helpers ---------------------------------------------------------------------------
    def _open(self) -> TextIO:
        try:
            return open(self.config.path, encoding=self.config.encoding, newline="")
        except OSError as exc:
            raise ConnectorError(f"cannot read {self.config.path}: {exc.strerror}") from exc

    def _digest(self) -> str:
        sha = hashlib.sha256()
        try:
            with open(self.config.path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    sha.update(chunk)
        except OSError as exc:
            raise ConnectorError(f"cannot read {self.config.path}: {exc.strerror}") from exc
        return sha.hexdigest()

    def _rows(self, fh: TextIO) -> Iterator[tuple[int, list[str]]]:
        """(line number, cells) per row; a file the csv module cannot read fails naming the line."""
        reader = None
        try:
            reader = csv.reader(fh, delimiter=self._delimiter(fh))
            for row in reader:
                yield reader.line_num, row
        except csv.Error as exc:
            line = reader.line_num if reader is not None else 1
            raise PayloadError(f"{self.config.path} line {line}: {exc}") from exc
        except UnicodeDecodeError as exc:
            line, encoding = self._undecodable_line(), self.config.encoding
            raise PayloadError(f"{self.config.path} line {line}: not {encoding} text ({exc.reason})") from exc

    def _delimiter(self, fh: TextIO) -> str:
        if self.config.delimiter is not None:
            return self.config.delimiter
        sample = fh.read(64 * 1024)
        fh.seek(0)
        try:
            return csv.Sniffer().sniff(sample, delimiters=",;\t|").delimiter
        except csv.Error:
            return "\t" if str(self.config.path).endswith(".tsv") else ","

    def _undecodable_line(self) -> int:
        """The first line that does not decode (a decode error only knows its offset in a buffer)."""
        with open(self.config.path, "rb") as fh:
            for line_no, raw in enumerate(fh, start=1):
                try:
                    raw.decode(self.config.encoding)
                except UnicodeDecodeError:
                    return line_no
        return 1

    def _missing_columns(self, header: list[str]) -> list[str]:
        wanted = [self.config.id_column, *(v for v in self.config.columns.model_dump().values() if v)]
        return [c for c in wanted if c not in header]

    def _cell(self, row: dict[str, str], field: str) -> str:
        column = getattr(self.config.columns, field)
        return (row.get(column) or "").strip() if column else ""

    def _status(self, raw: str, line_no: int) -> Status:
        key = raw.strip().lower()
        if not key:
            return Status.TODO
        found = self.config.status_map.get(key) or DEFAULT_STATUS_MAP.get(key)
        if found is None:
            self.log.warning("%s line %d: unknown status %r, taken as todo", self.config.path, line_no, raw)
            return Status.TODO
        return found

    def _record(self, row: dict[str, str], line_no: int) -> TaskRecord | None:
        external_id = (row.get(self.config.id_column) or "").strip()
        title = self._cell(row, "title")
        if not external_id or not title:
            self.log.warning("%s line %d: no id or no title, row skipped", self.config.path, line_no)
            return None
        due = None
        try:
            due = parse_due(self._cell(row, "due"))
        except ValueError as exc:
            self.log.warning("%s line %d: %s, ignored", self.config.path, line_no, exc)
        raw_status = self._cell(row, "status")
        owner = owner_ref(self._cell(row, "owner"))
        labels_cell = self._cell(row, "labels")
        labels = tuple(x.strip() for x in labels_cell.split(self.config.labels_separator) if x.strip())
        return TaskRecord(
            external_id=external_id,
            title=title,
            body=self._cell(row, "body"),
            status=self._status(raw_status, line_no),
            raw_status=raw_status or "(empty)",
            url=self._cell(row, "url") or None,
            scope=SCOPE,
            assignees=(owner,) if owner else (),
            due=due,
            priority=PRIORITY_WORDS.get(self._cell(row, "priority").lower(), Priority.NONE),
            labels=labels,
        )

