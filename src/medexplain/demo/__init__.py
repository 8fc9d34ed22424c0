"""``medexplain demo``: the whole chain on the built-in aligned benchmark, as named steps."""

from __future__ import annotations

from .run import DEMO_METHODS, DemoSettings, run_demo

__all__ = ["DEMO_METHODS", "DemoSettings", "run_demo"]
