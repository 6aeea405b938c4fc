"""Finding connector types: every one, built-in or plugin, arrives through one entry-point group."""

from __future__ import annotations

from collections.abc import Mapping

from connectors.base import Connector
from store.plugins import PluginInfo, discover

GROUP = "trackloop.connectors"


def connector_plugins() -> dict[str, PluginInfo]:
    return discover(GROUP)


def connector_types(explicit: Mapping[str, type[Connector]] | None = None) -> dict[str, type[Connector]]:  # type: ignore[type-arg]
    """The connector classes by type name; tests pass `explicit` instead of scanning."""
    if explicit is not None:
        return dict(explicit)
    return {name: info.cls for name, info in connector_plugins().items()}
