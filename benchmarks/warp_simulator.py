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
  average ranks), per image then averaged (``auroc_removal_pooled``: all pixels at once);
  ``auroc_injection``: the same for healthy images (``-log J`` of the injection warp)
  against the template's atrophy region;
- ``cycle_relative_mse``: ``MSE(x, warp(x~, S(x~, -c)))`` over the mean per-image variance.

``checks`` compares with the targets of issue 7: requested shift reached for >= 90% of the
images in each direction, folding < 0.1% (plain) and 0 (diffeomorphic), AUROC >= 0.9.

Prints one JSON document. Usage:
``python benchmarks/warp_simulator.py [--dims 2 3] [--variants plain diffeomorphic]
[--max-seconds-2d 300] [--max-seconds-3d 600] [--quick] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata

from medexplain.data.synthetic import make_benchmark
from medexplain.explain.generative.jacobian import jacobian_determinant
from medexplain.explain.generative.warp_simulator import fit_warp_simulator
from medexplain.models.cnn import CNNConfig, build_classifier
from medexplain.models.train import evaluate_classifier, train_classifier

CLASSES = ("healthy", "atrophy")
ATROPHY = 1


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Rank-based AUROC (Mann-Whitney U / (n_pos n_neg), ties at average rank)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    positive = np.asarray(positive, dtype=bool).ravel()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


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
    folds, voxels = 0, 0
    cycle_mse, variance = [], []
    for name, part, direction in (("removal", atrophy, -1), ("injection", healthy, 1)):
        x = part.images
        f0, f1 = explainer.score_shift(x, direction, ATROPHY)
        shift = direction * (f1 - f0)
        result[f"reached_{name}"] = float((shift >= margin).float().mean())
        result[f"median_shift_{name}"] = float(shift.median())
        simulated, u = explainer.simulate(x, direction, ATROPHY)
        det = jacobian_determinant(u)
        folds += int((det <= 0).sum())
        voxels += det.numel()
        back, _ = explainer.simulate(simulated, -direction, ATROPHY)
        cycle_mse.append(((back - x) ** 2).flatten(1).mean(1))
        variance.append(x.flatten(1).var(1))
        start = time.perf_counter()
        maps = explainer(x, ATROPHY).abs()
        result[f"map_seconds_per_image_{name}"] = (time.perf_counter() - start) / len(x)
        if name == "removal":
            truth = part.evidence
        else:  # where the pattern would appear: the template's atrophy region
            truth = part.regions["atrophy"].unsqueeze(0).expand_as(maps)
        per_image = [auroc(m.numpy(), t.numpy()) for m, t in zip(maps, truth)]
        result[f"auroc_{name}"] = float(np.nanmean(per_image))
        result[f"auroc_{name}_pooled"] = auroc(maps.numpy(), truth.numpy())
        if args.out is not None:
            save_outputs(Path(args.out), dims, variant, name, x, simulated, u, maps, det)
    result["folding_fraction"] = folds / voxels
    result["cycle_mse"] = float(torch.cat(cycle_mse).mean())
    result["cycle_relative_mse"] = float(torch.cat(cycle_mse).mean() / torch.cat(variance).mean())
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


def save_outputs(out: Path, dims, variant, name, x, simulated, u, maps, det) -> None:
    from medexplain.explain.generative.warp_figures import plot_warp, save_nifti

    stem = out / f"warp_{dims}d_{variant}_{name}"
    plot_warp(x[:4], simulated[:4], u[:4], det[:4], path=f"{stem}.png", titles=[name] * 4)
    if dims == 3:
        save_nifti(det[0, 0], f"{stem}_jacobian.nii.gz")


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
    parser.add_argument("--quick", action="store_true", help="small data, 1-2 minute fits")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: the machine is shared; 2 threads spin)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="directory for figures / NIfTI (optional)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {
        "benchmark": "warp_simulator",
        "quick": args.quick,
        "threads": args.threads,
        "runs": [run_dims(dims, args) for dims in args.dims],
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
