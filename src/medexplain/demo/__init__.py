"""``medexplain demo``: the whole chain on the built-in aligned benchmark, as named steps
(:data:`~medexplain.demo.run.STEPS`)."""

from __future__ import annotations

from .run import STEPS, run_demo
from .settings import DEMO_IMAGES, DEMO_METHODS, DemoSettings
from .state import DemoState

__all__ = ["DEMO_IMAGES", "DEMO_METHODS", "STEPS", "DemoSettings", "DemoState", "run_demo"]
