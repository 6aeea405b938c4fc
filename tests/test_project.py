"""Meta-tests: the layering rule, plugin registration, docs that must stay true."""

from __future__ import annotations

import ast
import re
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from connectors.registry import GROUP, connector_plugins
from store.plugins import PluginError, discover

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("store", "connectors", "rules", "sync")
# What each room may import from the others (the design card's dependency direction).
ALLOWED = {
    "store": set(),
    "connectors": {"store.canonical", "store.errors", "store.durations", "store.plugins"},
    "rules": {"store"},
    "sync": {"store", "connectors", "rules"},
}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_point_inward(package: str) -> None:
    bad = []
    for path in (ROOT / package).rglob("*.py"):
        for name in imports_of(path):
            top = name.split(".")[0]
            if top not in PACKAGES or top == package:
                continue
            if not any(name == ok or name.startswith(ok + ".") for ok in ALLOWED[package]):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def test_builtins_register_through_entry_points() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][GROUP]
    plugins = connector_plugins()
    for name, target in declared.items():
        assert name in plugins, f"{name} declared in pyproject but not installed; reinstall"
        assert plugins[name].cls.kind == name
        assert target.split(":")[0] == plugins[name].cls.__module__


def test_every_builtin_connector_has_tests_and_docs() -> None:
    readme = (ROOT / "README.md").read_text()
    example = (ROOT / "config.example.toml").read_text()
    for name in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][GROUP]:
        assert (ROOT / "tests" / f"test_{name}.py").exists(), f"no tests/test_{name}.py"
        assert f"### {name}\n" in readme, f"no README section for {name}"
        assert f'type = "{name}"' in example, f"no example for {name} in config.example.toml"


def test_two_plugins_with_one_name_fail_naming_both(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib.metadata import EntryPoint

    import store.plugins as registry

    fake = [EntryPoint("csv", "connectors.csv:CsvConnector", GROUP),
            EntryPoint("csv", "other_pkg.csv:Thing", GROUP)]
    monkeypatch.setattr(registry, "entry_points", lambda group: fake)
    with pytest.raises(PluginError, match=r"two plugins are named 'csv'.*connectors\.csv:CsvConnector.*other_pkg"):
        discover(GROUP)
    assert entry_points  # the real function stays importable


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.+?)\n```", quickstart)
    assert len(commands) == 2, "the Quickstart holds exactly two commands"
    assert "trackloop demo" in commands[0]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci


def test_package_data_lists_files_that_exist() -> None:
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for package, patterns in package_data.items():
        for pattern in patterns:
            assert list((ROOT / package).glob(pattern)), f"package-data {package}/{pattern} matches nothing"
