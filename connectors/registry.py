"""Finding connector types: every one, built-in or plugin, arrives through one entry-point group."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

from connectors.base import Connector
from store.errors import TrackloopError

GROUP = "trackloop.connectors"


class PluginError(TrackloopError):
    """A plugin could not be loaded, or two plugins claim one name."""


@dataclass(frozen=True, slots=True)
class PluginInfo:
    name: str
    cls: type[Connector]  # type: ignore[type-arg]
    distribution: str
    version: str


def _describe(ep: EntryPoint) -> str:
    dist = ep.dist.name if ep.dist else "?"
    return f"{ep.value} (from {dist})"


def discover(group: str = GROUP) -> dict[str, PluginInfo]:
    """Load every entry point of `group`; two with one name fail, naming both."""
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


def connector_types(explicit: Mapping[str, type[Connector]] | None = None) -> dict[str, type[Connector]]:  # type: ignore[type-arg]
    """The connector classes by type name; tests pass `explicit` instead of scanning."""
    if explicit is not None:
        return dict(explicit)
    return {name: info.cls for name, info in discover().items()}
