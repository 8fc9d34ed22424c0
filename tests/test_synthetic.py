"""The synthetic benchmark's ground truth is checked against its construction.

Independent references used here: the same subject rendered with and without its effect
(the difference must lie exactly inside the evidence mask), bounds on the subject
deformation derived from the module's constants, binomial tolerances for the random
frequencies, a closed-form ridge classifier for separability, and the pixel-coordinate
convention (``x`` along the last axis, ``align_corners=True``) for the template regions.
"""

from __future__ import annotations

import math

import pytest
import torch

from medexplain.data import synthetic as syn
from medexplain.data.template import (
    DEFAULT_LAYOUT,
    TISSUE_INTENSITY,
    TISSUES,
    identity_grid,
    template_image,
)

NOISE = 0.05


def _binomial_ok(count: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


def _deformation_bounds(dims: int) -> tuple[float, float]:
    """(m, tau): |y - x| <= m |x| + tau for every subject, from the module's bounds.

    The rotation is expm(K) with skew entries <= MAX_ANGLE, so its angle is at most
    ||K||_F / sqrt(2) <= MAX_ANGLE * sqrt(dims (dims - 1) / 2), and |R s - I| <= |s - 1| + s angle.
    """
    angle = syn.MAX_ANGLE * math.sqrt(dims * (dims - 1) / 2)
    m = syn.MAX_SCALE + (1 + syn.MAX_SCALE) * angle
    tau = math.sqrt(dims) * (syn.MAX_SHIFT + syn.MAX_DISPLACEMENT)
    return m, tau


def _reach(center, radius: float, dims: int) -> float:
    """Radius around ``center`` that holds every image point whose template point lies in
    the ball: |x - c| <= |x - y| + r and |x - y| <= m (|c| + |x - c|) + tau."""
    m, tau = _deformation_bounds(dims)
    norm_c = math.sqrt(sum(v * v for v in center[:dims]))
    return (radius + m * norm_c + tau) / (1 - m)


def _pixel_points(dims: int, size: int) -> torch.Tensor:
    """Template coordinates of the pixels, written independently of the module:
    x runs along the last tensor axis, pixel i at -1 + 2 i / (size - 1)."""
    axis = torch.arange(size, dtype=torch.float64) * 2 / (size - 1) - 1
    mesh = torch.meshgrid(*[axis] * dims, indexing="ij")
    return torch.stack(mesh[::-1], dim=-1)  # (..., dims) in (x, y, z) order


def _inside(dims: int, size: int, center, radius: float) -> torch.Tensor:
    c = torch.tensor(center[:dims], dtype=torch.float64)
    return ((_pixel_points(dims, size) - c).norm(dim=-1) < radius).unsqueeze(0)


@pytest.mark.parametrize(
    "dims, size, redundant, n",
    [(2, 64, False, 45), (2, 48, True, 45), (3, 32, False, 9)],
)
def test_effect_lies_exactly_inside_evidence(dims, size, redundant, n):
    subjects = syn.sample_subjects(n, dims, size, redundant=redundant, seed=7)
    on = syn.render(subjects, effects=True)
    off = syn.render(subjects, effects=False)
    assert torch.equal(on.evidence, off.evidence)
    diff = (on.images - off.images).abs()
    # Outside the evidence the images are bitwise identical; healthy images entirely.
    assert diff[~on.evidence].max() == 0
    healthy = subjects.effect_of("healthy")
    assert not on.evidence[healthy].any()

    # Inside, the difference is the effect: derive its least size from the constants.
    least_gain = syn.GAIN[0] * math.exp(-syn.MAX_LOG_BIAS)
    nucleus = TISSUE_INTENSITY[TISSUES.index("nucleus")]
    interior = TISSUE_INTENSITY[TISSUES.index("interior")]
    lesion_step = least_gain * syn.LESION_CONTRAST
    atrophy_step = least_gain * (nucleus - interior - 2 * syn.TISSUE_JITTER)
    # Share of the evidence ball where the intensity must change by more than the noise:
    # lesion: where profile(rho) * step > noise; atrophy: the ring between the old and the
    # new nucleus radius, out of the ball of radius atrophy_outer.
    rho = torch.linspace(0, 1, 10001)
    rho_star = rho[syn.lesion_profile(rho) * lesion_step > NOISE].max().item()
    lesion_share = rho_star**dims
    r0, outer = DEFAULT_LAYOUT.nucleus.radius, DEFAULT_LAYOUT.atrophy_outer
    factor = syn.atrophy_factor(1.0)
    atrophy_share = (r0**dims - (factor * r0) ** dims) / outer**dims
    for name, step, share in (
        ("lesion", lesion_step, lesion_share),
        ("atrophy", atrophy_step, atrophy_share),
    ):
        for i in subjects.effect_of(name).nonzero().flatten().tolist():
            inside = diff[i][on.evidence[i]]
            assert inside.numel() > 0
            # Noise cancels; clamping at 1 can only shave bright pixels, hence the halves.
            assert inside.max() >= 0.5 * step, (name, i)
            assert (inside > NOISE).float().mean() >= 0.5 * share, (name, i)


def test_strength_scales_the_effect():
    subjects = syn.sample_subjects(30, 2, 48, seed=2)
    base = syn.render(subjects, effects=False).images
    zero = syn.render(syn.sample_subjects(30, 2, 48, strength=0.0, seed=2)).images
    assert torch.equal(zero, base)
    full = syn.render(subjects).images - base
    half = syn.render(syn.sample_subjects(30, 2, 48, strength=0.5, seed=2)).images - base
    lesion = subjects.effect_of("lesion").view(-1, 1, 1, 1).expand_as(full)
    # The lesion adds contrast * strength * profile before gain and bias: linear in strength
    # wherever no clamping happened (pixels away from 0 and 1 in all three images).
    clean = lesion & (base > 0.01) & (base + full < 0.99)
    assert torch.allclose(2 * half[clean], full[clean], atol=1e-5)
    assert full[clean].abs().max() > 0.2


def test_evidence_follows_template_regions():
    dims, size = 2, 64
    bench = syn.make_benchmark(240, dims, size, redundant=True, seed=3)
    layout = DEFAULT_LAYOUT
    balls = {"A1": layout.lesion_regions[0], "A2": layout.lesion_regions[1]}
    b_ball = layout.atrophy_region()
    # Template regions are the balls of the layout in the stated pixel convention.
    parts = bench.region_parts["lesion"]
    for part, ball in zip(parts, balls.values()):
        assert torch.equal(part, _inside(dims, size, ball.center, ball.radius))
    assert torch.equal(bench.regions["atrophy"], _inside(dims, size, b_ball.center, b_ball.radius))
    assert torch.equal(bench.regions["lesion"], parts[0] | parts[1])
    assert not (parts[0] & parts[1]).any()
    # Each image's evidence lies within reach of its template region (deformation bound).
    labels = bench.labels
    atrophy = labels == bench.class_names.index("atrophy")
    near_b = _inside(dims, size, b_ball.center, _reach(b_ball.center, b_ball.radius, dims))
    assert bench.evidence[atrophy].any(dim=(1, 2, 3)).all()
    assert not (bench.evidence[atrophy] & ~near_b).any()
    for p, ball in enumerate(balls.values()):
        near = _inside(dims, size, ball.center, _reach(ball.center, ball.radius, dims))[0]
        assert not (bench.evidence_parts[:, p] & ~near).any()
    # The mean evidence (a global map of the truth) is centred on the template region,
    # within the largest displacement near it.
    m, tau = _deformation_bounds(dims)
    points = _pixel_points(dims, size).float()
    mean_b = bench.evidence[atrophy].float().mean(0)[0]
    centroid = (points * mean_b[..., None]).sum((0, 1)) / mean_b.sum()
    c = torch.tensor(b_ball.center[:dims])
    assert (centroid - c).norm() <= m * (c.norm() + b_ball.radius) + tau


def test_redundant_parts_frequencies():
    bench = syn.make_benchmark(900, 2, 32, redundant=True, seed=5)
    lesion = bench.labels == bench.class_names.index("lesion")
    parts = bench.evidence_parts.any(dim=(2, 3))  # (N, 2) which parts hold evidence
    assert bench.evidence_parts.shape == (900, 2, 32, 32)
    assert not parts[~lesion].any()
    assert torch.equal(bench.evidence[lesion], bench.evidence_parts[lesion].any(1, keepdim=True))
    k = int(lesion.sum())
    both = int((parts[lesion].all(dim=1)).sum())
    only = [int((parts[lesion, p] & ~parts[lesion, 1 - p]).sum()) for p in (0, 1)]
    assert both + sum(only) == k  # every lesion image has evidence somewhere
    assert _binomial_ok(both, k, 0.5)
    assert all(_binomial_ok(c, k, 0.25) for c in only)
    # Non-redundant: one part, no per-part masks.
    plain = syn.make_benchmark(30, 2, 32, seed=5)
    assert plain.evidence_parts is None and len(plain.region_parts["lesion"]) == 1
    assert torch.equal(plain.regions["lesion"], plain.region_parts["lesion"][0])


def test_shortcut_marker_frequency_and_place():
    p, cls = 0.3, 2
    bench = syn.make_benchmark(900, 2, 32, shortcut=p, shortcut_class=cls, seed=11)
    in_class = bench.labels == cls
    assert not bench.has_marker[~in_class].any()
    assert _binomial_ok(int(bench.has_marker.sum()), int(in_class.sum()), p)
    # The marker is a corner patch, away from the anatomy and from all evidence.
    marker = bench.marker[0]
    assert marker.any() and not (bench.evidence[:, 0] & marker).any()
    assert marker.nonzero().max() < 32 / 4
    values = bench.images[:, 0][:, marker]  # (N, marker pixels)
    on, off = values[bench.has_marker], values[~bench.has_marker]
    # Marker pixels are MARKER_INTENSITY + noise clamped at 1: E = mu - s (pdf(a) - a sf(a)).
    a = (1 - syn.MARKER_INTENSITY) / NOISE
    normal = torch.distributions.Normal(0.0, 1.0)
    pdf, sf = normal.log_prob(torch.tensor(a)).exp(), 1 - normal.cdf(torch.tensor(a))
    expected = syn.MARKER_INTENSITY - NOISE * (pdf - a * sf)
    assert abs(on.mean() - expected) < 4 * NOISE / math.sqrt(on.numel())
    # Without the marker the corner is background: every marked image is brighter there.
    background = TISSUE_INTENSITY[0] + syn.TISSUE_JITTER + syn.MAX_OFFSET
    ceiling = background * syn.GAIN[1] * math.exp(syn.MAX_LOG_BIAS)
    assert abs(off.mean() - ceiling / 2) < ceiling
    assert on.mean(1).min() > off.mean(1).max()
    # Apart from the marker, the images are those made without the shortcut.
    marked = syn.make_benchmark(120, 2, 32, shortcut=0.5, shortcut_class=cls, seed=11)
    plain = syn.make_benchmark(120, 2, 32, shortcut=0.0, shortcut_class=cls, seed=11)
    assert marked.has_marker.any() and not plain.has_marker.any()
    assert torch.equal(plain.images[:, 0][:, ~marker], marked.images[:, 0][:, ~marker])
    assert torch.equal(plain.images[~marked.has_marker], marked.images[~marked.has_marker])
    every = syn.make_benchmark(60, 2, 32, shortcut=1.0, shortcut_class=cls, seed=11)
    assert torch.equal(every.has_marker, every.labels == cls)


def test_deterministic_by_seed_and_chunk_invariant(monkeypatch):
    a = syn.make_benchmark(40, 2, 32, redundant=True, seed=3)
    b = syn.make_benchmark(40, 2, 32, redundant=True, seed=3)
    for name in ("images", "labels", "evidence", "evidence_parts", "has_marker", "marker"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    # The config recreates the subjects: their healthy counterparts come from it.
    subjects = syn.sample_subjects(**a.config)
    assert torch.equal(syn.render(subjects).images, a.images)
    c = syn.make_benchmark(40, 2, 32, redundant=True, seed=4)
    assert not torch.equal(a.images, c.images)
    assert not torch.equal(a.labels, c.labels)
    # Other chunks or a subset of the subjects give the same images (up to float rounding
    # of vectorised kernels) and the same masks.
    monkeypatch.setattr(syn.rendering, "CHUNK_PIXELS", 7 * 32 * 32)
    chunked = syn.render(subjects)
    assert torch.allclose(chunked.images, a.images, atol=1e-5, rtol=0)
    assert torch.equal(chunked.evidence, a.evidence)
    picked = torch.tensor([5, 0, 39, 17])
    assert torch.allclose(syn.render(subjects.select(picked)).images, a.images[picked], atol=1e-5)


def test_2d_is_the_middle_slice_of_3d():
    size = 33  # odd, so the middle slice sits exactly at z = 0
    two = syn.make_benchmark(6, 2, size, redundant=True, seed=0)
    three = syn.make_benchmark(6, 3, size, redundant=True, seed=0)
    assert three.images.shape == (6, 1, size, size, size)
    assert three.images.dtype == torch.float32
    mid = size // 2
    for name in ("lesion", "atrophy"):
        assert torch.equal(three.regions[name][:, mid], two.regions[name])
    assert torch.allclose(template_image(3, size)[:, mid], template_image(2, size), atol=1e-6)
    points = identity_grid([size] * 3)
    assert torch.allclose(points[mid, ..., :2], identity_grid([size] * 2))
    default3d = syn.make_benchmark(3, dims=3)
    assert default3d.images.shape == (3, 1, 32, 32, 32) and default3d.config["size"] == 32


def _ridge_accuracy(train, test, features: torch.Tensor) -> float:
    """One-vs-rest ridge classifier in closed (dual) form on standardised pixels; the
    penalty is one unit per feature (no tuning)."""
    x_train = train.images.flatten(1)[:, features].double()
    x_test = test.images.flatten(1)[:, features].double()
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    targets = 2.0 * torch.nn.functional.one_hot(train.labels, 3).double() - 1
    gram = x_train @ x_train.T + x_train.shape[1] * torch.eye(len(x_train), dtype=torch.float64)
    weights = x_train.T @ torch.linalg.solve(gram, targets)
    return ((x_test @ weights).argmax(1) == test.labels).float().mean().item()


def test_classes_separable_only_through_the_evidence():
    bench = syn.make_benchmark(600, seed=1)
    assert bench.images.shape == (600, 1, 64, 64) and bench.images.dtype == torch.float32
    assert bench.images.min() >= 0.0 and bench.images.max() <= 1.0
    assert torch.bincount(bench.labels).tolist() == [200, 200, 200]
    train, test = bench.split((2 / 3, 1 / 3), seed=0)
    everywhere = torch.ones(64 * 64, dtype=torch.bool)
    outside = ~bench.evidence.any(dim=0).flatten()
    chance, k = 1 / 3, len(test)
    tolerance = 4 * math.sqrt(chance * (1 - chance) / k)
    # The effects are well above the noise: a linear model on the pixels separates them.
    assert _ridge_accuracy(train, test, everywhere) >= 0.9
    # Outside every image's evidence the classes are identically distributed: chance.
    assert abs(_ridge_accuracy(train, test, outside) - chance) <= tolerance
    # And with strength 0 nothing separates them anywhere.
    null = syn.make_benchmark(600, strength=0.0, seed=1).split((2 / 3, 1 / 3), seed=0)
    assert abs(_ridge_accuracy(*null, everywhere) - chance) <= tolerance


def test_split_subset_dataset_mean():
    bench = syn.make_benchmark(101, 2, 32, redundant=True, seed=0)
    parts = bench.split()
    again = bench.split()
    assert all(torch.equal(p.images, q.images) for p, q in zip(parts, again))
    assert sum(len(p) for p in parts) == 101
    counts = torch.bincount(bench.labels)
    for part, fraction in zip(parts, (0.7, 0.15, 0.15)):
        per_class = torch.bincount(part.labels, minlength=3)
        assert ((per_class - fraction * counts).abs() <= 1).all()
    # Parts are disjoint and carry their own truth: match images back to the full set.
    index = torch.tensor([5, 7, 50])
    sub = bench.subset(index)
    assert torch.equal(sub.evidence, bench.evidence[index])
    assert torch.equal(sub.evidence_parts, bench.evidence_parts[index])
    assert torch.equal(sub.has_marker, bench.has_marker[index])
    # The parts partition the images (an image's pixel sum serves as its key).
    keys = torch.cat([p.images.sum((1, 2, 3)) for p in parts]).sort().values
    assert torch.equal(keys, bench.images.sum((1, 2, 3)).sort().values)
    image, label = bench.dataset()[3]
    assert torch.equal(image, bench.images[3]) and label == int(bench.labels[3])
    assert isinstance(label, int) and len(bench.dataset()) == 101
    assert torch.allclose(bench.mean_image(), bench.images.sum(0) / 101)
    assert bench.config == dict(
        n=101,
        dims=2,
        size=32,
        classes=["healthy", "lesion", "atrophy"],
        strength=1.0,
        shortcut=0.0,
        shortcut_class=1,
        redundant=True,
        noise=0.05,
        seed=0,
    )


def test_class_subsets_and_order():
    bench = syn.make_benchmark(40, 2, 32, classes=("atrophy", "healthy"), seed=0)
    assert bench.class_names == ("atrophy", "healthy")
    assert set(bench.regions) == {"atrophy"}
    healthy = bench.labels == 1
    assert not bench.evidence[healthy].any() and bench.evidence[~healthy].any(dim=(1, 2, 3)).all()


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(n=0), "n"),
        (dict(dims=4), "dims"),
        (dict(size=8), "size"),
        (dict(classes=("healthy", "tumour")), "classes"),
        (dict(strength=-1.0), "strength"),
        (dict(shortcut=1.5), "shortcut"),
        (dict(shortcut_class=3), "shortcut_class"),
        (dict(classes=("healthy", "atrophy"), redundant=True), "redundant"),
        (dict(noise=-0.1), "noise"),
    ],
)
def test_bad_arguments_are_named(kwargs, word):
    with pytest.raises(ValueError, match=word):
        syn.make_benchmark(**{"n": 10, **kwargs})


def test_split_rejects_bad_fractions():
    bench = syn.make_benchmark(12, 2, 32)
    with pytest.raises(ValueError, match="fractions"):
        bench.split((0.5, 0.2))
