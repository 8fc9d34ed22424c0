"""SAG benchmark: batched versus one-at-a-time scoring, and redundant evidence recovery.

Prints JSON: seconds and forward passes per image with ``batched=True`` and ``False`` on the
64 x 64 redundant-benchmark classifier (same roots required), and the fraction of correctly
classified lesion images with blobs in both regions for which SAG returns two disjoint
roots, one overlapping each region (per baseline: zero, dataset mean, healthy counterpart).

Usage: ``.venv/bin/python benchmarks/sag.py [--images 4] [--redundant-images 24]``
Reuses ``tests/.cache/classifier2d_redundant_*.pt`` when present, else trains (~2 min).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from medexplain.data.synthetic import make_benchmark, render, sample_subjects
from medexplain.explain.sag import StructuredAttentionGraph

BENCH = dict(n=1200, dims=2, size=64, seed=0, redundant=True)
TRAIN = dict(epochs=15, batch_size=64, lr=3e-3, seed=0, max_seconds=120)


def classifier(train, val):
    from medexplain.models.checkpoint import load_checkpoint
    from medexplain.models.cnn import CNNConfig, build_classifier
    from medexplain.models.train import train_classifier

    cached = sorted(
        (Path(__file__).parents[1] / "tests" / ".cache").glob("classifier2d_redundant_*.pt")
    )
    if cached:
        return load_checkpoint(cached[0])[0].eval()
    model = build_classifier(CNNConfig(in_channels=1, num_classes=3, spatial_dims=2))
    train_classifier(model, train.dataset(), val.dataset(), progress=False, **TRAIN)
    return model.eval()


def two_disjoint_region_roots(result, parts) -> bool:
    covers = [[bool((result.patch_mask(r.patches) & p).any()) for p in parts] for r in result.roots]
    return any(
        set(a.patches).isdisjoint(b.patches) and covers[ia][0] and covers[ib][1]
        for ia, a in enumerate(result.roots)
        for ib, b in enumerate(result.roots)
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=3, help="images for the speed comparison")
    parser.add_argument("--redundant-images", type=int, default=24)
    parser.add_argument("--threshold", type=float, default=0.9)
    args = parser.parse_args()
    torch.set_num_threads(2)
    full = make_benchmark(**BENCH)
    train, val, test = full.split()
    model = classifier(train, val)
    lesion = test.class_names.index("lesion")
    with torch.no_grad():
        predicted = model(test.images).argmax(1)
    parts = test.evidence_parts
    chosen = [
        i
        for i in range(len(test))
        if test.labels[i] == lesion
        and predicted[i] == lesion
        and parts[i, 0].any()
        and parts[i, 1].any()
    ]
    out: dict = {"qualifying_images": len(chosen), "threshold": args.threshold}

    # Speed: batched versus one at a time (zero baseline, paper defaults).
    speed = {}
    roots = {}
    for batched in (True, False):
        seconds, passes, calls, found = 0.0, 0, 0, []
        for i in chosen[: args.images]:
            sag = StructuredAttentionGraph(model, batched=batched, max_nodes=60)
            start = time.perf_counter()
            result = sag.explain_image(test.images[i], lesion)
            seconds += time.perf_counter() - start
            passes += result.forward_passes
            calls += result.forward_calls
            found.append([list(r.patches) for r in result.roots])
        n = max(1, min(args.images, len(chosen)))
        speed["batched" if batched else "one_at_a_time"] = {
            "seconds_per_image": seconds / n,
            "forward_passes_per_image": passes / n,
            "forward_calls_per_image": calls / n,
        }
        roots[batched] = found
    speed["speedup"] = (
        speed["one_at_a_time"]["seconds_per_image"] / speed["batched"]["seconds_per_image"]
    )
    speed["same_roots"] = roots[True] == roots[False]
    out["speed"] = speed

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
                kw = {"baseline": name, "mean_image": train.mean_image()}
            sag = StructuredAttentionGraph(model, threshold=args.threshold, max_nodes=1, **kw)
            result = sag.explain_image(test.images[i], lesion)
            hits += two_disjoint_region_roots(result, [parts[i, 0], parts[i, 1]])
        fractions[name] = {
            "found": hits,
            "images": len(subset),
            "fraction": hits / max(1, len(subset)),
        }
    out["redundant"] = fractions
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
