"""Deletion/insertion metric against curves derived by hand (numpy) on tiny linear models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medexplain.metrics.deletion import deletion_insertion, step_counts


class LinearScore(nn.Module):
    """logits = sum over channels and pixels of w * x (+ a zero logit when two_class)."""

    def __init__(self, weight: torch.Tensor, two_class: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone())
        self.two_class = two_class

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = (x * self.weight).flatten(1).sum(1, keepdim=True)
        return torch.cat([torch.zeros_like(score), score], 1) if self.two_class else score


def numpy_curves(w, x, b, saliency, counts):
    """Deletion/insertion logit curves by hand: pixels (spatial positions) ordered by
    decreasing saliency, ties by index; channel axis first."""
    order = np.argsort(-saliency.ravel(), kind="stable")
    deletion, insertion = [], []
    for c in counts:
        changed = np.zeros(saliency.size, bool)
        changed[order[:c]] = True
        changed = changed.reshape(saliency.shape)
        deleted = np.where(changed, b, x)  # broadcast over channels
        inserted = np.where(changed, x, b)
        deletion.append((w * deleted).sum())
        insertion.append((w * inserted).sum())
    return np.array(deletion), np.array(insertion)


def test_step_counts_end_with_a_partial_step():
    assert step_counts(5, 0.4).tolist() == [0, 2, 4, 5]
    assert step_counts(100, 0.02).tolist() == list(range(0, 101, 2))
    assert step_counts(3, 0.01).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="step_fraction"):
        step_counts(10, 0.0)


def test_curves_match_hand_computation_with_logits_and_two_channels():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(2, 3, 4)).astype(np.float32)
    x = rng.random((2, 3, 4)).astype(np.float32)
    b = rng.random((2, 3, 4)).astype(np.float32)
    saliency = rng.random((3, 4)).astype(np.float32)
    model = LinearScore(torch.from_numpy(w))
    result = deletion_insertion(
        model,
        torch.from_numpy(x)[None],
        0,
        torch.from_numpy(saliency)[None, None],
        baseline=torch.from_numpy(b)[None],
        step_fraction=0.25,
        batch_size=5,
        activation="logit",
    )
    counts = [0, 3, 6, 9, 12]
    deletion, insertion = numpy_curves(w, x, b, saliency, counts)
    np.testing.assert_allclose(result.fractions.numpy(), np.array(counts) / 12)
    np.testing.assert_allclose(result.deletion[0].numpy(), deletion, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.insertion[0].numpy(), insertion, rtol=1e-5, atol=1e-5)
    # The curves join the image and the baseline scores at their ends.
    assert result.deletion[0, 0] == pytest.approx(float((w * x).sum()), abs=1e-5)
    assert result.insertion[0, 0] == pytest.approx(float((w * b).sum()), abs=1e-5)


def test_trapezoid_weights_the_uneven_last_step_by_its_true_fraction():
    # 5 pixels, steps of 2: fractions 0, .4, .8, 1.0 -- the last step is half a step.
    w = np.array([[[1.0, 2.0, 3.0, 4.0, 5.0]]], np.float32)
    x = np.ones((1, 1, 5), np.float32)
    saliency = np.array([[5.0, 4.0, 3.0, 2.0, 1.0]], np.float32)  # pixel 0 first
    model = LinearScore(torch.from_numpy(w), two_class=True)
    result = deletion_insertion(
        model,
        torch.from_numpy(x)[None],
        1,
        torch.from_numpy(saliency)[None, None],
        baseline="zero",
        step_fraction=0.4,
    )
    # By hand: deletion removes pixels 0,1 then 2,3 then 4 -> logits 15, 12, 5, 0.
    sig = lambda z: 1 / (1 + np.exp(-np.asarray(z, np.float64)))  # noqa: E731
    deletion = sig([15, 12, 5, 0])
    insertion = sig([0, 3, 10, 15])
    np.testing.assert_allclose(result.deletion[0].numpy(), deletion, rtol=1e-5)
    np.testing.assert_allclose(result.insertion[0].numpy(), insertion, rtol=1e-5)
    dx = np.array([0.4, 0.4, 0.2])
    expected_del = float(((deletion[:-1] + deletion[1:]) / 2 * dx).sum())
    expected_ins = float(((insertion[:-1] + insertion[1:]) / 2 * dx).sum())
    assert result.deletion_auc[0].item() == pytest.approx(expected_del, rel=1e-5)
    assert result.insertion_auc[0].item() == pytest.approx(expected_ins, rel=1e-5)
    # Weighing the last step as a full one (the public code's defect) gives another number.
    wrong = float(((deletion[:-1] + deletion[1:]) / 2 * 0.4).sum())
    assert abs(result.deletion_auc[0].item() - wrong) > 0.05


def test_batch_3d_and_predicted_target():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(1, 3, 3, 2)).astype(np.float32)
    xs = rng.random((3, 1, 3, 3, 2)).astype(np.float32)
    sal = rng.random((3, 1, 3, 3, 2)).astype(np.float32)
    model = LinearScore(torch.from_numpy(w), two_class=True)
    result = deletion_insertion(
        model,
        torch.from_numpy(xs),
        None,
        torch.from_numpy(sal),
        baseline="zero",
        step_fraction=0.1,
        batch_size=7,
        activation="logit",
    )
    counts = step_counts(18, 0.1).tolist()
    for i in range(3):
        logit = float((w * xs[i]).sum())
        target = 1 if logit > 0 else 0  # predicted class of [0, logit]
        deletion, insertion = numpy_curves(w, xs[i], np.zeros_like(xs[i]), sal[i, 0], counts)
        if target == 0:  # the zero logit stays 0 along both curves
            deletion, insertion = np.zeros_like(deletion), np.zeros_like(insertion)
        np.testing.assert_allclose(result.deletion[i].numpy(), deletion, atol=1e-5)
        np.testing.assert_allclose(result.insertion[i].numpy(), insertion, atol=1e-5)
        # Batch invariance: each image alone gives the same curves.
        alone = deletion_insertion(
            model,
            torch.from_numpy(xs[i : i + 1]),
            target,
            torch.from_numpy(sal[i : i + 1]),
            baseline="zero",
            step_fraction=0.1,
            activation="logit",
        )
        torch.testing.assert_close(alone.deletion[0], result.deletion[i])


def test_model_left_as_found_and_errors():
    model = LinearScore(torch.ones(1, 4, 4), two_class=True).train()
    x = torch.rand(2, 1, 4, 4)
    deletion_insertion(model, x, 1, torch.rand(2, 1, 4, 4))
    assert model.training and model.weight.requires_grad and model.weight.grad is None
    with pytest.raises(ValueError, match="maps must have shape"):
        deletion_insertion(model, x, 1, torch.rand(2, 1, 2, 2))
    with pytest.raises(ValueError, match="mean_image"):
        deletion_insertion(model, x, 1, torch.rand(2, 1, 4, 4), baseline="mean")
    with pytest.raises(ValueError, match="out of range"):
        deletion_insertion(model, x, 5, torch.rand(2, 1, 4, 4))
    with pytest.raises(ValueError, match="step_fraction"):
        deletion_insertion(model, x, 1, torch.rand(2, 1, 4, 4), step_fraction=1.5)


class _SquareReader(nn.Module):
    """Logit: the mean inside the square rows/cols 8..15 of a 32 x 32 image plus a weak ramp
    over rows, so that the order in which a constant region is deleted matters."""

    def __init__(self) -> None:
        super().__init__()
        square = torch.zeros(32, 32)
        square[8:16, 8:16] = 1.0
        self.register_buffer("square", square)
        self.register_buffer("ramp", torch.linspace(0, 1, 32).view(32, 1).repeat(1, 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = (x[:, 0] * self.square).sum((1, 2)) / 64 + 0.3 * (x[:, 0] * self.ramp).mean((1, 2))
        return torch.stack([4 * score, -4 * score], 1)


def test_ties_of_an_igos_map_no_longer_sweep_in_raster_order():
    from medexplain.explain import create
    from medexplain.metrics.deletion import TIED_FRACTION, tied_fraction

    model = _SquareReader().eval()
    x = 0.5 + 0.1 * torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    x[:, :, 8:16, 8:16] += 0.5
    maps = create("igos", model, size=8, iterations=10)(x, torch.tensor([0, 0]))
    assert float((maps == 0).double().mean()) > 0.3  # a large region where the mask stayed 1
    assert bool((tied_fraction(maps) > TIED_FRACTION).all())
    first, second = (
        deletion_insertion(model, x, 0, maps, baseline="zero", tie_seed=seed) for seed in (0, 100)
    )
    for name in ("deletion_auc", "insertion_auc"):
        assert torch.allclose(getattr(first, name), getattr(second, name), atol=0.01), name
    # the raster order the curves used to take sweeps the zero region from the top down: the
    # ramp makes that order read as a clearly different deletion curve
    flat = maps.flatten(1)
    raster = torch.argsort(torch.argsort(-flat, dim=1, stable=True), dim=1).view_as(maps)
    by_raster = deletion_insertion(model, x, 0, -raster.double(), baseline="zero", tie_seeds=1)
    assert float((by_raster.deletion_auc - first.deletion_auc).abs().min()) > 0.03


def test_tied_fraction_by_hand():
    from medexplain.metrics.deletion import tied_fraction

    maps = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.0, 0.0], [0.0, 5.0]]]])
    assert tied_fraction(maps).tolist() == [0.0, 0.75]
