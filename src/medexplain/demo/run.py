"""``medexplain demo``: the whole chain on the built-in aligned benchmark (or a realistic
cohort, :mod:`.cohorts`), as named steps.

generate (with a corner-marker shortcut in one class) -> train -> (fit the
similar/adversarial generator) -> explain the test images with several methods -> label-wise
global maps -> localization, deletion/insertion, sanity,
PEPPR -> examples and SAGs -> (warping simulator) -> ``results.json``, ``maps/``,
``figures/``, ``report.html``. Each step takes the :class:`~.state.DemoState` and returns it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .evaluate import evaluate_methods, run_peppr
from .examples import draw_examples, run_sag
from .learned import fit_learned_explainers
from .methods import aggregate_global_maps, explain_methods
from .prepare import choose_images, generate_data, train_model
from .results import write_html_report, write_results
from .settings import DemoSettings
from .state import DemoState
from .warp import run_warp

Step = Callable[[DemoState], DemoState]

#: The demo's steps, in order.
STEPS: tuple[Step, ...] = (
    generate_data,
    train_model,
    choose_images,
    fit_learned_explainers,
    explain_methods,
    aggregate_global_maps,
    evaluate_methods,
    run_peppr,
    draw_examples,
    run_sag,
    run_warp,
    write_results,
    write_html_report,
)


def run_demo(
    out: str | Path, settings: DemoSettings | None = None, progress: bool = True
) -> dict[str, Any]:
    """Run the demo into ``out``; returns the results dictionary also written as JSON."""
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    (out / "maps").mkdir(parents=True, exist_ok=True)
    settings = settings or DemoSettings()
    state = DemoState(out, settings, progress, torch.device(settings.device))
    for step in STEPS:
        state = step(state)
    return state.results
