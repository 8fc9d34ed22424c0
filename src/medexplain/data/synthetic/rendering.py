"""Images and per-pixel ground truth of subjects: warp the template, add the class effect,
bias field, shortcut marker and noise."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..deform import radial_contraction, sample_channels, sampling_grid, upsample_field
from ..template import (
    DEFAULT_LAYOUT,
    ball_distance,
    center_of,
    identity_grid,
    marker_mask,
    render_template,
)
from .subjects import (
    ATROPHY_SHRINK,
    LESION_CONTRAST,
    MARKER_INTENSITY,
    MIN_ATROPHY_FACTOR,
    Subjects,
)

# Pixels (voxels) rendered per chunk, which bounds memory for large benchmarks.
CHUNK_PIXELS = 2**21


@dataclass
class Rendered:
    """Output of :func:`render`: images and per-image ground truth."""

    images: torch.Tensor  # (N, 1, *S) float32 in [0, 1]
    evidence: torch.Tensor  # (N, 1, *S) bool
    evidence_parts: torch.Tensor  # (N, P, *S) bool, per lesion part (P = 2 when redundant)


def _subject_noise(seeds: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Gaussian noise ``(n, 1, *shape)``, each subject from its own seed."""
    out = torch.empty((len(seeds), 1, *shape))
    g = torch.Generator()
    for i, seed in enumerate(seeds.tolist()):
        g.manual_seed(seed)
        out[i, 0] = torch.randn(tuple(shape), generator=g)
    return out


def lesion_profile(rel: torch.Tensor) -> torch.Tensor:
    """Blob profile at relative distance ``rel = d / r``: 1 on ``rel <= 1/2``, a smoothstep
    down to exactly 0 at ``rel >= 1`` (compact support, so the evidence mask is exact)."""
    t = ((1.0 - rel) * 2.0).clamp(0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def atrophy_factor(strength: float) -> float:
    """Radius factor of the shrinking nucleus: ``1 - 0.35 * strength``, at least 0.1."""
    return max(MIN_ATROPHY_FACTOR, 1.0 - ATROPHY_SHRINK * float(strength))


def _render_chunk(
    subjects: Subjects, template: torch.Tensor, marker: torch.Tensor, effects: bool, markers: bool
) -> Rendered:
    dims, size = subjects.dims, subjects.size
    shape = [size] * dims
    n = len(subjects)
    layout = DEFAULT_LAYOUT
    expand = (n, *[1] * (dims + 1))  # per-subject scalars -> (n, 1, *S)
    grid = sampling_grid(
        identity_grid(shape),
        subjects.matrix,
        subjects.shift,
        upsample_field(subjects.displacement, shape),
    )
    evidence = torch.zeros((n, 1, *shape), dtype=torch.bool)
    evidence_parts = torch.zeros((n, subjects.lesion_parts.shape[1], *shape), dtype=torch.bool)

    # Atrophy: contract the nucleus inside region B (identity outside, bitwise).
    lookup = grid
    atrophic = subjects.effect_of("atrophy").nonzero().flatten()
    if len(atrophic):
        b_center = center_of(layout.nucleus.center, dims)
        points = grid[atrophic]
        evidence[atrophic, 0] = ball_distance(points, b_center) < layout.atrophy_outer
        if effects and subjects.strength > 0:
            lookup = grid.clone()
            lookup[atrophic] = radial_contraction(
                points,
                b_center,
                layout.nucleus.radius,
                layout.atrophy_outer,
                atrophy_factor(subjects.strength),
            )
    channels = sample_channels(template, lookup)  # (n, K, *S)
    clean = torch.einsum("nk...,nk->n...", channels, subjects.tissue).unsqueeze(1)

    # Lesion: compact bright blobs in the chosen parts, in template coordinates.
    lesioned = subjects.effect_of("lesion")
    for part in range(subjects.lesion_parts.shape[1]):
        chosen = (lesioned & subjects.lesion_parts[:, part]).nonzero().flatten()
        if not len(chosen):
            continue
        center = subjects.lesion_center[chosen, part].view(-1, *[1] * dims, dims)
        radius = subjects.lesion_radius[chosen, part].view(-1, *[1] * dims)
        rel = ball_distance(grid[chosen], center) / radius  # (m, *S)
        evidence_parts[chosen, part] = rel < 1.0
        if effects and subjects.strength > 0:
            clean[chosen, 0] += LESION_CONTRAST * subjects.strength * lesion_profile(rel)
    evidence |= evidence_parts.any(dim=1, keepdim=True)

    bias = torch.exp(upsample_field(subjects.log_bias, shape).movedim(-1, 1))
    image = (subjects.gain.view(expand) * clean + subjects.offset.view(expand)) * bias
    if markers and subjects.has_marker.any():
        show = subjects.has_marker.view(expand) & marker
        image = torch.where(show, torch.full_like(image, MARKER_INTENSITY), image)
    if subjects.noise > 0:
        image = image + subjects.noise * _subject_noise(subjects.noise_seed, shape)
    return Rendered(image.clamp_(0.0, 1.0), evidence, evidence_parts)


@functools.lru_cache(maxsize=4)
def _template(dims: int, size: int) -> torch.Tensor:
    """The rendered template for one image geometry, cached (it is only ever read)."""
    return render_template(dims, size)


def render(subjects: Subjects, *, effects: bool = True, markers: bool = True) -> Rendered:
    """Images and ground truth of ``subjects``.

    ``effects=False`` renders every subject as if healthy (same deformation, intensities and
    noise), the counterfactual used to check that the evidence masks hold every difference;
    the evidence masks are returned either way. ``markers=False`` omits the shortcut marker.
    Works in chunks of about :data:`CHUNK_PIXELS` pixels.
    """
    dims, size = subjects.dims, subjects.size
    template = _template(dims, size)
    marker = marker_mask(dims, size)
    per_chunk = max(1, CHUNK_PIXELS // size**dims)
    pieces = [
        _render_chunk(
            subjects.select(slice_indices), template, marker, effects=effects, markers=markers
        )
        for slice_indices in torch.arange(len(subjects)).split(per_chunk)
    ]
    return Rendered(
        torch.cat([p.images for p in pieces]),
        torch.cat([p.evidence for p in pieces]),
        torch.cat([p.evidence_parts for p in pieces]),
    )
