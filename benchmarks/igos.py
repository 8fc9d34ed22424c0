"""I-GOS / iGOS++ on the default 2D benchmark: speed, model passes, efficiency, faithfulness.

All in one run, with the same explainer settings (the papers' defaults unless overridden):

(a) images per second of iGOS++ image-at-a-time (batch 1: one image's path images per
    pass) versus batches of 16 and 32 images, and the largest difference between their
    masks (batch invariance). Batch 1 and batch 16 explain the same first 16 images, batch
    32 the first 32;
(b) model passes per image, forward-only and forward+backward counted separately by the
    explainer (``explainer.passes``), and ``efficiency`` = the time the bare model needs for
    exactly those passes at the same chunk sizes divided by the explainer's time (1.0 =
    nothing spent beyond the model itself). The bare time is measured by replaying every
    chunk size ``min(count, --replay)`` times and scaling by its count. Wall time and this
    process's CPU time are both reported: on a shared machine other processes slow the
    wall clock unevenly between runs, CPU time much less (use ``--threads 1`` there), so the
    speed comparison is checked on CPU time and wall time alike;
(c) deletion / insertion AUCs (medexplain.metrics.deletion, 2 % steps) of iGOS++, I-GOS,
    saliency and integrated gradients on the same 32 images, and the localization AUROC of
    each map against the benchmark's evidence mask (computed inline from ranks, per image,
    over the correctly classified images that have evidence).

Baseline: I-GOS/iGOS++ and the deletion/insertion metric use the dataset mean image (of
the training split), natural for aligned data; the papers' blur is no "absence of
evidence" here, since the classifier calls blurred images "atrophy" (the JSON lists f_c
of each baseline per class). Saliency and integrated gradients run at their defaults
(IG: zero baseline, 50 steps); IG with the mean baseline is reported as well, for a
like-for-like comparison.

The classifier is the test suite's (tests/conftest.py: same benchmark and training
configuration, reused from tests/.cache when present, otherwise trained here in about two
minutes and cached there). Prints one JSON document with a ``checks`` section.

Usage: ``python benchmarks/igos.py [--images 32] [--single 16] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from medexplain.core.model import model_guard
from medexplain.core.perturb import make_baseline
from medexplain.explain import create
from medexplain.explain.igos_loss import PassCounter
from medexplain.metrics.deletion import deletion_insertion

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import BENCH2D, TRAIN2D, cached_classifier  # noqa: E402


def load_classifier():
    """The benchmark split and the suite's trained classifier (trained when not cached)."""
    from medexplain.data.synthetic import make_benchmark

    train, _, test = make_benchmark(**BENCH2D).split()
    model = cached_classifier("classifier2d", BENCH2D, TRAIN2D)
    return test, train.mean_image(), model


def rank_auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """AUROC of ``scores`` (N,) for the boolean truth ``positive`` (N,), ties averaged
    (Mann-Whitney U / (n1 n0))."""
    scores = scores.double()
    order = torch.argsort(scores)
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, scores.numel() + 1, dtype=torch.float64)
    # average the ranks of tied values
    values, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    sums = torch.zeros(values.numel(), dtype=torch.float64).index_add_(0, inverse, ranks)
    ranks = (sums / counts)[inverse]
    n1 = int(positive.sum())
    n0 = positive.numel() - n1
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


class Clock:
    """Wall time and this process's CPU time, started together."""

    def __init__(self) -> None:
        self.wall = time.perf_counter()
        self.cpu = time.process_time()

    def elapsed(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def bare_model_seconds(
    model, passes: PassCounter, shape, n_classes: int, replay: int
) -> tuple[float, float]:
    """(wall, CPU) seconds the bare model needs for the passes in ``passes``."""
    wall = cpu = 0.0
    with model_guard(model):
        for kind, counter in (("forward", passes.forward), ("backward", passes.backward)):
            for chunk, count in counter.items():
                x = torch.rand(chunk, *shape)
                target = torch.arange(chunk) % n_classes
                reps = min(count, replay)
                clock = Clock()
                for _ in range(reps):
                    if kind == "forward":
                        with torch.no_grad():
                            torch.softmax(model(x), 1).gather(1, target[:, None])
                    else:
                        inputs = x.clone().requires_grad_(True)
                        out = torch.softmax(model(inputs), 1).gather(1, target[:, None])
                        torch.autograd.grad(out.sum(), inputs)
                dt_wall, dt_cpu = clock.elapsed()
                wall += dt_wall * count / reps
                cpu += dt_cpu * count / reps
    return wall, cpu


def run_batched(explainer, x, target, batch: int):
    """Explain ``x`` in groups of ``batch`` images; maps, (wall, CPU) seconds, all passes."""
    maps, passes, wall, cpu = [], PassCounter(), 0.0, 0.0
    for start in range(0, len(x), batch):
        clock = Clock()
        maps.append(explainer(x[start : start + batch], target[start : start + batch]))
        dt_wall, dt_cpu = clock.elapsed()
        wall, cpu = wall + dt_wall, cpu + dt_cpu
        for kind in ("forward", "backward"):
            getattr(passes, kind).update(getattr(explainer.passes, kind))
        passes.padding += explainer.passes.padding
    return torch.cat(maps), (wall, cpu), passes


def faithfulness(model, x, maps, target, evidence, correct, mean_image) -> dict:
    result = deletion_insertion(model, x, target, maps, baseline="mean", mean_image=mean_image)
    has = evidence.flatten(1).any(1) & correct
    aurocs = [rank_auroc(maps[i].flatten(), evidence[i].flatten()) for i in has.nonzero().flatten()]
    return {
        "deletion_auc": round(float(result.deletion_auc.mean()), 4),
        "insertion_auc": round(float(result.insertion_auc.mean()), 4),
        "localization_auroc": round(sum(aurocs) / max(len(aurocs), 1), 4),
        "localization_images": len(aurocs),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32, help="test images explained")
    parser.add_argument("--single", type=int, default=16, help="images explained one at a time")
    parser.add_argument("--batches", default="16,32", help="batch sizes compared to batch 1")
    parser.add_argument("--chunk", type=int, default=None, help="explainer batch_size")
    parser.add_argument("--iterations", type=int, default=15)
    parser.add_argument("--integration-steps", type=int, default=20)
    parser.add_argument("--replay", type=int, default=5, help="bare-model repeats per chunk size")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    test, mean_image, model = load_classifier()
    x = test.images[: args.images]
    labels = test.labels[: args.images]
    evidence = test.evidence[: args.images]
    with torch.no_grad():
        target = model(x).argmax(1)
        baseline_scores = {
            name: {
                cls: round(float(torch.softmax(model(b), 1)[labels == c, c].mean()), 3)
                for c, cls in enumerate(test.class_names)
            }
            for name, b in (
                ("image", x),
                ("blur", make_baseline(x, "blur")),
                ("mean", make_baseline(x, "mean", mean_image)),
                ("zero", make_baseline(x, "zero")),
            )
        }
    correct = target == labels
    n_classes = len(test.class_names)
    params = {
        "iterations": args.iterations,
        "integration_steps": args.integration_steps,
        "baseline": "mean",
        "mean_image": mean_image,
    }
    if args.chunk:
        params["batch_size"] = args.chunk

    # Warm-up: one-time costs (allocator, kernels' first calls) stay out of the timings.
    create("igos++", model, iterations=1, integration_steps=2)(x[:1], target[:1])
    rows = []
    masks = {}
    batches = [1, *(int(b) for b in args.batches.split(","))]
    runs = [("igos++", b) for b in batches] + [("igos", max(batches))]
    for name, batch in runs:
        explainer = create(name, model, **params)
        n = min(args.single if batch == 1 else max(batch, args.single), len(x))
        maps, (seconds, cpu), passes = run_batched(explainer, x[:n], target[:n], batch)
        masks[(name, batch)] = maps
        model_wall, model_cpu = bare_model_seconds(
            model, passes, x.shape[1:], n_classes, args.replay
        )
        row = {
            "method": name,
            "batch": batch,
            "chunk": explainer.batch_size,
            "images": n,
            "seconds": round(seconds, 2),
            "cpu_seconds": round(cpu, 2),
            "images_per_second": round(n / seconds, 4),
            "images_per_cpu_second": round(n / cpu, 4),
            "forward_passes_per_image": round(passes.images("forward") / n, 1),
            "backward_passes_per_image": round(passes.images("backward") / n, 1),
            "model_seconds": round(model_wall, 2),
            "model_cpu_seconds": round(model_cpu, 2),
            "efficiency": round(model_wall / seconds, 3),
            "efficiency_cpu": round(model_cpu / cpu, 3),
        }
        if n == len(x):
            row.update(faithfulness(model, x, maps, target, evidence, correct, mean_image))
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    others = (
        ("saliency", "saliency", {}),
        ("integrated_gradients", "integrated_gradients", {}),
        (
            "integrated_gradients(mean baseline)",
            "integrated_gradients",
            {"baseline": "mean", "mean_image": mean_image},
        ),
    )
    for label, name, extra in others:
        explainer = create(name, model, **extra)
        start = time.perf_counter()
        maps = explainer(x, target)
        seconds = time.perf_counter() - start
        row = {"method": label, "batch": len(x), "images": len(x), "seconds": round(seconds, 2)}
        row["images_per_second"] = round(len(x) / seconds, 2)
        row.update(faithfulness(model, x, maps, target, evidence, correct, mean_image))
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)

    def find(method, batch=None):
        return next(r for r in rows if r["method"] == method and batch in (None, r["batch"]))

    single = find("igos++", 1)
    n_single = single["images"]
    mask_diff = {}
    for b in batches[1:]:
        m = min(n_single, len(masks[("igos++", b)]))
        diff = masks[("igos++", b)][:m] - masks[("igos++", 1)][:m]
        mask_diff[f"batch{b}_vs_batch1"] = float(diff.abs().max())
    best = find("igos++", max(batches))
    ig = find("integrated_gradients")
    checks = {
        "batched_not_slower_cpu": all(
            find("igos++", b)["images_per_cpu_second"] >= single["images_per_cpu_second"]
            for b in batches[1:]
        ),
        "batched_not_slower_wall": all(
            find("igos++", b)["images_per_second"] >= single["images_per_second"]
            for b in batches[1:]
        ),
        "masks_identical_max_abs_diff": max(mask_diff.values()),
        "masks_identical": max(mask_diff.values()) <= 1e-6,
        "efficiency_at_least_0.7": all(
            min(find("igos++", b)["efficiency"], find("igos++", b)["efficiency_cpu"]) >= 0.7
            for b in batches[1:]
        ),
        "igospp_deletion_below_integrated_gradients": best["deletion_auc"] < ig["deletion_auc"],
        "igospp_insertion_above_integrated_gradients": best["insertion_auc"] > ig["insertion_auc"],
        "igospp_localization_auroc_at_least_0.85": best["localization_auroc"] >= 0.85,
    }
    report = {
        "benchmark": {**BENCH2D, "split": "test", "images": len(x)},
        "settings": {
            **{k: v for k, v in params.items() if k != "mean_image"},
            "threads": torch.get_num_threads(),
        },
        "mean_f_c_per_true_class": baseline_scores,
        "accuracy_on_these_images": round(float(correct.float().mean()), 4),
        "results": rows,
        "mask_max_abs_diff": mask_diff,
        "checks": checks,
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
