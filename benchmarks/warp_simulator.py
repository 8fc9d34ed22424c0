"""Conditional warping simulators on the atrophy benchmark, 2D and 3D, plain and diffeomorphic.

Data: the synthetic benchmark restricted to ``("healthy", "atrophy")`` (a binary view: the
atrophy class shrinks the right nucleus; METHODS.md section 5 needs a classifier for which
atrophy is the positive), split 70/15/15. A SmallCNN is trained on it (no early stopping,
so its logits are confident), then one simulator per variant (plain, diffeomorphic) is
fitted with :func:`medexplain.explain.generative.warp_simulator.fit_warp_simulator`
(``target_class=1``, default hyper-parameters, time-capped). Reported on the test images
the classifier gets right:

- ``training_seconds``, ``steps``, ``stop_reason``; ``margin`` = the requested shift ``b``;
- ``reached_removal`` / ``reached_injection``: fraction of atrophy (healthy) images whose
  log-odds ``f`` drops (rises) by at least ``b``; median shifts;
- ``folding_fraction``: fraction of pixels/voxels with ``J <= 0`` over every test warp;
- ``auroc_removal``: localization AUROC of ``|map|`` (``map = log J`` of the removal warp,
  the ``warp_simulator`` explainer) against the atrophy evidence mask, rank-based (ties get
  average ranks), per image then averaged; ``auroc_injection``: the same for healthy
  images (``-log J`` of the injection warp) against the template's atrophy region;
- ``cycle_relative_mse``: ``MSE(x, warp(x~, S(x~, -c)))`` over the mean per-image variance.

``checks`` compares with the targets of issue 7: requested shift reached for >= 90% of the
images in each direction, folding < 0.1% (plain) and 0 (diffeomorphic), AUROC >= 0.9.

The measures come from
:func:`medexplain.metrics.warp.evaluate_warp_simulator`. Prints one
JSON document. Usage:
``python benchmarks/warp_simulator.py [--dims 2 3] [--variants plain diffeomorphic]
[--max-seconds-2d 300] [--max-seconds-3d 600] [--param key=value ...] [--quick] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from medexplain.cli import parse_params
from medexplain.data.synthetic import make_benchmark
from medexplain.data.writers import save_nifti
from medexplain.explain.batch import predicted_classes
from medexplain.explain.generative.warp_simulator import fit_warp_simulator
from medexplain.metrics.warp import SHIFTS, evaluate_warp_simulator
from medexplain.models.cnn import CNNConfig, build_classifier
from medexplain.models.train import evaluate_classifier, train_classifier
from medexplain.report.warp_plot import plot_simulation

CLASSES = ("healthy", "atrophy")
ATROPHY = 1


def settings(dims: int, quick: bool, args) -> dict:
    if dims == 2:
        base = dict(
            n=800, classifier_epochs=12, classifier_seconds=240, max_seconds=args.max_seconds_2d
        )
        if quick:
            base.update(classifier_epochs=8, classifier_seconds=60, max_seconds=90)
    else:
        base = dict(
            n=400, classifier_epochs=12, classifier_seconds=480, max_seconds=args.max_seconds_3d
        )
        if quick:
            base.update(n=200, classifier_epochs=8, classifier_seconds=120, max_seconds=120)
    if args.n is not None:
        base["n"] = args.n
    return base


def run_dims(dims: int, args) -> dict:
    cfg = settings(dims, args.quick, args)
    start = time.perf_counter()
    train, val, test = make_benchmark(
        n=cfg["n"], dims=dims, classes=CLASSES, seed=args.seed
    ).split()
    data_seconds = time.perf_counter() - start

    model = build_classifier(CNNConfig(spatial_dims=dims, num_classes=len(CLASSES)))
    start = time.perf_counter()
    train_classifier(
        model,
        train.dataset(),
        None,
        epochs=cfg["classifier_epochs"],
        batch_size=64,
        lr=3e-3,
        seed=args.seed,
        max_seconds=cfg["classifier_seconds"],
        progress=False,
    )
    classifier_seconds = time.perf_counter() - start
    model.eval()
    accuracy = evaluate_classifier(model, test.dataset())["accuracy"]
    correct = predicted_classes(model, test.images) == test.labels
    atrophy = test.subset(correct & (test.labels == ATROPHY))
    healthy = test.subset(correct & (test.labels == 0))

    out = {
        "dims": dims,
        "size": int(test.images.shape[-1]),
        "n_train": len(train),
        "n_test_atrophy": len(atrophy),
        "n_test_healthy": len(healthy),
        "data_seconds": round(data_seconds, 2),
        "classifier_seconds": round(classifier_seconds, 1),
        "classifier_accuracy": accuracy,
        "variants": {},
    }
    for variant in args.variants:
        out["variants"][variant] = run_variant(
            model, train, val, atrophy, healthy, dims, variant, cfg, args
        )
    return out


def run_variant(model, train, val, atrophy, healthy, dims, variant, cfg, args) -> dict:
    explainer = fit_warp_simulator(
        model,
        train.dataset(),
        val.dataset(),
        target_class=ATROPHY,
        max_seconds=cfg["max_seconds"],
        epochs=args.epochs,
        seed=args.seed,
        progress=False,
        diffeomorphic=(variant == "diffeomorphic"),
        batch_size=32,
        **args.params,
    )
    history = explainer.history
    margin = float(explainer.margin)
    result = {
        "training_seconds": round(history.seconds, 1),
        "steps": history.steps,
        "epochs": len(history.train_loss),
        "best_epoch": history.best_epoch,
        "stop_reason": history.stop_reason,
        "margin": margin,
        # the values actually used (library defaults + --param), for reproducing the run
        "simulator_config": asdict(explainer.simulator.config),
        "fit_config": asdict(explainer.fit_config),
    }
    # healthy images are scored against where the pattern would be
    region = healthy.regions["atrophy"]  # (1, *S)
    truth_injection = region[None].expand(len(healthy), *region.shape)
    result.update(
        evaluate_warp_simulator(
            explainer,
            torch.cat([atrophy.images, healthy.images]),
            torch.cat([atrophy.labels, healthy.labels]),
            target_class=ATROPHY,
            masks=torch.cat([atrophy.evidence, truth_injection]),
        )
    )
    if args.out is not None:
        for name, part in (("removal", atrophy), ("injection", healthy)):
            stem = Path(args.out) / f"warp_{dims}d_{variant}_{name}"
            _, det = plot_simulation(
                explainer,
                part.images[:4],
                SHIFTS[name],
                ATROPHY,
                path=f"{stem}.png",
                titles=[name] * len(part.images[:4]),
            )
            if dims == 3:
                save_nifti(det[0, 0], f"{stem}_jacobian.nii.gz")
    plain = variant == "plain"
    result["checks"] = {
        "reached_removal>=0.9": result["reached_removal"] >= 0.9,
        "reached_injection>=0.9": result["reached_injection"] >= 0.9,
        ("folding<0.001" if plain else "folding==0"): (
            result["folding_fraction"] < 1e-3 if plain else result["folding_fraction"] == 0
        ),
        "auroc_removal>=0.9": result["auroc_removal"] >= 0.9,
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 3], choices=[2, 3])
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["plain", "diffeomorphic"],
        choices=["plain", "diffeomorphic"],
    )
    parser.add_argument("--max-seconds-2d", type=float, default=300.0)
    parser.add_argument("--max-seconds-3d", type=float, default=600.0)
    parser.add_argument("--epochs", type=int, default=200, help="upper bound; time/patience stop")
    parser.add_argument("--n", type=int, default=None, help="benchmark images (default per dims)")
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        help="simulator keyword key=value (repeatable), e.g. margin_fraction=1.5, patience=16, "
        "field_downsample=1, magnitude_weight=1 (default: the library's values)",
    )
    parser.add_argument("--quick", action="store_true", help="small data, 1-2 minute fits")
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads (2: the idle 2-core machine of the issue; 1 if it is shared)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="directory for figures / NIfTI (optional)")
    args = parser.parse_args()
    args.params = parse_params(args.param)
    torch.set_num_threads(args.threads)
    results = {
        "benchmark": "warp_simulator",
        "quick": args.quick,
        "threads": args.threads,
        "params": args.params,
        "runs": [run_dims(dims, args) for dims in args.dims],
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
