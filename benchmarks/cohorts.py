"""Seconds per image and efficiency of the gradient family on the realistic cohorts.

For each cohort (brain 3D and 2D, retina, chest) and each standard network (MONAI ResNet
and DenseNet at the widths of ``medexplain.models.standard``), the script measures, in the
same run and at the same batch size, every gradient method's seconds per image and its
efficiency: the bare model's time for the same forward/backward passes divided by the
method's time (``benchmarks/explain_throughput.py`` explains the measure; 1.0 means no time
beyond the model's own passes). Networks are untrained: speed does not depend on the
weights.

With ``--faithfulness RUN [RUN ...]`` it prints instead the faithfulness table of finished
cohort demos (``medexplain demo --cohort NAME --out RUN``): per cohort the classifier's test
AUC and, per method, seconds per image, image-wise and global-map localization AUROC, the
shortcut's share of the shortcut class's map (and its area share), deletion and insertion
areas, PEPPR erase/restore against the shared random order, and the sanity correlation;
plus the warping simulator's and the generator's scores where the cohort has them.

Prints one JSON document. Usage: ``python benchmarks/cohorts.py [--images 8] [--steps 16]``
or ``python benchmarks/cohorts.py --faithfulness runs/brain runs/retina runs/chest``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from explain_throughput import paired_rates

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
        bare, ips = paired_rates(model, explainer, x, target, passes, repeats)
        out[name] = {
            "seconds_per_image": round(1.0 / ips, 4),
            "model_passes_per_image": passes,
            "bare_passes_per_second": round(bare, 1),
            "efficiency": round(ips * passes / bare, 3),
        }
    return {"image_shape": list(x.shape[1:]), "methods": out}


#: (JSON path in a method's demo results, column name) of the faithfulness table.
FAITHFULNESS_COLUMNS = (
    ("seconds_per_image", "seconds_per_image"),
    ("n_explained", "images"),
    ("localization_auroc", "localization_auroc"),
    ("global.localization_auroc", "global_localization_auroc"),
    ("global.localization_auroc_per_label", "global_localization_auroc_per_label"),
    ("global.shortcut_fraction", "shortcut_fraction"),
    ("global.marker_share_of_image", "marker_share_of_image"),
    ("deletion_auc", "deletion_auc"),
    ("insertion_auc", "insertion_auc"),
    ("peppr.erase_area", "peppr_erase"),
    ("peppr.random_erase_area", "random_erase"),
    ("peppr.restore_area", "peppr_restore"),
    ("peppr.random_restore_area", "random_restore"),
    ("sanity.rank_correlation_fully_randomized", "sanity_rho"),
)


def _dig(tree: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def faithfulness(run: Path) -> dict:
    """The faithfulness table of one finished cohort demo (its ``results.json``)."""
    results = json.loads((run / "results.json").read_text())
    table = {
        name: {column: _dig(method, key) for key, column in FAITHFULNESS_COLUMNS}
        for name, method in results["methods"].items()
    }
    warp = results.get("warp_simulator") or {}
    learned = results.get("learned_explainers") or {}
    return {
        "cohort": results["data"].get("cohort"),
        "dims": results["data"]["dims"],
        "shape": results["data"]["shape"],
        "network": results["settings"]["arch"],
        "classifier_test_auc": results["classifier"]["test_auc"],
        "classifier_test_accuracy": results["classifier"]["test_accuracy"],
        "wall_seconds": results["wall_seconds"],
        "methods": table,
        "warp_simulator": warp.get("scores"),
        "similar_adversarial": (learned.get("similar_adversarial") or {}).get(
            "test_decision_rates"
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8, help="images per batch")
    parser.add_argument("--steps", type=int, default=16, help="IG steps / SmoothGrad samples")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cohorts", default=",".join(COHORTS))
    parser.add_argument(
        "--faithfulness", nargs="+", type=Path, help="finished cohort demo folders to tabulate"
    )
    args = parser.parse_args()
    if args.faithfulness:
        tables = [faithfulness(run) for run in args.faithfulness]
        print(json.dumps({"benchmark": "cohorts_faithfulness", "runs": tables}, indent=2))
        return
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
