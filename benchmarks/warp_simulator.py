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
:func:`medexplain.explain.generative.warp_evaluation.evaluate_warp_simulator`. Prints one
JSON document. Usage:
``python benchmarks/warp_simulator.py [--dims 2 3] [--variants plain diffeomorphic]
[--max-seconds-2d 300] [--max-seconds-3d 600] [--quick] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from medexplain.data.synthetic import make_benchmark
from medexplain.explain.generative.jacobian import jacobian_determinant
from medexplain.explain.generative.warp_evaluation import DIRECTIONS, evaluate_warp_simulator
from medexplain.explain.generative.warp_simulator import fit_warp_simulator
from medexplain.models.cnn import CNNConfig, build_classifier
from medexplain.models.train import evaluate_classifier, train_classifier

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
    with torch.no_grad():
        pred = torch.cat([model(part).argmax(1) for part in torch.split(test.images, 64)])
    correct = pred == test.labels
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
        **({} if args.field_downsample is None else {"field_downsample": args.field_downsample}),
        **({} if args.margin is None else {"margin": args.margin}),
        **({} if args.patience is None else {"patience": args.patience}),
        **dict(parse_param(item) for item in args.param),
        **({} if args.margin_fraction is None else {"margin_fraction": args.margin_fraction}),
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
    }
    truth_injection = healthy.regions["atrophy"].unsqueeze(0)  # where the pattern would be
    result.update(
        evaluate_warp_simulator(
            explainer,
            ATROPHY,
            atrophy.images,
            healthy.images,
            removal_truth=atrophy.evidence,
            injection_truth=truth_injection,
        )
    )
    if args.out is not None:
        for name, part in (("removal", atrophy), ("injection", healthy)):
            x = part.images[:4]
            simulated, u = explainer.simulate(x, DIRECTIONS[name], ATROPHY)
            save_outputs(Path(args.out), dims, variant, name, x, simulated, u)
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


def save_outputs(out: Path, dims, variant, name, x, simulated, u) -> None:
    from medexplain.explain.generative.warp_figures import plot_warp, save_nifti

    stem = out / f"warp_{dims}d_{variant}_{name}"
    det = jacobian_determinant(u)
    plot_warp(x, simulated, u, det, path=f"{stem}.png", titles=[name] * len(x))
    if dims == 3:
        save_nifti(det[0, 0], f"{stem}_jacobian.nii.gz")


def parse_param(item: str) -> tuple[str, float]:
    """``key=value`` of ``--param`` (a number) as ``(key, value)``."""
    key, sep, value = item.partition("=")
    if not sep:
        raise SystemExit(f"--param expects key=value, got {item!r}")
    number = float(value)
    return key.strip(), int(number) if number.is_integer() and "." not in value else number


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
        "--field-downsample",
        type=int,
        default=None,
        help="predict the field on a grid this many times coarser (default: the library's)",
    )
    parser.add_argument(
        "--margin", type=float, default=None, help="requested shift b (default: auto_margin)"
    )
    parser.add_argument(
        "--margin-fraction",
        type=float,
        default=None,
        help="auto margin = this x median |f| (default: the library's)",
    )
    parser.add_argument(
        "--patience", type=int, default=None, help="early-stopping epochs (default: library's)"
    )
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        help="further simulator keyword key=value, e.g. field_sigma=3 (repeatable)",
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
    torch.set_num_threads(args.threads)
    results = {
        "benchmark": "warp_simulator",
        "quick": args.quick,
        "threads": args.threads,
        "field_downsample": args.field_downsample,
        "margin_fraction": args.margin_fraction,
        "patience": args.patience,
        "params": dict(parse_param(item) for item in args.param),
        "runs": [run_dims(dims, args) for dims in args.dims],
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
