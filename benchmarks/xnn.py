"""XNN on the 2D benchmark with the shortcut marker: faithfulness, what each x-feature
localises, fit time.

The benchmark (1200 images, 64 px, split 70/15/15) has three evidence sources: the lesion
(class "lesion"), the atrophy (class "atrophy") and the bright corner marker carried by
70 % of the lesion images. A SmallCNN is trained on it (or loaded from ``--classifier``),
then XNN (``k=5``, defaults) is fitted on the training split's pooled last-block features.
Measured on the held-out test split:

- faithfulness: agreement of the head's predicted class with the network's, and the ``R^2``
  of the head's logits;
- per x-feature, the rank AUROC of its map (Grad-CAM and integrated gradients, the latter
  by absolute value) against each source's ground truth on the images carrying it (lesion:
  the per-image evidence of lesion images; atrophy: that of atrophy images; marker: the
  marker mask on images with the marker), and the best assignment of three *different*
  x-features to the three sources (also among the x-features that contribute to some
  class's logit: a mean absolute contribution of at least 5 % of the largest);
- per class, the mean contribution of each x-feature to the class's logit;
- the pull-away term's effect: mean squared cosine between x-feature columns, with and
  without the term;
- the fit time (feature extraction and optimisation).

Prints one JSON document. Usage: ``python benchmarks/xnn.py [--out FILE]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from medexplain.data.synthetic import make_benchmark
from medexplain.explain.generative.xnn import fit_xnn, x_feature_similarity
from medexplain.explain.generative.xnn_features import collect_features, resolve_module
from medexplain.explain.generative.xnn_global import class_contributions
from medexplain.metrics.localization import auroc
from medexplain.models.checkpoint import load_checkpoint, save_checkpoint
from medexplain.models.cnn import CNNConfig, build_classifier
from medexplain.models.train import train_classifier

BENCH = dict(n=1200, dims=2, size=64, shortcut=0.7, shortcut_class=1, seed=0)
CLASSIFIER_TRAINING = dict(epochs=15, batch_size=64, lr=3e-3, seed=0, patience=5)
SOURCES = ("lesion", "atrophy", "marker")


def classifier(train, val, path: Path | None) -> torch.nn.Module:
    if path is not None and path.exists():
        model, _ = load_checkpoint(path)
        return model.eval()
    model = build_classifier(CNNConfig(in_channels=1, num_classes=3, spatial_dims=2))
    train_classifier(model, train.dataset(), val.dataset(), progress=False, **CLASSIFIER_TRAINING)
    if path is not None:
        save_checkpoint(path, model, extra={"class_names": list(train.class_names)})
    return model.eval()


def source_masks(test) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per source: (which test images carry it (N,) bool, their masks (n, 1, *S))."""
    names = list(test.class_names)
    out = {}
    for source in ("lesion", "atrophy"):
        rows = test.labels == names.index(source)
        out[source] = (rows, test.evidence[rows])
    rows = test.has_marker
    out["marker"] = (rows, test.marker.expand(int(rows.sum()), *test.marker.shape).clone())
    return out


def localisation(feature_maps: torch.Tensor, test) -> dict[str, list[float]]:
    """AUROC of every x-feature's map per source: {source: [auroc of x-feature j]}."""
    out = {}
    for source, (rows, masks) in source_masks(test).items():
        maps = feature_maps[rows]
        out[source] = [
            float(auroc(maps[:, j : j + 1].abs(), masks).nanmean()) for j in range(maps.shape[1])
        ]
    return out


def assignment(scores: dict[str, list[float]], allowed: list[int] | None = None) -> dict:
    """Three different x-features (of ``allowed``, default all), one per source, maximising
    the worst AUROC."""
    k = len(scores[SOURCES[0]])
    best = max(
        itertools.permutations(range(k) if allowed is None else allowed, len(SOURCES)),
        key=lambda perm: min(scores[s][j] for s, j in zip(SOURCES, perm)),
    )
    return {s: {"x_feature": j, "auroc": scores[s][j]} for s, j in zip(SOURCES, best)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classifier", type=Path, default=Path("runs/bench/xnn_classifier2d.pt"))
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here too")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bench = make_benchmark(**BENCH)
    train, val, test = bench.split(seed=0)
    model = classifier(train, val, args.classifier)

    start = time.perf_counter()
    explainer = fit_xnn(model, train.dataset(), val.dataset(), progress=False)
    fit_seconds = time.perf_counter() - start

    x = test.images
    _, y_hat = explainer.x_features(x)
    with torch.no_grad():
        y = model(x)
    agreement = float((y_hat.argmax(1) == y.argmax(1)).float().mean())
    r2 = float(1 - (y_hat - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())

    results = {"benchmark": BENCH, "k": explainer.k, "fit_seconds": fit_seconds}
    results["faithfulness"] = {"class_agreement": agreement, "logit_r2": r2, "n_test": len(test)}
    for kind in ("gradcam", "integrated_gradients"):
        explainer.feature_map = kind
        scores = localisation(explainer.feature_maps(x), test)
        results[f"auroc_{kind}"] = scores
        results[f"assignment_{kind}"] = assignment(scores)
    explainer.feature_map = "gradcam"
    table = class_contributions(explainer, x, test.labels, list(test.class_names))
    results["contributions"] = table
    # x-features that matter: a mean |contribution| to some class >= 5 % of the largest
    size = torch.tensor([v["mean_contribution"] for v in table.values()]).abs().amax(0)
    contributing = [j for j in range(explainer.k) if size[j] >= 0.05 * size.max()]
    results["contributing_x_features"] = contributing
    results["assignment_gradcam_contributing"] = assignment(results["auroc_gradcam"], contributing)

    network = explainer.network
    module = resolve_module(model, network.config.layer)
    z_test, _ = collect_features(model, module, network.config.tap, torch.split(x, 64))
    plain = fit_xnn(model, train.dataset(), val.dataset(), progress=False, pull_away_weight=0.0)
    results["pull_away"] = {
        "mean_cos2_with": x_feature_similarity(network, z_test),
        "mean_cos2_without": x_feature_similarity(plain.network, z_test),
    }
    best = results["assignment_gradcam"]
    results["must_show"] = {
        "class_agreement_ge_0.99": agreement >= 0.99,
        "logit_r2_ge_0.95": r2 >= 0.95,
        "three_sources_auroc_ge_0.8": all(v["auroc"] >= 0.8 for v in best.values()),
        "fit_le_180s": fit_seconds <= 180,
    }
    text = json.dumps(results, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
