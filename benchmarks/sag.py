"""SAG benchmark: batched versus one-at-a-time scoring, and redundant evidence recovery.

Prints JSON: seconds and forward passes per image with ``batched=True`` and ``False`` on the
64 x 64 redundant-benchmark classifier (same roots required), for the black and the
dataset-mean baselines; ``candidate_seconds_per_image`` leaves out the I-GOS heuristic
(timed alone: the same work in both modes), so ``candidate_speedup`` is the gain of batched
candidate evaluation itself; and the fraction of correctly
classified lesion images with blobs in both regions for which SAG returns two disjoint
roots, one overlapping each region (per baseline: zero, dataset mean, healthy counterpart).

Usage: ``.venv/bin/python benchmarks/sag.py [--images 4] [--redundant-images 24]``
Reuses ``tests/.cache/classifier2d_redundant_*.pt`` when present, else trains (~2 min).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from medexplain.data.synthetic import make_benchmark, render, sample_subjects
from medexplain.explain.sag import StructuredAttentionGraph

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import BENCH2D_REDUNDANT as BENCH  # noqa: E402
from conftest import TRAIN2D_REDUNDANT as TRAIN  # noqa: E402
from conftest import cached_classifier  # noqa: E402
from test_sag import (  # noqa: E402  (the tests' checks, reused)
    redundant_lesion_images,
    two_region_roots,
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=3, help="images for the speed comparison")
    parser.add_argument("--redundant-images", type=int, default=24)
    parser.add_argument("--threshold", type=float, default=0.9)
    args = parser.parse_args()
    torch.set_num_threads(2)
    full = make_benchmark(**BENCH)
    train, _, test = full.split()
    model = cached_classifier("classifier2d_redundant", BENCH, TRAIN)
    lesion = test.class_names.index("lesion")
    with torch.no_grad():
        predicted = model(test.images).argmax(1)
    parts = test.evidence_parts
    chosen = redundant_lesion_images(test, predicted)
    out: dict = {"qualifying_images": len(chosen), "threshold": args.threshold}

    # Speed: batched versus one at a time, same images and settings (paper defaults), for
    # the paper's black baseline and the dataset mean.
    out["speed"] = {}
    mean_image = train.mean_image()
    for baseline in ("zero", "mean"):
        speed, roots = {}, {}
        for batched in (True, False):
            seconds, heuristic, passes, calls, found = 0.0, 0.0, 0, 0, []
            for i in chosen[: args.images]:
                sag = StructuredAttentionGraph(
                    model,
                    batched=batched,
                    max_nodes=60,
                    baseline=baseline,
                    mean_image=mean_image,
                )
                start = time.perf_counter()
                result = sag.explain_image(test.images[i], lesion)
                seconds += time.perf_counter() - start
                # The I-GOS heuristic is the same work in both modes: time it alone.
                start = time.perf_counter()
                sag.heuristic(test.images[i : i + 1], lesion, result.grid)
                heuristic += time.perf_counter() - start
                passes += result.forward_passes
                calls += result.forward_calls
                found.append([list(r.patches) for r in result.roots])
            n = max(1, min(args.images, len(chosen)))
            speed["batched" if batched else "one_at_a_time"] = {
                "seconds_per_image": seconds / n,
                "candidate_seconds_per_image": (seconds - heuristic) / n,
                "forward_passes_per_image": passes / n,
                "forward_calls_per_image": calls / n,
            }
            roots[batched] = found
        speed["speedup"] = (
            speed["one_at_a_time"]["seconds_per_image"] / speed["batched"]["seconds_per_image"]
        )
        speed["candidate_speedup"] = (
            speed["one_at_a_time"]["candidate_seconds_per_image"]
            / speed["batched"]["candidate_seconds_per_image"]
        )
        speed["same_roots"] = roots[True] == roots[False]
        out["speed"][baseline] = speed
        print(json.dumps({baseline: speed}), file=sys.stderr, flush=True)

    # Redundant evidence: fraction with two disjoint roots, one per region.
    subset = chosen[: args.redundant_images]
    in_full = [int((full.images == test.images[i]).flatten(1).all(1).nonzero()[0]) for i in subset]
    healthy = render(sample_subjects(**full.config).select(torch.tensor(in_full)), effects=False)
    fractions = {}
    for name in ("zero", "mean", "healthy"):
        hits = 0
        for k, i in enumerate(subset):
            if name == "healthy":
                kw = {"baseline": healthy.images[k : k + 1]}
            else:
                kw = {"baseline": name, "mean_image": mean_image}
            sag = StructuredAttentionGraph(model, threshold=args.threshold, max_nodes=1, **kw)
            result = sag.explain_image(test.images[i], lesion)
            hits += two_region_roots(result, [parts[i, 0], parts[i, 1]])
        print(name, hits, file=sys.stderr, flush=True)
        fractions[name] = {
            "found": hits,
            "images": len(subset),
            "fraction": hits / max(1, len(subset)),
        }
    out["redundant"] = fractions
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
