"""Small CNN, the generic training loop, evaluation (AUC) and safe checkpoints."""

from __future__ import annotations

import pickle
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from scipy.stats import mannwhitneyu
from torch import nn
from torch.utils.data import TensorDataset

from medexplain.core.ranks import rank_auroc
from medexplain.models import checkpoint
from medexplain.models.checkpoint import (
    FORMAT,
    CheckpointError,
    load_checkpoint,
    register_builder,
    save_checkpoint,
)
from medexplain.models.cnn import CNNConfig, SmallCNN, build_classifier
from medexplain.models.loop import seed_everything, train_loop
from medexplain.models.train import evaluate_classifier, recalibrate_batch_norm, train_classifier


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These nets are tiny: a second thread only adds synchronisation (and is slow on a
    shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def half_mean_task(n: int, dims: int = 2, size: int = 16, seed: int = 0) -> TensorDataset:
    """Noise images whose left half is shifted by +-1; label = 1 iff the left half's mean
    intensity is positive (derived from the pixels, not from the random sign)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, *([size] * dims), generator=g)
    sign = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    x[..., : size // 2] += sign.view(-1, *([1] * (dims + 1)))
    left = x[..., : size // 2].mean(dim=tuple(range(1, x.dim())))
    return TensorDataset(x, (left > 0).long())


def small(dims: int = 2, **kwargs) -> SmallCNN:
    return build_classifier(CNNConfig(num_classes=2, spatial_dims=dims, widths=(4, 8), **kwargs))


def params_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------- network


def test_last_conv_is_the_last_conv_module_and_keeps_resolution():
    model = build_classifier(CNNConfig())
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs[-1] is model.last_conv
    seen = {}
    handle = model.last_conv.register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    logits = model.eval()(torch.randn(2, 1, 64, 64))
    handle.remove()
    assert logits.shape == (2, 3)
    # three blocks, two poolings before the last conv: 64 / 2**2
    assert seen["out"].shape == (2, 64, 16, 16)


def test_build_is_seeded_and_dict_config_equals_dataclass():
    torch.manual_seed(123)
    a = build_classifier(CNNConfig(widths=(4, 8)))
    torch.manual_seed(456)
    b = build_classifier({"widths": [4, 8]})
    assert b.config.widths == (4, 8) and isinstance(b.config.widths, tuple)
    for k, v in params_of(a).items():
        assert torch.equal(v, params_of(b)[k]), k
    c = build_classifier(CNNConfig(widths=(4, 8), seed=1))
    assert not torch.equal(a.last_conv.weight, c.last_conv.weight)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"norm": "group"}, "norm"),
        ({"spatial_dims": 1}, "spatial_dims"),
        ({"widths": ()}, "widths"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CNNConfig(**kwargs)


def test_wrong_input_shape_names_the_expected_layout():
    with pytest.raises(ValueError, match=r"\(B, C, D, H, W\)"):
        small(dims=3)(torch.randn(2, 1, 16, 16))
    with pytest.raises(ValueError, match="C=1"):
        small()(torch.randn(2, 3, 16, 16))


# --------------------------------------------------------------------------- training


def test_training_reduces_loss_and_fits_a_separable_task():
    train, val = half_mean_task(256, size=8, seed=0), half_mean_task(64, size=8, seed=1)
    test = half_mean_task(256, size=8, seed=2)
    model = small()
    history = train_classifier(model, train, val, epochs=8, batch_size=32, lr=1e-2, progress=False)
    assert history.train_loss[-1] < 0.5 * history.train_loss[0]
    assert not model.training
    result = evaluate_classifier(model, test)
    assert result["n"] == len(test)
    assert result["accuracy"] >= 0.97
    assert result["auc"] >= 0.99


def test_monitor_loss_restores_the_epoch_of_lowest_validation_cross_entropy():
    """``monitor="loss"``: the restored model's validation cross-entropy, recomputed here
    with torch's reference loss, is the smallest of the epochs' validation values."""
    train, val = half_mean_task(256, size=8, seed=0), half_mean_task(64, size=8, seed=1)
    model = small()
    history = train_classifier(
        model, train, val, epochs=6, batch_size=32, lr=1e-2, monitor="loss", progress=False
    )
    x, y = val.tensors
    with torch.no_grad():
        restored = float(nn.functional.cross_entropy(model(x), y))
    assert history.best_epoch == int(np.argmin(history.val_metric))
    assert restored == pytest.approx(min(history.val_metric), rel=1e-4)
    with pytest.raises(ValueError, match="monitor"):
        train_classifier(small(), train, val, epochs=1, monitor="auc", progress=False)


def test_3d_model_on_volumes_learns_the_same_task():
    data = half_mean_task(64, dims=3, size=8, seed=2)
    model = small(dims=3)
    assert isinstance(model.last_conv, nn.Conv3d)
    assert model.eval()(torch.randn(2, 1, 16, 16, 16)).shape == (2, 2)
    history = train_classifier(model, data, epochs=5, batch_size=16, lr=1e-2, progress=False)
    assert history.train_loss[-1] < history.train_loss[0]
    assert evaluate_classifier(model, data)["accuracy"] >= 0.9


def _scripted_run(values, higher_is_better, patience):
    torch.manual_seed(0)
    module = nn.Linear(4, 1)
    batches = [torch.randn(8, 4) for _ in range(3)]
    script = iter(values)
    snapshots, modes = [], []

    def val_fn() -> float:
        snapshots.append(params_of(module))
        modes.append(module.training)
        return next(script)

    history = train_loop(
        module,
        lambda b: (module(b) - 1).pow(2).mean(),
        batches,
        val_fn=val_fn,
        higher_is_better=higher_is_better,
        epochs=20,
        patience=patience,
        lr=0.05,
        progress=False,
    )
    return module, history, snapshots, modes


@pytest.mark.parametrize(
    "values, higher, patience, best, n_epochs",
    [
        ([0.2, 0.7, 0.5, 0.6, 0.9], True, 2, 1, 4),  # 0.5, 0.6 do not beat 0.7
        ([0.5, 0.3, 0.4, 0.1, 0.2, 0.3, 0.15, 0.0], False, 3, 3, 7),
    ],
)
def test_early_stopping_restores_the_best_epoch(values, higher, patience, best, n_epochs):
    module, history, snapshots, modes = _scripted_run(values, higher, patience)
    assert history.best_epoch == best
    assert history.stopped_early and history.stop_reason == "patience"
    assert history.val_metric == values[:n_epochs]
    assert len(history.train_loss) == n_epochs
    assert not any(modes)  # val_fn runs in eval mode
    state = module.state_dict()
    for k in state:
        assert torch.equal(state[k], snapshots[best][k]), k
    assert not torch.equal(state["weight"], snapshots[-1]["weight"])


def test_time_limit_stops_mid_epoch_and_progress_bar_runs():
    module = nn.Linear(3, 1)
    batches = (torch.ones(2, 3) for _ in range(50))  # a loader without len()
    history = train_loop(
        module,
        lambda b: module(b).pow(2).mean(),
        batches,
        epochs=5,
        max_seconds=0.0,
        progress=True,
        description="unit",
    )
    assert history.steps == 1 and len(history.train_loss) == 1
    assert history.stopped_early and history.stop_reason == "time"
    # a generator lasts one epoch: the second one is refused with advice
    with pytest.raises(ValueError, match="re-iterable"):
        train_loop(
            module,
            lambda b: module(b).pow(2).mean(),
            iter([torch.ones(2, 3)]),
            epochs=2,
            progress=False,
        )


def test_training_is_deterministic_per_seed_and_keeps_global_rng():
    data = half_mean_task(64, size=8, seed=3)
    template = small(dropout=0.3)

    def run(seed: int) -> dict[str, torch.Tensor]:
        model = build_classifier(template.config)
        train_classifier(model, data, epochs=2, batch_size=16, seed=seed, progress=False)
        return params_of(model)

    seed_everything(7)
    rng = torch.get_rng_state()
    a, b, c = run(5), run(5), run(6)
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_nan_loss_and_empty_parameters_raise():
    module = nn.Linear(2, 1)
    with pytest.raises(FloatingPointError, match="loss is nan"):
        train_loop(
            module, lambda b: module(b).sum() * float("nan"), [torch.ones(1, 2)], progress=False
        )
    module.requires_grad_(False)
    with pytest.raises(ValueError, match="requires grad"):
        train_loop(module, lambda b: module(b).sum(), [torch.ones(1, 2)], progress=False)


def test_recalibrated_batch_norm_holds_the_average_batch_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Dropout(0.5)).eval()
    norm = model[0]
    batches = [torch.randn(4, 3, 5, 5) * (i + 1) + i for i in range(3)]
    assert recalibrate_batch_norm(model, batches) == 1
    means = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches])
    variances = torch.stack([b.transpose(0, 1).reshape(3, -1).var(dim=1) for b in batches])
    assert torch.allclose(norm.running_mean, means.mean(0), atol=1e-5)
    assert torch.allclose(norm.running_var, variances.mean(0), atol=1e-4)
    assert norm.momentum == 0.1 and not model.training and not norm.training
    assert recalibrate_batch_norm(nn.Linear(2, 2), []) == 0


@pytest.mark.slow
def test_benchmark_classifier_reaches_95_percent(classifier2d, bench2d):
    """The shared fixture (tests/conftest.py settings) on the default benchmark's test split."""
    _, _, test = bench2d
    result = evaluate_classifier(classifier2d, test.dataset())
    assert result["accuracy"] >= 0.95
    assert not classifier2d.training


# --------------------------------------------------------------------------- AUC
# evaluate_classifier's AUC is core.ranks.rank_auroc on 1D inputs.


def roc_auc(scores, positive) -> float:
    return float(
        rank_auroc(torch.as_tensor(scores, dtype=torch.float64), torch.as_tensor(positive))
    )


def test_auc_hand_computed_examples():
    # positives 0.35 (beats 0.1, loses to 0.4) and 0.8 (beats both): 3 of 4 pairs
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # tie between a positive and a negative at 0.5 counts one half: (0.5 + 1 + 2) / 4
    assert roc_auc([0.5, 0.5, 0.2, 0.9], [1, 0, 0, 1]) == pytest.approx(0.875)
    assert np.isnan(roc_auc([0.1, 0.2], [1, 1]))


def test_auc_equals_pairwise_count_and_mann_whitney():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, size=40).astype(float)  # many ties
    labels = rng.integers(0, 2, size=40).astype(bool)
    pos, neg = scores[labels], scores[~labels]
    pairwise = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (
        pos.size * neg.size
    )
    u = mannwhitneyu(pos, neg).statistic
    assert roc_auc(scores, labels) == pytest.approx(pairwise)
    assert roc_auc(scores, labels) == pytest.approx(u / (pos.size * neg.size))


def test_evaluate_classifier_matches_softmax_ovr_reference():
    rng = np.random.default_rng(1)
    logits = torch.tensor(rng.normal(size=(30, 4)), dtype=torch.float32)
    labels = torch.tensor(rng.integers(0, 3, size=30))  # class 3 never occurs
    model = nn.Sequential(nn.Identity()).train()
    result = evaluate_classifier(model, TensorDataset(logits, labels), batch_size=7)
    assert model.training  # flags restored
    probs = torch.softmax(logits, 1).numpy()
    expected = []
    for k in range(3):
        pos, neg = probs[labels.numpy() == k, k], probs[labels.numpy() != k, k]
        expected.append((pos[:, None] > neg[None]).mean())  # continuous: no ties
    assert result["per_class_auc"][:3] == pytest.approx(expected)
    assert np.isnan(result["per_class_auc"][3])
    assert result["auc"] == pytest.approx(np.mean(expected))
    assert result["accuracy"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert result["n"] == 30


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip(tmp_path):
    model = small(norm="batch")
    model.train()(torch.randn(8, 1, 16, 16))  # move the batch-norm running statistics
    model.eval()
    extra = {"class_names": ["a", "b"], "acc": np.float64(0.5), "mean": torch.arange(3.0)}
    path = tmp_path / "sub" / "clf.pt"
    save_checkpoint(path, model, extra=extra)
    assert [p.name for p in path.parent.iterdir()] == ["clf.pt"]  # no temporary file left

    raw = torch.load(path, weights_only=True)
    assert raw["format"] == FORMAT and raw["kind"] == "classifier"

    loaded, got = load_checkpoint(path)
    assert isinstance(loaded, SmallCNN) and not loaded.training
    assert loaded.config == model.config and isinstance(loaded.config.widths, tuple)
    x = torch.randn(5, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert got["class_names"] == ["a", "b"] and got["acc"] == 0.5
    assert torch.equal(got["mean"], torch.arange(3.0))


@dataclass
class _TinyConfig:
    shape: tuple[int, ...] = (3, 2)
    pairs: tuple[tuple[int, int], ...] = ((1, 2),)


class _Tiny(nn.Module):
    def __init__(self, config: _TinyConfig) -> None:
        super().__init__()
        self.config = config
        self.linear = nn.Linear(*config.shape)


def test_registered_kind_round_trips_nested_tuples(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "_BUILDERS", dict(checkpoint._BUILDERS))  # undone after
    register_builder("unit-tiny", _TinyConfig, _Tiny)
    model = _Tiny(_TinyConfig(shape=(4, 2), pairs=((1, 2), (3, 4))))
    save_checkpoint(tmp_path / "tiny.pt", model)
    loaded, extra = load_checkpoint(tmp_path / "tiny.pt")
    assert loaded.config == model.config and extra == {}
    assert torch.equal(loaded.linear.weight, model.linear.weight)
    with pytest.raises(ValueError, match="already registered"):
        register_builder("unit-tiny", _TinyConfig, lambda c: _Tiny(c))


class _Payload:
    """Unpickling this object would create the file named in ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_objects_are_refused_without_running_them(tmp_path):
    marker = tmp_path / "executed"
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"state_dict": _Payload(str(marker))}))
    torch_file = tmp_path / "object.pt"
    torch.save({"format": FORMAT, "model": _Payload(str(marker))}, torch_file)
    whole_module = tmp_path / "module.pt"
    torch.save(nn.Linear(2, 2), whole_module)
    for path in (plain, torch_file, whole_module):
        with pytest.raises(CheckpointError, match="weights_only") as info:
            load_checkpoint(path)
        assert str(path) in str(info.value)
    assert not marker.exists()


def test_non_checkpoint_files_are_refused_with_the_file_name(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    weights = tmp_path / "weights.pt"
    torch.save({"weight": torch.ones(2)}, weights)
    unknown = tmp_path / "unknown.pt"
    torch.save({"format": FORMAT, "kind": "nope", "config": {}, "state_dict": {}}, unknown)
    for path, match in (
        (text, "not a readable torch file"),
        (weights, "format"),
        (unknown, "'nope'"),
    ):
        with pytest.raises(CheckpointError, match=match) as info:
            load_checkpoint(path)
        assert str(path) in str(info.value)
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        load_checkpoint(tmp_path / "missing.pt")


def test_save_refuses_what_could_not_be_loaded_safely(tmp_path):
    with pytest.raises(TypeError, match=r"extra\['arr'\]"):
        save_checkpoint(tmp_path / "a.pt", small(), extra={"arr": np.zeros(3)})
    with pytest.raises(TypeError, match=r"dataclass \.config"):
        save_checkpoint(tmp_path / "b.pt", nn.Linear(2, 2))
    assert list(tmp_path.iterdir()) == []
