"""The ``augmented:<name>`` wrapper's transforms: the alignment-keeping default against the
former default (every axis flipped, +-10 degrees).

On the first ``--images`` test images of the default 2D benchmark with the test suite's
classifier (or a 2D cohort with the demo's classifier, ``--cohort``), the inner explainer
(``--method``, integrated gradients with ``--steps`` steps by default) explains the images
alone and inside ``augmented:`` with ``n = --copies`` transformed copies per image under
each setting:

- ``plain``: the inner explainer without the wrapper;
- ``default``: rotation +-5 degrees, no zoom, no flips (the wrapper's default);
- ``default+zoom``: rotation +-5 degrees, zoom 0.8-1, no flips (the generators' default);
- ``former_default``: rotation +-10 degrees, zoom 0.8-1, random flips of every axis
  (preset ``"all_flips"``);
- ``vertical_flips``: rotation +-5 degrees, zoom 0.8-1 and random flips of the first
  spatial axis (rows), the generators' ``variant="paper"``.

Each row: localization AUROC of ``|map|`` against the evidence masks (correctly classified
images with evidence), deletion / insertion AUC of ``|map|`` (dataset-mean baseline, 2 %
steps, seeded tie order) on every image for its predicted class, wall and CPU seconds per
image. Prints one JSON document (``--out`` also writes it).

Usage: ``python benchmarks/augment_paper.py [--images 32] [--copies 8] [--cohort chest]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from medexplain.explain import create

sys.path.insert(0, str(Path(__file__).resolve().parent))
from igos import faithfulness
from paper_data import COHORT_CHOICES, emit, load

SETTINGS: dict[str, dict | None] = {
    "plain": None,
    "default": {},
    "default+zoom": {"zoom": (0.8, 1.0)},
    "former_default": {"transforms": "all_flips"},
    "vertical_flips": {"zoom": (0.8, 1.0), "flip": (0,)},
}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--copies", type=int, default=8, help="transformed copies per image")
    parser.add_argument("--method", default="integrated_gradients")
    parser.add_argument("--steps", type=int, default=32, help="integration steps")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--cohort", choices=COHORT_CHOICES, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load(args.cohort)
    model, test = data.model, data.test
    mean_image = data.train.mean_image()
    x = test.images[: args.images]
    labels, evidence = test.labels[: args.images], test.evidence[: args.images]
    with torch.no_grad():
        target = model(x).argmax(1)
    correct = target == labels
    inner = {"n_steps": args.steps} if args.method == "integrated_gradients" else {}
    rows = []
    for name in args.settings.split(","):
        setting = SETTINGS[name]
        if setting is None:
            explainer = create(args.method, model, **inner)
        else:
            explainer = create(
                f"augmented:{args.method}", model, n=args.copies, seed=0, **inner, **setting
            )
        wall, cpu = time.perf_counter(), time.process_time()
        maps = explainer(x, target).abs()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        row = {
            "setting": name,
            "transforms": None if setting is None else str(explainer.transforms),
            "seconds_per_image": round(wall / len(x), 4),
            "cpu_seconds_per_image": round(cpu / len(x), 4),
        }
        row.update(faithfulness(model, x, maps, target, evidence, correct, mean_image))
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    report = {
        "benchmark": data.description,
        "method": args.method,
        "steps": args.steps,
        "copies": args.copies,
        "images": len(x),
        "accuracy_on_these_images": round(float(correct.float().mean()), 4),
        "threads": torch.get_num_threads(),
        "results": rows,
    }
    return emit(report, args.out)


if __name__ == "__main__":
    main()
