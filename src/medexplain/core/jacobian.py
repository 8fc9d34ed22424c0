"""Jacobian determinant of a displacement field, 2D and 3D (METHODS.md section 5).

``J(p) = det(I + grad u(p))`` for ``phi(p) = p + u(p)`` (see
:mod:`~medexplain.explain.generative.spatial_transform` for the layout of ``u``). With the
pull-back warp ``x~(p) = x(phi(p))``, ``J(p)`` is the volume of the source region of ``x``
that lands on a unit volume at ``p`` in ``x~``: ``J < 1`` where ``x`` is shrunk relative to
``x~``, ``J > 1`` where it is expanded, ``J <= 0`` where the map folds.
"""

from __future__ import annotations

import torch

from .spatial import spatial_dims_of


def displacement_gradient(displacement: torch.Tensor) -> torch.Tensor:
    """``du_i/dp_j`` as ``(B, *spatial, d, d)`` (row ``i`` = component, column ``j`` = axis).

    Finite differences in voxel units: second-order central differences inside the image,
    first-order one-sided differences on the border (``torch.gradient``); both are exact for
    an affine field. An axis of length 1 has zero derivative.
    """
    dims = spatial_dims_of(displacement, "displacement")
    if displacement.shape[1] != dims:
        raise ValueError(
            f"displacement must have {dims} channels (one per spatial dim) for "
            f"{dims}D data, got shape {tuple(displacement.shape)}"
        )
    columns = []
    for axis in range(dims):
        if displacement.shape[2 + axis] < 2:
            columns.append(torch.zeros_like(displacement))
        else:
            columns.append(torch.gradient(displacement, dim=2 + axis)[0])
    grad = torch.stack(columns, dim=2)  # (B, i, j, *spatial)
    return grad.movedim(1, -1).movedim(1, -1)  # (B, *spatial, i, j)


def jacobian_determinant(displacement: torch.Tensor) -> torch.Tensor:
    """``det(I + grad u)`` per pixel/voxel: ``(B, d, *spatial)`` -> ``(B, 1, *spatial)``.

    A zero displacement gives 1 everywhere; an affine field ``u = (A - I) p + t`` gives
    ``det(A)`` everywhere. Computed in float64 and returned in the input's dtype.
    """
    grad = displacement_gradient(displacement.to(torch.float64))
    dims = grad.shape[-1]
    m = grad + torch.eye(dims, dtype=grad.dtype, device=grad.device)
    return _small_det(m).unsqueeze(1).to(displacement.dtype)


def _small_det(m: torch.Tensor) -> torch.Tensor:
    """Determinants of ``(..., d, d)`` matrices, ``d`` in 1..3, by cofactor expansion: the
    same values as ``torch.linalg.det`` but without its LU factorisation per voxel, whose
    backward pass is slow over a whole volume of 3 x 3 matrices."""
    dims = m.shape[-1]
    if dims == 1:
        return m[..., 0, 0]
    if dims == 2:
        return m[..., 0, 0] * m[..., 1, 1] - m[..., 0, 1] * m[..., 1, 0]
    minors = [
        m[..., 1, 1] * m[..., 2, 2] - m[..., 1, 2] * m[..., 2, 1],
        m[..., 1, 0] * m[..., 2, 2] - m[..., 1, 2] * m[..., 2, 0],
        m[..., 1, 0] * m[..., 2, 1] - m[..., 1, 1] * m[..., 2, 0],
    ]
    return m[..., 0, 0] * minors[0] - m[..., 0, 1] * minors[1] + m[..., 0, 2] * minors[2]


def log_jacobian(displacement: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``log J`` ``(B, 1, *spatial)``, with ``J`` clamped to ``eps`` where the warp folds."""
    return torch.log(jacobian_determinant(displacement).clamp_min(eps))


def folding_fraction(displacement: torch.Tensor) -> torch.Tensor:
    """Fraction of pixels/voxels with ``J <= 0`` per image, ``(B,)``."""
    det = jacobian_determinant(displacement)
    return (det <= 0).flatten(1).float().mean(dim=1)
