"""The demo's last steps: ``results.json`` and ``report.html``."""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict
from typing import Any

import torch

from .. import __version__
from ..core.serialise import json_safe
from ..report.html import embed_png, metrics_table, write_report
from .cohorts import describe_cohort
from .state import DemoState

#: The summary table of the report: (key in a method's results, column header[, score name]);
#: the arrows (which way is better) come from medexplain.metrics.DIRECTIONS.
REPORT_COLUMNS = [
    ("seconds_per_image", "s / image"),
    ("n_explained", "images"),
    ("localization_auroc", "loc. AUROC", "auroc"),
    ("global.localization_auroc", "global loc. AUROC", "auroc"),
    ("global.shortcut_fraction", "shortcut fraction"),
    ("deletion_auc", "deletion AUC"),
    ("insertion_auc", "insertion AUC"),
    ("peppr.erase_area", "PEPPR erase"),
    ("peppr.random_erase_area", "random erase"),
    ("peppr.restore_area", "PEPPR restore"),
    ("peppr.random_restore_area", "random restore"),
    ("sanity.rank_correlation_fully_randomized", "sanity ρ"),
]


def write_results(state: DemoState) -> DemoState:
    """Collect every step's numbers into ``state.results`` and write ``results.json``."""
    settings, bench = state.settings, state.bench
    clf, history = state.classifier_metrics, state.history
    state.results = {
        "medexplain_version": __version__,
        "settings": asdict(settings),
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": str(state.device),
        },
        "data": {
            "cohort": settings.cohort,
            "n_images": len(bench),
            "dims": settings.dims,
            "shape": list(bench.images.shape[2:]),
            "class_names": list(bench.class_names),
            "n_train": len(state.train),
            "n_val": len(state.val),
            "n_test": len(state.test),
            "n_explained": len(state.explain_set),
            "shortcut": {
                "class": bench.class_names[settings.shortcut_class],
                "fraction": settings.shortcut,
            },
        },
        "classifier": {
            "test_accuracy": clf["accuracy"],
            "test_auc": clf["auc"],
            "train_seconds": history.seconds,
            "best_epoch": history.best_epoch,
        },
        "methods": {name: outcome.metrics for name, outcome in state.outcomes.items()},
        "sag": state.sag,
        "warp_simulator": state.warp,
        "learned_explainers": state.learned_fits,
        "timings_seconds": state.timings,
        "wall_seconds": time.perf_counter() - state.started,
    }
    (state.out / "results.json").write_text(json.dumps(json_safe(state.results), indent=2))
    return state


def write_html_report(state: DemoState) -> DemoState:
    """``report.html``: the summary table, then every figure with a note on how to read it."""
    results, figures = state.results, state.figures
    sections = [("Summary", _intro(results) + metrics_table(results["methods"], REPORT_COLUMNS))]
    if "examples" in figures:
        sections.append(("Image-wise explanations", embed_png(figures["examples"])))
    sag_figures = sorted(key for key in figures if key.startswith("sag_"))
    if sag_figures:
        body = _SAG_NOTE + "".join(embed_png(figures[key]) for key in sag_figures)
        sections.append(("Several explanations per image (SAG)", body))
    warp = results.get("warp_simulator")
    if warp and "scores" in warp:
        body = _warp_note(warp["scores"]) + "".join(
            embed_png(figures[key]) for key in ("warp_removal", "warp_injection") if key in figures
        )
        sections.append(("What would have to change (warping simulator)", body))
    for name in results["methods"]:
        keys = (f"global_{name}", f"peppr_{name}")
        body = "".join(embed_png(figures[key]) for key in keys if key in figures)
        sections.append((f"{name}: global maps and PEPPR", body))
    write_report(
        state.out / "report.html",
        title="medexplain demo",
        sections=sections,
        results=json_safe(results),
    )
    return state


_SAG_NOTE = (
    "<p class='note'>Structured Attention Graphs: each root is a minimal set of "
    "patches that, shown alone (the rest replaced by the mean image), keeps at least "
    "90% of the predicted probability; under each root, how the probability falls "
    "as its patches are removed one by one.</p>"
)


def _intro(results: dict[str, Any]) -> str:
    clf, data = results["classifier"], results["data"]
    shortcut = ""
    if data["shortcut"]["fraction"] > 0:
        shortcut = (
            f"A marker appears in {data['shortcut']['fraction']:.0%} of the "
            f"<b>{data['shortcut']['class']}</b> images: a shortcut a faithful global map must "
            "reveal. "
        )
    return (
        f"<p>Data: {describe_cohort(data.get('cohort'), data)}, classes "
        f"{', '.join(data['class_names'])}. {shortcut}"
        f"Classifier ({results['settings']['arch']}) test accuracy "
        f"{clf['test_accuracy']:.3f}, macro AUC "
        f"{clf['test_auc']:.3f}. {data['n_explained']} test images explained per method "
        "(fewer for the mask-optimisation methods: see the table's <i>images</i> column).</p>"
        "<p class='note'>Read the global maps first: each panel is where the model looks for "
        "that label on average, over the mean image; the cyan outline is where the label's "
        "evidence truly is (and the marker, for the shortcut class). PEPPR then tests whether "
        "erasing the highlighted pixels first hurts the model faster than erasing random "
        "pixels.</p>"
    )


def _warp_note(scores: dict[str, Any]) -> str:
    nan = float("nan")
    return (
        "<p class='note'>Warping simulator for the <b>atrophy</b> class: the warp that "
        "removes the pattern from atrophy images and injects it into healthy ones, with "
        "its Jacobian determinant (blue: the structure shrinks, red: it grows). Requested "
        f"shift of the log-odds {scores['margin']:.2f}: reached for "
        f"{scores.get('reached_removal', nan):.0%} of the removals and "
        f"{scores.get('reached_injection', nan):.0%} of the injections; "
        f"|log J| localization AUROC {scores.get('auroc_removal', nan):.3f}; "
        f"folding fraction {scores.get('folding_fraction', nan):.2g}; "
        f"cycle MSE / image variance {scores.get('cycle_relative_mse', nan):.3f}."
        "</p>"
    )
