"""Cascading model-parameter randomisation (Adebayo et al. 2018).

- a gradient explanation of a model whose randomisation fully changes it decorrelates;
- an explanation that ignores the model (the image itself, Adebayo's edge-detector case)
  keeps correlation 1 at every step;
- the caller's model and the global RNG are left exactly as they were.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from medexplain.core.ranks import spearman
from medexplain.explain.base import Explainer
from medexplain.metrics.sanity import cascading_randomization, parameterised_layers


class Gradient(Explainer):
    """Plain input gradient of the target logit, summed over channels."""

    def _attribute(self, x, targets):
        x = x.clone().requires_grad_(True)
        with torch.enable_grad():
            score = self.model(x).gather(1, targets.view(-1, 1)).sum()
            (grad,) = torch.autograd.grad(score, x)
        return grad.sum(dim=1, keepdim=True)


SIZE = {2: 12, 3: 6}  # 144 and 216 pixels


def _net(dims=2):
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    torch.manual_seed(0)
    return nn.Sequential(
        conv(1, 4, 3, padding=1),
        nn.ReLU(),
        conv(4, 4, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * (SIZE[dims] ** dims), 3),
    )


def test_spearman_matches_scipy():
    rng = np.random.default_rng(0)
    a = np.round(rng.normal(size=(4, 50)), 1)
    b = np.round(a + rng.normal(size=(4, 50)), 1)
    ours = spearman(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    for k in range(4):
        assert ours[k] == pytest.approx(stats.spearmanr(a[k], b[k]).statistic, abs=1e-12)
    # a constant row carries no rank information: 0 (scipy would give NaN)
    assert float(spearman(torch.ones(10), torch.arange(10.0))) == 0.0


@pytest.mark.parametrize("dims", [2, 3])
def test_gradient_decorrelates_and_caller_model_unchanged(dims):
    model = _net(dims).train()  # a training-mode model must come back in training mode
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model[0].weight.requires_grad_(False)
    rng_before = torch.get_rng_state()
    x = torch.rand(4, 1, *([SIZE[dims]] * dims), generator=torch.Generator().manual_seed(1))

    result = cascading_randomization(model, x, None, make_explainer=lambda m: Gradient(m), seed=0)

    # top-down order, one cumulative step per parameterised layer
    assert result.step_names == ["5", "2", "0"] == parameterised_layers(model)
    assert result.correlation.shape == (3, 4)
    # all layers re-drawn: the gradient map is that of an unrelated network. Spearman of
    # independent maps of n >= 144 pixels has sd ~ 1/sqrt(n - 1) <= 0.084: bounds are ~4 sd
    assert abs(result.rank_correlation_fully_randomized) < 0.2
    assert torch.all(result.correlation_abs[-1].abs() < 0.35)
    # the caller's model is untouched: parameters, flags, RNG
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.training and all(m.training for m in model.modules())
    assert not model[0].weight.requires_grad and model[5].weight.requires_grad
    assert torch.equal(torch.get_rng_state(), rng_before)
    # seeded: the same seed gives the same numbers
    again = cascading_randomization(model, x, None, make_explainer=lambda m: Gradient(m), seed=0)
    torch.testing.assert_close(again.correlation_abs, result.correlation_abs)


def test_model_independent_explanation_stays_correlated():
    model = _net(2)
    x = torch.rand(3, 1, 12, 12, generator=torch.Generator().manual_seed(2))

    def image_itself(m):
        """Ignores the model: the map is the image (what an edge detector would do); a plain
        callable model -> (x, targets) -> maps, no Explainer class needed."""
        return lambda images, targets: images.sum(dim=1, keepdim=True)

    result = cascading_randomization(model, x, None, make_explainer=image_itself, absolute=False)
    torch.testing.assert_close(result.correlation, torch.ones(3, 3, dtype=torch.float64))
    assert result.rank_correlation_fully_randomized == pytest.approx(1.0)


def test_block_granularity_explicit_layers_and_maps():
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU()),
        nn.Sequential(nn.Flatten(), nn.Linear(3 * 36, 2)),
    ).eval()
    x = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(3))
    blocks = cascading_randomization(
        model, x, None, make_explainer=lambda m: Gradient(m), granularity="block", return_maps=True
    )
    assert blocks.step_names == ["1", "0"]
    assert blocks.maps.shape == (3, 2, 1, 6, 6)
    # the first entry is the trained model's explanation
    torch.testing.assert_close(blocks.maps[0], Gradient(model)(x, blocks.targets))
    explicit = cascading_randomization(
        model, x, None, make_explainer=lambda m: Gradient(m), layers=["1", ["0.1", "0.0"]]
    )
    assert explicit.step_names == ["1", "0.1+0.0"]
    # both randomise the same parameters with the same seeds per step
    torch.testing.assert_close(explicit.correlation_abs, blocks.correlation_abs)
    assert set(explicit.to_dict()) >= {"steps", "mean", "rank_correlation_fully_randomized"}
    # maps of the trained model passed in replace its own explanation: same correlations
    given = cascading_randomization(
        model, x, blocks.targets, blocks.maps[0], make_explainer=Gradient, granularity="block"
    )
    torch.testing.assert_close(given.correlation_abs, blocks.correlation_abs)
    with pytest.raises(ValueError, match="maps must have shape"):
        cascading_randomization(model, x, None, torch.zeros(2, 1, 5, 5), make_explainer=Gradient)
    with pytest.raises(ValueError, match="unknown module"):
        cascading_randomization(
            model, x, None, make_explainer=lambda m: Gradient(m), layers=["nope"]
        )


def test_a_map_that_goes_flat_is_degenerate_not_uncorrelated():
    model = _net(2)
    x = torch.rand(3, 1, 12, 12, generator=torch.Generator().manual_seed(2))
    trained = dict(model.named_parameters())["5.weight"].detach().clone()

    def flat_once_randomised(m):
        """The image while the head keeps its trained weights, a constant map after: an
        explainer that collapses instead of decorrelating."""
        intact = torch.equal(dict(m.named_parameters())["5.weight"], trained)
        return lambda images, targets: images if intact else torch.full_like(images, 0.5)

    result = cascading_randomization(model, x, None, make_explainer=flat_once_randomised)
    # spearman() alone would call the flat maps uncorrelated (rho = 0): a pass
    assert torch.isnan(result.correlation).all()
    assert result.degenerate.all() and result.degenerate_fraction == 1.0
    assert np.isnan(result.rank_correlation_fully_randomized)
    assert result.to_dict()["degenerate_fraction"] == 1.0
    image_itself = cascading_randomization(
        model, x, None, make_explainer=lambda m: lambda images, targets: images
    )
    assert image_itself.degenerate_fraction == 0.0 and not image_itself.degenerate.any()
