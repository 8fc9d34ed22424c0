"""The ``medexplain`` command line: one Typer app (:mod:`.app`) whose commands live in one
module per group; importing this package registers them all."""

from . import basics, fit_commands, run_commands, sag_command  # noqa: F401  (registers)
from .app import app, main, parse_params

__all__ = ["app", "main", "parse_params"]
