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
from ..report.predictions import probabilities
from ..report.run_page import Example, MethodMaps, ReportData, report_sections
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


def report_data(state: DemoState) -> ReportData:
    """The explained test images as the run report draws them: the model's probabilities,
    each method's global maps by label, prediction and outcome, and example images (most
    and least confident, misclassified) among those every method explained."""
    images = state.explain_set.images
    with torch.no_grad():
        logits = torch.cat(
            [state.model(batch.to(state.device)).cpu() for batch in images.split(64)]
        )
    names = list(state.bench.class_names)
    labels = state.explain_set.labels.numpy()
    signed = state.settings.transform == "signed"
    how = f"{state.settings.normalise}, {state.settings.transform}"
    methods = {
        name: MethodMaps(
            groups={k: g.mean.numpy().reshape(images.shape[2:]) for k, g in r.groups.items()},
            counts={k: int(n) for k, n in r.counts.items()},
            signed=signed,
            how=how,
            transform=state.settings.transform,
        )
        for name, r in ((n, o.global_result) for n, o in state.outcomes.items())
    }
    data = ReportData(
        class_names=names,
        multilabel=False,
        labels=labels,
        preds=state.preds.numpy(),
        probs=probabilities(logits.numpy(), len(names), sigmoid=False),
        names=[f"test #{i}" for i in range(len(labels))],
        mean_image=state.mean_image.double().numpy(),
        methods=methods,
        affine=state.affine if state.settings.dims == 3 else None,
    )
    shared = min(len(outcome.explained.maps) for outcome in state.outcomes.values())
    data.examples = [
        Example(
            images[i].double().numpy(),
            {
                n: o.explained.maps[i].double().numpy().reshape(images.shape[2:])
                for n, o in state.outcomes.items()
            },
            i,
            why,
        )
        for i, why in data.example_positions(among=shared)
    ]
    return data


def write_html_report(state: DemoState) -> DemoState:
    """``report.html``: the summary table, the sections every run report has (predictions,
    examples, global maps by label, prediction and outcome, :mod:`medexplain.report.run_page`),
    the demo's own figures with a note on how to read them, then the interactive view."""
    results, figures = state.results, state.figures
    sections = [("Summary", _intro(results) + metrics_table(results["methods"], REPORT_COLUMNS))]
    shared = report_sections(report_data(state), state.out / "figures")
    sections += shared[:3]
    if "examples" in figures:
        sections.append(("Every method on the same images", embed_png(figures["examples"])))
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
    sections.append(shared[3])
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
