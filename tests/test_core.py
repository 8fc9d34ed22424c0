"""Core helpers: 2D/3D blur vs scipy, mask application, ranking, targets, model guard."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from medexplain.core.model import model_guard, per_image_noise
from medexplain.core.perturb import (
    apply_mask,
    igos_blur_parameters,
    make_baseline,
    rank_pixels,
    top_fraction_mask,
    upsample_mask,
)
from medexplain.core.scores import as_targets, class_score, probabilities
from medexplain.core.spatial import gaussian_blur, gaussian_kernel1d, resize
from medexplain.explain.base import _REGISTRY, Explainer, create, register


@pytest.mark.parametrize("shape", [(1, 1, 17, 23), (1, 1, 9, 11, 13)])
def test_gaussian_blur_matches_scipy(shape):
    rng = np.random.default_rng(0)
    x = rng.random(shape).astype(np.float32)
    sigma, kernel = 1.5, 9
    ours = gaussian_blur(torch.from_numpy(x), sigma=sigma, kernel_size=kernel).numpy()
    # scipy's "mirror" mode is torch's "reflect"; truncate so the radius equals kernel // 2.
    ref = ndimage.gaussian_filter(
        x[0, 0].astype(np.float64), sigma=sigma, mode="mirror", truncate=(kernel // 2) / sigma
    )
    np.testing.assert_allclose(ours[0, 0], ref, atol=1e-5)


def test_gaussian_kernel_is_normalised_and_symmetric():
    k = gaussian_kernel1d(2.0, 11)
    assert torch.isclose(k.sum(), torch.tensor(1.0))
    assert torch.allclose(k, k.flip(0))


def test_igos_blur_parameters_scale_from_224():
    assert igos_blur_parameters((224, 224)) == (51, 50.0)
    kernel, sigma = igos_blur_parameters((112, 100))
    assert kernel % 2 == 1 and kernel in (25, 27) and sigma == pytest.approx(25.0)


def test_apply_mask_blends_by_hand():
    x = torch.full((1, 2, 4, 4), 3.0)
    b = torch.full((1, 2, 4, 4), 1.0)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1.0
    mask[..., 2, :] = 0.25
    out = apply_mask(x, b, mask)
    assert torch.allclose(out[:, :, :2], torch.full((1, 2, 2, 4), 3.0))
    assert torch.allclose(out[:, :, 2], torch.full((1, 2, 4), 1.5))
    assert torch.allclose(out[:, :, 3], torch.full((1, 2, 4), 1.0))


def test_upsample_mask_is_linear_with_corners_aligned():
    coarse = torch.tensor([[[[0.0, 1.0]]]]).expand(1, 1, 2, 2)
    up = upsample_mask(coarse, (2, 5))
    assert torch.allclose(up[0, 0, 0], torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    cube = torch.rand(1, 1, 3, 3, 3)
    assert resize(cube, (3, 3, 3)) is cube
    assert upsample_mask(cube, (5, 5, 5))[0, 0, ::2, ::2, ::2].allclose(cube[0, 0])


def test_baselines():
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(make_baseline(x, "zero"), torch.zeros_like(x))
    mean = torch.rand(1, 8, 8)
    assert torch.equal(make_baseline(x, "mean", mean_image=mean)[1], mean)
    blurred = make_baseline(x, "blur")
    assert blurred.std() < x.std()
    with pytest.raises(ValueError, match="mean_image"):
        make_baseline(x, "mean")
    with pytest.raises(ValueError, match="baseline must be one of"):
        make_baseline(x, "noise")


def test_rank_pixels_and_top_fraction():
    saliency = torch.tensor([[[[0.1, 0.9], [0.5, 0.3]]]])
    ranks = rank_pixels(saliency)
    assert ranks.tolist() == [[[[3, 0], [1, 2]]]]
    assert top_fraction_mask(ranks, 0.5).tolist() == [[[[0.0, 1.0], [1.0, 0.0]]]]
    assert top_fraction_mask(ranks, 0.0).sum() == 0
    assert top_fraction_mask(ranks, 1.0).sum() == 4
    # Random tie breaking is a permutation of all pixels.
    flat = rank_pixels(torch.zeros(1, 1, 3, 3), torch.Generator().manual_seed(1)).flatten()
    assert sorted(flat.tolist()) == list(range(9))


def test_targets_and_probabilities():
    logits = torch.tensor([[1.0, 3.0, 0.0], [2.0, 0.0, 0.5]])
    assert as_targets(None, 2, logits=lambda: logits).tolist() == [1, 0]
    assert as_targets(2, 2).tolist() == [2, 2]
    assert as_targets(torch.tensor([0, 2]), 2).tolist() == [0, 2]
    with pytest.raises(ValueError, match="batch of 3"):
        as_targets(torch.tensor([0, 2]), 3)
    with pytest.raises(TypeError):
        as_targets(torch.tensor([0.5, 1.0]), 2)
    probs = probabilities(logits)
    assert torch.allclose(probs.sum(1), torch.ones(2))
    assert torch.allclose(probabilities(torch.tensor([[0.0]])), torch.tensor([[0.5]]))
    model = nn.Linear(3, 3)
    x = torch.rand(5, 3)
    t = torch.tensor([0, 1, 2, 1, 0])
    full = class_score(model, x, t)
    assert torch.allclose(full, class_score(model, x, t, batch_size=2))
    assert torch.allclose(full, torch.softmax(model(x), 1)[torch.arange(5), t])


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.head = nn.Linear(2, 3)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).mean((2, 3)))


def test_model_guard_restores_flags_and_removes_leftover_hooks():
    net = _Net().train()
    net.head.weight.requires_grad_(False)
    with model_guard(net):
        assert not net.training and not net.bn.training
        assert not any(p.requires_grad for p in net.parameters())
        net.conv.register_forward_hook(lambda *args: None)
    assert net.training and net.bn.training
    assert not net.head.weight.requires_grad and net.conv.weight.requires_grad
    assert len(net.conv._forward_hooks) == 0


def test_model_guard_restores_a_mixed_state_and_keeps_earlier_hooks_and_grads():
    """A model half in eval mode, half frozen, with a hook of its own and a stored gradient
    comes back exactly so; a frozen eval-mode model comes back frozen and in eval mode."""
    net = _Net().train()
    net.bn.eval()
    net.conv.weight.requires_grad_(False)
    grad = torch.ones_like(net.head.weight)
    net.head.weight.grad = grad
    own = net.head.register_forward_hook(lambda *args: None)
    with model_guard(net):
        assert not any(m.training for m in net.modules())
        assert not any(p.requires_grad for p in net.parameters())
        net.head.register_forward_pre_hook(lambda *args: None)
        net.head.weight.grad = None
    assert net.training and net.conv.training and not net.bn.training
    assert not net.conv.weight.requires_grad and net.head.weight.requires_grad
    assert net.head.weight.grad is grad
    assert list(net.head._forward_hooks) == [own.id] and len(net.head._forward_pre_hooks) == 0

    frozen = _Net().eval().requires_grad_(False)
    before = {name: p.requires_grad for name, p in frozen.named_parameters()}
    with model_guard(frozen):
        frozen.head.register_forward_hook(lambda *args: None)
    assert not frozen.training and before == {
        name: p.requires_grad for name, p in frozen.named_parameters()
    }
    assert len(frozen.head._forward_hooks) == 0


class _InputCopy(Explainer):
    def _attribute(self, x, targets):
        return x[:, :1]


@pytest.fixture
def input_copy_registered():
    register("_test_input_copy", "returns the input (test only)")(_InputCopy)
    yield "_test_input_copy"
    _REGISTRY.pop("_test_input_copy")


def test_registry_and_contract_errors(input_copy_registered):
    net = _Net()
    x = torch.rand(2, 1, 6, 6)
    maps = create(input_copy_registered, net)(x)
    assert maps.dtype == torch.float32 and torch.equal(maps, x)
    with pytest.raises(KeyError, match="available"):
        create("no_such_method", net)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        create(input_copy_registered, net)(torch.rand(6, 6))
    with pytest.raises(ValueError, match="out of range"):
        create(input_copy_registered, net)(x, target=7)


def test_per_image_noise_is_identical_across_the_batch():
    noise = per_image_noise((1, 4, 4), batch=3, seed=5, device="cpu")
    assert torch.equal(noise[0], noise[2])
    assert torch.equal(noise[0], per_image_noise((1, 4, 4), batch=1, seed=5, device="cpu")[0])


@pytest.mark.parametrize("method", ["saliency", "integrated_gradients"])
def test_explainer_leaves_a_training_batchnorm_model_as_found(method):
    torch.manual_seed(0)
    net = _Net().train()
    net.bn.running_mean.uniform_(-1.0, 1.0)
    net.bn.running_var.uniform_(0.5, 2.0)
    stats = {k: v.clone() for k, v in net.bn.state_dict().items()}
    x = torch.rand(3, 1, 8, 8)
    maps = create(method, net, batch_size=2)(x, target=1)
    assert net.training and net.bn.training and net.head.training
    for key, value in net.bn.state_dict().items():
        assert torch.equal(value, stats[key]), key
    # The map is the one of the model in eval mode: the running statistics, not batch ones.
    reference = create(method, net.eval(), batch_size=2)(x, target=1)
    assert torch.equal(maps, reference)
    # The public call is the only way in: there is no unguarded ``attribute``.
    assert not hasattr(create(method, net), "attribute")
