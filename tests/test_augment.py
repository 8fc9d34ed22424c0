"""Random affine transforms and the ``augmented:<name>`` wrapper (Charachon et al.)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from medexplain.explain import base
from medexplain.explain.augment import (
    AugmentedExplainer,
    RandomAffine,
    augmented,
    invert_affine,
    warp,
)
from medexplain.explain.base import Explainer, create

SHAPES = [(1, 1, 20, 28), (1, 1, 10, 12, 14)]


class IdentityExplainer(Explainer):
    """The map is the image itself (summed over channels): equivariant to any transform."""

    name = "identity"

    def _attribute(self, x, targets):
        return x.sum(dim=1, keepdim=True)


class TargetExplainer(Explainer):
    """The map is the target class index everywhere."""

    name = "target"

    def _attribute(self, x, targets):
        shape = (x.shape[0], 1, *x.shape[2:])
        return targets.view(-1, *[1] * (x.dim() - 1)).float().expand(shape).clone()


class ScaledSquare(Explainer):
    """A nonlinear map, x^2 * scale plus the model's score of the target (uses the model)."""

    name = "scaled_square"

    def __init__(self, model, *, scale: float = 1.0, **kw):
        super().__init__(model, **kw)
        self.scale = scale

    def _attribute(self, x, targets):
        score = torch.softmax(self.model(x), 1).gather(1, targets.view(-1, 1)).view(-1)
        extra = score.view(-1, *[1] * (x.dim() - 1))
        return self.scale * (x**2).sum(1, keepdim=True) + extra


def tiny_model(dims: int) -> nn.Module:
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    pool = nn.AdaptiveAvgPool2d if dims == 2 else nn.AdaptiveAvgPool3d
    bn = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
    torch.manual_seed(0)
    return nn.Sequential(
        conv(1, 4, 3, padding=1), bn(4), nn.ReLU(), pool(1), nn.Flatten(), nn.Linear(4, 3)
    )


def smooth_field(spatial, freqs):
    """sum_j sin(k_j u_j) at the pixel centres u of affine_grid (align_corners=False)."""
    axes = [(2 * torch.arange(s, dtype=torch.float64) + 1) / s - 1 for s in spatial]
    grids = torch.meshgrid(*axes, indexing="ij")
    return sum(torch.sin(k * g) for k, g in zip(freqs, grids))[None, None].float()


@pytest.mark.parametrize("shape", SHAPES)
def test_flip_average_of_identity_explainer_is_the_input(shape):
    torch.manual_seed(1)
    x = torch.randn(3, *shape[1:])
    wrapped = augmented(IdentityExplainer(tiny_model(len(shape) - 2)), n=6, transforms="flips")
    # flips are a permutation of the pixels: mapped back exactly, every copy is x.
    torch.testing.assert_close(wrapped(x), x, atol=1e-4, rtol=0)
    # the draws really contain flips (otherwise the test would be trivial)
    thetas = wrapped.matrices(shape[2:])
    assert (thetas[:, :, :-1].diagonal(dim1=1, dim2=2) < 0).any()


@pytest.mark.parametrize("shape", SHAPES)
def test_inverse_composed_with_transform_is_identity_on_smooth_maps(shape):
    spatial = shape[2:]
    dims = len(spatial)
    freqs = [1.0, 1.5, 2.0][:dims]
    field = smooth_field(spatial, freqs)
    thetas = RandomAffine().sample(8, spatial, torch.Generator().manual_seed(3))
    # Multilinear interpolation error <= sum_i h_i^2/8 max|d_i^2 f| (h: pixel pitch in the
    # normalised coordinates, 2/size). A rotated sum of sines has |d_i^2 f| <= sum_j k_j^2;
    # the round trip interpolates twice (the second grid is finer: zoom <= 1).
    h = 2.0 / min(spatial)
    bound = 2 * dims * h**2 / 8 * sum(k * k for k in freqs)
    for theta in thetas:
        theta = theta[None]
        back = warp(warp(field, theta), invert_affine(theta))
        covered = warp(warp(torch.ones_like(field), theta), invert_affine(theta)) > 1 - 1e-5
        assert covered.float().mean() > 0.3
        error = (back - field)[covered].abs().max()
        assert error < bound, (error, bound)
        # the transform itself is not the identity (rotation/zoom moved the field)
        assert (warp(field, theta) - field).abs().max() > 5 * error


@pytest.mark.parametrize("spatial", [(20, 28), (10, 12, 14)])
def test_sampled_transforms_are_rigid_zoom_and_flip_in_pixel_units(spatial):
    dims = len(spatial)
    thetas = RandomAffine(rotation=10.0, zoom=(0.8, 1.0)).sample(
        64, spatial, torch.Generator().manual_seed(0)
    )
    half = torch.tensor(spatial[::-1], dtype=torch.float64) / 2
    linear = thetas[:, :, :-1].double()
    physical = linear * half.view(1, dims, 1) / half.view(1, 1, dims)  # D A D^-1
    gram = physical.transpose(1, 2) @ physical
    zoom2 = gram.diagonal(dim1=1, dim2=2).mean(1)
    eye = torch.eye(dims, dtype=torch.float64)
    torch.testing.assert_close(gram, zoom2.view(-1, 1, 1) * eye, atol=1e-5, rtol=0)
    zoom = zoom2.sqrt()
    assert zoom.min() >= 0.8 - 1e-6 and zoom.max() <= 1 + 1e-6
    # angles: every entry of the rotation stays within cos(10deg) of the identity's sign
    rotation = physical / zoom.view(-1, 1, 1)
    assert rotation.diagonal(dim1=1, dim2=2).abs().min() >= math.cos(math.radians(10)) ** 2 - 1e-6
    # composing with the inverse gives the identity exactly (up to float32)
    homog = torch.cat([thetas, torch.zeros(64, 1, dims + 1)], 1)
    homog[:, -1, -1] = 1
    inv = torch.cat([invert_affine(thetas), homog[:, -1:]], 1)
    torch.testing.assert_close(
        homog @ inv, torch.eye(dims + 1).expand(64, -1, -1), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("shape", SHAPES)
def test_average_of_equivariant_explainer_over_rotations_recovers_smooth_input(shape):
    spatial = shape[2:]
    dims = len(spatial)
    freqs = [1.0, 1.5, 2.0][:dims]
    field = smooth_field(spatial, freqs)
    wrapped = augmented(IdentityExplainer(tiny_model(dims)), n=5, transforms="default", seed=4)
    out = wrapped(field)
    h = 2.0 / min(spatial)
    bound = 2 * dims * h**2 / 8 * sum(k * k for k in freqs)
    # pixels that every copy saw entirely (the wrapper's own coverage weights)
    coverage = sum(
        warp(warp(torch.ones_like(field), t[None]), invert_affine(t[None]))
        for t in wrapped.matrices(spatial)
    )
    inner = coverage > 5 - 1e-4
    assert inner.float().mean() > 0.3
    assert (out - field)[inner].abs().max() < bound


def test_targets_come_from_the_original_image():
    model = tiny_model(2).eval()
    x = torch.randn(4, 1, 16, 16)
    predicted = model(x).argmax(1)
    out = augmented(TargetExplainer(model), n=4, transforms="default")(x)
    seen = out.abs() > 0
    expected = predicted.float().view(-1, 1, 1, 1).expand_as(out)
    assert seen.float().mean() > 0.9
    torch.testing.assert_close(out[seen], expected[seen], atol=1e-5, rtol=1e-5)
    out = augmented(TargetExplainer(model), n=4)(x, 2)
    torch.testing.assert_close(out[seen], torch.full_like(out[seen], 2.0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_batch_invariance_seed_and_model_untouched(shape, monkeypatch):
    monkeypatch.setitem(base._REGISTRY, "scaled_square", ScaledSquare)
    dims = len(shape) - 2
    model = tiny_model(dims).train()
    model[0].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(2)
    x = torch.randn(3, *shape[1:])
    explainer = create("augmented:scaled_square", model, n=3, scale=2.0, seed=5)
    assert isinstance(explainer, AugmentedExplainer) and explainer.inner.scale == 2.0
    assert explainer.name == "augmented:scaled_square"
    targets = torch.tensor([0, 2, 1])
    batch = explainer(x, targets)
    singles = torch.cat([explainer(x[i : i + 1], targets[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batch, singles, atol=1e-5, rtol=1e-5)
    # the model: same flags, same requires_grad, same buffers (BN stats untouched), no hooks
    assert model.training and all(m.training for m in model.modules())
    assert not model[0].weight.requires_grad and model[0].bias.requires_grad
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)
    # same seed -> same maps; another seed -> other transforms -> other maps
    again = create("augmented:scaled_square", model, n=3, scale=2.0, seed=5)(x, targets)
    torch.testing.assert_close(again, batch, atol=0, rtol=0)
    other = create("augmented:scaled_square", model, n=3, scale=2.0, seed=6)(x, targets)
    assert (other - batch).abs().max() > 1e-3


def test_errors_are_clear():
    model = tiny_model(2)
    with pytest.raises(ValueError, match="n must be"):
        augmented(IdentityExplainer(model), n=0)
    with pytest.raises(ValueError, match="unknown fields"):
        augmented(IdentityExplainer(model), transforms={"shear": 3})
    with pytest.raises(ValueError, match="zoom"):
        RandomAffine(zoom=(1.0, 0.5))
    with pytest.raises(ValueError, match="inner parameters"):
        augmented(IdentityExplainer(model), scale=2.0)
    with pytest.raises(KeyError, match="unknown explainer"):
        create("augmented:no_such_method", model)
    with pytest.raises(ValueError, match="theta"):
        warp(torch.zeros(1, 1, 8, 8), torch.zeros(1, 3, 4))
    assert "augmented:<name>" in base.available()


class RecordingExplainer(IdentityExplainer):
    """The identity map; remembers every (transformed) image it was shown."""

    name = "recording"

    def __init__(self, model, **kw):
        super().__init__(model, **kw)
        self.seen: list[torch.Tensor] = []

    def _attribute(self, x, targets):
        self.seen.append(x.detach().clone())
        return super()._attribute(x, targets)


def left_right_masses(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    half = images.shape[-1] // 2
    return images[..., :half].sum((1, 2, 3)), images[..., half:].sum((1, 2, 3))


def test_default_augmentation_keeps_an_aligned_image_aligned_and_flips_are_opt_in():
    from medexplain.data.synthetic import make_benchmark

    # An aligned benchmark image with evidence on its left side only: the brain-like
    # background is symmetric about the vertical midline, the added pattern is not.
    image = make_benchmark(3, dims=2, size=32, seed=0).images[:1].clone()
    image = image - image.amin()
    image[..., 10:22, 3:10] += 2.0
    left, right = left_right_masses(image)
    assert left > 1.2 * right
    model = tiny_model(2).eval()

    def copies(**params) -> torch.Tensor:
        inner = RecordingExplainer(model)
        augmented(inner, n=32, seed=1, **params)(image, 0)
        return torch.cat(inner.seen)

    # Property: every default copy keeps more mass on the left; rotations within +-5 deg
    # (and zooms of at least 0.8, tried below) cannot move the pattern across the midline.
    left, right = left_right_masses(copies())
    assert bool((left > right).all())
    theta = RandomAffine().sample(200, (32, 32), torch.Generator().manual_seed(0))
    angles = torch.rad2deg(torch.atan2(theta[:, 1, 0], theta[:, 0, 0]))
    assert 4.0 < float(angles.abs().max()) <= 5.0 + 1e-4
    assert not bool((theta[:, :, :2].diagonal(dim1=1, dim2=2) < 0).any())  # no flips drawn
    # Explicit flips of the left-right axis (spatial axis 1) mirror about half of the copies,
    # the former default (preset or parameters) mirrors some too.
    former = {"flip": True, "rotation": 10, "zoom": (0.8, 1)}
    for params in ({"flip": [1]}, {"transforms": "all_flips"}, former):
        left, right = left_right_masses(copies(**params))
        assert 0.25 < float((left < right).float().mean()) < 0.75, params
    # Neither a zoom nor a vertical flip (axis 0) moves the pattern to the right.
    left, right = left_right_masses(copies(flip=(0,), zoom=(0.8, 1.0)))
    assert bool((left > right).all())


def test_transform_parameters_replace_fields_of_the_transforms():
    model = tiny_model(2)
    wrapped = augmented(IdentityExplainer(model), flip=True, rotation=10.0, zoom=(0.8, 1.0))
    assert wrapped.transforms == RandomAffine.all_flips()
    assert augmented(IdentityExplainer(model), transforms="all_flips").transforms == (
        RandomAffine(rotation=10.0, zoom=(0.8, 1.0), flip=True)
    )
    wrapped = augmented(IdentityExplainer(model), transforms="none", zoom=(0.9, 1.0))
    assert wrapped.transforms == RandomAffine(rotation=0.0, zoom=(0.9, 1.0), flip=False)
    wrapped = create("augmented:saliency", model, flip=[0], rotation=2.0)
    assert wrapped.transforms.flip == (0,) and wrapped.transforms.rotation == 2.0
    assert wrapped.transforms.zoom == (1.0, 1.0)  # the default: no zoom
    with pytest.raises(ValueError, match="rotation"):
        augmented(IdentityExplainer(model), rotation=-1.0)
