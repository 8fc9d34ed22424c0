"""I-GOS / iGOS++: ``variant="paper"`` (the authors' code) against medexplain's default.

For each method, on the first ``--images`` test images of the default 2D benchmark and the
test suite's classifier (as ``benchmarks/igos.py``; dataset-mean baseline for the explainer
and for deletion/insertion), the rows are:

- ``default`` and ``paper`` (``variant="paper"``: every :class:`IGOSOptions` field on,
  ``scale_l2=False``, no Armijo slack);
- ``default+<option>``: the default with one of the authors' choices switched on, to see
  which difference moves the result (``--ablate``).

Each row: localization AUROC against the benchmark's evidence mask (correctly classified
images with evidence), deletion / insertion AUC (2 % steps, tie order seeded), seconds and
CPU seconds per image, model passes per image. ``--iterations`` / ``--integration-steps``
are smaller than the papers' 15 / 20 by default so that a run takes a few minutes; both
variants use the same values. Prints one JSON document.

``--cohort brain|chest|retina``: a 2D cohort with the demo's classifier instead
(``benchmarks/paper_data.py``); ``--out`` also writes the JSON.

Usage: ``python benchmarks/igos_paper.py --method igos++ [--images 16] [--ablate]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import torch

from medexplain.explain import create
from medexplain.explain.igos import IGOSOptions

sys.path.insert(0, str(Path(__file__).resolve().parent))
from igos import faithfulness
from paper_data import COHORT_CHOICES, emit, load

#: Options that only concern one of the two methods.
ONLY = {"integrated_objective": "igos"} | {
    name: "igos++" for name in ("halved_data", "product_of_upsampled", "standardised_btv")
}


def run(model, x, target, params: dict, options: IGOSOptions | None, method: str):
    explainer = create(method, model, **params)
    if options is not None:
        explainer.options = options
    wall, cpu = time.perf_counter(), time.process_time()
    maps = explainer(x, target)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return maps, wall, cpu, explainer.passes


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=("igos", "igos++"), default="igos++")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--integration-steps", type=int, default=10)
    parser.add_argument("--ablate", action="store_true", help="one option at a time")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cohort", choices=COHORT_CHOICES, default=None)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load(args.cohort)
    test, mean_image, model = data.test, data.train.mean_image(), data.model
    x = test.images[: args.images]
    labels = test.labels[: args.images]
    evidence = test.evidence[: args.images]
    with torch.no_grad():
        target = model(x).argmax(1)
    correct = target == labels
    base = {
        "iterations": args.iterations,
        "integration_steps": args.integration_steps,
        "baseline": "mean",
        "mean_image": mean_image,
    }
    configs: list[tuple[str, dict, IGOSOptions | None]] = [
        ("default", {}, None),
        ("paper", {"variant": "paper"}, None),
    ]
    if args.ablate:
        for f in fields(IGOSOptions):
            if ONLY.get(f.name, args.method) == args.method:
                configs.append((f"default+{f.name}", {}, replace(IGOSOptions(), **{f.name: True})))
    create(args.method, model, iterations=1, integration_steps=2)(x[:1], target[:1])  # warm-up
    rows = []
    for label, extra, options in configs:
        maps, wall, cpu, passes = run(model, x, target, {**base, **extra}, options, args.method)
        n = len(x)
        row = {
            "method": args.method,
            "setting": label,
            "images": n,
            "seconds_per_image": round(wall / n, 3),
            "cpu_seconds_per_image": round(cpu / n, 3),
            "forward_passes_per_image": round(passes.images("forward") / n, 1),
            "backward_passes_per_image": round(passes.images("backward") / n, 1),
        }
        row.update(faithfulness(model, x, maps, target, evidence, correct, mean_image))
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    report = {
        "benchmark": (
            "default 2D synthetic benchmark (tests/conftest.py BENCH2D), test split"
            if args.cohort is None
            else data.description
        ),
        "settings": {
            **{k: v for k, v in base.items() if k != "mean_image"},
            "images": len(x),
            "threads": torch.get_num_threads(),
        },
        "accuracy_on_these_images": round(float(correct.float().mean()), 4),
        "results": rows,
    }
    return emit(report, args.out)


if __name__ == "__main__":
    main()
