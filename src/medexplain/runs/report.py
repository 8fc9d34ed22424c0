"""``report``: one self-contained HTML page from what a run folder holds.

The page shows, for every run (2D and 3D): the run's settings, model hash, timings and
``errors.csv`` summary; what the model predicted (counts, confusion matrix, probability
histograms); example images with their maps (most and least confident, misclassified);
global maps by label, prediction and outcome (computed here in memory from the stored maps,
with the ``global`` command's normalisation when it ran: ``RUN/global`` is left as it is);
the contrast and the evaluation when they exist; and an interactive viewer of the maps.
"""

from __future__ import annotations

import html
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.errors import one_line
from ..core.serialise import json_safe
from ..data.readers import DataError
from .aggregate import BY, accumulate
from .errors import RunError
from .settings import open_data, open_run, settings_of
from .store import RunStore
from .xnn_summary import xnn_section

__all__ = ["report_run"]

#: Sanity check: a map that still correlates this much (Spearman) with the map of the fully
#: randomised model fails (Adebayo et al. 2018 ask for maps that change; 0.5 is our line).
SANITY_LIMIT = 0.5


def _predictions(store: RunStore, record: dict[str, Any]):
    """Labels, predictions, scores, manifest rows and paths of the explained images, in
    chunk order, and ``(chunk number, row) -> position``."""
    labels, preds, scores, rows, paths, where = [], [], [], [], [], {}
    for chunk in store.iter_chunks(maps=False):
        for j in range(len(chunk)):
            where[(chunk.number, j)] = len(rows)
            labels.append(np.asarray(chunk.label[j]))
            preds.append(np.asarray(chunk.pred[j]))
            scores.append(np.asarray(chunk.logits[j], dtype=np.float64))
            rows.append(int(chunk.index[j]))
            paths.append(str(chunk.path[j]))
    if not rows:
        raise RunError(f"{store.root} holds no explained image yet; run explain first")
    return np.stack(labels), np.stack(preds), np.stack(scores), rows, paths, where


def _global_options(store: RunStore) -> tuple[str, str]:
    """``(normalise, transform)`` of the ``global`` command when it ran, else its defaults."""
    index = store.root / "global" / "index.json"
    if index.is_file():
        settings = json.loads(index.read_text()).get("settings", {})
        return settings.get("normalise", "max"), settings.get("transform", "abs")
    return "max", "abs"


def _method_maps(store: RunStore, record: dict[str, Any]):
    from ..report.run_page import MethodMaps

    normalise, transform = _global_options(store)
    result = accumulate(store, record, BY, normalise, transform).result()
    groups = {
        key: group.mean.numpy().reshape(result.spatial_shape)
        for key, group in result.groups.items()
    }
    return MethodMaps(
        groups=groups,
        counts={key: int(n) for key, n in result.counts.items()},
        signed=transform == "signed",
        how=f"{normalise}, {transform}",
        transform=transform,
    )


def _fit(image: torch.Tensor, spatial: tuple[int, ...]) -> np.ndarray:
    """An image ``(C, *S')`` resampled (linear) onto the maps' grid ``S`` when it differs."""
    if tuple(image.shape[1:]) != spatial:
        mode = "trilinear" if len(spatial) == 3 else "bilinear"
        image = torch.nn.functional.interpolate(
            image[None].double(), size=spatial, mode=mode, align_corners=False
        )[0]
    return image.double().numpy()


def _examples(store, record, where, chosen, method: str, log) -> list:
    """The chosen images' maps from the chunks and their images read again from the data
    (None when the data cannot be opened or the file read: the page draws the mean)."""
    from ..report.run_page import Example

    spatial = tuple(record["spatial_shape"])
    wanted = dict(chosen)
    examples = []
    for chunk in store.iter_chunks():
        for j in range(len(chunk)):
            position = where.get((chunk.number, j))
            if position in wanted:
                heat = np.asarray(chunk.maps[j], dtype=np.float64).reshape(spatial)
                examples.append((position, int(chunk.index[j]), heat))
    try:
        dataset = open_data(settings_of(record))
    except (DataError, RunError, OSError, ValueError) as error:  # the data moved or changed
        log(f"notice: the report draws the examples over the mean image ({one_line(error)})")
        dataset = None
    order = {position: rank for rank, (position, _) in enumerate(chosen)}
    out = []
    for position, row, heat in sorted(examples, key=lambda e: order[e[0]]):
        image = None
        if dataset is not None:
            item, _ = dataset.try_get(row)
            image = None if item is None else _fit(item["image"], spatial)
        out.append(Example(image, {method: heat}, position, wanted[position]))
    return out


def _affine(store: RunStore) -> np.ndarray | None:
    for _, _, affine in store.affines():
        if np.isfinite(affine).all():
            return affine
        break
    return None


def _report_data(store: RunStore, record: dict[str, Any], log):
    """Everything the shared sections draw (:class:`~medexplain.report.run_page.ReportData`)."""
    from ..report.predictions import probabilities
    from ..report.run_page import ReportData

    labels, preds, scores, rows, paths, where = _predictions(store, record)
    names = record["class_names"]
    sigmoid = bool(record["multilabel"]) or record["model"].get("activation") == "sigmoid"
    method = record["settings"]["method"]
    spatial = tuple(record["spatial_shape"])
    mean = store.mean_image()
    if mean is None:
        mean = np.zeros((int(record.get("channels", 1)), *spatial))
    data = ReportData(
        class_names=list(names),
        multilabel=bool(record["multilabel"]),
        labels=labels,
        preds=preds,
        probs=probabilities(scores, len(names), sigmoid),
        names=[f"#{row} {Path(path).name}" for row, path in zip(rows, paths)],
        mean_image=np.asarray(mean, dtype=np.float64).reshape(-1, *spatial),
        methods={method: _method_maps(store, record)},
        affine=_affine(store) if len(spatial) == 3 else None,
    )
    data.examples = _examples(store, record, where, data.example_positions(), method, log)
    return data


def _seconds(value: Any) -> str:
    return "–" if value is None else f"{float(value):.1f} s"


def _run_section(store: RunStore, record: dict[str, Any], errors: list) -> str:
    """Settings, model, data, timings and the errors summary."""
    from ..report.html import plain_table

    settings = record["settings"]
    summary = record.get("last_explain", {})
    model = record.get("model", {})
    n_done = summary.get("n_done", store.count())
    per_image = (
        summary.get("seconds") / max(1, summary.get("n_computed") or 1)
        if summary.get("seconds")
        else None
    )
    rows = [
        ("method", f"{settings['method']} {settings['params'] or ''}"),
        (
            "data",
            f"{settings['data']} ({n_done} image(s) explained, shape {record['spatial_shape']})",
        ),
        (
            "classes",
            ", ".join(record["class_names"]) + (" (multi-label)" if record["multilabel"] else ""),
        ),
        ("model", settings["model"] or settings["model_factory"]),
        ("model sha256", str(model.get("sha256"))),
        ("model outputs", f"{model.get('score', 'logits')} ({model.get('activation', 'softmax')})"),
        ("target", settings["target"]),
        ("created", record.get("created", "–")),
        (
            "last explain",
            f"{_seconds(summary.get('seconds'))} for {summary.get('n_computed', '–')} "
            "computed image(s)" + (f", {per_image:.3f} s / image" if per_image else ""),
        ),
        ("images not explained", f"{len(errors)} (errors.csv)"),
    ]
    body = plain_table(("setting", "value"), rows, "text")
    other = {
        k: v
        for k, v in settings.items()
        if k not in ("method", "params", "data", "model", "target")
    }
    body += "<details><summary>all settings</summary><pre>"
    body += html.escape(json.dumps(json_safe(other), indent=2)) + "</pre></details>"
    return body


def _checks(evaluation: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """``(check, passed, detail)`` for each evaluation that ran."""
    out = []
    peppr = evaluation.get("peppr") or {}
    if "erase_area" in peppr and "random_erase_area" in peppr:
        a, b = peppr["erase_area"], peppr["random_erase_area"]
        out.append(("PEPPR erase below random", a < b, f"{a:.3f} vs random {b:.3f}"))
    if "restore_area" in peppr and "random_restore_area" in peppr:
        a, b = peppr["restore_area"], peppr["random_restore_area"]
        out.append(("PEPPR restore above random", a > b, f"{a:.3f} vs random {b:.3f}"))
    deletion = evaluation.get("deletion") or {}
    if "deletion_auc" in deletion:
        a, b = deletion["deletion_auc"], deletion["insertion_auc"]
        out.append(
            ("insertion AUC above deletion AUC", b > a, f"insertion {b:.3f}, deletion {a:.3f}")
        )
    auroc = (evaluation.get("localization") or {}).get("auroc")
    if auroc is not None:
        out.append(("localization AUROC above chance (0.5)", auroc > 0.5, f"{auroc:.3f}"))
    sanity = evaluation.get("sanity") or {}
    rho = sanity.get("rank_correlation_fully_randomized")
    degenerate = sanity.get("degenerate_fraction") or 0.0
    if degenerate > 0:
        out.append(
            (
                "sanity: maps stay informative when the model is randomised",
                False,
                f"{degenerate:.0%} of the maps became flat (degenerate, not uncorrelated)",
            )
        )
    elif rho is not None and math.isfinite(rho):
        out.append(
            (
                f"sanity: maps change when the model is randomised (ρ < {SANITY_LIMIT})",
                rho < SANITY_LIMIT,
                f"ρ = {rho:.3f}",
            )
        )
    return out


def _evaluation_section(store: RunStore, evaluation: dict[str, Any], method: str) -> str:
    from ..report.html import embed_png, metrics_table

    columns = [
        ("peppr.erase_area", "PEPPR erase"),
        ("peppr.random_erase_area", "random erase"),
        ("peppr.restore_area", "PEPPR restore"),
        ("peppr.random_restore_area", "random restore"),
        ("deletion.deletion_auc", "deletion AUC"),
        ("deletion.insertion_auc", "insertion AUC"),
        ("localization.auroc", "loc. AUROC"),
        ("sanity.rank_correlation_fully_randomized", "sanity ρ"),
    ]
    body = metrics_table({method: evaluation}, columns)
    checks = _checks(evaluation)
    if checks:
        items = "".join(
            f"<li class='{'pass' if ok else 'fail'}'><b>{'PASS' if ok else 'FAIL'}</b> "
            f"{html.escape(name)}: {html.escape(detail)}</li>"
            for name, ok, detail in checks
        )
        body += f"<ul class='checks'>{items}</ul>"
    for name in ("sanity", "localization"):
        skipped = (evaluation.get(name) or {}).get("skipped")
        if skipped:
            body += f"<p class='note'>{name} skipped: {html.escape(str(skipped))}</p>"
    if (store.root / "figures" / "peppr.png").is_file() and "peppr" in evaluation:
        body += embed_png(store.root / "figures" / "peppr.png")
    if (store.root / "figures" / "deletion.png").is_file() and "deletion" in evaluation:
        body += embed_png(store.root / "figures" / "deletion.png")
    return body


def _errors_section(errors: list) -> str:
    """``errors.csv`` by cause (the reason with its file's path taken out), most frequent
    first, then the first 50 images."""
    reasons: Counter[str] = Counter(reason.replace(path, "<file>") for _, path, reason in errors)
    summary = "".join(
        f"<li>{n} image(s): {html.escape(reason)}</li>" for reason, n in reasons.most_common()
    )
    rows = "".join(
        f"<li>{i}: {html.escape(path)} — {html.escape(reason)}</li>"
        for i, path, reason in errors[:50]
    )
    more = f"<p>… and {len(errors) - 50} more in errors.csv.</p>" if len(errors) > 50 else ""
    return (
        f"<p>By cause:</p><ul>{summary}</ul>"
        f"<details><summary>first images</summary><ul>{rows}</ul>{more}</details>"
    )


def report_run(run: str | Path, log=print) -> Path:
    """A self-contained ``RUN/report.html``: run settings, predictions, examples, global
    maps by label, prediction and outcome, contrasts and evaluation (when they exist), an
    interactive viewer. Figures are written as ``RUN/figures/report_*.png`` and embedded."""
    from ..report.html import embed_png, write_report
    from ..report.run_page import report_sections

    store, record = open_run(run)
    errors = store.errors()
    figures = store.root / "figures"
    data = _report_data(store, record, log)
    results: dict[str, Any] = {"run": record}
    sections = [("Run", _run_section(store, record, errors))]
    shared = report_sections(data, figures)
    sections += shared[:3]
    xnn = xnn_section(store, record, figures, log)
    if xnn is not None:
        sections.append(("XNN: x-features and their contributions", xnn))
    contrasts = sorted(figures.glob("contrast_*.png"))
    if contrasts:
        sections.append(("Group contrast (Welch t, BH-FDR)", "".join(map(embed_png, contrasts))))
    evaluation_path = store.root / "evaluation.json"
    if evaluation_path.is_file():
        evaluation = json.loads(evaluation_path.read_text())
        results["evaluation"] = evaluation
        sections.append(
            ("Evaluation", _evaluation_section(store, evaluation, record["settings"]["method"]))
        )
    sections.append(shared[3])
    if errors:
        sections.append(("Images not explained", _errors_section(errors)))
    index = store.root / "global" / "index.json"
    if index.is_file():
        results["global"] = json.loads(index.read_text())
    return write_report(
        store.root / "report.html",
        title=f"medexplain run — {record['settings']['method']}",
        sections=sections,
        results=json_safe(results),
    )
