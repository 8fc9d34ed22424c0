"""The sections every report page shares (``medexplain report`` and ``medexplain demo``):
predictions, per-image examples, global maps by label, prediction and outcome, and the
interactive viewer. The caller gathers the numbers (:class:`ReportData`); this module draws
them and returns ``(heading, HTML)`` sections for :func:`medexplain.report.html.write_report`.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .html import embed_png
from .panels import mass_cut, plot_examples_panels, plot_group_panels
from .predictions import (
    choose_examples,
    confidence,
    plot_probability_histograms,
    predictions_html,
    wrong,
)
from .viewer import viewer_html

__all__ = ["Example", "MethodMaps", "ReportData", "report_sections"]

OUTCOMES = ("TP", "FP", "FN", "TN")


@dataclass
class MethodMaps:
    """One method's global maps: group key (``("label", name)``, ``("prediction", name)``,
    ``("outcome", name, "TP")``, ``("overall",)``) -> mean map ``(*S)``, image counts per
    key, whether the maps are signed, how they were made (e.g. ``"max, abs"``) and the
    transform each image's map went through first (``"abs"``, ``"positive"``, ``"signed"``;
    None: ``"signed"`` for signed maps, else ``"abs"``)."""

    groups: dict[tuple[str, ...], np.ndarray]
    counts: dict[tuple[str, ...], int]
    signed: bool
    how: str = ""
    transform: str | None = None

    def as_shown(self, heat: np.ndarray) -> np.ndarray:
        """A single image's map ``(*S)`` under the global maps' transform, so it is drawn
        on the same kind of scale: ``|E|`` (abs), ``max(E, 0)`` (positive) or ``E``."""
        transform = self.transform or ("signed" if self.signed else "abs")
        heat = np.asarray(heat, dtype=np.float64)
        if transform == "abs":
            return np.abs(heat)
        if transform == "positive":
            return np.clip(heat, 0.0, None)
        return heat


@dataclass
class Example:
    """One image shown in the report: its image ``(C, *S)`` (None when it could not be read
    again: the mean image is drawn instead), its map per method ``(*S)``, its position in
    :class:`ReportData`'s arrays and why it was chosen."""

    image: np.ndarray | None
    maps: dict[str, np.ndarray]
    position: int
    why: str


@dataclass
class ReportData:
    """What the shared sections draw. ``labels``: ``(N,)`` class indices (-1 unlabelled) or
    ``(N, K)`` 0/1 (multi-label), ``preds`` the same; ``probs`` ``(N, K)``; ``names`` one
    identifier per image (its manifest row or file); ``mean_image`` ``(C, *S)``; ``affine``
    ``(4, 4)`` voxel -> world of 3D images (None: RAS voxel order is assumed)."""

    class_names: list[str]
    multilabel: bool
    labels: np.ndarray
    preds: np.ndarray
    probs: np.ndarray
    names: list[str]
    mean_image: np.ndarray
    methods: dict[str, MethodMaps]
    examples: list[Example] = field(default_factory=list)
    affine: np.ndarray | None = None

    def example_positions(
        self, n_confident: int = 3, n_mistaken: int = 12, among: int | None = None
    ) -> list[tuple[int, str]]:
        """``(position, why)`` of the images to show (:func:`choose_examples`), among the
        first ``among`` images (all: None)."""
        n = len(self.probs) if among is None else among
        conf = confidence(self.probs[:n], self.preds[:n], self.multilabel)
        mistaken = wrong(self.labels[:n], self.preds[:n], self.multilabel)
        return choose_examples(conf, mistaken, n_confident, n_mistaken)


def _class_text(data: ReportData, value: np.ndarray) -> str:
    value = np.asarray(value)
    if data.multilabel:
        on = [n for n, v in zip(data.class_names, value.tolist()) if v > 0]
        return "+".join(on) or "none"
    return "–" if int(value) < 0 else data.class_names[int(value)]


def _example_title(data: ReportData, position: int) -> str:
    pred, label = data.preds[position], data.labels[position]
    p = float(confidence(data.probs[position : position + 1], pred[None], data.multilabel)[0])
    text = f"{data.names[position]}\npred {_class_text(data, pred)} p={p:.2f}"
    if data.multilabel or int(label) >= 0:
        text += f"\ntrue {_class_text(data, label)}"
    return text


def predictions_section(data: ReportData, figures: Path) -> str:
    body = predictions_html(data.class_names, data.labels, data.preds, data.multilabel)
    path = plot_probability_histograms(
        data.probs,
        data.labels,
        data.class_names,
        figures / "report_probabilities.png",
        data.multilabel,
    )
    note = (
        "<p class='note'>Calibration at a glance: the histogram of each class's predicted "
        "probability, red for the images that are that class, blue for the others.</p>"
    )
    return body + note + embed_png(path)


def examples_section(data: ReportData, figures: Path) -> str:
    """Per method and reason, one figure of the examples' maps over their images."""
    if not data.examples:
        return "<p>No image could be shown.</p>"
    parts = [
        "<p class='note'>Each map over its own image, divided by its own peak |value|; the "
        "title gives the image, the predicted class with its probability and the true "
        "class. 3D: axial, coronal and sagittal slices through the slices holding most of the"
        " map.</p>"
    ]
    for method, maps in data.methods.items():
        for why in ("most confident", "least confident", "misclassified"):
            chosen = [e for e in data.examples if e.why == why and method in e.maps]
            if not chosen:
                continue
            panels = [
                (
                    e.image if e.image is not None else data.mean_image,
                    maps.as_shown(e.maps[method]),
                    _example_title(data, e.position),
                )
                for e in chosen
            ]
            stem = f"report_examples_{_safe(method)}_{why.split()[0]}"
            path = plot_examples_panels(
                panels, figures / f"{stem}.png", signed=maps.signed, affine=data.affine
            )
            heading = f"{why.capitalize()} ({len(chosen)})"
            if len(data.methods) > 1:
                heading = f"{method}: {why} ({len(chosen)})"
            parts.append(f"<h3>{html.escape(heading)}</h3>{embed_png(path)}")
    return "".join(parts)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _by(maps: MethodMaps, kind: str, class_names: Sequence[str]) -> dict[str, np.ndarray]:
    """The maps of one grouping, in class order (outcomes: class by class, TP FP FN TN)."""
    out = {}
    for name in class_names:
        if kind == "outcome":
            for outcome in OUTCOMES:
                key = ("outcome", name, outcome)
                if key in maps.groups:
                    out[f"{name} {outcome} (n={maps.counts.get(key, 0)})"] = maps.groups[key]
        elif (kind, name) in maps.groups:
            out[f"{name} (n={maps.counts.get((kind, name), 0)})"] = maps.groups[(kind, name)]
    return out


def global_section(data: ReportData, figures: Path) -> str:
    """Per method, the global maps by label, by prediction and by outcome: one figure each,
    one scale and colour bar per figure."""
    parts = [
        "<p class='note'>Mean map of each group over the mean image. Each figure has one "
        "colour scale shared by its panels (diverging for signed maps, sequential for "
        "magnitudes). Outcomes are one-vs-rest per class: TP = the class is true and "
        "predicted, FP = predicted but not true, FN = true but not predicted.</p>"
    ]
    is3d = data.mean_image.ndim == 4
    for method, maps in data.methods.items():
        for kind in ("label", "prediction", "outcome"):
            panels = _by(maps, kind, data.class_names)
            if not panels:
                continue
            stem = f"report_global_{_safe(method)}_{kind}"
            title = f"{method}: global maps by {kind}" + (f" ({maps.how})" if maps.how else "")
            if kind == "outcome" and is3d:
                title += " — axial slices (all views in the viewer below)"
            path = plot_group_panels(
                data.mean_image,
                panels,
                figures / f"{stem}.png",
                signed=maps.signed,
                affine=data.affine,
                title=title,
                axial_only=kind == "outcome",
                columns=4,
            )
            parts.append(embed_png(path))
    return "".join(parts)


def _group_name(key: tuple[str, ...], count: int) -> str:
    """``"label: lesion (n=12)"``, ``"outcome: lesion TP (n=3)"``, ``"overall (n=40)"``."""
    if len(key) == 1:
        return f"{key[0]} (n={count})"
    return f"{key[0]}: {' '.join(key[1:])} (n={count})"


def viewer_section(data: ReportData) -> str:
    """The interactive viewer: every method's group maps and the example images."""
    methods = {}
    for method, maps in data.methods.items():
        groups = {_group_name(key, maps.counts.get(key, 0)): a for key, a in maps.groups.items()}
        methods[method] = (maps.signed, groups)
    first = next(iter(methods.values()))[1]
    initial = next((g for g in first if g.startswith("label: ")), None)
    maps = next(iter(data.methods.values()))
    overall = maps.groups.get(("overall",))
    cut = mass_cut(overall) if overall is not None and overall.ndim == 3 else None
    images = {
        f"image {data.names[e.position]} ({e.why})": (
            e.image if e.image is not None else data.mean_image,
            {m: data.methods[m].as_shown(heat) for m, heat in e.maps.items() if m in data.methods},
        )
        for e in data.examples
    }
    return (
        "<p>Switch the method and the group: the groups' mean maps over the mean image share "
        "one scale per method; the example images (at the end of the list) are drawn each "
        "over its own image on its own scale. The threshold hides values below that "
        "fraction of the scale.</p>"
        + viewer_html(
            data.mean_image,
            methods,
            images=images,
            affine=data.affine,
            initial_group=initial,
            cut=cut,
        )
    )


def report_sections(data: ReportData, figures: str | Path) -> list[tuple[str, str]]:
    """The shared sections in order: predictions, examples, global maps, interactive view.
    Figures are written into ``figures`` as ``report_*.png`` (and embedded)."""
    figures = Path(figures)
    figures.mkdir(parents=True, exist_ok=True)
    return [
        ("Predictions", predictions_section(data, figures)),
        ("Image-wise explanations", examples_section(data, figures)),
        ("Global maps by label, prediction and outcome", global_section(data, figures)),
        ("Interactive view", viewer_section(data)),
    ]
