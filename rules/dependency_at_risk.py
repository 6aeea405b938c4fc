"""`dependency_at_risk`: an open task blocked by open work that is late, stale, or due after it.

Risk propagates along chains of `blocks` links: a late blocker three levels down flags the
task at the top. A blocker is stale by `stale_status`'s thresholds even where that rule is
switched off or scoped away from it: nagging is optional, the risk is not. Chains are walked
over the strongly connected components of the blocking graph (Tarjan), so a cycle terminates
and is reported as a cycle.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import date

from sqlalchemy import and_, select
from sqlalchemy.orm import aliased

from rules.base import OPEN, Rule, RuleConfig, RuleContext, Verdict
from rules.stale_status import StaleStatus, StaleStatusConfig
from store.canonical import LinkKind
from store.models import Task, TaskLink
from store.sql import one_of


@dataclass(frozen=True, slots=True)
class Node:
    ref: str
    due: date | None


@dataclass(frozen=True, slots=True)
class Risk:
    """Why a task is at risk: the chain of blockers down to the cause."""

    chain: tuple[str, ...]
    cause: str


class DependencyAtRisk(Rule[RuleConfig]):
    id = "dependency_at_risk"
    requires = ("stale_status", "overdue")

    def evaluate(self, ctx: RuleContext) -> list[Verdict]:
        nodes, blockers = self._graph(ctx)
        stale = self._stale_blockers(ctx, set().union(*blockers.values()))
        risks: dict[int, Risk] = {}
        for component in _components(nodes, blockers):  # blockers come before what they block
            if len(component) > 1 or component[0] in blockers[component[0]]:
                members = sorted(component)
                loop = " → ".join(nodes[t].ref for t in members) + f" → {nodes[members[0]].ref}"
                for task in members:
                    risks[task] = Risk((), f"is in a dependency cycle: {loop}")
                continue
            [task] = component
            options = []
            for blocker in sorted(blockers[task]):
                direct = self._direct(ctx, nodes, task, blocker, stale)
                if direct is not None:
                    options.append(direct)
                elif blocker in risks:
                    options.append(Risk((nodes[blocker].ref, *risks[blocker].chain), risks[blocker].cause))
            if options:
                risks[task] = min(options, key=lambda r: len(r.chain))
        in_scope = _in_scope(ctx, list(risks), self.config)  # risk itself crosses scopes
        verdicts = []
        for task, risk in risks.items():
            if task not in in_scope:
                continue
            if not risk.chain:
                message = risk.cause.removeprefix("is ")
            elif len(risk.chain) == 1:
                message = f"blocked by {risk.chain[0]}, which {risk.cause}"
            else:
                path = " ← ".join(risk.chain)
                message = (f"blocked by {risk.chain[0]}: {len(risk.chain)} levels down, "
                           f"{risk.chain[-1]} {risk.cause} ({path})")
            verdicts.append(Verdict(task, message, {"chain": list(risk.chain), "cause": risk.cause}))
        return verdicts

    @staticmethod
    def _stale_blockers(ctx: RuleContext, ids: set[int]) -> dict[int, Verdict]:
        """Which blockers are stale by stale_status's thresholds, ignoring its switch and scope.

        What stale_status flagged in this run is stale; of the rest, only blockers its scope
        kept it from seeing are checked here (with the defaults: those labelled on-hold or wontfix).
        """
        settings = ctx.configs.get("stale_status")
        base = settings if isinstance(settings, StaleStatusConfig) else StaleStatusConfig()
        flagged = ctx.results.get("stale_status", {}) if base.enabled else {}
        found = {tid: flagged[tid] for tid in ids & flagged.keys()}
        unknown = list(ids - flagged.keys())
        if base.enabled and unknown:
            seen = _in_scope(ctx, unknown, base)
            unknown = [tid for tid in unknown if tid not in seen]  # in scope and not flagged: not stale
        if unknown:
            unscoped = base.model_copy(update={"enabled": True, "sources": [], "labels": [], "owners": [],
                                               "exclude_labels": []})
            found.update((v.task_id, v) for v in StaleStatus(unscoped).stale(ctx, among=unknown))
        return found

    @staticmethod
    def _direct(ctx: RuleContext, nodes: dict[int, Node], task: int, blocker: int,
                stale: dict[int, Verdict]) -> Risk | None:
        b, t = nodes[blocker], nodes[task]
        if b.due is not None and b.due < ctx.today:
            late = (ctx.today - b.due).days
            return Risk((b.ref,), f"is overdue by {late} day{'s' if late != 1 else ''}")
        if blocker in stale:
            return Risk((b.ref,), f"is stale ({stale[blocker].message})")
        if b.due is not None and t.due is not None and b.due > t.due:
            return Risk((b.ref,), f"is due {b.due.isoformat()}, after this task's {t.due.isoformat()}")
        return None

    @staticmethod
    def _graph(ctx: RuleContext) -> tuple[dict[int, Node], dict[int, set[int]]]:
        """Open tasks joined by `blocks` links whose both ends are stored and open."""
        blocker, blocked = aliased(Task), aliased(Task)
        stmt = (
            select(blocked.id, blocked.source, blocked.external_id, blocked.due,
                   blocker.id, blocker.source, blocker.external_id, blocker.due)
            .select_from(TaskLink)
            .join(blocker, and_(TaskLink.src_source == blocker.source, TaskLink.src_external_id == blocker.external_id))
            .join(blocked, and_(TaskLink.dst_source == blocked.source, TaskLink.dst_external_id == blocked.external_id))
            .where(TaskLink.kind == LinkKind.BLOCKS.value, blocker.status.in_(OPEN), blocked.status.in_(OPEN))
        )
        nodes: dict[int, Node] = {}
        blockers: dict[int, set[int]] = defaultdict(set)
        for tid, tsrc, text, tdue, bid, bsrc, bext, bdue in ctx.session.execute(stmt):
            nodes[tid] = Node(f"{tsrc}:{text}", tdue)
            nodes[bid] = Node(f"{bsrc}:{bext}", bdue)
            blockers[tid].add(bid)
        return nodes, blockers


def _in_scope(ctx: RuleContext, ids: list[int], config: RuleConfig) -> set[int]:
    """Which of `ids` a rule's scope admits."""
    found: set[int] = set()
    for i in range(0, len(ids), 5000):
        stmt = ctx.scoped(select(Task.id).where(one_of(ctx.session, Task.id, ids[i : i + 5000])), config)
        found.update(tid for (tid,) in ctx.session.execute(stmt))
    return found


def _components(nodes: dict[int, Node], edges: dict[int, set[int]]) -> list[list[int]]:
    """Tarjan's strongly connected components, iteratively, each emitted after the ones it
    points to (blockers before the tasks they block)."""
    index: dict[int, int] = {}
    low: dict[int, int] = {}
    on_stack: set[int] = set()
    stack: list[int] = []
    out: list[list[int]] = []
    counter = 0
    for root in sorted(nodes):
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                out.append(component)
    return out
