"""NARSUITE_REQUIRE_LAB is read in one place and means what it says ("0" is not true)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from narsuite.lab import pytest_plugin

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("value,expected", [
    ("1", True), ("true", True), ("YES", True), (" on ", True),
    ("0", False), ("", False), ("false", False), ("no", False), ("off", False),
])
def test_lab_required_parses_the_variable(monkeypatch, value, expected):
    monkeypatch.setenv(pytest_plugin.REQUIRE_ENV, value)
    assert pytest_plugin.lab_required() is expected


def test_unavailable_fails_when_required_and_skips_otherwise(monkeypatch):
    monkeypatch.setenv(pytest_plugin.REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="frobnicator missing"):
        pytest_plugin.unavailable("frobnicator missing", "tool")
    monkeypatch.setenv(pytest_plugin.REQUIRE_ENV, "0")
    with pytest.raises(pytest.skip.Exception, match="frobnicator missing"):
        pytest_plugin.unavailable("frobnicator missing", "tool")


def test_need_tools_names_the_missing_tool(monkeypatch):
    monkeypatch.setenv(pytest_plugin.REQUIRE_ENV, "1")
    pytest_plugin.need_tools("sh")  # present: no effect
    with pytest.raises(pytest.fail.Exception, match="no-such-tool-here"):
        pytest_plugin.need_tools("sh", "no-such-tool-here")


def test_no_other_module_reads_the_variable():
    """Every skip-or-fail decision goes through lab_required (one parser, one meaning)."""
    readers = []
    for path in [*ROOT.joinpath("tests").rglob("*.py"), *ROOT.joinpath("narsuite").rglob("*.py"),
                 *ROOT.joinpath("bench").rglob("*.py")]:
        if path.name in ("pytest_plugin.py", "test_require_lab.py"):
            continue
        if re.search(r"environ[^\n]*NARSUITE_REQUIRE_LAB", path.read_text()):
            readers.append(str(path.relative_to(ROOT)))
    assert readers == []
