"""Spatial transformer: warp an image with a dense displacement field, 2D and 3D.

Convention (used by every warping module in medexplain):

- a displacement ``u`` is a tensor ``(B, d, *spatial)`` with ``d = len(spatial)``, in **voxel
  units**; channel ``k`` is the displacement along spatial axis ``k`` of the tensor, i.e.
  ``(H, W)`` order in 2D (rows, then columns) and ``(D, H, W)`` order in 3D;
- the warp is a pull-back: ``phi(p) = p + u(p)`` and ``warp(x, u)(p) = x(phi(p))``, sampled
  with linear interpolation (``grid_sample``, ``align_corners=True``, so voxel ``0`` and
  voxel ``n - 1`` are the centres of the first and last voxels — METHODS.md section 5);
- a stationary velocity field ``v`` (same layout) is turned into a diffeomorphic
  displacement by scaling and squaring (:func:`integrate_velocity`, Arsigny et al. 2006;
  Dalca et al. 2019 use 7 squarings).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...core.spatial import spatial_dims_of

#: Number of squarings in scaling and squaring (VoxelMorph-diff default, Dalca et al. 2019).
DEFAULT_SQUARINGS = 7
PADDING_MODES = ("border", "zeros", "reflection")


def identity_grid(
    spatial: tuple[int, ...], device=None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Voxel coordinates ``(1, d, *spatial)``: channel ``k`` holds the index along axis ``k``."""
    axes = [torch.arange(n, device=device, dtype=dtype) for n in spatial]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0).unsqueeze(0)


def check_displacement(x: torch.Tensor, displacement: torch.Tensor, name: str = "displacement"):
    """Raise unless ``displacement`` is ``(B, d, *spatial)`` matching ``x`` ``(B, C, *spatial)``."""
    dims = spatial_dims_of(x)
    expected = (x.shape[0], dims, *x.shape[2:])
    if not isinstance(displacement, torch.Tensor) or tuple(displacement.shape) != expected:
        got = tuple(displacement.shape) if isinstance(displacement, torch.Tensor) else displacement
        raise ValueError(f"{name} must have shape {expected} (B, d, *spatial), got {got}")
    return dims


def _normalised_grid(displacement: torch.Tensor) -> torch.Tensor:
    """Sampling grid for ``grid_sample`` from a voxel displacement ``(B, d, *spatial)``.

    ``grid_sample`` wants ``(B, *spatial, d)`` in ``[-1, 1]`` with the *last* spatial axis
    first (x = W, y = H, z = D); with ``align_corners=True`` voxel ``i`` of an axis of
    length ``n`` sits at ``2 i / (n - 1) - 1``.
    """
    spatial = tuple(displacement.shape[2:])
    grid = identity_grid(spatial, displacement.device, displacement.dtype) + displacement
    scale = torch.tensor(
        [2.0 / max(n - 1, 1) for n in spatial], device=grid.device, dtype=grid.dtype
    )
    grid = grid * scale.view(1, -1, *([1] * len(spatial))) - 1.0
    grid = grid.movedim(1, -1)  # (B, *spatial, d) in axis order
    return grid.flip(-1)  # grid_sample order: (x=W, y=H[, z=D])


def warp(
    x: torch.Tensor,
    displacement: torch.Tensor,
    *,
    mode: str = "bilinear",
    padding_mode: str = "border",
) -> torch.Tensor:
    """``x(p + u(p))``: warp ``x`` ``(B, C, *spatial)`` by ``displacement`` ``(B, d, *spatial)``.

    Linear interpolation (``mode="bilinear"`` is trilinear for 3D inputs in ``grid_sample``);
    samples outside the image repeat the border (``padding_mode="border"``, a choice: the
    papers do not fix it; it avoids dark seams at the edges). A zero displacement returns
    ``x`` exactly (up to float rounding).
    """
    check_displacement(x, displacement)
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    grid = _normalised_grid(displacement.to(x.dtype))
    return F.grid_sample(x, grid, mode=mode, padding_mode=padding_mode, align_corners=True)


def compose(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Displacement of ``phi_first ∘ phi_second``: ``u(p) = u_2(p) + u_1(p + u_2(p))``.

    Warping with the result equals warping with ``first`` and then with ``second``
    (``warp(warp(x, first), second)``), up to interpolation.
    """
    return second + warp(first, second)


def integrate_velocity(velocity: torch.Tensor, squarings: int = DEFAULT_SQUARINGS) -> torch.Tensor:
    """Displacement ``exp(v)`` of a stationary velocity ``v`` ``(B, d, *spatial)`` (voxel units).

    Scaling and squaring: ``u = v / 2^N``, then ``N`` times ``u <- u + u(p + u(p))``. The
    resulting map is the flow of a smooth vector field at time 1, hence invertible and
    non-folding as long as ``v / 2^N`` is small against the voxel size.
    """
    spatial_dims_of(velocity, "velocity")
    if velocity.shape[1] != velocity.dim() - 2:
        raise ValueError(
            f"velocity must have one channel per spatial dim, got shape {tuple(velocity.shape)}"
        )
    if squarings < 0:
        raise ValueError(f"squarings must be >= 0, got {squarings}")
    u = velocity / (2**squarings)
    for _ in range(squarings):
        u = compose(u, u)
    return u
