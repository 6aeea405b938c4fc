"""People and their tool identities: loading them from config and resolving task owners."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from sqlalchemy import ColumnElement, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from store.canonical import IdentityKind, IdentityRef
from store.models import Finding, Identity, Person, Task


def normalize(kind: str, value: str) -> str:
    """Logins and addresses compare case-insensitively; Slack and Jira ids are case-sensitive."""
    value = value.strip()
    if kind in (IdentityKind.EMAIL, IdentityKind.GITHUB, IdentityKind.PERSON):
        return value.lower()
    return value


def key_in(column: ColumnElement[str], keys: Iterable[str]) -> ColumnElement[bool]:
    """Match person keys as users type them: config keys are lower-case, while auto-created ones
    keep a Slack or Jira id's case (`slack:U01BOB`), so either spelling of a key finds it."""
    return column.in_(sorted({form for key in keys for form in (key, key.lower())}))


@dataclass(frozen=True, slots=True)
class PersonSpec:
    """A `[people.KEY]` table in plain terms."""

    key: str
    name: str | None = None
    lead: bool = False
    identities: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # (kind, value)


def sync_people(session: Session, specs: Iterable[PersonSpec]) -> None:
    """Make the people table match the config.

    A configured identity that an earlier sync attached to an auto-created person merges that
    person into the configured one (all its identities, tasks and findings), so adding someone to
    the config later never leaves a stray duplicate that their other tools still resolve to.
    """
    specs = list(specs)
    people = {p.key: p for p in session.scalars(select(Person))}
    for spec in specs:
        person = people.get(spec.key)
        if person is None:
            person = Person(key=spec.key)
            session.add(person)
            people[spec.key] = person
        person.name, person.lead, person.from_config = spec.name, spec.lead, True
    configured = {s.key for s in specs}
    for key, person in people.items():
        if person.from_config and key not in configured:
            person.from_config, person.lead = False, False
    session.flush()

    for spec in specs:
        person = people[spec.key]
        for kind, value in spec.identities:
            norm = normalize(kind, value)
            ident = session.scalar(select(Identity).where(Identity.kind == kind, Identity.value == norm))
            if ident is None:
                session.add(Identity(person_id=person.id, kind=kind, value=norm))
            elif ident.person_id != person.id:
                _move_identity(session, ident, person)
    session.flush()


def _move_identity(session: Session, ident: Identity, to: Person) -> None:
    """Give `ident` to `to`; an auto-created holder is merged into `to` whole and deleted."""
    old = session.get(Person, ident.person_id)
    if old is None or old.from_config:
        ident.person_id = to.id  # two configured people: the config decides, nothing else moves
        return
    session.execute(update(Identity).where(Identity.person_id == old.id).values(person_id=to.id))
    session.execute(update(Task).where(Task.owner_id == old.id).values(owner_id=to.id))
    session.execute(update(Task).where(Task.reporter_id == old.id).values(reporter_id=to.id))
    session.execute(update(Finding).where(Finding.act_person_id == old.id).values(act_person_id=to.id))
    session.expire(old, ["identities"])
    session.delete(old)
    session.flush()
    session.expire(ident)


class IdentityResolver:
    """Maps identity refs to person ids, creating a person for an identity nobody configured.

    Caches across pages; `rollback()` forgets what the failed transaction created, so a cached
    id never points at a row that was rolled back.
    """

    def __init__(self) -> None:
        self._known: dict[tuple[str, str], int] = {}
        self._pending: dict[tuple[str, str], int] = {}

    def rollback(self) -> None:
        self._pending.clear()

    def commit(self) -> None:
        self._known.update(self._pending)
        self._pending.clear()

    def resolve(self, session: Session, ref: IdentityRef | None) -> int | None:
        if ref is None or not ref.value.strip():
            return None
        key = (str(ref.kind), normalize(ref.kind, ref.value))
        found = self._known.get(key) or self._pending.get(key)
        if found is not None:
            return found
        person_id = self._lookup(session, *key)
        if person_id is None and ref.email:
            person_id = self._lookup(session, IdentityKind.EMAIL, normalize(IdentityKind.EMAIL, ref.email))
            if person_id is not None:  # matched by email: remember the tool identity too
                person_id = self._add_identity(session, person_id, key)
        if person_id is None:
            person_id = self._create(session, ref, key)
        self._pending[key] = person_id
        return person_id

    @staticmethod
    def _lookup(session: Session, kind: str, value: str) -> int | None:
        if kind == IdentityKind.PERSON:
            return session.scalar(select(Person.id).where(Person.key == value))
        return session.scalar(select(Identity.person_id).where(Identity.kind == kind, Identity.value == value))

    @classmethod
    def _add_identity(cls, session: Session, person_id: int, key: tuple[str, str]) -> int:
        """Attach identity `key` to a person; if another replica attached it meanwhile, use theirs."""
        try:
            with session.begin_nested():
                session.add(Identity(person_id=person_id, kind=key[0], value=key[1]))
                session.flush()
        except IntegrityError:
            found = cls._lookup(session, *key)
            if found is None:
                raise
            return found
        return person_id

    @classmethod
    def _create(cls, session: Session, ref: IdentityRef, key: tuple[str, str]) -> int:
        """A person for an identity nobody configured.

        Replicas syncing different sources can meet the same stranger at the same moment: the
        insert runs in a savepoint, and the loser of that race picks up the winner's person.
        """
        person_key = key[1] if ref.kind == IdentityKind.PERSON else f"{key[0]}:{key[1]}"
        try:
            with session.begin_nested():
                person = Person(key=person_key, name=ref.display_name)
                session.add(person)
                session.flush()
                if ref.kind != IdentityKind.PERSON:
                    session.add(Identity(person_id=person.id, kind=key[0], value=key[1]))
                    session.flush()
        except IntegrityError:
            found = cls._lookup(session, *key)
            if found is None:
                found = session.scalar(select(Person.id).where(Person.key == person_key))
            if found is None:
                raise
            return found
        if ref.kind != IdentityKind.PERSON and ref.email:
            email = normalize(IdentityKind.EMAIL, ref.email)
            if cls._lookup(session, IdentityKind.EMAIL, email) is None:
                cls._add_identity(session, person.id, (IdentityKind.EMAIL.value, email))
        return person.id
