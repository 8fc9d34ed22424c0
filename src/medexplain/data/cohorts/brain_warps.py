"""The exact warps between a brain-cohort subject and its healthy counterfactual.

Every atrophy subject of :func:`~.brain.make_brain` is its healthy counterfactual
(``effects=False``) pulled back through ``psi(p) = p + a g(r) (p - c)`` around each
hippocampus (module docstring of :mod:`.brain`). :func:`atrophy_warps` gives both directions
of that map in the displacement convention of medexplain's warping modules
(:mod:`medexplain.explain.generative.spatial_transform`: voxel units, channel ``k`` along
tensor axis ``k``, pull-back ``warp(x, u)(p) = x(p + u(p))``):

- injection ``u = psi(p) - p``: ``warp(healthy, u)`` is the atrophied subject;
- removal ``u = psi^-1(q) - q``: ``warp(atrophied, u)`` is the healthy subject.

They are the ground truth a warping simulator (Liu et al.) is after: the warp that removes or
injects the class's anatomy and nothing else. On the voxel grid the equalities hold up to
interpolation: compressing tissue loses detail a linear resampling cannot bring back.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import Cohort
from .brain import _bump, atrophy_displacement
from .mni import world_points

#: Convergence of the inverse, in mm (the grid is millimetres to centimetres).
INVERSE_TOLERANCE_MM = 1e-4
MAX_ITERATIONS = 500


def _inverse(q: torch.Tensor, centre: torch.Tensor, radii: torch.Tensor, a: torch.Tensor):
    """``p`` ``(n, K, d)`` with ``psi(p) = q`` for points ``q`` ``(K, d)`` mm and amplitudes
    ``a`` ``(n,)``, by damped fixed-point iteration ``p <- p - w (psi(p) - q)``.

    The eigenvalues of ``D psi`` lie in ``[1 - 0.65 a, 1 + a]`` (``g + r g'`` is at least
    about -0.65), so ``w = 2 / (2 + 0.35 a)`` contracts by ``1.65 a / (2 + 0.35 a) < 1`` for
    every amplitude the cohort allows (``a < 1.5``).
    """
    a = a.to(torch.float64).view(-1, 1, 1)
    q64, c64, r64 = q.to(torch.float64), centre.to(torch.float64), radii.to(torch.float64)
    step = 2.0 / (2.0 + 0.35 * a)
    p = q64[None].expand(a.shape[0], -1, -1).clone()
    for _ in range(MAX_ITERATIONS):
        _, g = _bump(p, c64, r64)
        residual = p + a * g[..., None] * (p - c64) - q64
        p = p - step * residual
        if float(residual.abs().max()) < INVERSE_TOLERANCE_MM:
            return p
    raise RuntimeError(
        f"the atrophy inverse did not converge in {MAX_ITERATIONS} iterations "
        f"(largest residual {float(residual.abs().max()):.2e} mm)"
    )


def atrophy_warps(cohort: Cohort) -> tuple[torch.Tensor, torch.Tensor]:
    """``(injection, removal)`` displacements ``(n, d, *S)`` in voxels of the cohort's grid.

    ``cohort``: a brain cohort (:func:`~.brain.make_brain`, or a subset of one). Zero for
    subjects without atrophy and outside both ellipsoids (module docstring for the
    convention and what each warp does).
    """
    config = cohort.config
    if config.get("cohort") != "brain" or "atrophy_amplitude" not in cohort.extra:
        raise ValueError("atrophy_warps needs a brain cohort (make_brain) with its extra truth")
    dims = int(config["dims"])
    shape = tuple(cohort.images.shape[2:])
    points = world_points(shape, cohort.affine, dims).reshape(-1, dims)
    amplitude = cohort.extra["atrophy_amplitude"]
    n = amplitude.shape[0]
    radii = torch.tensor(config["atrophy_radii_mm"][:dims], dtype=points.dtype)
    injection = torch.zeros(n, points.shape[0], dims, dtype=torch.float64)
    removal = torch.zeros_like(injection)
    for side, centre_mm in enumerate(config["atrophy_centres_mm"]):
        centre = torch.tensor(centre_mm[:dims], dtype=points.dtype)
        s, _ = _bump(points, centre, radii)
        index = torch.nonzero(s < 1.0).flatten()
        a = amplitude[:, side].to(torch.float64)
        q = points[index].to(torch.float64)
        injection[:, index] += atrophy_displacement(q, centre.to(q.dtype), radii.to(q.dtype), a)
        removal[:, index] += _inverse(points[index], centre, radii, a) - q[None]
    # mm -> voxels: world = A @ index + t, so a world displacement is A @ (index displacement)
    to_voxels = torch.from_numpy(np.linalg.inv(np.asarray(cohort.affine)[:dims, :dims]))
    out = []
    for field in (injection, removal):
        voxels = (field @ to_voxels.T.to(field.dtype)).float()
        out.append(voxels.view(n, *shape, dims).movedim(-1, 1).contiguous())
    return out[0], out[1]
