"""Planning follow-ups: open findings (and observed moves to done) become outbox actions.

Policy comes from `[notify]`; without it nothing is planned (a new install observes before it
speaks). Every action's idempotency key is built from stable names only:
`RULE:SOURCE:EXTERNAL_ID:KIND:TARGET:N`, where N is the reminder number. A store that is lost
and rebuilt plans the same keys again, and the connectors find their own earlier posts.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import select
from sqlalchemy.orm import Session, aliased

from connectors.base import Connector, ConnectorConfig
from store.canonical import Status
from store.durations import Duration, format_duration
from store.models import Finding, Identity, Person, Task, TaskEvent
from store.outbox import NewAction, PastAction, actions_for_tasks
from sync import messages
from sync.zones import TimeZoneName

Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
DAYS: tuple[Day, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_HOURS = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")
VERIFY_LOOKBACK = timedelta(days=7)


class TriageChannel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    connector: str = Field(description="The Slack connector to post through.")
    channel: str = Field(description='Channel id (e.g. "C0TRIAGE") or "#name".')


class NotifyConfig(BaseModel):
    """`[notify]`: who hears about which findings, and when."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    comment_on_source: list[str] = Field(
        default_factory=list, description="Rules whose findings are commented on the task itself (email: a reply)."
    )
    dm_owner: list[str] = Field(
        default_factory=list, description="Rules whose findings are sent to the owner by Slack DM."
    )
    dm_connector: str | None = Field(
        None, description="The Slack connector that sends DMs (default: the only Slack connector)."
    )
    triage_channel: TriageChannel | None = Field(
        None, description="Where missing_owner findings go: { connector = NAME, channel = ID }."
    )
    escalate_after: Duration | None = Field(
        None, description="Tell a lead (Slack DM) about findings still open after this long."
    )
    remind_every: Duration = Field(timedelta(days=3), description="Follow up again on a finding still open after this.")
    max_actions_per_run: int = Field(50, ge=1, description="At most this many new actions per run; the rest wait.")
    per_task_per_day: int = Field(1, ge=1, description="At most this many actions per task and target per day.")
    quiet_hours: str | None = Field(None, description='No new actions in this local time range, e.g. "20:00-08:00".')
    working_days: list[Day] = Field(default_factory=lambda: list(DAYS), description="Days on which actions are sent.")
    timezone: TimeZoneName = Field("UTC", description="IANA time zone for quiet hours, working days and caps.")
    verify_done: bool = Field(True, description="When a task moves to done, ask its reporter to confirm the outcome.")
    verifier: str | None = Field(None, description="Person key asked instead of the reporter (by Slack DM).")
    max_attempts: int = Field(5, ge=1, description="Delivery attempts before an action is parked as failed.")

    @field_validator("quiet_hours")
    @classmethod
    def _hours(cls, value: str | None) -> str | None:
        if value is not None and not _HOURS.match(value):
            raise ValueError(f'expected "HH:MM-HH:MM", got {value!r}')
        return value

    def in_quiet_time(self, now: datetime) -> str | None:
        """Why no action may be sent now, or None."""
        local = now.astimezone(ZoneInfo(self.timezone))
        if DAYS[local.weekday()] not in self.working_days:
            return f"{DAYS[local.weekday()]} is not a working day"
        if self.quiet_hours:
            start, end = (time.fromisoformat(part) for part in self.quiet_hours.split("-"))
            t = local.time()
            quiet = start <= t or t < end if start > end else start <= t < end
            if quiet:
                return f"quiet hours ({self.quiet_hours} {self.timezone})"
        return None

    def day_start(self, now: datetime) -> datetime:
        local = now.astimezone(ZoneInfo(self.timezone))
        return datetime.combine(local.date(), time(), local.tzinfo)


@dataclass(frozen=True, slots=True)
class VerifySignals:
    """What counts as verification in one source, so an ask names only what the source has."""

    labels: tuple[str, ...] = ()
    statuses: tuple[str, ...] = ()
    reaction: bool = False


def verify_signals(connectors: Mapping[str, ConnectorConfig], rule_labels: Sequence[str]) -> dict[str, VerifySignals]:
    """Per source: labels (its own verified labels and done_unverified's, where tasks have labels),
    Jira's verified statuses, a Slack ✅ reaction."""
    out = {}
    for name, cfg in connectors.items():
        own = list(getattr(cfg, "verified_labels", []))
        has_labels = cfg.type in ("github", "jira") or bool(getattr(getattr(cfg, "columns", None), "labels", None))
        labels = tuple(dict.fromkeys([*own, *rule_labels])) if has_labels else ()
        out[name] = VerifySignals(labels, tuple(getattr(cfg, "verified_statuses", ())), cfg.type == "slack")
    return out


@dataclass(frozen=True, slots=True)
class Planned:
    action: NewAction
    due_since: datetime  # when it became due: fairness across runs (oldest first)
    ref: str


@dataclass(slots=True)
class Plan:
    actions: list[Planned] = field(default_factory=list)
    held_back: int = 0  # due but over a cap; they go first next run
    skipped: Counter[str] = field(default_factory=Counter)  # why some findings have no action
    paused: str | None = None  # quiet hours or a day off


@dataclass(slots=True)
class _Item:
    finding_id: int | None
    rule: str
    task: Task
    owner: str | None
    message: str
    first_seen: datetime
    severity: str


_SEVERITY = {"critical": 0, "warning": 1, "info": 2}


class Planner:
    """Turns the store's open findings into the actions `[notify]` asks for."""

    def __init__(
        self,
        policy: NotifyConfig,
        connectors: Mapping[str, tuple[str, type[Connector]]],  # name -> (type, class)  # type: ignore[type-arg]
        signals: Mapping[str, VerifySignals] | None = None,
    ) -> None:
        self.policy = policy
        self.connectors = connectors
        self.signals = signals or {}
        slack = [name for name, (kind, _cls) in connectors.items() if kind == "slack"]
        self.dm_connector = policy.dm_connector or (slack[0] if len(slack) == 1 else None)

    def plan(self, session: Session, now: datetime) -> Plan:
        plan = Plan()
        plan.paused = self.policy.in_quiet_time(now)
        if plan.paused:
            return plan
        items = self._open_findings(session)
        verifications = self._done_transitions(session, now) if self.policy.verify_done else []
        task_ids = {i.task.id for i in items} | {t.id for t, _ in verifications}
        past = actions_for_tasks(session, sorted(task_ids))
        latest = _latest_by_base(past)
        slack_ids = self._slack_ids(session)
        leads = sorted(key for key, in session.execute(select(Person.key).where(Person.lead.is_(True))))

        candidates: list[Planned] = []
        for item in items:
            for connector, kind, target, text_for in self._routes(item, slack_ids, leads, now, plan):
                base = f"{item.rule}:{item.task.source}:{item.task.external_id}:{kind}:{target}"
                number, due_since = self._next(base, latest, item.first_seen, now, once=kind == "escalate")
                if number is None:
                    continue
                candidates.append(self._planned(base, number, due_since, connector, kind, target,
                                                text_for(number), item.task, item.finding_id, slack_ids))
        for task, reporter in verifications:
            route = self._verify_route(task, reporter, slack_ids, plan)
            if route is None:
                continue
            connector, kind, target, text = route
            base = f"verify:{task.source}:{task.external_id}:{kind}:{target}"
            if base in latest:
                continue  # asked once, ever
            done_at = task.status_changed_at or now
            candidates.append(self._planned(base, 0, done_at, connector, kind, target, text, task, None, slack_ids))
        self._apply_caps(candidates, past, now, plan)
        return plan

    # -- inputs ------------------------------------------------------------------------------
    @staticmethod
    def _open_findings(session: Session) -> list[_Item]:
        owner = aliased(Person)
        stmt = (
            select(Finding.id, Finding.rule, Finding.message, Finding.first_seen, Finding.severity, Task, owner.key)
            .join(Task, Task.id == Finding.task_id)
            .outerjoin(owner, owner.id == Task.owner_id)
            .where(Finding.status == "open")
        )
        return [_Item(fid, rule, task, okey, msg, first, sev)
                for fid, rule, msg, first, sev, task, okey in session.execute(stmt)]

    @staticmethod
    def _done_transitions(session: Session, now: datetime) -> list[tuple[Task, str | None]]:
        """Tasks trackloop saw move to done lately (not those already done when first synced)."""
        reporter = aliased(Person)
        stmt = (
            select(Task, reporter.name, reporter.key)
            .join(TaskEvent, TaskEvent.task_id == Task.id)
            .outerjoin(reporter, reporter.id == Task.reporter_id)
            .where(TaskEvent.field == "status", TaskEvent.new == Status.DONE.value, TaskEvent.origin == "sync",
                   TaskEvent.at >= now - VERIFY_LOOKBACK, Task.status == Status.DONE.value)
            .distinct()
        )
        return [(task, name or key) for task, name, key in session.execute(stmt)]

    @staticmethod
    def _slack_ids(session: Session) -> dict[str, str]:
        stmt = select(Person.key, Identity.value).join(Identity).where(Identity.kind == "slack").order_by(Identity.id)
        found: dict[str, str] = {}
        for key, value in session.execute(stmt):
            found.setdefault(key, value)
        return found

    # -- routing -----------------------------------------------------------------------------
    def _can_push(self, connector: str) -> bool:
        entry = self.connectors.get(connector)
        return entry is not None and entry[1].push is not Connector.push

    def _source_kind(self, connector: str) -> str:
        return "reply" if self.connectors[connector][0] == "slack" else "comment"

    def _routes(
        self, item: _Item, slack_ids: dict[str, str], leads: list[str], now: datetime, plan: Plan
    ) -> Iterator[tuple[str, str, str, Callable[[int], str]]]:
        """(connector, kind, target, text(n)) for each way this finding should be followed up."""
        t, p = item.task, self.policy
        ref = f"{t.source}:{t.external_id}"
        how = self._how_to_verify(t) if item.rule == "done_unverified" else None
        if item.rule in p.comment_on_source:
            if self._can_push(t.source):
                yield (t.source, self._source_kind(t.source), "task",
                       lambda n: messages.follow_up(item.rule, item.message, reminder=n, how=how))
            else:
                plan.skipped[f"{t.source} cannot post comments"] += 1
        if item.rule in p.dm_owner:
            if item.owner is None:
                plan.skipped["no owner to DM"] += 1
            elif self.dm_connector is None or item.owner not in slack_ids:
                plan.skipped["owner has no Slack identity (or no Slack connector)"] += 1
            else:
                yield (self.dm_connector, "dm", item.owner,
                       lambda n: messages.direct(item.rule, item.message, ref=ref, title=t.title, url=t.url,
                                                 reminder=n, how=how))
        if item.rule == "missing_owner" and p.triage_channel is not None:
            yield (p.triage_channel.connector, "channel", p.triage_channel.channel,
                   lambda n: messages.triage(item.message, ref=ref, title=t.title, url=t.url))
        if p.escalate_after is not None and now - item.first_seen >= p.escalate_after and self.dm_connector:
            for lead in leads:
                if lead in slack_ids and lead != item.owner:
                    yield (self.dm_connector, "escalate", lead,
                           lambda n: messages.escalation(item.rule, item.message, ref=ref, title=t.title, url=t.url,
                                                         open_for=format_duration(p.escalate_after or timedelta()),
                                                         owner=item.owner))

    def _how_to_verify(self, task: Task) -> str:
        s = self.signals.get(task.source, VerifySignals())
        return messages.how_to_verify(f"{task.source}:{task.external_id}", labels=s.labels, statuses=s.statuses,
                                      reaction=s.reaction)

    def _verify_route(
        self, task: Task, reporter: str | None, slack_ids: dict[str, str], plan: Plan
    ) -> tuple[str, str, str, str] | None:
        text = messages.verification(criteria=task.acceptance_criteria, reporter=reporter,
                                     how=self._how_to_verify(task))
        verifier = self.policy.verifier
        if verifier:
            if self.dm_connector and verifier in slack_ids:
                return self.dm_connector, "dm", verifier, text
            plan.skipped["verifier has no Slack identity"] += 1
            return None
        if self._can_push(task.source):
            return task.source, self._source_kind(task.source), "task", text
        plan.skipped[f"{task.source} cannot post comments"] += 1
        return None

    # -- numbering, caps ---------------------------------------------------------------------
    def _next(
        self, base: str, latest: dict[str, tuple[int, PastAction]], first_seen: datetime, now: datetime, *,
        once: bool,
    ) -> tuple[int | None, datetime]:
        """The reminder number due now for `base` (None: nothing due) and since when it is due."""
        if base not in latest:
            return 0, first_seen
        number, last = latest[base]
        if last.status == "cancelled":
            return number + 1, first_seen  # its finding resolved before it was said: this is a new one
        if once or last.status != "sent" or last.sent_at is None:
            return None, first_seen  # pending or failed actions handle themselves
        due = last.sent_at + self.policy.remind_every
        return (number + 1, due) if due <= now else (None, due)

    @staticmethod
    def _planned(
        base: str, number: int, due_since: datetime, connector: str, kind: str, target: str, text: str,
        task: Task, finding_id: int | None, slack_ids: dict[str, str],
    ) -> Planned:
        """The action; a DM's key names the person, its wire target is their Slack id."""
        wire_kind = "dm" if kind == "escalate" else kind
        action = NewAction(
            key=f"{base}:{number}",
            connector=connector,
            kind=wire_kind,
            text=text,
            target=None if target == "task" else slack_ids.get(target, target) if wire_kind == "dm" else target,
            payload={"person": target} if wire_kind == "dm" else {},
            task_id=task.id,
            finding_id=finding_id,
        )
        return Planned(action, due_since, f"{task.source}:{task.external_id}")

    def _apply_caps(self, candidates: list[Planned], past: list[PastAction], now: datetime, plan: Plan) -> None:
        today = self.policy.day_start(now)
        per_day: Counter[tuple[int | None, str, str | None]] = Counter(
            (a.task_id, a.connector, a.target) for a in past if a.created_at >= today and a.status != "cancelled"
        )
        candidates.sort(key=lambda c: (c.due_since, c.action.key))
        for candidate in candidates:
            a = candidate.action
            slot = (a.task_id, a.connector, a.target)
            if per_day[slot] >= self.policy.per_task_per_day or len(plan.actions) >= self.policy.max_actions_per_run:
                plan.held_back += 1
                continue
            per_day[slot] += 1
            plan.actions.append(candidate)


def _latest_by_base(past: list[PastAction]) -> dict[str, tuple[int, PastAction]]:
    """For each key base (the key without its reminder number), the newest action."""
    latest: dict[str, tuple[int, PastAction]] = {}
    for action in past:
        base, _, number = action.key.rpartition(":")
        if not number.isdigit():
            continue
        n = int(number)
        if base not in latest or n > latest[base][0]:
            latest[base] = (n, action)
    return latest

