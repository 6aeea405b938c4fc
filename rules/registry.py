"""Finding rules: built-ins and plugins alike arrive through the `trackloop.rules` entry points."""

from __future__ import annotations

from collections.abc import Mapping

from rules.base import Rule
from store.plugins import PluginInfo, discover

GROUP = "trackloop.rules"


def rule_plugins() -> dict[str, PluginInfo]:
    return discover(GROUP)


def rule_types(explicit: Mapping[str, type[Rule]] | None = None) -> dict[str, type[Rule]]:  # type: ignore[type-arg]
    """Rule classes by id; tests pass `explicit` instead of scanning entry points."""
    if explicit is not None:
        return dict(explicit)
    return {name: info.cls for name, info in rule_plugins().items()}
