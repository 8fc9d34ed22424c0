"""``medexplain demo``: the whole chain on the built-in aligned benchmark.

generate (with a corner-marker shortcut in one class) -> train -> explain the test images
with several methods -> label-wise global maps -> PEPPR, deletion/insertion,
localization, sanity -> ``results.json``, ``maps/``, ``figures/``, ``report.html``.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..data.synthetic import SyntheticBenchmark, make_benchmark
from ..explain import create, explainer_class
from ..explain.sag import StructuredAttentionGraph
from ..globalmaps import GlobalMaps, GlobalResult
from ..metrics.deletion import deletion_insertion
from ..metrics.localization import localization_scores
from ..metrics.peppr import peppr_many, plot_peppr
from ..metrics.sanity import cascading_randomization
from ..models.checkpoint import save_checkpoint
from ..models.cnn import CNNConfig, build_classifier
from ..models.train import evaluate_classifier, train_classifier
from ..pipeline import ExplainedSet, explain_all, predicted_classes
from ..report.figures import plot_examples, plot_global_maps
from ..report.html import embed_png, metrics_table, write_report
from ..report.nifti import save_nifti
from .warp import run_warp_section

# Explainer parameters used by the demo. Published defaults unless the entry says otherwise;
# the quick variant trades accuracy of the estimate for time, and the "3d" entries are added
# for volumes. Mask optimisation costs about 5 s per 64 x 64 image at the papers' defaults
# on 2 CPU cores (benchmarks/igos.py), so those methods explain only the first ``images`` of
# the explained set (the smaller of the mode's count and the "3d" count for volumes) and run
# the sanity check on ``sanity_images`` of them; the others explain the whole set. In 3D,
# occlusion's default window (1/8 of each side, stride half of it) means 3,375 passes per
# 32^3 volume, so the demo uses windows of 1/4 (343 passes), integrated gradients 20 steps
# and SmoothGrad 20 samples; I-GOS runs with 8^3 masks and the quick iteration counts on 6
# volumes, without the sanity check (iGOS++ took minutes per volume on the randomised
# models, whose line searches back-track far more).
_MASK_OPTIMISATION = {
    "default": {},
    "quick": {"iterations": 5, "integration_steps": 10},
    "3d": {"size": 8, "iterations": 5, "integration_steps": 10},
    "images": {"default": 24, "quick": 12, "3d": 6},
    "sanity_images": {"default": 1, "quick": 1, "3d": 0},
}
DEMO_METHODS: dict[str, dict[str, dict[str, Any]]] = {
    "saliency": {"default": {}, "quick": {}},
    "input_x_gradient": {"default": {}, "quick": {}},
    "integrated_gradients": {
        "default": {"n_steps": 50},
        "quick": {"n_steps": 16},
        "3d": {"n_steps": 20},
    },
    "smoothgrad": {
        "default": {"n_samples": 50},
        "quick": {"n_samples": 10},
        "3d": {"n_samples": 20},
    },
    "gradcam": {"default": {}, "quick": {}},
    "occlusion": {
        "default": {},
        "quick": {},
        "3d": {"window_fraction": 0.25},
        "sanity_images": {"default": 6, "quick": 3, "3d": 1},
    },
    "igos": _MASK_OPTIMISATION,
    "igos++": _MASK_OPTIMISATION,
}


@dataclass
class DemoSettings:
    """Sizes of the demo run; ``for_run`` picks defaults that fit the time budgets
    (2D default < 5 min, quick < 90 s on 2 CPU cores; 3D measured 753 s, of which the
    warp simulator 189 s and PEPPR 177 s).

    ``warp_seconds > 0`` fits a warping simulator for the atrophy class for at most that
    long (:mod:`medexplain.demo_warp`) and scores it on ``warp_images`` test images per
    direction; ``for_run`` turns it on for volumes (``--dims 3``).
    """

    dims: int = 2
    quick: bool = False
    seed: int = 0
    device: str = "cpu"
    n_images: int = 2000
    size: int | None = None
    shortcut: float = 0.7
    shortcut_class: int = 1
    widths: tuple[int, ...] = (8, 16, 32)
    train_epochs: int = 15
    train_lr: float = 3e-3
    train_seconds: float = 300.0
    n_explain: int = 150
    n_peppr: int = 150
    n_deletion: int = 32
    n_sanity: int = 6
    n_examples: int = 4
    sag_images: int = 3
    warp_seconds: float = 0.0
    warp_images: int = 24
    peppr_steps: int = 20
    peppr_seeds: int = 5
    normalise: str = "max"
    transform: str = "abs"
    methods: tuple[str, ...] = tuple(DEMO_METHODS)

    @classmethod
    def for_run(cls, dims: int = 2, quick: bool = False, **overrides: Any) -> DemoSettings:
        settings = cls(dims=dims, quick=quick)
        if dims == 3:
            settings = cls(
                dims=3,
                quick=quick,
                n_images=600,
                train_epochs=12,
                train_seconds=600.0,
                n_explain=32,
                n_peppr=48,
                n_deletion=8,
                n_sanity=2,
                warp_seconds=180.0,
            )
        if quick:
            settings.n_images = 1200 if dims == 2 else 300
            settings.train_epochs = 12
            settings.train_seconds = 120.0 if dims == 2 else 300.0
            settings.n_explain = 48 if dims == 2 else 24
            settings.n_peppr = 60 if dims == 2 else 24
            settings.n_deletion = 12 if dims == 2 else 6
            settings.n_sanity = 3 if dims == 2 else 2
            settings.peppr_steps = 10
            settings.warp_seconds = min(settings.warp_seconds, 90.0)
        for key, value in overrides.items():
            setattr(settings, key, value)
        return settings

    def method_params(self, name: str) -> dict[str, Any]:
        table = DEMO_METHODS.get(name, {"default": {}, "quick": {}})
        params = dict(table["quick" if self.quick else "default"])
        if self.dims == 3:
            params.update(table.get("3d", {}))
        return params

    def method_images(self, name: str) -> tuple[int, int]:
        """How many images ``name`` explains and how many its sanity check uses."""
        table = DEMO_METHODS.get(name, {})
        mode = "quick" if self.quick else "default"
        explain = table.get("images", {}).get(mode, self.n_explain)
        if self.dims == 3:
            explain = min(explain, table.get("images", {}).get("3d", explain))
        sanity = table.get("sanity_images", {}).get(mode, self.n_sanity)
        if self.dims == 3:
            sanity = min(sanity, table.get("sanity_images", {}).get("3d", sanity))
        return min(explain, self.n_explain), min(sanity, self.n_sanity)


@dataclass
class MethodOutcome:
    """Everything the demo measured for one method."""

    explained: ExplainedSet
    global_result: GlobalResult
    metrics: dict[str, Any] = field(default_factory=dict)


def _auroc_against_region(global_map: torch.Tensor, region: torch.Tensor) -> float:
    scores = localization_scores(global_map[None].float(), region[None].bool())
    return float(scores["auroc"][0])


def _global_metrics(
    result: GlobalResult, bench: SyntheticBenchmark, shortcut_class: int
) -> dict[str, Any]:
    disease = [name for name in bench.class_names if name in bench.regions]
    per_label = {}
    for name in disease:
        key = ("label", name)
        if key in result.groups:
            per_label[name] = _auroc_against_region(result.groups[key].mean, bench.regions[name])
    metrics: dict[str, Any] = {
        "localization_auroc": float(np.mean(list(per_label.values()))) if per_label else None,
        "localization_auroc_per_label": per_label,
    }
    shortcut_name = bench.class_names[shortcut_class]
    key = ("label", shortcut_name)
    if key in result.groups and bench.marker.any():
        positive = result.groups[key].mean.clamp(min=0)
        total = float(positive.sum())
        on_marker = float(positive[bench.marker.expand_as(positive)].sum())
        metrics["shortcut_fraction"] = on_marker / total if total > 0 else 0.0
        metrics["marker_share_of_image"] = float(bench.marker.float().mean())
    return metrics


def _imagewise_localization(maps: torch.Tensor, evidence: torch.Tensor) -> float | None:
    has_evidence = evidence.flatten(1).any(1)
    if not has_evidence.any():
        return None
    scores = localization_scores(maps[has_evidence], evidence[has_evidence])
    values = scores["auroc"]
    values = values[torch.isfinite(values)]
    return float(values.mean()) if len(values) else None


def run_demo(out: str | Path, settings: DemoSettings | None = None, progress: bool = True) -> dict:
    """Run the demo into ``out``; returns the results dictionary also written as JSON."""
    settings = settings or DemoSettings()
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    (out / "maps").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    timings: dict[str, float] = {}
    torch.manual_seed(settings.seed)
    device = torch.device(settings.device)

    # 1. data
    t0 = time.perf_counter()
    bench = make_benchmark(
        settings.n_images,
        dims=settings.dims,
        size=settings.size,
        shortcut=settings.shortcut,
        shortcut_class=settings.shortcut_class,
        seed=settings.seed,
    )
    train, val, test = bench.split(seed=settings.seed)
    timings["generate"] = time.perf_counter() - t0

    # 2. classifier
    t0 = time.perf_counter()
    model = build_classifier(
        CNNConfig(
            in_channels=1,
            num_classes=len(bench.class_names),
            spatial_dims=settings.dims,
            widths=settings.widths,
        )
    ).to(device)
    history = train_classifier(
        model,
        train.dataset(),
        val.dataset(),
        epochs=settings.train_epochs,
        lr=settings.train_lr,
        max_seconds=settings.train_seconds,
        seed=settings.seed,
        device=device,
        progress=progress,
    )
    model.eval()
    classifier_metrics = evaluate_classifier(model, test.dataset(), device=device)
    save_checkpoint(out / "classifier.pt", model, extra={"class_names": list(bench.class_names)})
    timings["train"] = time.perf_counter() - t0

    # 3. the images every method explains (the first n_explain test images), their targets
    explain_set = test.subset(torch.arange(min(settings.n_explain, len(test))))
    images = explain_set.images
    labels = explain_set.labels
    preds = predicted_classes(model, images.to(device)).cpu()
    # PEPPR is evaluated on held-out test images, not those the global maps were made from.
    peppr_set = test.subset(torch.arange(len(explain_set.labels), len(test))[: settings.n_peppr])
    if len(peppr_set) == 0:
        peppr_set = explain_set
    rankings: dict[str, torch.Tensor] = {}
    mean_image = train.mean_image()

    # Outlines drawn on the global maps: each label's true region, plus the marker for the
    # shortcut class.
    outlines = dict(bench.regions)
    shortcut_name = bench.class_names[settings.shortcut_class]
    outlines[shortcut_name] = outlines.get(shortcut_name, bench.marker) | bench.marker

    outcomes: dict[str, MethodOutcome] = {}
    methods_json: dict[str, Any] = {}
    figures: dict[str, Path] = {}
    for name in settings.methods:
        t0 = time.perf_counter()
        params = {"seed": settings.seed, **settings.method_params(name)}
        explainer = create(name, model, **params)
        n_method, n_sanity = settings.method_images(name)
        explained = explain_all(
            explainer,
            images[:n_method].to(device),
            labels[:n_method].to(device),
            batch_size=16,
            progress=progress,
            description=f"{name:>22}",
        )
        maps = explained.maps
        accumulator = GlobalMaps(
            maps.shape[2:],
            bench.class_names,
            normalise=settings.normalise,
            transform=settings.transform,
        )
        accumulator.update(maps, labels=labels[:n_method], preds=preds[:n_method])
        result = accumulator.result()
        method_dir = out / "maps" / name
        result.save(method_dir)
        if settings.dims == 3:
            for key, group in result.groups.items():
                save_nifti(group.mean, method_dir / f"{'_'.join(key)}.nii.gz")

        metrics: dict[str, Any] = {
            "seconds_per_image": explained.seconds_per_image,
            "n_explained": n_method,
            "parameters": {k: v for k, v in params.items()},
            "signed": bool(explainer_class(name).signed),
        }
        metrics["localization_auroc"] = _imagewise_localization(
            maps, explain_set.evidence[:n_method]
        )
        metrics["global"] = _global_metrics(result, bench, settings.shortcut_class)

        n_del = min(settings.n_deletion, n_method)
        deletion = deletion_insertion(
            model,
            images[:n_del].to(device),
            maps[:n_del].to(device),
            labels[:n_del].to(device),
            baseline="blur",
            batch_size=64,
        )
        metrics["deletion_auc"] = float(deletion.deletion_auc.mean())
        metrics["insertion_auc"] = float(deletion.insertion_auc.mean())

        rankings[name] = result.overall.mean.float()

        n_sanity = min(n_sanity, len(images))
        metrics["sanity_images"] = n_sanity
        metrics["sanity"] = None  # not run (see DEMO_METHODS)
        if n_sanity > 0:
            sanity = cascading_randomization(
                model,
                lambda m, _name=name, _params=params: create(_name, m, **_params),
                images[:n_sanity].to(device),
                labels[:n_sanity].to(device),
                seed=settings.seed,
            )
            metrics["sanity"] = {
                "rank_correlation_fully_randomized": sanity.rank_correlation_fully_randomized,
                "mean_per_step": sanity.mean.tolist(),
                "steps": sanity.step_names,
            }

        label_maps = {
            c: result.groups[("label", c)].mean
            for c in bench.class_names
            if ("label", c) in result.groups
        }
        figures[f"global_{name}"] = plot_global_maps(
            mean_image,
            label_maps,
            out / "figures" / f"global_{name}.png",
            regions=outlines,
            title=f"label-wise global maps — {name}",
        )
        metrics["seconds_total"] = time.perf_counter() - t0
        timings[f"method:{name}"] = metrics["seconds_total"]
        outcomes[name] = MethodOutcome(explained, result, metrics)
        methods_json[name] = metrics

    # One PEPPR pass for all methods: the random-order control is shared.
    t0 = time.perf_counter()
    peppr_results = peppr_many(
        model,
        peppr_set.images.to(device),
        peppr_set.labels.to(device),
        rankings,
        fill="mean",
        mean_image=mean_image,
        n_steps=settings.peppr_steps,
        random_seeds=settings.peppr_seeds,
        class_names=bench.class_names,
        progress=progress,
    )
    for name, peppr_result in peppr_results.items():
        methods_json[name]["peppr"] = peppr_result.summary()
        figures[f"peppr_{name}"] = plot_peppr(
            peppr_result, out / "figures" / f"peppr_{name}.png", title=f"PEPPR — {name}"
        )
    timings["peppr"] = time.perf_counter() - t0

    # Examples come from the images every method explained.
    shared = min(len(outcome.explained.maps) for outcome in outcomes.values())
    examples = _example_indices(explain_set.subset(torch.arange(shared)), settings)
    figures["examples"] = plot_examples(
        images[examples],
        explain_set.evidence[examples],
        {name: outcome.explained.maps[examples] for name, outcome in outcomes.items()},
        out / "figures" / "examples.png",
        titles=[
            f"{bench.class_names[int(labels[i])]}"
            + (" + marker" if bool(explain_set.has_marker[i]) else "")
            for i in examples.tolist()
        ],
    )

    # Structured Attention Graphs for the first examples: several minimal sufficient patch
    # sets per image. Hidden patches show the training mean image (the natural absence on
    # aligned data; the paper's black is far outside it); 4 cubes per axis in 3D (7^3 = 343
    # cubes would make the search far longer).
    t0 = time.perf_counter()
    sag_json = []
    sag_grid = 7 if settings.dims == 2 else 4
    for rank, i in enumerate(examples.tolist()[: settings.sag_images]):
        sag = StructuredAttentionGraph(
            model, grid=sag_grid, baseline="mean", mean_image=mean_image, seed=settings.seed
        )
        started = time.perf_counter()
        sag_result = sag.explain_image(images[i : i + 1].to(device))
        figures[f"sag_{rank}"] = sag_result.plot(out / "figures" / f"sag_{rank}.png")
        sag_result.to_json(out / "maps" / f"sag_{rank}.json")
        sag_json.append(
            {
                "image": i,
                "label": bench.class_names[int(labels[i])],
                "explained_class": bench.class_names[sag_result.target],
                "probability": sag_result.probability,
                "roots": [list(r.patches) for r in sag_result.roots],
                "diverse": sag_result.diverse,
                "forward_passes": sag_result.forward_passes,
                "seconds": time.perf_counter() - started,
            }
        )
    timings["sag"] = time.perf_counter() - t0

    # What would have to change in the anatomy: a warping simulator for the atrophy class.
    warp_json = None
    if settings.warp_seconds > 0:
        t0 = time.perf_counter()
        warp_json, warp_figures = run_warp_section(
            model,
            train,
            val,
            test,
            out,
            max_seconds=settings.warp_seconds,
            n_images=settings.warp_images,
            seed=settings.seed,
            progress=progress,
        )
        figures.update(warp_figures)
        timings["warp_simulator"] = time.perf_counter() - t0

    results = {
        "medexplain_version": __version__,
        "settings": asdict(settings),
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": str(device),
        },
        "data": {
            "n_images": len(bench),
            "dims": settings.dims,
            "shape": list(bench.images.shape[2:]),
            "class_names": list(bench.class_names),
            "n_train": len(train),
            "n_val": len(val),
            "n_test": len(test),
            "n_explained": len(images),
            "shortcut": {
                "class": bench.class_names[settings.shortcut_class],
                "fraction": settings.shortcut,
            },
        },
        "classifier": {
            "test_accuracy": classifier_metrics["accuracy"],
            "test_auc": classifier_metrics["auc"],
            "train_seconds": history.seconds,
            "best_epoch": history.best_epoch,
        },
        "methods": methods_json,
        "sag": {"grid": sag_grid, "baseline": "mean", "images": sag_json},
        "warp_simulator": warp_json,
        "timings_seconds": timings,
    }
    results["wall_seconds"] = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps(_json_safe(results), indent=2))
    _write_demo_report(out, results, figures)
    return results


def _example_indices(explain_set: SyntheticBenchmark, settings: DemoSettings) -> torch.Tensor:
    """One image per class, then one carrying the shortcut marker, up to n_examples."""
    chosen: list[int] = []
    for cls in range(len(explain_set.class_names)):
        hits = (explain_set.labels == cls).nonzero().flatten().tolist()
        if hits:
            chosen.append(hits[0])
    marked = [i for i in explain_set.has_marker.nonzero().flatten().tolist() if i not in chosen]
    chosen += marked[:1]
    return torch.tensor(chosen[: settings.n_examples])


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, torch.Tensor):
        return _json_safe(value.tolist())
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _write_demo_report(out: Path, results: dict, figures: dict[str, Path]) -> Path:
    columns = [
        ("seconds_per_image", "s / image"),
        ("n_explained", "images"),
        ("localization_auroc", "loc. AUROC"),
        ("global.localization_auroc", "global loc. AUROC"),
        ("global.shortcut_fraction", "shortcut fraction"),
        ("deletion_auc", "deletion AUC ↓"),
        ("insertion_auc", "insertion AUC ↑"),
        ("peppr.erase_area", "PEPPR erase ↓"),
        ("peppr.random_erase_area", "random erase"),
        ("peppr.restore_area", "PEPPR restore ↑"),
        ("peppr.random_restore_area", "random restore"),
        ("sanity.rank_correlation_fully_randomized", "sanity ρ ↓"),
    ]
    clf = results["classifier"]
    data = results["data"]
    intro = (
        f"<p>Benchmark: {data['n_images']} synthetic aligned images "
        f"({data['dims']}D, shape {data['shape']}), classes {', '.join(data['class_names'])}. "
        f"A corner marker appears in {data['shortcut']['fraction']:.0%} of the "
        f"<b>{data['shortcut']['class']}</b> images: a shortcut a faithful global map must "
        f"reveal. Classifier test accuracy {clf['test_accuracy']:.3f}, macro AUC "
        f"{clf['test_auc']:.3f}. {data['n_explained']} test images explained per method "
        "(fewer for the mask-optimisation methods: see the table's <i>images</i> column).</p>"
        "<p class='note'>Read the global maps first: each panel is where the model looks for "
        "that label on average, over the mean image; the cyan outline is where the label's "
        "evidence truly is (and the marker, for the shortcut class). PEPPR then tests whether "
        "erasing the highlighted pixels first hurts the model faster than erasing random "
        "pixels.</p>"
    )
    sections = [("Summary", intro + metrics_table(results["methods"], columns))]
    if "examples" in figures:
        sections.append(("Image-wise explanations", embed_png(figures["examples"])))
    sag_figures = sorted(key for key in figures if key.startswith("sag_"))
    if sag_figures:
        note = (
            "<p class='note'>Structured Attention Graphs: each root is a minimal set of "
            "patches that, shown alone (the rest replaced by the mean image), keeps at least "
            "90% of the predicted probability; under each root, how the probability falls "
            "as its patches are removed one by one.</p>"
        )
        body = note + "".join(embed_png(figures[key]) for key in sag_figures)
        sections.append(("Several explanations per image (SAG)", body))
    warp = results.get("warp_simulator")
    if warp and "scores" in warp:
        scores = warp["scores"]
        note = (
            "<p class='note'>Warping simulator for the <b>atrophy</b> class: the warp that "
            "removes the pattern from atrophy images and injects it into healthy ones, with "
            "its Jacobian determinant (blue: the structure shrinks, red: it grows). Requested "
            f"shift of the log-odds {scores['margin']:.2f}: reached for "
            f"{scores.get('reached_removal', float('nan')):.0%} of the removals and "
            f"{scores.get('reached_injection', float('nan')):.0%} of the injections; "
            f"|log J| localization AUROC {scores.get('auroc_removal', float('nan')):.3f}; "
            f"folding fraction {scores.get('folding_fraction', float('nan')):.2g}; "
            f"cycle MSE / image variance {scores.get('cycle_relative_mse', float('nan')):.3f}."
            "</p>"
        )
        body = note + "".join(
            embed_png(figures[key]) for key in ("warp_removal", "warp_injection") if key in figures
        )
        sections.append(("What would have to change (warping simulator)", body))
    for name in results["methods"]:
        body = ""
        for key in (f"global_{name}", f"peppr_{name}"):
            if key in figures:
                body += embed_png(figures[key])
        sections.append((f"{name}: global maps and PEPPR", body))
    return write_report(
        out / "report.html", title="medexplain demo", sections=sections, results=_json_safe(results)
    )
