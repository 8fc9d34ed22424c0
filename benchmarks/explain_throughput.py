"""Images explained per second for each gradient method vs the bare model's throughput.

For every method the script measures, in the same run and at the same batch size:

- ``images_per_second``: the explainer's throughput;
- ``model_passes_per_image``: forward(+backward) passes the method needs per image by
  construction (saliency 1, integrated gradients n_steps, SmoothGrad n_samples, occlusion
  one forward per window position plus one);
- ``bare_passes_per_second``: what the bare model does with the same kind of pass
  (forward+backward for gradient methods, forward only for occlusion);
- ``efficiency`` = images_per_second * passes_per_image / bare_passes_per_second
  (1.0 = no time spent beyond the model's own passes).

The bare passes and the method's calls are timed in alternation and each rate is its best
round's (:func:`paired_rates`).

Prints one JSON document. Usage: ``python benchmarks/explain_throughput.py [--dims 2]``.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from medexplain.explain import create
from medexplain.models.cnn import CNNConfig, build_classifier

# name -> (parameters, pass kind, passes per image as a function of the image size)
METHODS = {
    "saliency": ({}, "backward", lambda size, dims: 1),
    "input_x_gradient": ({}, "backward", lambda size, dims: 1),
    "integrated_gradients": ({"n_steps": 50}, "backward", lambda size, dims: 50),
    "smoothgrad": ({"n_samples": 50}, "backward", lambda size, dims: 50),
    "gradcam": ({}, "backward", lambda size, dims: 1),
}


def _bare_seconds(model, x, backward: bool, calls: int) -> float:
    """Seconds for ``calls`` plain forward (and backward to the input) passes on ``x``."""
    start = time.perf_counter()
    for _ in range(calls):
        inputs = x.clone().requires_grad_(backward)
        out = model(inputs)
        if backward:
            torch.autograd.grad(out[:, 0].sum(), inputs)
    return time.perf_counter() - start


def _method_seconds(explainer, x, target) -> float:
    """Seconds for one call ``explainer(x, target)``."""
    start = time.perf_counter()
    explainer(x, target)
    return time.perf_counter() - start


def paired_rates(
    model,
    explainer,
    x,
    target,
    passes: int,
    repeats: int,
    backward: bool = True,
    min_seconds: float = 1.0,
) -> tuple[float, float]:
    """Images per second of the bare model and of the method on ``x``, timed in alternation.

    ``passes`` is the model passes the method makes per image. The bare reference carries
    the same number of images per pass as the method does (the batch for one-pass methods,
    one image repeated ``min(len(x), passes)`` times otherwise) and makes as many passes as
    one method call, so both average over the same work. One round times the bare passes,
    then one method call; rounds repeat at least ``repeats`` times and until the method's
    timed calls add up to ``min_seconds``, after one untimed warm-up round. Each rate is the
    best round's. Alternating keeps a change in the machine's load from landing on one side
    only, which matters most for calls of a millisecond.
    """
    chunk = x if passes == 1 else x[:1].expand(min(len(x), passes), *x.shape[1:])
    chunk = chunk.contiguous()
    calls = math.ceil(len(x) * passes / len(chunk))
    best_bare = best_method = math.inf
    spent, rounds = 0.0, 0
    while rounds <= repeats or spent < min_seconds:
        bare = _bare_seconds(model, chunk, backward, calls)
        method = _method_seconds(explainer, x, target)
        if rounds:
            best_bare, best_method = min(best_bare, bare), min(best_method, method)
            spent += method
        rounds += 1
    return calls * len(chunk) / best_bare, len(x) / best_method


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, default=2, choices=(2, 3))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    size = 64 if args.dims == 2 else 32
    model = build_classifier(CNNConfig(spatial_dims=args.dims)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.rand(args.batch_size, 1, *([size] * args.dims))
    target = torch.zeros(args.batch_size, dtype=torch.long)
    results = {}
    for name, (params, kind, passes) in METHODS.items():
        explainer = create(name, model, batch_size=args.batch_size, **params)
        n_passes = passes(size, args.dims)
        bare, ips = paired_rates(
            model, explainer, x, target, n_passes, args.repeats, kind == "backward"
        )
        results[name] = {
            "images_per_second": round(ips, 2),
            "model_passes_per_image": n_passes,
            "bare_passes_per_second": round(bare, 1),
            "efficiency": round(ips * n_passes / bare, 3),
        }
    print(
        json.dumps(
            {
                "benchmark": "explain_throughput",
                "dims": args.dims,
                "image_size": size,
                "batch_size": args.batch_size,
                "threads": torch.get_num_threads(),
                "methods": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
