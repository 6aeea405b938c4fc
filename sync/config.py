"""Loading `trackloop.toml`: TOML, `${ENV}` interpolation, `TRACKLOOP_*` overrides, validation.

Validation runs in two steps because connector sections are typed by their `type` key: the
top level first, then each `[connectors.NAME]` by the model its type's plugin declares. Every
problem becomes one `ConfigProblem(file, key path, message)`; nothing here prints or exits.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from connectors.base import Connector, ConnectorConfig
from connectors.smtp import SmtpConfig
from rules.base import Rule, RuleConfig
from rules.registry import rule_types as rule_types_of
from store.canonical import IdentityKind
from store.durations import Duration
from store.errors import ConfigError, ConfigProblem
from store.people import PersonSpec, normalize
from sync.digests import DigestConfig
from sync.notify import NotifyConfig

ENV_PREFIX = "TRACKLOOP_"
_URL_EXAMPLES = '"sqlite:///trackloop.db" or "postgresql+psycopg://USER@HOST/DB"'
_ENV_REF = re.compile(r"\$(\$|\{([A-Za-z_][A-Za-z0-9_]*)\})")


class StoreConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    url: str = Field(
        "sqlite:///trackloop.db",
        description="SQLAlchemy URL: sqlite:///PATH (default) or postgresql+psycopg://USER@HOST/DB.",
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        """Checked here so `config validate` catches it; the message never repeats the URL (a password)."""
        try:
            backend = make_url(value).get_backend_name()
        except ArgumentError:
            raise ValueError(f"expected a URL such as {_URL_EXAMPLES}") from None
        if backend not in ("sqlite", "postgresql"):
            raise ValueError(f"unsupported database {backend!r}; expected {_URL_EXAMPLES}")
        return value


def parse_address(value: str) -> tuple[str, int]:
    """ "HOST:PORT" (an IPv6 host in brackets) -> (host, port); raise ValueError otherwise."""
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f'expected "HOST:PORT" such as "127.0.0.1:9464", got {value!r}')
    return host, int(port)


class WebhooksConfig(BaseModel):
    """Secrets of the webhook endpoints; an endpoint without its secret answers 404."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    github_secret: SecretStr | None = Field(
        None,
        description='Secret of the GitHub webhook (checks X-Hub-Signature-256), e.g. "${GH_HOOK_SECRET}".',
    )
    jira_secret: SecretStr | None = Field(
        None, description="Shared secret of the Jira webhook: its HMAC signature, or `?secret=` in the URL."
    )
    slack_signing_secret: SecretStr | None = Field(
        None, description="The Slack app's signing secret (checks X-Slack-Signature) for the Events API."
    )


class DaemonConfig(BaseModel):
    """How `trackloop run` behaves."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    http: str = Field(
        "",
        description='Serve /healthz, /metrics and webhooks on "HOST:PORT" ("" = none; --http overrides).',
    )
    workers: int = Field(4, ge=1, le=64, description="Connectors this replica syncs at the same time.")
    lease: Duration = Field(
        timedelta(seconds=60),
        description="How long a claim on a connector lasts unless renewed; then another replica takes over.",
    )
    max_backoff: Duration = Field(
        timedelta(minutes=15),
        description="Longest pause after repeated failures of a connector (the pause doubles per failure).",
    )
    rules_interval: Duration = Field(
        timedelta(minutes=5),
        description="Rules run after every sync that changed something, and at least this often.",
    )
    outbox_interval: Duration = Field(
        timedelta(seconds=10),
        description="How often the outbox is checked for due actions (also right after follow-ups are planned).",
    )
    webhooks: WebhooksConfig = Field(default_factory=WebhooksConfig, description="Webhook secrets.")

    @field_validator("http")
    @classmethod
    def _address(cls, value: str) -> str:
        if value:
            parse_address(value)
        return value

    @field_validator("lease")
    @classmethod
    def _lease(cls, value: timedelta) -> timedelta:
        if value < timedelta(seconds=2):
            raise ValueError(f'must be at least "2s", got {value.total_seconds():g}s')
        return value


def _email(value: str) -> str:
    """One `email` item, checked alone so a fault names its index (`email[1]`)."""
    if "@" not in value:
        raise ValueError(f"expected an email address, got {json.dumps(value)}")
    return value


class PersonConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str | None = Field(None, description="Display name.")
    email: list[Annotated[str, AfterValidator(_email)]] = Field(
        default_factory=list, description="Email address, or a list of them."
    )
    github: list[str] = Field(default_factory=list, description="GitHub login(s).")
    jira: list[str] = Field(default_factory=list, description="Jira accountId (Cloud) or username (Server/DC).")
    slack: list[str] = Field(default_factory=list, description="Slack user id(s), e.g. U01ALICE.")
    lead: bool = Field(False, description="Leads receive digests and escalations.")

    @field_validator("email", "github", "jira", "slack", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    def spec(self, key: str) -> PersonSpec:
        identities = [(IdentityKind.EMAIL.value, v) for v in self.email]
        identities += [(IdentityKind.GITHUB.value, v) for v in self.github]
        identities += [(IdentityKind.JIRA.value, v) for v in self.jira]
        identities += [(IdentityKind.SLACK.value, v) for v in self.slack]
        return PersonSpec(key=key, name=self.name, lead=self.lead, identities=tuple(identities))


class TopLevel(BaseModel):
    """The file's shape before connector sections are typed."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    store: StoreConfig = Field(default_factory=StoreConfig, description="Where trackloop keeps its data.")
    people: dict[str, PersonConfig] = Field(default_factory=dict, description="The team, by person key.")
    connectors: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Sources by name; the name becomes each task's `source`."
    )
    rules: dict[str, dict[str, Any]] = Field(default_factory=dict, description="Rule settings by rule id.")
    notify: NotifyConfig | None = Field(
        None, description="Push-back policy; without this table nothing is ever posted, only observed."
    )
    digests: dict[str, DigestConfig] = Field(default_factory=dict, description="Lead digests by name.")
    smtp: SmtpConfig | None = Field(
        None, description="Outgoing mail (email replies, digests); connectors with an `smtp` key inherit it."
    )
    daemon: DaemonConfig = Field(default_factory=DaemonConfig, description="`trackloop run`: HTTP, webhooks.")


class AppConfig(BaseModel):
    """The validated configuration the rest of trackloop reads."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    file: str = ""
    store: StoreConfig = Field(default_factory=StoreConfig)
    people: dict[str, PersonConfig] = Field(default_factory=dict)
    connectors: dict[str, ConnectorConfig] = Field(default_factory=dict)
    rules: dict[str, RuleConfig] = Field(default_factory=dict)
    notify: NotifyConfig | None = None
    digests: dict[str, DigestConfig] = Field(default_factory=dict)
    smtp: SmtpConfig | None = None
    daemon: DaemonConfig = Field(default_factory=DaemonConfig)

    def secrets(self) -> list[str]:
        """Every secret value in the config, for the log redactor."""
        found: list[str] = []

        def walk(value: Any) -> None:
            if isinstance(value, BaseModel):
                for name in type(value).model_fields:
                    walk(getattr(value, name))
            elif hasattr(value, "get_secret_value"):
                secret = value.get_secret_value()
                if secret:
                    found.append(secret)
            elif isinstance(value, dict):
                for item in value.values():
                    walk(item)
            elif isinstance(value, list | tuple):
                for item in value:
                    walk(item)

        walk(self)
        password = _url_password(self.store.url)
        if password:
            found.append(password)
        return found


def _url_password(url: str) -> str | None:
    match = re.match(r"^[a-z0-9+]+://[^:/@]+:([^@]+)@", url)
    return match.group(1) if match else None


# -- reading ---------------------------------------------------------------------------------
def format_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _interpolate(value: Any, env: Mapping[str, str], path: tuple[Any, ...], problems: list[tuple[str, str]]) -> Any:
    if isinstance(value, str):
        def sub(match: re.Match[str]) -> str:
            if match.group(1) == "$":
                return "$"
            name = match.group(2)
            if name not in env:
                problems.append((format_path(path), f"environment variable {name} is not set"))
                return ""
            return env[name]

        return _ENV_REF.sub(sub, value)
    if isinstance(value, dict):
        return {k: _interpolate(v, env, (*path, k), problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env, (*path, i), problems) for i, v in enumerate(value)]
    return value


def _env_value(raw: str) -> Any:
    """Env values are strings; a JSON list or table may be given for list and table keys."""
    if raw[:1] in "[{":
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw
    return raw


def _apply_env_overrides(
    data: dict[str, Any], env: Mapping[str, str], problems: list[tuple[str, str]]
) -> dict[str, str]:
    """`TRACKLOOP_CONNECTORS__GH__TOKEN=x` sets connectors.gh.token (names match case-insensitively).

    Only names with `__` are overrides (TRACKLOOP_CONFIG and friends are not); one that names no
    section is a problem, not silently ignored. Returns {path the variable created: variable}, so
    a fault found later in that value names the variable.
    """
    sections = set(TopLevel.model_fields)
    created: dict[str, str] = {}
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        if parts[0] not in sections or not all(parts):
            problems.append(("", f"{name}: no such config key {'.'.join(parts)!r} "
                                 f"(expected TRACKLOOP_ + a key path such as STORE__URL)"))
            continue
        node, path, new = data, (), None
        for part in parts[:-1]:
            match = next((k for k in node if isinstance(k, str) and k.lower() == part), part)
            path = (*path, match)
            if match not in node:
                new = new or path
            child = node.setdefault(match, {})
            if not isinstance(child, dict):
                problems.append((format_path(path), f"{name}: this key is not a table"))
                break
            node = child
        else:
            leaf = next((k for k in node if k.lower() == parts[-1]), parts[-1])
            node[leaf] = _env_value(env[name])
            created[format_path(new or (*path, leaf))] = name
    return created


def _within(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith((f"{prefix}.", f"{prefix}["))


def _blamed(found: list[ConfigProblem], unset: set[str], overrides: Mapping[str, str]) -> list[ConfigProblem]:
    """Drop faults of values blanked by an unset ${VAR} (already reported); name the variable
    behind a faulty overridden value."""
    out = []
    for problem in found:
        if problem.path in unset:
            continue
        var = next((v for p, v in overrides.items() if _within(problem.path, p)), None)
        out.append(ConfigProblem(problem.file, problem.path, f"{problem.message} (set by {var})") if var else problem)
    return out


def _problems_from(exc: ValidationError, file: str, prefix: tuple[Any, ...] = ()) -> list[ConfigProblem]:
    out = []
    for err in exc.errors():
        loc = (*prefix, *err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        elif "input" in err and err["type"].endswith("_type"):
            msg = f"{msg}, got {err['input']!r}"
        out.append(ConfigProblem(file, format_path(loc), msg))
    return out


def parse_config(
    data: dict[str, Any],
    *,
    file: str = "",
    env: Mapping[str, str] | None = None,
    connector_types: Mapping[str, type[Connector]],  # type: ignore[type-arg]
    rule_types: Mapping[str, type[Rule]] | None = None,  # type: ignore[type-arg]
) -> AppConfig:
    """Validate a parsed TOML document; raise ConfigError listing every problem."""
    env = os.environ if env is None else env
    raw_problems: list[tuple[str, str]] = []
    data = _interpolate(data, env, (), raw_problems)
    unset = {path for path, _ in raw_problems}
    overrides = _apply_env_overrides(data, env, raw_problems)
    early = [ConfigProblem(file, path, msg) for path, msg in raw_problems]
    try:
        top = TopLevel.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(early + _blamed(_problems_from(exc, file), unset, overrides)) from None
    problems: list[ConfigProblem] = []

    connectors: dict[str, ConnectorConfig] = {}
    for name, section in top.connectors.items():
        path = ("connectors", name)
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            problems.append(ConfigProblem(file, format_path(path), "names may hold letters, digits, _ . - only"))
            continue
        kind = section.get("type")
        if kind is None:
            problems.append(ConfigProblem(file, format_path((*path, "type")), "required key is missing"))
            continue
        cls = connector_types.get(str(kind))
        if cls is None:
            known = ", ".join(sorted(connector_types)) or "none installed"
            problems.append(
                ConfigProblem(file, format_path((*path, "type")), f"unknown connector type {kind!r} (known: {known})")
            )
            continue
        if top.smtp is not None and "smtp" in cls.config_model.model_fields and "smtp" not in section:
            section = {**section, "smtp": top.smtp}  # the shared [smtp] table, unless the section has its own
        try:
            connectors[name] = cls.config_model.model_validate(section)
        except ValidationError as exc:
            problems.extend(_problems_from(exc, file, path))

    rules = _rules(top.rules, file, problems, rule_types_of(rule_types))

    problems += _cross_references(top, connectors, set(rule_types_of(rule_types)), file)

    for key in top.people:
        if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", key):
            problems.append(ConfigProblem(file, f"people.{key}", "person keys are lower-case letters, digits, _ . -"))
    problems += _shared_identities(top.people, file)

    if early or problems:
        raise ConfigError(early + _blamed(problems, unset, overrides))
    return AppConfig(
        file=file,
        store=top.store,
        people=top.people,
        connectors=connectors,
        rules=rules,
        notify=top.notify,
        digests=top.digests,
        smtp=top.smtp,
        daemon=top.daemon,
    )


def _rules(
    sections: dict[str, dict[str, Any]],
    file: str,
    problems: list[ConfigProblem],
    types: Mapping[str, type[Rule]],  # type: ignore[type-arg]
) -> dict[str, RuleConfig]:
    out: dict[str, RuleConfig] = {}
    for rule_id, section in sections.items():
        cls = types.get(rule_id)
        if cls is None:
            known = ", ".join(sorted(types)) or "none installed"
            problems.append(ConfigProblem(file, f"rules.{rule_id}", f"unknown rule (known: {known})"))
            continue
        try:
            out[rule_id] = cls.config_model.model_validate(section)
        except ValidationError as exc:
            problems.extend(_problems_from(exc, file, ("rules", rule_id)))
    return out


def _shared_identities(people: Mapping[str, PersonConfig], file: str) -> list[ConfigProblem]:
    """One identity given to two people would move between them on every sync."""
    problems: list[ConfigProblem] = []
    holder: dict[tuple[str, str], str] = {}
    for key, person in people.items():
        for kind in ("email", "github", "jira", "slack"):
            for i, value in enumerate(getattr(person, kind)):
                first = holder.setdefault((kind, normalize(kind, value)), key)
                if first != key:
                    problems.append(ConfigProblem(file, f"people.{key}.{kind}[{i}]",
                                                  f"{value!r} is already people.{first}'s"))
    return problems


def _cross_references(
    top: TopLevel, connectors: dict[str, ConnectorConfig], rule_ids: set[str], file: str
) -> list[ConfigProblem]:
    """Names that [notify] and [digests] use must exist elsewhere in the file."""
    problems: list[ConfigProblem] = []

    def connector_of(path: str, name: str | None, kind: str) -> None:
        if name is None:
            return
        found = connectors.get(name)
        if found is None:
            problems.append(ConfigProblem(file, path, f"no connector named {name!r}"))
        elif found.type != kind:
            problems.append(ConfigProblem(file, path, f"connector {name!r} is a {found.type} connector, not {kind}"))

    if top.notify is not None:
        n = top.notify
        for key in ("comment_on_source", "dm_owner"):
            for i, rule in enumerate(getattr(n, key)):
                if rule not in rule_ids:
                    problems.append(ConfigProblem(file, f"notify.{key}[{i}]", f"unknown rule {rule!r}"))
        connector_of("notify.dm_connector", n.dm_connector, "slack")
        if n.triage_channel is not None:
            connector_of("notify.triage_channel.connector", n.triage_channel.connector, "slack")
        if n.verifier is not None and n.verifier not in top.people:
            problems.append(ConfigProblem(file, "notify.verifier", f"no person {n.verifier!r} in [people]"))
    for name, digest in top.digests.items():
        connector_of(f"digests.{name}.slack_connector", digest.slack_connector, "slack")
        connector_of(f"digests.{name}.email_connector", digest.email_connector, "imap")
        for i, recipient in enumerate(digest.to):
            channel = recipient.startswith("#") or recipient[:1] in ("C", "G") and recipient.isupper()
            if not channel and recipient not in top.people:
                problems.append(ConfigProblem(file, f"digests.{name}.to[{i}]",
                                              f"expected a person key or a Slack channel, got {recipient!r}"))
        people = [r for r in digest.to if r in top.people]
        if "email" in digest.via and people and not any(c.type == "imap" for c in connectors.values()):
            if top.smtp is None or top.smtp.from_address is None:
                why = "[smtp] sets no sender" if top.smtp else "there is neither an imap connector nor [smtp]"
                problems.append(ConfigProblem(file, f"digests.{name}.via", f"cannot email {people[0]!r}: {why}"))
    return problems


def load_config(
    path: Path,
    *,
    env: Mapping[str, str] | None = None,
    connector_types: Mapping[str, type[Connector]],  # type: ignore[type-arg]
    rule_types: Mapping[str, type[Rule]] | None = None,  # type: ignore[type-arg]
) -> AppConfig:
    """Read and validate a config file."""
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([ConfigProblem(file, "", "no such file; `trackloop init` writes a starter config")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigProblem(file, "", f"cannot read: {exc}")]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([ConfigProblem(file, "", f"invalid TOML: {exc}")]) from None
    return parse_config(data, file=file, env=env, connector_types=connector_types, rule_types=rule_types)


def config_schema(connector_types: Mapping[str, type[Connector]]) -> dict[str, Any]:  # type: ignore[type-arg]
    """JSON Schema of the whole file, with each connector type's own section schema."""
    schema = TopLevel.model_json_schema()
    defs = schema.setdefault("$defs", {})
    variants = []
    for kind, cls in sorted(connector_types.items()):
        sub = cls.config_model.model_json_schema(ref_template="#/$defs/{model}")
        defs.update(sub.pop("$defs", {}))
        sub["properties"]["type"] = {**sub["properties"]["type"], "const": kind}
        title = sub.get("title", kind)
        defs[title] = sub
        variants.append({"$ref": f"#/$defs/{title}"})
    schema["properties"]["connectors"]["additionalProperties"] = {"oneOf": variants}
    rule_props = {}
    for rule_id, rule_cls in sorted(rule_types_of(None).items()):
        sub = rule_cls.config_model.model_json_schema(ref_template="#/$defs/{model}")
        defs.update(sub.pop("$defs", {}))
        defs[sub.get("title", rule_id)] = sub
        rule_props[rule_id] = {"$ref": f"#/$defs/{sub.get('title', rule_id)}"}
    schema["properties"]["rules"] = {**schema["properties"]["rules"], "properties": rule_props,
                                     "additionalProperties": False}
    return schema
