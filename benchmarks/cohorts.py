"""Seconds per image and efficiency of the gradient family on the realistic cohorts.

For each cohort (brain 3D and 2D, retina, chest) and each standard network (MONAI ResNet
and DenseNet at the widths of ``medexplain.models.standard``), the script measures, in the
same run and at the same batch size, every gradient method's seconds per image and its
efficiency: the bare model's time for the same forward/backward passes divided by the
method's time (``benchmarks/explain_throughput.py`` explains the measure; 1.0 means no time
beyond the model's own passes). Networks are untrained: speed does not depend on the
weights.

Prints one JSON document. Usage: ``python benchmarks/cohorts.py [--images 8] [--steps 16]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from explain_throughput import bare_rate, method_rate

from medexplain.data.cohorts import make_brain, make_chest, make_retina
from medexplain.explain import create
from medexplain.models.standard import StandardNetConfig, build_standard_network

COHORTS = {
    "brain3d": lambda n: make_brain(n, dims=3),
    "brain2d": lambda n: make_brain(n, dims=2),
    "retina": lambda n: make_retina(n),
    "chest": lambda n: make_chest(n),
}


def methods(steps: int) -> dict[str, tuple[dict, int]]:
    """name -> (parameters, model passes per image by construction)."""
    return {
        "saliency": ({}, 1),
        "input_x_gradient": ({}, 1),
        "integrated_gradients": ({"n_steps": steps}, steps),
        "smoothgrad": ({"n_samples": steps}, steps),
        "gradcam": ({}, 1),
    }


def measure(cohort: str, arch: str, images: int, steps: int, repeats: int) -> dict:
    data = COHORTS[cohort](images)
    x = data.images
    config = StandardNetConfig(
        arch=arch, spatial_dims=x.dim() - 2, in_channels=x.shape[1], num_classes=3
    )
    model = build_standard_network(config).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    target = torch.zeros(len(x), dtype=torch.long)
    out = {}
    for name, (params, passes) in methods(steps).items():
        explainer = create(name, model, batch_size=len(x), **params)
        chunk = x if passes == 1 else x[:1].expand(min(len(x), passes), *x.shape[1:])
        bare = bare_rate(model, chunk.contiguous(), backward=True, repeats=repeats)
        ips = method_rate(explainer, x, target, repeats)
        out[name] = {
            "seconds_per_image": round(1.0 / ips, 4),
            "model_passes_per_image": passes,
            "bare_passes_per_second": round(bare, 1),
            "efficiency": round(ips * passes / bare, 3),
        }
    return {"image_shape": list(x.shape[1:]), "methods": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8, help="images per batch")
    parser.add_argument("--steps", type=int, default=16, help="IG steps / SmoothGrad samples")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cohorts", default=",".join(COHORTS))
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    results = {
        cohort: {
            arch: measure(cohort, arch, args.images, args.steps, args.repeats)
            for arch in ("resnet", "densenet")
        }
        for cohort in args.cohorts.split(",")
    }
    print(
        json.dumps(
            {
                "benchmark": "cohorts_speed",
                "images": args.images,
                "steps": args.steps,
                "threads": torch.get_num_threads(),
                "seconds": round(time.perf_counter() - start, 1),
                "cohorts": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
