"""The gradient family against independent references.

Each method is compared with a hand computation (torch.autograd on an explicitly written
net, the closed form of a linear model) or with a property from its paper (completeness of
integrated gradients). The shared contract (shapes, batch invariance, model untouched, ...)
is tested for every explainer in tests/test_contract.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medexplain.core.spatial import conv
from medexplain.explain import create
from medexplain.explain.gradcam import GradCAM, find_gradcam_layer
from medexplain.explain.gradients import SmoothGrad, smoothgrad_noise
from medexplain.explain.occlusion import OcclusionExplainer
from test_contract import tiny_cnn

SHAPES = {2: (2, 12, 12), 3: (2, 6, 6, 6)}


def _model(dims: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return tiny_cnn(dims, SHAPES[dims][0]).eval()


def _images(dims: int, n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, *SHAPES[dims], generator=torch.Generator().manual_seed(seed))


def _input_grad(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """d logit_target / d x per image, by plain autograd: (B, C, *spatial)."""
    x = x.clone().requires_grad_(True)
    logits = model(x)
    (grad,) = torch.autograd.grad(logits.gather(1, targets.view(-1, 1)).sum(), x)
    return grad


# ---------------------------------------------------------------- saliency, input x gradient


@pytest.mark.parametrize("dims", [2, 3])
def test_saliency_is_the_gradient_magnitude_summed_over_channels(dims):
    model, x = _model(dims), _images(dims)
    targets = torch.tensor([0, 2, 1])
    grad = _input_grad(model, x, targets)
    unsigned = create("saliency", model, batch_size=2)(x, targets)
    torch.testing.assert_close(unsigned, grad.abs().sum(1, keepdim=True))
    signed = create("saliency", model, abs=False, batch_size=2)
    assert signed.signed
    torch.testing.assert_close(signed(x, targets), grad.sum(1, keepdim=True))


@pytest.mark.parametrize("dims", [2, 3])
def test_input_x_gradient_is_x_times_the_gradient(dims):
    model, x = _model(dims), _images(dims)
    targets = torch.tensor([1, 1, 0])
    grad = _input_grad(model, x, targets)
    maps = create("input_x_gradient", model, batch_size=2)(x, targets)
    torch.testing.assert_close(maps, (x * grad).sum(1, keepdim=True))


# ---------------------------------------------------------------- integrated gradients


def smooth_cnn(dims: int, seed: int = 0) -> nn.Module:
    """A CNN with smooth activations: the IG path integral has no kinks, so Gauss-Legendre
    quadrature converges in a few dozen steps (ReLU kinks need hundreds)."""
    torch.manual_seed(seed)
    channels, *spatial = SHAPES[dims]
    features = int(torch.Size(spatial).numel()) // 2**dims
    return nn.Sequential(
        conv(dims)(channels, 4, 3, padding=1),
        nn.Tanh(),
        conv(dims)(4, 4, 3, stride=2, padding=1),
        nn.Softplus(),
        nn.Flatten(),
        nn.Linear(4 * features, 3),
    ).eval()


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("baseline", ["zero", "blur", 0.5])
def test_integrated_gradients_completeness(dims, baseline):
    """Sundararajan et al. 2017: attributions sum to f(x) - f(baseline) for the target logit."""
    from medexplain.core.perturb import make_baseline

    model, x = smooth_cnn(dims), _images(dims) * 4 - 2  # a wide range: the logits really move
    targets = torch.tensor([0, 1, 2])
    maps = create("integrated_gradients", model, n_steps=32, baseline=baseline, batch_size=16)(
        x, targets
    )
    b = make_baseline(x, torch.tensor(baseline) if isinstance(baseline, float) else baseline)
    with torch.no_grad():
        rows = torch.arange(3)
        delta = model(x)[rows, targets] - model(b)[rows, targets]
    total = maps.flatten(1).sum(1)
    assert delta.abs().min() > 1e-3, "test images must change the logit"
    assert ((total - delta).abs() <= 0.01 * delta.abs()).all(), (total, delta)


def test_integrated_gradients_mean_baseline_needs_the_mean_image():
    model = smooth_cnn(2)
    with pytest.raises(ValueError, match="mean_image"):
        create("integrated_gradients", model, baseline="mean")
    mean = torch.rand(SHAPES[2])
    x = _images(2)
    maps = create("integrated_gradients", model, baseline="mean", mean_image=mean, n_steps=32)(x, 0)
    with torch.no_grad():
        delta = model(x)[:, 0] - model(mean.expand_as(x))[:, 0]
    assert ((maps.flatten(1).sum(1) - delta).abs() <= 0.01 * delta.abs()).all()


# ---------------------------------------------------------------- smoothgrad


@pytest.mark.parametrize("dims", [2, 3])
def test_smoothgrad_averages_saliency_over_the_same_noise_draws(dims):
    model, x = _model(dims), _images(dims)
    targets = torch.tensor([2, 0, 1])
    n, seed, level = 5, 7, 0.15
    explainer = SmoothGrad(model, n_samples=n, noise_level=level, seed=seed, batch_size=4)
    maps = explainer(x, targets)

    expected = torch.zeros_like(maps)
    for i in range(x.shape[0]):
        sigma = level * (x[i].max() - x[i].min())
        draws = smoothgrad_noise(SHAPES[dims], n, seed, "cpu")
        for eps in draws:
            grad = _input_grad(model, (x[i] + sigma * eps).unsqueeze(0), targets[i : i + 1])
            expected[i] += grad[0].abs().sum(0, keepdim=True) / n
    torch.testing.assert_close(maps, expected)

    other_seed = SmoothGrad(model, n_samples=n, noise_level=level, seed=seed + 1)(x, targets)
    assert not torch.allclose(other_seed, maps), "the seed must change the noise"
    no_noise = SmoothGrad(model, n_samples=2, noise_level=0.0)(x, targets)
    torch.testing.assert_close(no_noise, create("saliency", model)(x, targets))


def test_smoothgrad_noise_draws_do_not_depend_on_grouping():
    draws = list(smoothgrad_noise((1, 4, 4), 6, seed=3, device="cpu"))
    again = list(smoothgrad_noise((1, 4, 4), 6, seed=3, device="cpu"))
    assert all(torch.equal(a, b) for a, b in zip(draws, again))
    stacked = torch.stack(draws)
    assert stacked.shape == (6, 1, 4, 4)
    assert not torch.equal(draws[0], draws[1])


# ---------------------------------------------------------------- grad-cam


class ExplicitNet(nn.Module):
    """conv1 -> ReLU -> conv2 (the Grad-CAM layer) -> ReLU -> global mean -> linear."""

    def __init__(self, dims: int, in_channels: int) -> None:
        super().__init__()
        self.conv1 = conv(dims)(in_channels, 4, 3, padding=1)
        self.conv2 = conv(dims)(4, 5, 3, stride=2, padding=1)
        self.fc = nn.Linear(5, 3)
        self.dims = dims

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.conv1(x)))

    def head(self, a: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(a).mean(dim=tuple(range(2, 2 + self.dims))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _hand_gradcam(net: ExplicitNet, x: torch.Tensor, targets: torch.Tensor, relu: bool):
    """Selvaraju et al. 2017 by hand: alpha_k = spatial mean of d y_c / d A_k,
    map = ReLU(sum_k alpha_k A_k), linearly upsampled (align_corners=True)."""
    A = net.features(x).detach().requires_grad_(True)
    y = net.head(A)
    (grads,) = torch.autograd.grad(y.gather(1, targets.view(-1, 1)).sum(), A)
    alpha = grads.mean(dim=tuple(range(2, grads.dim())), keepdim=True)
    cam = (alpha * A).sum(1, keepdim=True).detach()
    if relu:
        cam = cam.clamp_min(0)
    mode = {2: "bilinear", 3: "trilinear"}[net.dims]
    return F.interpolate(cam, size=x.shape[2:], mode=mode, align_corners=True)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("relu", [True, False])
def test_gradcam_equals_the_hand_computation(dims, relu):
    torch.manual_seed(0)
    net = ExplicitNet(dims, SHAPES[dims][0]).eval()
    x = _images(dims)
    targets = torch.tensor([0, 1, 2])
    expected = _hand_gradcam(net, x, targets, relu)
    assert expected.std() > 0, "the reference maps must vary"
    by_default = GradCAM(net, relu=relu, batch_size=2)(x, targets)
    by_name = GradCAM(net, layer="conv2", relu=relu)(x, targets)
    by_module = GradCAM(net, layer=net.conv2, relu=relu)(x, targets)
    for maps in (by_default, by_name, by_module):
        torch.testing.assert_close(maps, expected)


class ReorderedNet(nn.Module):
    """Registers `late` before `early` but runs early -> late -> to_one_pixel."""

    def __init__(self) -> None:
        super().__init__()
        self.late = nn.Conv2d(3, 3, 3, padding=1)
        self.early = nn.Conv2d(1, 3, 3, padding=1)
        self.to_one_pixel = nn.Conv2d(3, 2, 8)  # 8x8 -> 1x1: a constant Grad-CAM map
        self.unused = nn.Conv2d(1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_one_pixel(self.late(self.early(x))).flatten(1)


def test_gradcam_default_layer_is_the_last_executed_multi_pixel_convolution():
    net = ReorderedNet()
    x = torch.rand(2, 1, 8, 8)
    assert find_gradcam_layer(net, x) is net.late
    assert not any(m._forward_hooks for m in net.modules()), "probe hooks must be removed"
    with pytest.raises(ValueError, match="no Conv3d"):
        find_gradcam_layer(net, torch.rand(1, 1, 4, 4, 4))
    with pytest.raises(ValueError, match="not a submodule"):
        GradCAM(net, layer="nope")
    with pytest.raises(ValueError, match="module of the model"):
        GradCAM(net, layer=nn.Conv2d(1, 1, 1))


# ---------------------------------------------------------------- occlusion


def _linear(shape: tuple[int, ...], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    numel = int(torch.Size(shape).numel())
    return nn.Sequential(nn.Flatten(), nn.Linear(numel, 3)).eval()


@pytest.mark.parametrize("shape", [(2, 5, 6), (2, 3, 4, 3)])
@pytest.mark.parametrize("baseline", ["zero", 0.5])
def test_occlusion_of_single_pixels_on_a_linear_model_is_w_times_x(shape, baseline):
    """f = w . x + c: occluding pixel p (all channels) by b changes f_t by
    sum_c w_tc[p] (x_c[p] - b), which is the map with window 1 and stride 1."""
    model = _linear(shape)
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([2, 0])
    maps = OcclusionExplainer(model, window=1, stride=1, baseline=baseline, batch_size=7)(
        x, targets
    )
    b = 0.0 if baseline == "zero" else baseline
    w = model[1].weight.detach()[targets].view(2, *shape)
    torch.testing.assert_close(maps, (w * (x - b)).sum(1, keepdim=True))


def test_occlusion_windows_average_the_window_effects():
    """Window 2, stride 1 on a linear model: each window's drop is the sum of w*x over it;
    a pixel gets the mean over the windows that cover it (Captum's convention)."""
    shape = (1, 4, 5)
    model = _linear(shape, seed=3)
    x = torch.rand(1, *shape, generator=torch.Generator().manual_seed(4))
    maps = OcclusionExplainer(model, window=2, stride=1)(x, 1)
    contribution = (model[1].weight.detach()[1].view(shape) * x[0]).sum(0)  # (4, 5)
    H, W = contribution.shape
    expected = torch.zeros(H, W)
    for i in range(H):
        for j in range(W):
            drops = [
                contribution[a : a + 2, c : c + 2].sum()
                for a in range(H - 1)
                for c in range(W - 1)
                if a <= i < a + 2 and c <= j < c + 2
            ]
            expected[i, j] = sum(drops) / len(drops)
    torch.testing.assert_close(maps[0, 0], expected)


def test_occlusion_default_window_scales_with_the_image():
    explainer = OcclusionExplainer(_linear((1, 4, 4)))
    assert explainer.windows((64, 64)) == ((8, 8), (4, 4))
    assert explainer.windows((32, 64, 16)) == ((4, 8, 2), (2, 4, 1))
    with pytest.raises(ValueError, match="stride"):
        OcclusionExplainer(_linear((1, 4, 4)), window=2, stride=3).windows((8, 8))
    with pytest.raises(ValueError, match="window must be"):
        OcclusionExplainer(_linear((1, 4, 4)), window=(2, 2, 2)).windows((8, 8))


def test_bad_parameters_are_clear_errors():
    model = _model(2)
    with pytest.raises(ValueError, match="n_steps"):
        create("integrated_gradients", model, n_steps=0)
    with pytest.raises(ValueError, match="method must be one of"):
        create("integrated_gradients", model, method="simpson")
    with pytest.raises(ValueError, match="baseline must be"):
        create("occlusion", model, baseline="grey")
    with pytest.raises(ValueError, match="n_samples"):
        create("smoothgrad", model, n_samples=0)
    with pytest.raises(ValueError, match="noise_level"):
        create("smoothgrad", model, noise_level=-0.1)
    with pytest.raises(ValueError, match="window_fraction"):
        create("occlusion", model, window_fraction=0)
    with pytest.raises(TypeError, match="layer must be"):
        create("gradcam", model, layer=3.5)
    with pytest.raises(TypeError, match=r"layer must be.*convolutions: 0, 3"):
        create("gradcam", model, layer=12)
    # ``--param layer=3`` arrives as a number: index 3 of the Sequential, its second conv
    assert create("gradcam", model, layer=3).layer is model[3]


def test_given_targets_a_one_pass_method_runs_no_extra_full_batch_forward():
    """Saliency with targets: the model sees the batch once per call (Captum's pass); the
    output count for the target check comes from one image, once per image shape."""
    model = _model(2)
    seen: list[int] = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    explainer = create("saliency", model)
    x, targets = _images(2, n=8), torch.zeros(8, dtype=torch.long)
    first = explainer(x, targets)
    second = explainer(x, targets)
    assert seen == [1, 8, 8]
    torch.testing.assert_close(first, second)
    with pytest.raises(ValueError):
        explainer(x, torch.full((8,), 99))
    seen.clear()
    explainer(x)  # no targets: the predicted classes need the logits of the whole batch
    assert seen == [8, 8]
