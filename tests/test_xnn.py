"""XNN (explain/generative/xnn*.py): losses by hand, faithfulness on held-out images, the
pull-away term's effect, x-feature maps against a hand-written Grad-CAM, contributions,
batch invariance, checkpoints and the CLI."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from medexplain.explain import create
from medexplain.explain.generative.xnn import XNNExplainer, fit_xnn, x_feature_similarity
from medexplain.explain.generative.xnn_features import collect_features, default_layer
from medexplain.explain.generative.xnn_global import class_contributions, top_activating
from medexplain.explain.generative.xnn_network import (
    XNNConfig,
    XNNNetwork,
    pull_away,
    sparse_reconstruction,
    xnn_losses,
)
from medexplain.models.checkpoint import save_checkpoint
from medexplain.models.cnn import CNNConfig, build_classifier
from medexplain.models.fingerprint import ClassifierMismatchError

SHAPE = (1, 16, 16)


def images(n: int, seed: int, shape=SHAPE) -> torch.Tensor:
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed))


def data(x: torch.Tensor) -> TensorDataset:
    return TensorDataset(x, torch.zeros(len(x), dtype=torch.long))


@pytest.fixture(scope="module")
def classifier() -> nn.Module:
    """A SmallCNN with random (seeded) weights: its logits are a fixed function of the image,
    which is all XNN needs; a larger head init spreads the logits."""
    model = build_classifier(CNNConfig(num_classes=3, widths=(4, 8), seed=0))
    with torch.no_grad():
        model.head.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(1))
    return model.eval()


@pytest.fixture(scope="module")
def fitted(classifier) -> XNNExplainer:
    return fit_xnn(classifier, data(images(160, 0)), progress=False, epochs=150, batch_size=8)


# ------------------------------------------------------------------ losses by hand


def test_pull_away_by_hand():
    orthogonal = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    assert float(pull_away(orthogonal)) == pytest.approx(0.0)
    parallel = torch.tensor([[1.0, 2.0], [2.0, 4.0]])
    assert float(pull_away(parallel)) == pytest.approx(1.0)
    # columns (1, 1) and (1, 0): cos = 1/sqrt(2), cos^2 = 1/2, both ordered pairs -> 1/2
    assert float(pull_away(torch.tensor([[1.0, 1.0], [1.0, 0.0]]))) == pytest.approx(0.5)
    # three columns: (1,0), (1,0), (0,1): pairs (0,1) cos^2 = 1, others 0 -> 2 / 6
    e = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert float(pull_away(e)) == pytest.approx(2 / 6)


def test_sparse_reconstruction_and_total_by_hand():
    z_hat = torch.tensor([[0.0, 3.0]])
    z = torch.tensor([[1.0, 0.0]])
    expected = (torch.log(torch.tensor(1 + 1 * 0.5)) + torch.log(torch.tensor(1 + 9 * 0.5))) / 2
    assert float(sparse_reconstruction(z_hat, z, q=0.5)) == pytest.approx(float(expected))
    net = XNNNetwork(XNNConfig(in_features=2, num_outputs=2, k=2, hidden=3))
    zb, yb = torch.randn(5, 2), torch.randn(5, 2)
    terms = xnn_losses(net, zb, yb, reconstruction_weight=0.3, pull_away_weight=0.7)
    e, y_hat, z_rec = net(zb)
    faith = ((y_hat - yb) ** 2).mean() / net.y_scale**2
    assert float(terms["faithfulness"].detach()) == pytest.approx(float(faith.detach()))
    total = faith + 0.3 * sparse_reconstruction(z_rec, zb) + 0.7 * pull_away(e)
    assert float(terms["total"].detach()) == pytest.approx(float(total.detach()), rel=1e-6)


def test_default_layer_is_the_pooled_features_entering_the_head(classifier):
    x = images(4, 3)
    name, tap = default_layer(classifier, x)
    assert (name, tap) == ("head", "input")
    z, logits = collect_features(classifier, classifier.head, "input", [x])
    with torch.no_grad():
        pooled = classifier.pool(classifier.features(x)).flatten(1)
        assert torch.allclose(z, pooled, atol=1e-6)
        assert torch.allclose(logits, classifier.head(pooled), atol=1e-5)


# ------------------------------------------------------------------ behaviour


def test_faithful_on_held_out_images(classifier, fitted):
    """The head's logits reproduce the classifier's on 100 images never seen in the fit."""
    x = images(100, 99)
    _, y_hat = fitted.x_features(x)
    with torch.no_grad():
        y = classifier(x)
    r2 = 1 - ((y_hat - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    agreement = (y_hat.argmax(1) == y.argmax(1)).float().mean()
    assert float(r2) >= 0.9, float(r2)
    assert float(agreement) >= 0.9, float(agreement)


def test_pull_away_term_lowers_the_similarity_of_x_features(classifier):
    train, held_out = data(images(160, 0)), images(100, 99)
    common = dict(progress=False, epochs=60, batch_size=16, train_batch_size=32)
    without = fit_xnn(classifier, train, pull_away_weight=0.0, **common)
    with_term = fit_xnn(classifier, train, pull_away_weight=1.0, **common)
    z, _ = collect_features(classifier, classifier.head, "input", [held_out])
    assert x_feature_similarity(with_term.network, z) < x_feature_similarity(without.network, z)


def test_contributions_sum_to_the_head_logit_and_weight_the_map(fitted):
    x = images(3, 5)
    out = fitted.explain(x, torch.tensor([0, 1, 2]))
    bias = fitted.network.bias.detach()
    expected = out.logits[torch.arange(3), out.targets] - bias[out.targets]
    assert torch.allclose(out.contributions.sum(1), expected, atol=1e-5)
    by_hand = sum(out.contributions[:, j, None, None] * out.feature_maps[:, j] for j in range(5))
    assert torch.allclose(out.maps[:, 0], by_hand, atol=1e-6)
    assert torch.allclose(fitted(x, torch.tensor([0, 1, 2])), out.maps)


def test_gradcam_x_feature_map_matches_a_hand_computation(classifier, fitted):
    """Grad-CAM of x-feature j at the last convolution, with autograd written out (signed:
    XNN keeps the negative part)."""
    x = images(2, 7)
    maps = fitted.feature_maps(x)
    conv = classifier.last_conv
    store = {}
    handle = conv.register_forward_hook(lambda m, i, o: store.update(a=o))
    try:
        net = fitted.network
        for j in range(fitted.k):
            z = classifier.pool(classifier.features(x)).flatten(1)
            e = net.encode(z)[:, j].sum()
            (grad,) = torch.autograd.grad(e, store["a"])
            alpha = grad.mean(dim=(2, 3), keepdim=True)
            cam = (alpha * store["a"]).sum(1, keepdim=True)
            cam = nn.functional.interpolate(
                cam, size=SHAPE[1:], mode="bilinear", align_corners=True
            )
            assert torch.allclose(maps[:, j : j + 1], cam.detach(), atol=1e-5), j
    finally:
        handle.remove()


def test_batch_invariance_and_integrated_gradients(fitted):
    x = images(3, 11)
    full = fitted.explain(x)
    singles = [fitted.explain(x[i : i + 1]) for i in range(3)]
    assert torch.allclose(torch.cat([s.maps for s in singles]), full.maps, atol=1e-5)
    assert torch.allclose(torch.cat([s.contributions for s in singles]), full.contributions)
    fitted.feature_map = "integrated_gradients"
    try:
        ig = fitted.feature_maps(x[:1])
        # completeness of integrated gradients: each map sums to e_j(x) - e_j(0)
        e_x, _ = fitted.x_features(x[:1])
        e_0, _ = fitted.x_features(torch.zeros_like(x[:1]))
        assert torch.allclose(ig.flatten(2).sum(2), e_x - e_0, atol=2e-2 * float(e_x.abs().max()))
    finally:
        fitted.feature_map = "gradcam"


def test_global_view(fitted):
    x = images(12, 13)
    labels = torch.tensor([0, 1, 2] * 4)
    e, _ = fitted.x_features(x)
    w = fitted.network.weight.detach()
    table = class_contributions(fitted, x, labels, ["a", "b", "c"])
    assert table["b"]["n"] == 4
    expected = (w[1] * e[labels == 1]).mean(0)
    assert torch.allclose(torch.tensor(table["b"]["mean_contribution"]), expected, atol=1e-6)
    top = top_activating(fitted, x, n=3)
    for j, entry in enumerate(top):
        assert entry["index"][0] == int(e[:, j].argmax())
        assert entry["value"] == sorted(entry["value"], reverse=True)


# ------------------------------------------------------------------ checkpoints


def test_checkpoint_round_trip_and_classifier_check(classifier, fitted, tmp_path):
    path = fitted.save(tmp_path / "xnn.ckpt")
    raw = torch.load(path, weights_only=True)  # plain tensors and values only
    assert raw["kind"] == "xnn"
    loaded = create("xnn", classifier, checkpoint=path, batch_size=8)
    x = images(2, 17)
    assert torch.equal(loaded(x), fitted(x))
    other = build_classifier(CNNConfig(num_classes=3, widths=(4, 8), seed=5))
    with pytest.raises(ClassifierMismatchError):
        create("xnn", other, checkpoint=path)
    assert create("xnn", other, checkpoint=path, force=True).fitted
    save_checkpoint(tmp_path / "cnn.ckpt", classifier)
    with pytest.raises(ValueError, match="not an xnn checkpoint"):
        create("xnn", classifier, checkpoint=tmp_path / "cnn.ckpt")


def test_unfitted_and_bad_parameters():
    model = build_classifier(CNNConfig(num_classes=2, widths=(4,), seed=0))
    with pytest.raises(RuntimeError, match="not fitted"):
        XNNExplainer(model)(images(1, 0))
    with pytest.raises(ValueError, match="feature_map"):
        XNNExplainer(model, feature_map="occlusion")
    with pytest.raises(ValueError, match="k must be"):
        XNNExplainer(model, k=0)
    with pytest.raises(TypeError, match="unknown xnn parameter"):
        XNNExplainer(model, epoch=3)
    with pytest.raises(ValueError, match="layer 'nope'"):
        fit_xnn(model, data(images(4, 0)), layer="nope", progress=False)


def test_named_layer_and_3d():
    model = build_classifier(CNNConfig(num_classes=2, widths=(4, 8), spatial_dims=3, seed=0))
    x = images(6, 1, shape=(1, 8, 8, 8))
    xnn = fit_xnn(model, data(x), progress=False, epochs=5, k=3, layer="features.1")
    assert xnn.network.config.in_features == 8 and xnn.network.config.tap == "output"
    out = xnn.explain(x[:2])
    assert out.feature_maps.shape == (2, 3, 8, 8, 8)
    assert out.maps.shape == (2, 1, 8, 8, 8)


# ------------------------------------------------------------------ command line


def test_cli_fit_then_explain(tmp_path):
    """``fit xnn`` on a manifest, then ``explain --method xnn`` with its checkpoint; a wrong
    --layer is one line with exit code 2."""
    import numpy as np
    from typer.testing import CliRunner

    from medexplain.cli import app
    from medexplain.runs.store import RunStore

    runner = CliRunner(env={"COLUMNS": "200"})
    rng = np.random.default_rng(0)
    (tmp_path / "data").mkdir()
    rows = ["path,label"]
    for i in range(8):
        np.save(tmp_path / "data" / f"i{i}.npy", rng.random((16, 16)).astype(np.float32))
        rows.append(f"data/i{i}.npy,{'ab'[i % 2]}")
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    net = build_classifier(CNNConfig(num_classes=2, widths=(4, 8), norm="none"))
    save_checkpoint(tmp_path / "model.pt", net, extra={"class_names": ["a", "b"]})
    common = ["--model", str(tmp_path / "model.pt"), "--data", str(tmp_path / "data.csv")]
    fit = ["fit", "xnn", *common, "--k", "3", "--param", "epochs=5", "--no-progress"]
    bad = runner.invoke(app, [*fit, "--layer", "nope", "--out", str(tmp_path / "bad.ckpt")])
    assert bad.exit_code == 2 and "--layer" in bad.output and "nope" in bad.output
    assert len(bad.output.strip().splitlines()) == 1, bad.output
    result = runner.invoke(app, [*fit, "--out", str(tmp_path / "xnn.ckpt")])
    assert result.exit_code == 0, result.output
    out = tmp_path / "run"
    args = ["explain", *common, "--method", "xnn", "--no-progress", "--out", str(out)]
    missing = runner.invoke(app, [*args[:-1], str(tmp_path / "run_missing")])
    assert missing.exit_code == 2 and "--explainer-checkpoint" in missing.output, missing.output
    assert len(missing.output.strip().splitlines()) == 1, missing.output
    result = runner.invoke(app, [*args, "--explainer-checkpoint", str(tmp_path / "xnn.ckpt")])
    assert result.exit_code == 0, result.output
    # the run's maps are the explainer's maps for the predicted class
    explainer = create("xnn", build_classifier(net.config), checkpoint=tmp_path / "xnn.ckpt")
    chunks = list(RunStore(out).iter_chunks())
    index = np.concatenate([c.index for c in chunks])
    maps = torch.from_numpy(np.concatenate([c.maps for c in chunks])).float()
    images = [np.load(tmp_path / "data" / f"i{i}.npy") for i in index]
    x = torch.stack([torch.from_numpy(a)[None] for a in images])
    assert maps.shape == (8, 1, 16, 16)
    assert torch.allclose(maps, explainer(x), atol=1e-5 * float(maps.abs().max()))


def test_fit_xnn_help_has_an_example():
    from typer.testing import CliRunner

    from medexplain.cli import app

    result = CliRunner().invoke(app, ["fit", "xnn", "--help"])
    assert result.exit_code == 0 and "Example: medexplain fit xnn" in result.output


def test_x_feature_global_maps_and_figure(fitted, tmp_path):
    """Each x-feature's label-wise global map is the mean of its maps over the label's
    images (no normalisation); the figure has the bar chart and one row per x-feature."""
    from medexplain.explain.generative.xnn_global import global_view
    from medexplain.report.xnn_plot import plot_xnn, x_feature_global_maps

    x = images(6, 21)
    labels = torch.tensor([0, 1, 0, 1, 2, 0])
    results = x_feature_global_maps(
        fitted, x, labels, ["a", "b", "c"], batch_size=4, normalise="none"
    )
    maps = fitted.feature_maps(x).double()
    for j, result in enumerate(results):
        expected = maps[labels == 0, j].mean(0)
        assert torch.allclose(result.groups[("label", "a")].mean[0], expected, atol=1e-6)
    view = global_view(fitted, x, labels, ["a", "b", "c"], n_top=2)
    figure = plot_xnn(view, x, results, n_top=2, path=tmp_path / "xnn.png")
    assert (tmp_path / "xnn.png").stat().st_size > 0
    assert len(figure.axes) == 1 + fitted.k * (2 + 3)
