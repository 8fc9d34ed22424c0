"""RISE (Petsiuk et al. 2018) against properties of the paper, in 2D and 3D.

- ``E[M] = p``: the smooth masks keep each pixel with probability ``p`` on average, so a model
  whose score does not depend on the image gets that score everywhere;
- the map is ``sum_i f_c(phi(x, b, M_i)) M_i / (N p)``, recomputed here from the masks with
  the network and softmax directly, for any baseline and internal batch size;
- for a score linear in the image, ``f(x) = 1/2 + sum(w x)`` to first order, the expected
  map is a constant plus ``w x`` seen through the masks' (local) correlation: it correlates
  with ``w x`` when ``w x`` varies on a scale larger than a cell.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medexplain.core.perturb import make_baseline
from medexplain.explain import create
from medexplain.explain.rise import RISE


class Linear(nn.Module):
    """Logits ``(scale * sum(w x), 0)``: class 0's softmax is ``sigmoid(scale sum(w x))``."""

    def __init__(self, w: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.register_buffer("w", w)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.scale * (x * self.w).flatten(1).sum(1)
        return torch.stack([g, torch.zeros_like(g)], dim=1)


class Constant(nn.Module):
    """Logits ``(1, 0)`` whatever the image: class 0 has probability sigmoid(1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([1.0, 0.0]).expand(x.shape[0], 2)


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.mark.parametrize("spatial", [(16, 16), (8, 8, 8)])
@pytest.mark.parametrize("p", [0.5, 0.25])
def test_masks_keep_each_pixel_with_probability_p(spatial, p):
    rise = RISE(Constant(), n_masks=3000, cells=4, p=p)
    masks = rise.masks(*rise.draw(spatial), spatial)
    assert masks.shape == (3000, 1, *spatial)
    assert float(masks.min()) >= 0.0 and float(masks.max()) <= 1.0
    # E[M] = p at every pixel; 3000 masks: standard error <= 0.5 / sqrt(3000) ~ 0.009
    mean = masks.mean(dim=0)
    assert float((mean - p).abs().max()) < 0.045
    # a score that ignores the image: the map is that score everywhere, up to E[M] / p
    x = torch.rand((2, 1, *spatial), generator=torch.Generator().manual_seed(0))
    maps = create("rise", Constant(), n_masks=3000, cells=4, p=p, batch_size=500)(x, 0)
    expected = torch.sigmoid(torch.tensor(1.0))
    torch.testing.assert_close(maps, (mean / p * expected).expand_as(maps), atol=1e-5, rtol=0)


@pytest.mark.parametrize("spatial", [(12, 10), (6, 7, 5)])
def test_map_is_the_masked_score_average_of_the_paper(spatial):
    torch.manual_seed(0)
    dims = len(spatial)
    conv = (nn.Conv2d if dims == 2 else nn.Conv3d)(2, 3, 3, padding=1)
    net = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3)).eval()
    x = torch.rand((2, 2, *spatial))
    net(x)  # materialise the lazy layer
    rise = RISE(net, n_masks=40, cells=3, p=0.4, baseline="blur", batch_size=7, seed=3)
    maps = rise(x, torch.tensor([2, 0]))
    masks = rise.masks(*rise.draw(spatial), spatial)  # (N, 1, *S)
    baseline = make_baseline(x, "blur")
    for i, target in enumerate([2, 0]):
        with torch.no_grad():
            probs = torch.softmax(net(baseline[i] + masks * (x[i] - baseline[i])), dim=1)
        weights = probs[:, target].view(-1, *([1] * (dims + 1)))
        expected = (weights * masks).sum(0) / (40 * 0.4)
        torch.testing.assert_close(maps[i], expected, atol=1e-5, rtol=1e-5)


class Half(nn.Module):
    """Logits ``(0, 0)``: probability 1/2 whatever the image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], 2)


@pytest.mark.parametrize(("spatial", "n_masks"), [((16, 16), 2000), ((8, 8, 8), 1000)])
def test_linear_score_map_follows_w_times_x(spatial, n_masks):
    dims = len(spatial)
    x = torch.ones((1, 1, *spatial)) * (1 + 0.5 * torch.linspace(0, 1, spatial[-2]).view(-1, 1))
    w = torch.ones(spatial)
    w[..., spatial[-1] // 2 :] = -1.0  # + on the left half, - on the right half
    w = w * torch.linspace(0.5, 1.5, spatial[0]).view(-1, *([1] * (dims - 1)))
    params = dict(n_masks=n_masks, cells=4, batch_size=250)
    # RISE is linear in the score: subtracting the map of the constant score 1/2 (same seed,
    # same masks) leaves sum_i (f_i - 1/2) M_i / (N p), the linear part without the
    # Monte-Carlo noise of the constant
    half = create("rise", Half(), **params)(x, 0)
    linear = {}
    for size in (0.1, 0.5):  # |scale sum(w x M)| <= size: sigmoid(g) = 1/2 + g/4 + O(g^3)
        scale = size / float((w * x[0, 0]).abs().sum())
        linear[size] = create("rise", Linear(w, scale), **params)(x, 0) - half
    assert _corr(linear[0.1][0, 0], w * x[0, 0]) > 0.85
    assert float(linear[0.1][0, 0][w > 0].mean()) > 0 > float(linear[0.1][0, 0][w < 0].mean())
    # linear in f: five times the score deviation, five times the map (to the O(g^3) term)
    torch.testing.assert_close(linear[0.5], 5 * linear[0.1], atol=2e-3 * 5 * 0.1, rtol=0.02)


def test_seed_decides_the_masks():
    x = torch.rand(1, 1, 16, 16)
    net = Linear(torch.randn(16, 16), 0.05)
    a = create("rise", net, n_masks=32, seed=1)(x, 0)
    b = create("rise", net, n_masks=32, seed=1, batch_size=5)(x, 0)
    c = create("rise", net, n_masks=32, seed=2)(x, 0)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"n_masks": 0}, "n_masks must be an int >= 1"),
        ({"p": 0.0}, r"p must be a probability in \(0, 1\]"),
        ({"cells": 0}, "cells must be a positive int"),
        ({"activation": "logit"}, "activation must be one of"),
        ({"baseline": "noise"}, "baseline must be one of"),
    ],
)
def test_bad_parameters_are_one_line(params, message):
    with pytest.raises(ValueError, match=message):
        create("rise", Constant(), **params)


def test_cells_finer_than_the_image_are_refused():
    with pytest.raises(ValueError, match=r"cells \(7, 7\) are finer than the image \(4, 4\)"):
        create("rise", Constant())(torch.rand(1, 1, 4, 4), 0)
