"""The command line, run as users run it: exit statuses, one-line errors, JSON contracts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine

from store.db import current_revision, head_revision

TRACKLOOP = [sys.executable, "-m", "sync.cli"]
HEADER = "ID,Task,Status,Owner,Due\n"


def run(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKLOOP_")}
    full_env.update(env or {})
    return subprocess.run([*TRACKLOOP, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=120)


def write_config(folder: Path, body: str) -> Path:
    path = folder / "trackloop.toml"
    path.write_text(body)
    return path


GOOD = """
[store]
url = "sqlite:///store.db"
[people.alice]
email = "alice@example.com"
[connectors.sheet]
type = "csv"
path = "tasks.csv"
id_column = "ID"
columns = { title = "Task", status = "Status", owner = "Owner", due = "Due" }
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    write_config(tmp_path, GOOD)
    rows = "1,Renew cert,doing,alice,2026-12-01\n2,Old,done,,\n3,Free,todo,team,\n"
    (tmp_path / "tasks.csv").write_text(HEADER + rows)
    return tmp_path


def test_bad_config_exits_2_with_one_line_per_problem_and_writes_nothing(tmp_path: Path) -> None:
    write_config(tmp_path, GOOD.replace('id_column = "ID"', 'id_colum = "ID"\ninterval = "often"'))
    for command in (["config", "validate"], ["sync"], ["tasks"]):
        proc = run(*command, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert "trackloop.toml: connectors.sheet.id_colum: unknown key" in lines
        assert "trackloop.toml: connectors.sheet.id_column: required key is missing" in lines
        assert any(line.startswith("trackloop.toml: connectors.sheet.interval: expected a duration") for line in lines)
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "store.db").exists()


def test_invalid_toml_exits_2(tmp_path: Path) -> None:
    write_config(tmp_path, "[store\n")
    proc = run("sync", cwd=tmp_path)
    assert proc.returncode == 2 and "invalid TOML" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "trackloop.db").exists()


def test_sync_then_tasks_json_contract(project: Path) -> None:
    proc = run("sync", cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert "sheet" in proc.stdout
    tasks = json.loads(run("tasks", "--json", cwd=project).stdout)
    assert [t["external_id"] for t in tasks] == ["1", "3"]  # open only, due first
    first = tasks[0]
    for key in ("source", "external_id", "url", "title", "status", "raw_status", "owner", "due", "priority",
                "labels", "updated_at"):
        assert key in first
    assert (first["source"], first["status"], first["raw_status"], first["owner"], first["due"]) == (
        "sheet", "in_progress", "doing", "alice", "2026-12-01")
    assert tasks[1]["owner"] is None
    every = json.loads(run("tasks", "--json", "--all", cwd=project).stdout)
    assert {t["external_id"] for t in every} == {"1", "2", "3"}
    done = json.loads(run("tasks", "--json", "--status", "done", cwd=project).stdout)
    assert [t["external_id"] for t in done] == ["2"]
    unowned = json.loads(run("tasks", "--json", "--owner", "none", cwd=project).stdout)
    assert [t["external_id"] for t in unowned] == ["3"]


def test_status_json_contract(project: Path) -> None:
    run("sync", cwd=project)
    [entry] = json.loads(run("status", "--json", cwd=project).stdout)
    assert entry["connector"] == "sheet" and entry["type"] == "csv" and entry["enabled"] is True
    assert entry["last_success"] and entry["last_error"] is None
    assert entry["cursor"]["version"] == 1


def test_failing_connector_exits_1_and_others_still_sync(project: Path) -> None:
    write_config(project, GOOD + '\n[connectors.broken]\ntype = "csv"\npath = "missing.csv"\nid_column = "ID"\n'
                 'columns = { title = "Task" }\n')
    proc = run("sync", cwd=project)
    assert proc.returncode == 1
    assert "broken" in proc.stderr and "missing.csv" in proc.stderr
    statuses = {s["connector"]: s for s in json.loads(run("status", "--json", cwd=project).stdout)}
    assert statuses["sheet"]["last_success"] and statuses["broken"]["last_error"]


def install_plugin(folder: Path, module: str, source: str, entry: str) -> dict[str, str]:
    """A throwaway plugin distribution on a PYTHONPATH folder; returns the env that finds it."""
    (folder / f"{module}.py").write_text(source)
    info = folder / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[trackloop.connectors]\n{entry}\n")
    return {"PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])}


BOOM = """
from connectors.csv import CsvConnector

class BoomConnector(CsvConnector):
    kind = "boom"
    def __init__(self, *args, **kwargs):
        raise RuntimeError("boom in the constructor")
"""


@pytest.mark.parametrize("command", ["sync", "doctor"])
def test_connector_whose_constructor_raises_fails_alone(project: Path, tmp_path_factory, command: str) -> None:
    env = install_plugin(tmp_path_factory.mktemp("plugins"), "boom_plugin", BOOM, "boom = boom_plugin:BoomConnector")
    write_config(project, GOOD + '\n[connectors.bad]\ntype = "boom"\npath = "tasks.csv"\nid_column = "ID"\n'
                 'columns = { title = "Task" }\n')
    proc = run(command, cwd=project, env=env)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    said = proc.stdout if command == "doctor" else proc.stderr  # sync: the table row, and one line on stderr
    assert [line for line in said.splitlines() if "boom in" in line] == [
        "bad\tboom\tFAIL\tunexpected RuntimeError: boom in the constructor" if command == "doctor"
        else "error: bad: unexpected RuntimeError: boom in the constructor"
    ]
    if command == "sync":
        statuses = {s["connector"]: s for s in json.loads(run("status", "--json", cwd=project, env=env).stdout)}
        assert statuses["sheet"]["last_success"] and "boom" in statuses["bad"]["last_error"]


def test_sync_unknown_connector_is_usage_error(project: Path) -> None:
    proc = run("sync", "--connector", "nope", cwd=project)
    assert proc.returncode == 2 and "connectors.nope: no such connector" in proc.stderr


def test_dry_run_leaves_store_empty(project: Path) -> None:
    proc = run("sync", "--dry-run", cwd=project)
    assert proc.returncode == 0 and "dry run: nothing was written" in proc.stderr
    assert json.loads(run("tasks", "--json", cwd=project).stdout) == []


def test_secret_from_env_never_printed(project: Path) -> None:
    write_config(project, GOOD.replace('url = "sqlite:///store.db"',
                                       'url = "postgresql+psycopg://u:${DB_PASSWORD}@127.0.0.1:1/db"'))
    proc = run("sync", cwd=project, env={"DB_PASSWORD": "hunter2-very-secret"})
    assert proc.returncode == 1
    assert "hunter2-very-secret" not in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


def test_config_path_from_env_and_init(tmp_path: Path) -> None:
    proc = run("init", cwd=tmp_path, env={"TRACKLOOP_CONFIG": str(tmp_path / "mine.toml")})
    assert proc.returncode == 0 and (tmp_path / "mine.toml").exists()
    assert oct((tmp_path / "mine.toml").stat().st_mode & 0o777) == "0o600"
    again = run("init", cwd=tmp_path, env={"TRACKLOOP_CONFIG": str(tmp_path / "mine.toml")})
    assert again.returncode == 2 and "exists" in again.stderr
    assert run("--config", "mine.toml", "config", "validate", cwd=tmp_path).returncode == 0


def test_config_schema_is_json(tmp_path: Path) -> None:
    schema = json.loads(run("config", "schema", cwd=tmp_path).stdout)
    variants = schema["properties"]["connectors"]["additionalProperties"]["oneOf"]
    types = {schema["$defs"][v["$ref"].rsplit("/", 1)[1]]["properties"]["type"]["const"] for v in variants}
    assert types == {"csv", "github", "jira", "slack", "imap"}
    assert schema["$defs"]["CsvConfig"]["additionalProperties"] is False
    assert "stale_status" in schema["properties"]["rules"]["properties"]


def test_doctor_lists_plugins_and_checks(project: Path) -> None:
    proc = run("doctor", cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert "csv\tconnector\tconnectors.csv.CsvConnector\ttrackloop" in proc.stdout
    assert "stale_status\trule\trules.stale_status.StaleStatus\ttrackloop" in proc.stdout
    assert "sheet\tcsv\tok" in proc.stdout


def test_db_upgrade(project: Path) -> None:
    proc = run("db", "upgrade", cwd=project)
    assert proc.returncode == 0 and "is at" in proc.stderr
    engine = create_engine(f"sqlite:///{project / 'store.db'}")
    try:
        assert current_revision(engine) == head_revision() and head_revision() in proc.stderr
    finally:
        engine.dispose()


def test_demo_prints_a_real_table(tmp_path: Path) -> None:
    proc = run("demo", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "trackloop-demo.db").exists()
    lines = proc.stdout.splitlines()
    assert lines[0].split("\t")[:3] == ["task", "title", "status"]
    assert any(line.startswith("sheet:OPS-101\tRenew the wildcard TLS certificate") for line in lines)
    assert "task\trule\tseverity\tact\tmessage" in lines  # the findings
    assert any(line.startswith("sheet:OPS-106\toverdue\twarning\tcarol\toverdue by 5 days") for line in lines)
    assert "to\tmessage" in lines and any(line.startswith("carol\tsheet:OPS-106") for line in lines)  # DMs
    assert any(line.startswith("trackloop digest “leads”") for line in lines) and "Overdue: 4" in lines


def test_demo_replaces_only_a_demo_store(tmp_path: Path) -> None:
    (tmp_path / "mine.db").write_text("precious")
    proc = run("demo", "--db", "mine.db", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: mine.db exists and is not a trackloop demo store; choose another --db "
        "(the demo replaces only a store it made)"
    ]
    assert (tmp_path / "mine.db").read_text() == "precious"
    for _ in range(2):  # a store the demo made is replaced on the next run
        proc = run("demo", "--db", "other.db", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr


def test_help_shows_plain_metavars(tmp_path: Path) -> None:
    top = run("--help", cwd=tmp_path).stdout
    assert "--config PATH" in top and "[default: 0]" not in top
    for command, shown in (("tasks", "--status STATUS"), ("sync", "--connector NAME")):
        text = run(command, "--help", cwd=tmp_path).stdout
        assert shown in text and "<list[" not in text


def test_mistyped_env_override_exits_2_naming_it(project: Path) -> None:
    proc = run("sync", cwd=project, env={"TRACKLOOP_STOER__URL": "sqlite:///elsewhere.db"})
    assert proc.returncode == 2 and proc.stderr.startswith("trackloop.toml: TRACKLOOP_STOER__URL: no such config key")
    assert not (project / "store.db").exists() and not (project / "elsewhere.db").exists()


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)  # SQLite has one writer at a time anyway
@pytest.mark.parametrize("command", [("rules", "run"), ("verify", "sheet:2")])
def test_cli_rule_runs_take_the_rules_lock(project: Path, db_url: str, command: tuple[str, ...]) -> None:
    """`rules run` and `verify` wait for a daemon's rules run instead of racing it (PostgreSQL)."""
    from sqlalchemy import create_engine, func, select

    from store.locks import lock_key

    write_config(project, GOOD.replace('url = "sqlite:///store.db"', f'url = "{db_url}"'))
    assert run("sync", cwd=project).returncode == 0
    holder = create_engine(db_url)
    with holder.connect() as conn, conn.begin():
        conn.execute(select(func.pg_advisory_xact_lock(lock_key("rules"))))  # a daemon mid-run
        waiting = subprocess.Popen([*TRACKLOOP, *command], cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   env={k: v for k, v in os.environ.items() if not k.startswith("TRACKLOOP_")})
        with pytest.raises(subprocess.TimeoutExpired):
            waiting.wait(timeout=4)
    assert waiting.wait(timeout=60) == 0  # the lock is released with the transaction
    holder.dispose()
