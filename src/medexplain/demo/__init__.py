"""``medexplain demo``: the whole chain on the built-in aligned benchmark or a realistic
cohort (:mod:`.cohorts`), as named steps (:data:`~medexplain.demo.run.STEPS`)."""

from __future__ import annotations

from .cohorts import COHORTS
from .run import STEPS, run_demo
from .settings import DEMO_IMAGES, DEMO_METHODS, DemoSettings
from .state import DemoState

__all__ = [
    "COHORTS",
    "DEMO_IMAGES",
    "DEMO_METHODS",
    "STEPS",
    "DemoSettings",
    "DemoState",
    "run_demo",
]
