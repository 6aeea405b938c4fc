"""Loading trackloop.toml: interpolation, env overrides, durations, and one clear line per fault."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import BaseModel

from connectors.csv import CsvConnector
from connectors.github import GithubConnector
from connectors.registry import connector_types
from store.durations import Duration, format_duration, parse_duration
from store.errors import ConfigError
from sync.config import config_schema, load_config, parse_config

TYPES = {"csv": CsvConnector}
ROOT = Path(__file__).resolve().parent.parent

SHEET = {"type": "csv", "path": "t.csv", "id_column": "ID", "columns": {"title": "Task"}}


def problems(data: dict, env: dict | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, file="trackloop.toml", env=env or {}, connector_types=TYPES)
    return [str(p) for p in info.value.problems]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("90s", timedelta(seconds=90)), ("15m", timedelta(minutes=15)), ("3d", timedelta(days=3)),
     ("1h30m", timedelta(hours=1, minutes=30)), ("2w", timedelta(weeks=2)), ("1.5h", timedelta(minutes=90))],
)
def test_durations(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("bad", ["", "5", "m", "5 parsecs", "1h junk", "-3d"])
def test_bad_durations(bad: str) -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(bad)


def test_duration_round_trips_in_models() -> None:
    class M(BaseModel):
        every: Duration

    assert M(every="1h30m").every == timedelta(minutes=90)
    assert M(every="1h30m").model_dump(mode="json") == {"every": "1h30m"}
    assert format_duration(timedelta(days=3)) == "3d"


def test_example_config_is_valid() -> None:
    # Every installed connector type, and a stand-in value for each ${SECRET} the example names.
    path = ROOT / "config.example.toml"
    env = {name: "example-secret" for name in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", path.read_text())}
    config = load_config(path, env=env, connector_types=connector_types())
    assert config.people["alice"].email == ["alice@example.com"]
    assert config.people["alice"].lead is True
    assert set(config.connectors) >= {"sheet"}


def test_env_interpolation_and_escape() -> None:
    data = {"store": {"url": "postgresql+psycopg://u:${DB_PW}@h/db"}, "people": {"a": {"name": "$${literal}"}}}
    config = parse_config(data, env={"DB_PW": "s3cret"}, connector_types=TYPES)
    assert config.store.url == "postgresql+psycopg://u:s3cret@h/db"
    assert config.people["a"].name == "${literal}"
    assert "s3cret" in config.secrets()


def test_missing_env_var_is_named() -> None:
    expected = ["trackloop.toml: store.url: environment variable NOPE is not set"]
    assert problems({"store": {"url": "${NOPE}"}}) == expected


def test_env_overrides_by_key_path() -> None:
    env = {
        "TRACKLOOP_STORE__URL": "sqlite:///other.db",
        "TRACKLOOP_CONNECTORS__SHEET__ENABLED": "false",
        "TRACKLOOP_CONNECTORS__SHEET__INTERVAL": "90s",
        "TRACKLOOP_CONFIG": "not-a-key.toml",
        "TRACKLOOP_TEST_DATABASE_URL": "ignored",
    }
    config = parse_config({"connectors": {"sheet": SHEET}}, env=env, connector_types=TYPES)
    assert config.store.url == "sqlite:///other.db"
    assert config.connectors["sheet"].enabled is False
    assert config.connectors["sheet"].interval == timedelta(seconds=90)


def test_unknown_env_override_is_a_problem_naming_the_variable() -> None:
    env = {"TRACKLOOP_STOER__URL": "sqlite:///x.db", "TRACKLOOP_CONFIG": "a.toml", "TRACKLOOP_DEBUG": "1",
           "TRACKLOOP_TEST_DATABASE_URL": "postgresql+psycopg://x/y"}
    [found] = problems({}, env)
    assert found.startswith("trackloop.toml: TRACKLOOP_STOER__URL: no such config key 'stoer.url'")


def test_fault_in_an_overridden_value_names_the_variable() -> None:
    found = problems({}, {"TRACKLOOP_STORE__URL": "mysql://x/y", "TRACKLOOP_STORE__URL__X": "1"})
    assert "trackloop.toml: store.url: TRACKLOOP_STORE__URL__X: this key is not a table" in found
    assert any(p.startswith("trackloop.toml: store.url: unsupported database 'mysql'")
               and p.endswith("(set by TRACKLOOP_STORE__URL)") for p in found)
    env = {"TRACKLOOP_CONNECTORS__SHEET__INTERVAL": "often", "TRACKLOOP_CONNECTORS__NEW__PATH": "x.csv"}
    found = problems({"connectors": {"sheet": SHEET}}, env)
    assert any(p.startswith("trackloop.toml: connectors.sheet.interval: expected a duration")
               and p.endswith("(set by TRACKLOOP_CONNECTORS__SHEET__INTERVAL)") for p in found)
    assert ("trackloop.toml: connectors.new.type: required key is missing (set by TRACKLOOP_CONNECTORS__NEW__PATH)"
            in found)


def test_unknown_keys_are_errors_with_paths() -> None:
    found = problems({
        "stor": {},
        "people": {"alice": {"emial": "a@x"}},
        "connectors": {"sheet": {**SHEET, "colums": {}}},
    })
    assert "trackloop.toml: stor: unknown key" in found
    assert "trackloop.toml: people.alice.emial: unknown key" in found


def test_connector_section_problems_each_on_a_line() -> None:
    found = problems({"connectors": {
        "sheet": {**SHEET, "colums": {}, "interval": "soon", "delimiter": ";;"},
        "x": {"type": "nope"},
        "y": {"path": "a"},
    }})
    assert "trackloop.toml: connectors.sheet.colums: unknown key" in found
    assert any(p.startswith("trackloop.toml: connectors.sheet.interval: expected a duration") for p in found)
    assert "trackloop.toml: connectors.sheet.delimiter: expected a single character, got ';;'" in found
    assert "trackloop.toml: connectors.x.type: unknown connector type 'nope' (known: csv)" in found
    assert "trackloop.toml: connectors.y.type: required key is missing" in found


def test_list_index_in_path() -> None:
    found = problems({"people": {"a": {"email": ["a@x.org", "not-an-email"]}}})
    assert found == ['trackloop.toml: people.a.email[1]: expected an email address, got "not-an-email"']
    github = {"gh": {"type": "github", "token": "t", "repos": ["acme/api", "acme"]}}
    with pytest.raises(ConfigError) as info:
        parse_config({"connectors": github}, file="trackloop.toml", env={}, connector_types={"github": GithubConnector})
    assert [str(p) for p in info.value.problems] == [
        'trackloop.toml: connectors.gh.repos[1]: expected "owner/name", got "acme"'
    ]


def test_bad_toml_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "trackloop.toml"
    path.write_text("[store\nurl = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={}, connector_types=TYPES)
    [problem] = info.value.problems
    assert str(problem).startswith(f"{path}: invalid TOML:") and "line 1" in str(problem)


def test_missing_file_says_how_to_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="trackloop init"):
        load_config(tmp_path / "none.toml", env={}, connector_types=TYPES)


def test_secrets_are_collected_for_redaction() -> None:
    config = parse_config({"store": {"url": "postgresql+psycopg://u:pw123456@h/db"}}, env={}, connector_types=TYPES)
    assert config.secrets() == ["pw123456"]


def test_schema_types_connector_sections() -> None:
    schema = config_schema(TYPES)
    variants = schema["properties"]["connectors"]["additionalProperties"]["oneOf"]
    csv_def = schema["$defs"][variants[0]["$ref"].split("/")[-1]]
    assert csv_def["properties"]["type"]["const"] == "csv"
    assert csv_def["additionalProperties"] is False
    assert all("description" in prop for prop in csv_def["properties"].values())


@pytest.mark.parametrize(
    ("url", "fault"),
    [("mysql://u:s3cret@db/x", "unsupported database 'mysql'"), ("u:s3cret@db/x", "expected a URL such as")],
)
def test_store_url_is_checked_without_printing_the_password(url: str, fault: str) -> None:
    [found] = problems({"store": {"url": url}})
    assert found.startswith(f"trackloop.toml: store.url: {fault}") and "s3cret" not in found


@pytest.mark.parametrize("url", ["sqlite:///t.db", "sqlite://", "postgresql+psycopg://u:pw@db:5432/x"])
def test_store_url_accepts_sqlite_and_postgresql(url: str) -> None:
    assert parse_config({"store": {"url": url}}, env={}, connector_types=TYPES).store.url == url


def test_one_identity_given_to_two_people_is_a_problem() -> None:
    people = {"a": {"email": "Ann@x.org", "slack": "U01"}, "b": {"email": ["b@x.org", "ann@X.org"], "slack": "u01"}}
    assert problems({"people": people}) == ["trackloop.toml: people.b.email[1]: 'ann@X.org' is already people.a's"]
