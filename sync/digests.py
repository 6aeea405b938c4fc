"""Lead digests: what needs follow-up, grouped by owner, and what changed since the last one.

A digest is built once (`DigestContent`) and rendered for each medium: terminal text, Markdown,
HTML (files and email), and Slack Block Kit. Delivery goes through the outbox with the key
`digest:NAME:SLOT:VIA:RECIPIENT:0`, so each scheduled slot is sent once per recipient even if the
daemon restarts in the middle of it.
"""

from __future__ import annotations

import html
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

from croniter import croniter
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session, aliased

from connectors.base import safe_url
from connectors.slack import escape_mrkdwn
from store.canonical import OPEN_STATUSES, Status
from store.models import Finding, OutboxAction, Person, Task, TaskEvent
from store.outbox import NewAction
from store.people import key_in
from store.sql import has_any_label
from sync.messages import short
from sync.zones import TimeZoneName

Via = Literal["slack", "email"]
SMTP_VIA = "[smtp]"  # the outbox "connector" of email digests sent straight through [smtp] (no imap connector)


class DigestConfig(BaseModel):
    """`[digests.NAME]`: a consolidated follow-up for leads."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    to: list[str] = Field(description='Person keys, and/or Slack channels ("#ops" or "C0OPS").')
    schedule: str = Field("0 9 * * mon-fri", description="Cron expression, in the digest's time zone.")
    timezone: TimeZoneName = Field("UTC", description="IANA time zone of the schedule.")
    via: list[Via] = Field(default_factory=lambda: ["slack"], description="slack and/or email.")
    slack_connector: str | None = Field(None, description="Slack connector to post with (default: the only one).")
    email_connector: str | None = Field(
        None, description="imap connector whose SMTP settings send email digests (default: the only one, "
        "else the top-level [smtp])."
    )
    sources: list[str] = Field(default_factory=list, description="Only tasks of these connectors (empty: all).")
    labels: list[str] = Field(default_factory=list, description="Only tasks with one of these labels (empty: all).")
    owners: list[str] = Field(default_factory=list, description="Only tasks owned by these person keys (empty: all).")
    max_items: int = Field(200, ge=1, description="Items listed per section; the rest are counted.")

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str) -> str:
        if not croniter.is_valid(value):
            raise ValueError(f'expected a cron expression like "0 9 * * mon-fri", got {value!r}')
        return value

    def slot(self, now: datetime) -> datetime:
        """The latest scheduled time at or before `now` (the slot a send now belongs to)."""
        local = now.astimezone(ZoneInfo(self.timezone))
        return croniter(self.schedule, local + timedelta(seconds=1)).get_prev(datetime)

    def previous_slot(self, slot: datetime) -> datetime:
        return croniter(self.schedule, slot).get_prev(datetime)


@dataclass(frozen=True, slots=True)
class Item:
    ref: str
    title: str
    url: str | None  # as the source gave it: renderers link only `safe_url(url)`
    note: str


@dataclass(slots=True)
class Section:
    title: str
    by_owner: dict[str, list[Item]] = field(default_factory=lambda: defaultdict(list))
    total: int = 0

    @property
    def more(self) -> int:
        """Items counted but not listed (beyond `max_items`): every renderer says how many."""
        return self.total - sum(len(items) for items in self.by_owner.values())


@dataclass(slots=True)
class DigestContent:
    name: str
    slot: datetime
    since: datetime | None  # the last digest sent; None for a first digest
    counts: list[tuple[str, int]]
    sections: list[Section]
    changes: list[tuple[str, list[Item]]]

    @property
    def all_clear(self) -> bool:
        return not any(s.total for s in self.sections)

    @property
    def heading(self) -> str:
        return f"trackloop digest “{self.name}” for {self.slot.strftime('%a %d %b %Y, %H:%M %Z')}"

    @property
    def open_count(self) -> int:
        return dict(self.counts).get("Open", 0)


# Sections in reading order: (title, rules whose open findings list a task there).
SECTIONS: list[tuple[str, tuple[str, ...]]] = [
    ("Overdue", ("overdue",)),
    ("At risk", ("at_risk", "dependency_at_risk")),
    ("Due soon", ("due_soon",)),
    ("Stale", ("stale_status",)),
    ("Unowned", ("missing_owner",)),
    ("Done, not verified", ("done_unverified",)),
]


def build(session: Session, name: str, config: DigestConfig, now: datetime, since: datetime | None) -> DigestContent:
    """Gather the digest's content for the slot that `now` falls in; changes are listed since
    `since` (the last digest sent), and left out of a first digest."""
    slot = config.slot(now)
    owner = aliased(Person)

    def scoped(stmt):  # type: ignore[no-untyped-def]
        if config.sources:
            stmt = stmt.where(Task.source.in_(config.sources))
        if config.labels:
            stmt = stmt.where(has_any_label(session, config.labels))
        if config.owners:
            stmt = stmt.where(key_in(owner.key, config.owners))
        return stmt

    open_ = [s.value for s in OPEN_STATUSES]
    base = select(func.count()).select_from(Task).outerjoin(owner, owner.id == Task.owner_id)
    n_open = session.scalar(scoped(base.where(Task.status.in_(open_)))) or 0
    n_blocked = session.scalar(scoped(base.where(Task.status == Status.BLOCKED.value))) or 0

    flagged = scoped(
        select(Finding.rule, Finding.message, Task, owner.key)
        .join(Task, Task.id == Finding.task_id)
        .outerjoin(owner, owner.id == Task.owner_id)
        .where(Finding.status == "open")
        .order_by(Finding.first_seen, Task.id)
    )
    sections = {title: Section(title) for title, _ in SECTIONS}
    section_of = {rule: title for title, rules in SECTIONS for rule in rules}
    listed: set[tuple[str, int]] = set()
    per_rule: dict[str, set[int]] = defaultdict(set)
    for rule, message, task, owner_key in session.execute(flagged):
        per_rule[rule].add(task.id)
        title = section_of.get(rule)
        if title is None or (title, task.id) in listed:
            continue
        listed.add((title, task.id))
        section = sections[title]
        section.total += 1
        if section.total <= config.max_items:
            section.by_owner[owner_key or "no owner"].append(_item(task, message))
    blocked = Section("Blocked")
    for task, owner_key in session.execute(
        scoped(select(Task, owner.key).outerjoin(owner, owner.id == Task.owner_id)
               .where(Task.status == Status.BLOCKED.value).order_by(Task.status_changed_at, Task.id))
    ):
        blocked.total += 1
        if blocked.total <= config.max_items:
            blocked.by_owner[owner_key or "no owner"].append(_item(task, task.raw_status))

    counts = [
        ("Open", n_open),
        ("Unowned", len(per_rule["missing_owner"])),
        ("Stale", len(per_rule["stale_status"])),
        ("Overdue", len(per_rule["overdue"])),
        ("At risk", len(per_rule["at_risk"] | per_rule["dependency_at_risk"])),
        ("Done, not verified", len(per_rule["done_unverified"])),
        ("Blocked", n_blocked),
    ]
    changes = _changes(session, scoped, owner, since, config.max_items) if since is not None else []
    return DigestContent(name, slot, since, counts, [*sections.values(), blocked], changes)


def _item(task: Task, note: str) -> Item:
    return Item(f"{task.source}:{task.external_id}", short(task.title), task.url, note)


def _changes(session, scoped, owner, since: datetime, limit: int) -> list[tuple[str, list[Item]]]:  # type: ignore[no-untyped-def]
    new = session.execute(scoped(
        select(Task).outerjoin(owner, owner.id == Task.owner_id).where(Task.first_seen_at > since)
        .order_by(Task.first_seen_at, Task.id).limit(limit)
    )).scalars().all()
    closed = session.execute(scoped(
        select(Task).outerjoin(owner, owner.id == Task.owner_id)
        .join(TaskEvent, TaskEvent.task_id == Task.id)
        .where(TaskEvent.field == "status", TaskEvent.at > since, TaskEvent.origin != "initial",
               TaskEvent.new.in_([Status.DONE.value, Status.CANCELLED.value]),
               or_(Task.status == Status.DONE.value, Task.status == Status.CANCELLED.value))
        .distinct().order_by(Task.id).limit(limit)
    )).scalars().all()
    flagged = session.execute(scoped(
        select(Finding.message, Task).join(Task, Task.id == Finding.task_id)
        .outerjoin(owner, owner.id == Task.owner_id)
        .where(Finding.first_seen > since, Finding.status == "open")
        .order_by(Finding.first_seen, Task.id).limit(limit)
    )).all()
    return [
        ("New", [_item(t, t.status) for t in new]),
        ("Closed", [_item(t, t.status) for t in closed]),
        ("Newly flagged", [_item(t, message) for message, t in flagged]),
    ]


def _since(d: DigestContent) -> str:
    return d.since.astimezone(d.slot.tzinfo).strftime("%a %d %b, %H:%M") if d.since else ""


# -- renderers ---------------------------------------------------------------------------------
def render_text(d: DigestContent) -> str:
    """Plain text: the terminal and the text/plain part of email."""
    lines = [d.heading, ""]
    if d.all_clear:
        return f"{d.heading}\nAll clear: {d.open_count} open tasks, nothing needs follow-up.\n"
    lines += [f"{label}: {n}" for label, n in d.counts]
    for section in d.sections:
        if not section.total:
            continue
        lines += ["", f"{section.title} ({section.total})"]
        for owner, items in section.by_owner.items():
            lines.append(f"  {owner}")
            lines += [f"    - {i.ref} {i.title}: {i.note}" + (f" <{url}>" if (url := safe_url(i.url)) else "")
                      for i in items]
        if section.more:
            lines.append(f"  … and {section.more} more")
    changes = [(label, items) for label, items in d.changes if items]
    if changes:
        lines += ["", f"Since {_since(d)}"]
        for label, items in changes:
            lines.append(f"  {label} ({len(items)})")
            lines += [f"    - {i.ref} {i.title}" + (f": {i.note}" if label == "Newly flagged" else "")
                      for i in items]
    return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    """Markdown-escape user text (titles, notes): no links, markup or HTML can be injected."""
    out = text.replace("\\", "\\\\")
    for ch in "`*_{}[]<>()#+!|~":
        out = out.replace(ch, "\\" + ch)
    return out.replace("@", "@\u200b")


def render_markdown(d: DigestContent) -> str:
    if d.all_clear:
        return f"# {_md(d.heading)}\n\nAll clear: {d.open_count} open tasks, nothing needs follow-up.\n"
    lines = [f"# {_md(d.heading)}", ""]
    lines += [f"{label}: {n}  " for label, n in d.counts]
    for section in d.sections:
        if not section.total:
            continue
        lines += ["", f"## {section.title} ({section.total})"]
        for owner, items in section.by_owner.items():
            lines += ["", f"**{_md(owner)}**", ""]
            for i in items:
                ref = f"[{_md(i.ref)}]({url})" if (url := safe_url(i.url)) else _md(i.ref)
                lines.append(f"- {ref} {_md(i.title)}: {_md(i.note)}")
        if section.more:
            lines += ["", f"… and {section.more} more"]
    changes = [(label, items) for label, items in d.changes if items]
    if changes:
        lines += ["", f"## Since {_since(d)}"]
        for label, items in changes:
            lines += ["", f"**{label} ({len(items)})**", ""]
            lines += [f"- {_md(i.ref)} {_md(i.title)}" for i in items]
    return "\n".join(lines) + "\n"


def render_html(d: DigestContent) -> str:
    e = html.escape
    if d.all_clear:
        body = f"<p>All clear: {d.open_count} open tasks, nothing needs follow-up.</p>"
    else:
        parts = ["<p>" + "<br>".join(f"{e(label)}: {n}" for label, n in d.counts) + "</p>"]
        for section in d.sections:
            if not section.total:
                continue
            parts.append(f"<h2>{e(section.title)} ({section.total})</h2>")
            for owner, items in section.by_owner.items():
                parts.append(f"<h3>{e(owner)}</h3><ul>")
                for i in items:
                    ref = f'<a href="{e(url)}">{e(i.ref)}</a>' if (url := safe_url(i.url)) else e(i.ref)
                    parts.append(f"<li>{ref} {e(i.title)}: {e(i.note)}</li>")
                parts.append("</ul>")
            if section.more:
                parts.append(f"<p>… and {section.more} more</p>")
        changes = [(label, items) for label, items in d.changes if items]
        if changes:
            parts.append(f"<h2>Since {e(_since(d))}</h2>")
            for label, items in changes:
                parts.append(f"<h3>{e(label)} ({len(items)})</h3><ul>")
                parts += [f"<li>{e(i.ref)} {e(i.title)}</li>" for i in items]
                parts.append("</ul>")
        body = "\n".join(parts)
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{e(d.heading)}</title></head>"
            f"<body>\n<h1>{e(d.heading)}</h1>\n{body}\n</body></html>\n")


def render_blocks(d: DigestContent) -> list[dict[str, object]]:
    """Slack Block Kit; the Slack connector splits them to respect message limits."""
    def section(text: str) -> dict[str, object]:
        return {"type": "section", "text": {"type": "mrkdwn", "text": text}}

    blocks: list[dict[str, object]] = [{"type": "header", "text": {"type": "plain_text", "text": d.heading}}]
    if d.all_clear:
        return [*blocks, section(f"All clear: {d.open_count} open tasks, nothing needs follow-up.")]
    blocks.append(section("\n".join(f"{label}: *{n}*" for label, n in d.counts)))
    for sec in d.sections:
        if not sec.total:
            continue
        blocks += [{"type": "divider"}, {"type": "header", "text": {"type": "plain_text",
                                                                    "text": f"{sec.title} ({sec.total})"}}]
        for owner, items in sec.by_owner.items():
            lines = [f"*{escape_mrkdwn(owner)}*"]
            for i in items:
                ref = f"<{url}|{escape_mrkdwn(i.ref)}>" if (url := safe_url(i.url)) else escape_mrkdwn(i.ref)
                lines.append(f"• {ref} {escape_mrkdwn(i.title)}: {escape_mrkdwn(i.note)}")
            blocks.append(section("\n".join(lines)))
        if sec.more:
            blocks.append(section(f"… and {sec.more} more"))
    changes = [(label, items) for label, items in d.changes if items]
    if changes:
        blocks += [{"type": "divider"}, {"type": "header", "text": {
            "type": "plain_text", "text": f"Since {_since(d)}"}}]
        for label, items in changes:
            lines = [f"*{label} ({len(items)})*"] + [f"• {escape_mrkdwn(i.ref)} {escape_mrkdwn(i.title)}"
                                                     for i in items]
            blocks.append(section("\n".join(lines)))
    return blocks


def last_sent(session: Session, name: str) -> datetime | None:
    """When this digest was last delivered (the start of "what changed")."""
    prefix = f"digest:{name}:"
    return session.scalar(
        select(func.max(OutboxAction.sent_at)).where(OutboxAction.key.startswith(prefix, autoescape=True),
                                                     OutboxAction.status == "sent")
    )


def recipients(
    name: str,
    config: DigestConfig,
    content: DigestContent,
    connectors: dict[str, str],  # connector name -> type
    identities: dict[tuple[str, str], str],  # (person key, kind) -> value
    *,
    smtp: bool = False,  # a top-level [smtp] can send email when no imap connector does
) -> tuple[list[NewAction], list[str]]:
    """The outbox actions that deliver `content`, and the recipients that could not be reached."""
    actions: list[NewAction] = []
    missed: list[str] = []
    slot = content.slot.isoformat()
    for via in config.via:
        connector = config.slack_connector if via == "slack" else config.email_connector
        if connector is None:
            wanted = "slack" if via == "slack" else "imap"
            found = [n for n, kind in connectors.items() if kind == wanted]
            connector = found[0] if len(found) == 1 else SMTP_VIA if via == "email" and smtp and not found else None
        for recipient in config.to:
            is_channel = recipient.startswith("#") or recipient[:1] in ("C", "G") and recipient.isupper()
            if via == "slack":
                target = recipient if is_channel else identities.get((recipient, "slack"))
            else:
                target = None if is_channel else identities.get((recipient, "email"))
            if connector is None or target is None:
                missed.append(f"{recipient} by {via}")
                continue
            key = f"digest:{name}:{slot}:{via}:{recipient}:0"
            if via == "slack":
                actions.append(NewAction(key=key, connector=connector, kind="digest", target=target,
                                         text=render_text(content), payload={"blocks": render_blocks(content)}))
            else:
                actions.append(NewAction(key=key, connector=connector, kind="email", target=target,
                                         subject=content.heading, text=render_text(content),
                                         payload={"html": render_html(content)}))
    return actions, missed
