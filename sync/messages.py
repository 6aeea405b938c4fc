"""The words trackloop sends: short, specific, polite, and safe to post anywhere.

Every text here is plain text. Each connector renders it for its medium and escapes it there
(Slack mrkdwn, GitHub Markdown, Jira wiki markup), so a hostile task title can never inject a
mention, a broadcast or markup. Titles are cut short, so a 10 kB title stays a title.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from connectors.base import safe_url

TITLE_LIMIT = 120
_SPACE = re.compile(r"\s+")

ASKS: dict[str, str] = {
    "missing_owner": "Could someone take it, or assign it to the right person?",
    "stale_status": "Could you post a short status update, or change the status if it is blocked or done?",
    "overdue": "Could you update the due date, or note what is left to finish it?",
    "due_soon": "Is it still on track for its due date?",
    "no_due_date": "Could you add a due date so it can be planned?",
    "dependency_at_risk": "Something it depends on is at risk; is the plan still realistic?",
    "missing_context": (
        "Could you add acceptance criteria or a little more description, so whoever picks it up knows "
        "when it is done?"
    ),
    "done_unverified": "Could someone other than the assignee confirm the outcome?",
    "at_risk": "Judging by similar work it may miss its due date; is the date still realistic?",
}
DEFAULT_ASK = "Could you take a look?"


def short(text: str, limit: int = TITLE_LIMIT) -> str:
    """One line, at most `limit` characters."""
    line = _SPACE.sub(" ", text or "").strip()
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


def how_to_verify(ref: str, *, labels: Sequence[str] = (), statuses: Sequence[str] = (),
                  reaction: bool = False) -> str:
    """The verification signals the task's source really has, and the CLI, which always works."""
    ways = []
    if labels:
        ways.append("add the " + " or ".join(f"`{label}`" for label in labels) + " label")
    if statuses:
        ways.append("move it to " + " or ".join(f"“{status}”" for status in statuses))
    if reaction:
        ways.append("react with ✅ (someone other than the owner)")
    ways.append(f"run `trackloop verify {ref}`")
    text = ", ".join(ways[:-1]) + (", or " if len(ways) > 2 else " or " if ways[:-1] else "") + ways[-1]
    return text[0].upper() + text[1:] + "."


def _ask(rule: str, how: str | None) -> str:
    return f"{ASKS.get(rule, DEFAULT_ASK)} {how}" if how else ASKS.get(rule, DEFAULT_ASK)


def follow_up(rule: str, finding: str, *, reminder: int, how: str | None = None) -> str:
    """A comment on the task itself: what was noticed (with its numbers) and a polite ask
    (`how`: how to verify, for done_unverified)."""
    again = " (reminder)" if reminder else ""
    return f"trackloop follow-up{again}: {finding}.\n{_ask(rule, how)} Thank you!"


def direct(rule: str, finding: str, *, ref: str, title: str, url: str | None, reminder: int,
           how: str | None = None) -> str:
    """A direct message to a person about one task."""
    again = "Reminder: " if reminder else ""
    link = f"\n{safe}" if (safe := safe_url(url)) else ""
    return f"{again}{ref} “{short(title)}”: {finding}.\n{_ask(rule, how)}{link}"


def triage(finding: str, *, ref: str, title: str, url: str | None) -> str:
    """A note to the triage channel about work nobody owns."""
    link = f"\n{safe}" if (safe := safe_url(url)) else ""
    return f"Needs an owner: {ref} “{short(title)}”: {finding}.{link}"


def escalation(rule: str, finding: str, *, ref: str, title: str, url: str | None, open_for: str,
               owner: str | None) -> str:
    """A note to the lead about a finding nobody acted on."""
    who = f"owner: {owner}" if owner else "no owner"
    link = f"\n{safe}" if (safe := safe_url(url)) else ""
    return (f"Still open after {open_for} ({who}): {ref} “{short(title)}”: {finding}.\n"
            f"It may need your help to move.{link}")


def verification(*, criteria: str | None, reporter: str | None, how: str) -> str:
    """The ask for confirmation when a task moves to done (`how`: from `how_to_verify`)."""
    hello = f"{reporter}, this" if reporter else "This"
    ask = (f"{hello} was marked done. Could you confirm it does what was needed"
           f"{' (acceptance criteria below)' if criteria else ''}? {how}")
    return f"{ask}\n\nAcceptance criteria:\n{criteria.strip()}" if criteria else ask
