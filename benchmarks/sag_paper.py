"""SAG: the paper variant against the default, and each difference alone.

On the 64 x 64 redundant-benchmark classifier (test-split lesion images, correctly
classified, with a blob in both regions), for every setting: localization AUROC of the
registered map against the evidence mask, deletion/insertion areas of the map (dataset-mean
baseline), the fraction of images with two disjoint roots, one on each region (redundant
recovery, the tests' check), roots and graph nodes per image, forward passes and seconds
per image (the heuristic included; wall time, and the process's CPU time, which a machine
shared with other jobs inflates less). Settings: ``default``, ``paper`` (``variant="paper"``)
and the default with one part of the paper's (``paper_parts``: ``patches``, ``heuristic``,
``search``), and the default with every patch of a graph node removed
(``graph_removals=None``; both variants remove the first three, as the authors' code).
SAG's hidden patches show the dataset mean image (``--baseline``; ``zero`` is the paper's
black, far outside this data).

``--cohort brain|chest|retina``: a 2D cohort with the demo's classifier instead
(``benchmarks/paper_data.py``): correctly classified test images with evidence, each
explained for its class; redundant recovery is not defined there (null).

Usage: ``.venv/bin/python benchmarks/sag_paper.py [--images 20] [--cohort chest] [--out FILE]``
Reuses ``tests/.cache/classifier2d_redundant_*.pt`` when present, else trains (~2 min).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from medexplain.data.synthetic import make_benchmark
from medexplain.explain.sag import StructuredAttentionGraph, coverage_map
from medexplain.metrics.deletion import deletion_insertion
from medexplain.metrics.localization import auroc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import BENCH2D_REDUNDANT as BENCH  # noqa: E402
from conftest import TRAIN2D_REDUNDANT as TRAIN  # noqa: E402
from conftest import cached_classifier  # noqa: E402
from test_sag import (  # noqa: E402  (the tests' checks, reused)
    redundant_lesion_images,
    two_region_roots,
)

sys.path.insert(0, str(ROOT / "benchmarks"))
from paper_data import COHORT_CHOICES, emit, load  # noqa: E402

SETTINGS: dict[str, dict] = {
    "default": {"variant": "default"},
    "paper": {"variant": "paper"},
    "default+paper_patches": {"parts": {"patches"}},
    "default+paper_heuristic": {"parts": {"heuristic"}},
    "default+paper_search": {"parts": {"search"}},
    # Every patch of a graph node removed (the former default; the authors' code and the
    # default remove only its first three).
    "default+every_removal": {"params": {"graph_removals": None}},
}


def explain(model, images, targets: list[int], setting: dict, params: dict):
    """SAG results and maps ``(N, 1, *S)`` for ``images`` (one target per image); wall and
    CPU seconds spent."""
    results, maps, seconds, cpu = [], [], 0.0, 0.0
    for i in range(len(images)):
        sag = StructuredAttentionGraph(
            model,
            variant=setting.get("variant", "default"),
            **params,
            **setting.get("params", {}),
        )
        if "parts" in setting:
            sag.paper_parts = frozenset(setting["parts"])
        start, start_cpu = time.perf_counter(), time.process_time()
        result = sag.explain_image(images[i : i + 1], targets[i])
        seconds += time.perf_counter() - start
        cpu += time.process_time() - start_cpu
        results.append(result)
        maps.append(coverage_map(result))
    return results, torch.stack(maps).unsqueeze(1), (seconds, cpu)


def choose_images(model, test, redundant: bool, limit: int) -> tuple[list[int], list[int]]:
    """Correctly classified test images with evidence and their classes: on the redundant
    benchmark lesion images with a blob in both regions, on a cohort any class."""
    with torch.no_grad():
        predicted = model(test.images).argmax(1)
    has = test.evidence.flatten(1).any(1)
    if redundant:
        chosen = redundant_lesion_images(test, predicted)
    else:
        chosen = [i for i in range(len(test)) if has[i] and predicted[i] == test.labels[i]]
    chosen = chosen[:limit]
    return chosen, [int(test.labels[i]) for i in chosen]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--baseline", default="mean", choices=["mean", "zero"])
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--cohort", choices=COHORT_CHOICES, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.cohort is None:
        full = make_benchmark(**BENCH)
        train, _, test = full.split()
        model = cached_classifier("classifier2d_redundant", BENCH, TRAIN)
        description = "classifier2d_redundant (64 x 64, 2D)"
    else:
        data = load(args.cohort)
        train, test, model = data.train, data.test, data.model
        description = data.description
    chosen, targets = choose_images(model, test, args.cohort is None, args.images)
    images = test.images[chosen]
    mean_image = train.mean_image()
    params = {"baseline": args.baseline, "mean_image": mean_image}
    out: dict = {
        "images": len(chosen),
        "baseline": args.baseline,
        "model": description,
        "threads": args.threads,
        "settings": {},
    }
    for name in args.settings.split(","):
        results, maps, seconds = explain(model, images, targets, SETTINGS[name], params)
        curves = deletion_insertion(
            model, images, torch.tensor(targets), maps, baseline="mean", mean_image=mean_image
        )
        loc = auroc(maps, test.evidence[chosen])
        found = None
        if args.cohort is None:
            parts = test.evidence_parts
            recovered = sum(
                two_region_roots(r, [parts[i, 0], parts[i, 1]]) for r, i in zip(results, chosen)
            )
            found = round(recovered / len(results), 4)
        n = len(results)
        row = {
            "localization_auroc": round(float(loc.nanmean()), 4),
            "deletion_auc": round(float(curves.deletion_auc.mean()), 4),
            "insertion_auc": round(float(curves.insertion_auc.mean()), 4),
            "redundant_recovery": found,
            "roots_per_image": round(sum(len(r.roots) for r in results) / n, 2),
            "graph_nodes_per_image": round(sum(len(r.nodes) for r in results) / n, 2),
            "low_children_per_image": round(
                sum(sum(x.ratio <= r.child_threshold for x in r.nodes) for r in results) / n, 2
            ),
            "forward_passes_per_image": round(sum(r.forward_passes for r in results) / n, 1),
            "seconds_per_image": round(seconds[0] / n, 3),
            "cpu_seconds_per_image": round(seconds[1] / n, 3),
        }
        out["settings"][name] = row
        print(json.dumps({name: row}), file=sys.stderr, flush=True)
    emit(out, args.out)


if __name__ == "__main__":
    main()
