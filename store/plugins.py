"""Loading plugins from an entry-point group: shared by connector types and rules."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from store.errors import TrackloopError


class PluginError(TrackloopError):
    """A plugin could not be loaded, or two plugins claim one name."""


@dataclass(frozen=True, slots=True)
class PluginInfo:
    name: str
    cls: Any
    distribution: str
    version: str


def _describe(ep: EntryPoint) -> str:
    return f"{ep.value} (from {ep.dist.name if ep.dist else '?'})"


def discover(group: str) -> dict[str, PluginInfo]:
    """Load every entry point of `group`; two with one name fail startup, naming both."""
    found: dict[str, PluginInfo] = {}
    origins: dict[str, EntryPoint] = {}
    for ep in entry_points(group=group):
        if ep.name in origins:
            if origins[ep.name].value == ep.value:
                continue  # the same distribution seen twice (editable installs)
            raise PluginError(
                f"two plugins are named {ep.name!r} in {group}: {_describe(origins[ep.name])} and {_describe(ep)}"
            )
        try:
            cls = ep.load()
        except Exception as exc:
            raise PluginError(f"plugin {ep.name!r} ({ep.value}) failed to load: {exc}") from exc
        origins[ep.name] = ep
        dist = ep.dist
        found[ep.name] = PluginInfo(ep.name, cls, dist.name if dist else "?", dist.version if dist else "?")
    return found
