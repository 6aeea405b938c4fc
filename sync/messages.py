"""The words trackloop sends: short, specific, polite, and safe to post anywhere.

Every text here is plain text. Each connector renders it for its medium and escapes it there
(Slack mrkdwn, GitHub Markdown, Jira wiki markup), so a hostile task title can never inject a
mention, a broadcast or markup. Titles are cut short, so a 10 kB title stays a title.
"""

from __future__ import annotations

import re

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
    "done_unverified": (
        "Could someone other than the assignee confirm the outcome (add the `verified` label, or run "
        "`trackloop verify` on it)?"
    ),
    "at_risk": "Judging by similar work it may miss its due date; is the date still realistic?",
}
DEFAULT_ASK = "Could you take a look?"


def short(text: str, limit: int = TITLE_LIMIT) -> str:
    """One line, at most `limit` characters."""
    line = _SPACE.sub(" ", text or "").strip()
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


def follow_up(rule: str, finding: str, *, reminder: int) -> str:
    """A comment on the task itself: what was noticed (with its numbers) and a polite ask."""
    again = " (reminder)" if reminder else ""
    return f"trackloop follow-up{again}: {finding}.\n{ASKS.get(rule, DEFAULT_ASK)} Thank you!"


def direct(rule: str, finding: str, *, ref: str, title: str, url: str | None, reminder: int) -> str:
    """A direct message to a person about one task."""
    again = "Reminder: " if reminder else ""
    link = f"\n{url}" if url else ""
    return f"{again}{ref} “{short(title)}”: {finding}.\n{ASKS.get(rule, DEFAULT_ASK)}{link}"


def triage(finding: str, *, ref: str, title: str, url: str | None) -> str:
    """A note to the triage channel about work nobody owns."""
    link = f"\n{url}" if url else ""
    return f"Needs an owner: {ref} “{short(title)}”: {finding}.{link}"


def escalation(rule: str, finding: str, *, ref: str, title: str, url: str | None, open_for: str,
               owner: str | None) -> str:
    """A note to the lead about a finding nobody acted on."""
    who = f"owner: {owner}" if owner else "no owner"
    link = f"\n{url}" if url else ""
    return (f"Still open after {open_for} ({who}): {ref} “{short(title)}”: {finding}.\n"
            f"It may need your help to move.{link}")


def verification(*, criteria: str | None, reporter: str | None) -> str:
    """The ask for confirmation when a task moves to done."""
    hello = f"{reporter}, this" if reporter else "This"
    ask = (f"{hello} was marked done. Could you confirm it does what was needed"
           f"{' (acceptance criteria below)' if criteria else ''}? Add the `verified` label, reply "
           "here, or run `trackloop verify` on it.")
    return f"{ask}\n\nAcceptance criteria:\n{criteria.strip()}" if criteria else ask
