"""Smooth deformations of the synthetic benchmark, one code path for 2D and 3D.

A subject's sampling map sends image pixel ``x`` (template units, grid_sample order) to
the template point ``y = A x + t + u(x)``: a small random rotation-and-scale ``A``, a shift
``t`` and a smooth displacement ``u`` upsampled from a few random control values. All
random quantities are bounded (uniform draws), so images stay roughly, never perfectly,
aligned. The atrophy class composes this with a radial contraction of one structure
(:func:`radial_contraction`), which is the identity outside a ball.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..core.spatial import check_dims, resize


def uniform(generator: torch.Generator, shape: Sequence[int], low: float, high: float):
    """Float32 uniform draws in ``[low, high)`` from ``generator`` (CPU)."""
    return low + (high - low) * torch.rand(tuple(shape), generator=generator)


def random_rotation_scale(
    generator: torch.Generator, n: int, dims: int, max_angle: float, max_scale: float
) -> torch.Tensor:
    """``(n, dims, dims)`` matrices ``s * expm(K)``: a rotation with skew generator ``K``.

    ``K`` has independent entries uniform in ``[-max_angle, max_angle]`` (radians) above the
    diagonal, which gives a small rotation in any dimension without per-dimension formulas;
    ``s`` is an isotropic scale uniform in ``[1 - max_scale, 1 + max_scale]``.
    """
    check_dims(dims)
    upper = torch.triu(uniform(generator, (n, dims, dims), -max_angle, max_angle), diagonal=1)
    rotation = torch.linalg.matrix_exp(upper - upper.transpose(1, 2))
    scale = uniform(generator, (n, 1, 1), 1.0 - max_scale, 1.0 + max_scale)
    return rotation * scale


def control_displacement(
    generator: torch.Generator, n: int, dims: int, control: int, amplitude: float
) -> torch.Tensor:
    """Low-resolution displacement ``(n, dims, *[control] * dims)``, uniform in ``±amplitude``.

    Channel ``k`` displaces grid coordinate ``k`` (x first). Upsample it with
    :func:`upsample_field`; linear interpolation keeps every value within ``±amplitude``.
    """
    check_dims(dims)
    return uniform(generator, (n, dims, *[control] * dims), -amplitude, amplitude)


def upsample_field(field: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Linear upsampling of ``(n, C, *low)`` to ``(n, *shape, C)`` (channels last, grid order)."""
    full = resize(field, shape)
    return full.movedim(1, -1)


def sampling_grid(
    points: torch.Tensor,
    matrix: torch.Tensor,
    shift: torch.Tensor,
    displacement: torch.Tensor,
) -> torch.Tensor:
    """Template points sampled by each image pixel.

    points ``(*S, d)`` identity grid; matrix ``(n, d, d)``; shift ``(n, d)``; displacement
    ``(n, *S, d)`` (already upsampled). Returns ``(n, *S, d)``: ``A x + t + u(x)``.
    """
    n, d = shift.shape
    flat = points.reshape(-1, d)
    moved = torch.einsum("nij,pj->npi", matrix, flat) + shift[:, None, :]
    return (moved.reshape(n, *points.shape[:-1], d) + displacement).contiguous()


def radial_contraction(
    points: torch.Tensor, center: torch.Tensor, inner: float, outer: float, factor: float
) -> torch.Tensor:
    """Sampling map that shrinks the ball of radius ``inner`` around ``center`` by ``factor``.

    Tissue at distance ``r <= inner`` from the centre moves to ``factor * r``; tissue between
    ``inner`` and ``outer`` is stretched linearly to fill the gap; beyond ``outer`` nothing
    moves. This returns the inverse (where each output point samples the original image):
    ``rho(d) = d / factor`` for ``d <= factor * inner``, linear up to ``rho(outer) = outer``,
    and exactly ``points`` (bitwise) for ``d >= outer``. Monotone in ``d``, hence no folding;
    the Jacobian determinant of the forward tissue map is ``factor ** dims`` inside.

    points ``(..., d)``; center broadcastable to ``points``.
    """
    if not 0.0 < factor <= 1.0:
        raise ValueError(f"factor must be in (0, 1], got {factor}")
    if not 0.0 < inner < outer:
        raise ValueError(f"need 0 < inner < outer, got inner={inner}, outer={outer}")
    rel = points - center
    dist = rel.norm(dim=-1, keepdim=True)
    new_inner = factor * inner
    stretch = (outer - inner) / (outer - new_inner)
    rho = torch.where(dist <= new_inner, dist / factor, inner + (dist - new_inner) * stretch)
    ratio = rho / dist.clamp_min(1e-12)
    return torch.where(dist < outer, center + rel * ratio, points)


def sample_channels(template: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Sample template channels ``(1, K, *T)`` at points ``(n, *S, d)`` -> ``(n, K, *S)``.

    One grid_sample call for the whole batch (the subjects are stacked along the first
    spatial axis of a single grid), linear interpolation, ``align_corners=True``, border
    padding (the template border is background).
    """
    n = grid.shape[0]
    spatial = grid.shape[1:-1]
    stacked = grid.reshape(1, n * spatial[0], *spatial[1:], grid.shape[-1])
    out = F.grid_sample(
        template.to(grid.dtype), stacked, mode="bilinear", padding_mode="border", align_corners=True
    )
    k = template.shape[1]
    return out.reshape(k, n, *spatial).transpose(0, 1)
