"""Packaging: one version source, the --version option, and the floors make test-min installs."""

from __future__ import annotations

import importlib.util
from importlib.metadata import version
from pathlib import Path

import pytest
from typer.testing import CliRunner

import medexplain
from medexplain.cli import app

ROOT = Path(__file__).resolve().parents[1]


def _floors_module():
    spec = importlib.util.spec_from_file_location("floors", ROOT / "tools" / "floors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_version_written_once_and_reported_by_the_cli() -> None:
    assert medexplain.__version__ == version("medexplain")
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert medexplain.__version__ not in text  # pyproject reads it from the package
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"medexplain {medexplain.__version__}"


def test_floors_match_an_independent_parse_of_pyproject() -> None:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    expected = {}
    for spec in project["dependencies"]:
        name, floor = (part.strip() for part in spec.split(">="))
        if name != "torch":  # installed first, pinned to the local CPU wheel
            expected[name] = floor
    pins = _floors_module().floors(ROOT / "pyproject.toml")
    assert dict(pin.split("==") for pin in pins) == expected
    assert "torch" not in {pin.split("==")[0] for pin in pins}
