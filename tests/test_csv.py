"""The csv connector: mapping, sniffing, edits and removals, odd rows."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest
from sqlalchemy import select

from connectors.csv import CsvConnector, owner_ref, parse_due
from store.canonical import IdentityKind, SyncState
from store.db import Store
from store.errors import ConfigError
from store.models import Person, Task
from sync.config import parse_config
from sync.engine import SyncEngine

TYPES = {"csv": CsvConnector}
HEADER = "ID,Task,Status,Owner,Due,Priority,Labels\n"


def section(path: Path, **extra) -> dict:
    return {"type": "csv", "path": str(path), "id_column": "ID",
            "columns": {"title": "Task", "status": "Status", "owner": "Owner", "due": "Due",
                        "priority": "Priority", "labels": "Labels"}, **extra}


def sync(url: str, path: Path, **extra):
    config = parse_config({"store": {"url": url}, "people": {"alice": {"email": "alice@example.com"}},
                           "connectors": {"sheet": section(path, **extra)}}, env={}, connector_types=TYPES)
    store = Store(url)
    try:
        [result] = SyncEngine(store, config, TYPES).run()
        with store.transaction() as s:
            rows = {t.external_id: (t.title, t.status, t.raw_status, t.owner.key if t.owner else None, t.due,
                                    t.priority, t.labels) for t in s.scalars(select(Task))}
    finally:
        store.close()
    return result, rows


def test_rows_map_to_tasks(db_url: str, tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text(HEADER + "1,Renew cert,In progress,alice,2026-12-01,high,\"sec, ops\"\n"
                    "2,Order disks,,alice@example.com,,p3,\n3,Rotate keys,Waiting,team,not a date,,\n")
    result, rows = sync(db_url, path, status_map={"Waiting": "blocked"})
    assert result.ok
    assert rows["1"] == ("Renew cert", "in_progress", "In progress", "alice", date(2026, 12, 1), "high",
                         ["sec", "ops"])
    assert rows["2"] == ("Order disks", "todo", "(empty)", "alice", None, "low", [])
    assert rows["3"] == ("Rotate keys", "blocked", "Waiting", None, None, "none", [])


def test_edit_updates_and_removed_row_is_cancelled(db_url: str, tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text(HEADER + "1,A,todo,,,,\n2,B,todo,,,,\n")
    sync(db_url, path)
    path.write_text(HEADER + "1,A renamed,done,,,,\n")
    result, rows = sync(db_url, path)
    assert (result.upserts.updated, result.upserts.cancelled) == (1, 1)
    assert rows["1"][:2] == ("A renamed", "done")
    assert rows["2"][1:3] == ("cancelled", "(gone from source)")


def test_unchanged_file_writes_nothing(db_url: str, tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text(HEADER + "1,A,todo,,,,\n")
    sync(db_url, path)
    result, _ = sync(db_url, path)
    assert result.ok and result.pages == 0 and result.upserts.unchanged == 0


def test_tsv_and_semicolons_are_sniffed(tmp_path: Path, db_url: str) -> None:
    path = tmp_path / "t.tsv"
    path.write_text("ID\tTask\tStatus\tOwner\tDue\tPriority\tLabels\n7\tTabbed; title\tdoing\t\t\t\t\n")
    result, rows = sync(db_url, path)
    assert result.ok and rows["7"][:2] == ("Tabbed; title", "in_progress")


def test_rows_without_id_or_title_are_skipped(tmp_path: Path, db_url: str) -> None:
    path = tmp_path / "t.csv"
    path.write_text(HEADER + ",No id,todo,,,,\n5,,todo,,,,\n6,Fine,todo,,,,\n7,Short row\n")
    result, rows = sync(db_url, path)
    assert result.ok and set(rows) == {"6", "7"}


def test_missing_column_is_a_clear_error(tmp_path: Path, db_url: str) -> None:
    path = tmp_path / "t.csv"
    path.write_text("ID,Title\n1,x\n")
    result, rows = sync(db_url, path)
    assert not result.ok and "missing column(s) Task, Status, Owner, Due, Priority, Labels" in result.error
    assert rows == {}


def test_missing_file_is_a_clear_error(tmp_path: Path, db_url: str) -> None:
    result, _ = sync(db_url, tmp_path / "nope.csv")
    assert not result.ok and "cannot read" in result.error and "No such file" in result.error


def test_large_file_streams_in_pages(tmp_path: Path) -> None:
    path = tmp_path / "big.csv"
    path.write_text(HEADER + "".join(f"{i},Task {i},todo,,,,\n" for i in range(2500)))
    cfg = parse_config({"connectors": {"s": section(path)}}, env={}, connector_types=TYPES).connectors["s"]
    pages = list(CsvConnector("s", cfg).pull(SyncState()))
    assert [len(p.tasks) for p in pages] == [1000, 1000, 500]
    assert pages[-1].completed_scopes == ["file"] and not pages[0].completed_scopes


def test_check_reports_missing_columns(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("ID,Task\n")
    cfg = parse_config({"connectors": {"s": section(path)}}, env={}, connector_types=TYPES).connectors["s"]
    verdict = CsvConnector("s", cfg).check()
    assert not verdict.ok and "Status" in verdict.detail


@pytest.mark.parametrize(("cell", "expected"), [
    ("alice", (IdentityKind.PERSON, "alice")), ("Bob@Example.com", (IdentityKind.EMAIL, "Bob@Example.com")),
    ("team", None), ("", None), ("TBD", None)])
def test_owner_cells(cell: str, expected) -> None:
    ref = owner_ref(cell)
    assert (None if ref is None else (ref.kind, ref.value)) == expected


def test_due_dates() -> None:
    assert parse_due("2026-12-03") == date(2026, 12, 3)
    assert parse_due("Dec 3, 2026") == date(2026, 12, 3)
    assert parse_due("") is None
    with pytest.raises(ValueError):
        parse_due("someday")


def test_unknown_person_key_becomes_a_person(tmp_path: Path, db_url: str) -> None:
    path = tmp_path / "t.csv"
    path.write_text(HEADER + "1,A,todo,zed,,,\n")
    _, rows = sync(db_url, path)
    assert rows["1"][3] == "zed"
    store = Store(db_url)
    with store.transaction() as s:
        zed = s.scalar(select(Person).where(Person.key == "zed"))
        assert zed is not None and not zed.from_config and zed.identities == []
    store.close()


def test_empty_labels_separator_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"connectors\.s\.labels_separator: String should have at least 1"):
        parse_config({"connectors": {"s": section(tmp_path / "t.csv", labels_separator="")}}, env={},
                     connector_types=TYPES)


@pytest.mark.parametrize(
    ("content", "fault", "header_fails"),
    [
        ((HEADER + "1,A,todo,,,,\n2,B,todo,,,,\n").encode() + b"3,Caf\xe9,todo,,,,\n",
         "t.csv line 4: not utf-8-sig text (invalid continuation byte)", True),  # the sniffer reads it all
        ((HEADER + "1,A,todo,,,,\n2,\"" + "x" * 200_000 + "\",todo,,,,\n").encode(),
         "t.csv line 3: field larger than field limit (131072)", False),
    ],
)
def test_unreadable_file_fails_naming_the_line(
    tmp_path: Path, db_url: str, content: bytes, fault: str, header_fails: bool
) -> None:
    path = tmp_path / "t.csv"
    path.write_bytes(content)
    result, rows = sync(db_url, path)
    assert not result.ok and result.error.endswith(fault) and rows == {}
    cfg = parse_config({"connectors": {"s": section(path)}}, env={}, connector_types=TYPES).connectors["s"]
    verdict = CsvConnector("s", cfg).check()  # doctor: a verdict, never a traceback
    assert verdict.ok is not header_fails and (verdict.ok or verdict.detail.endswith(fault))
