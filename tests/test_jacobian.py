"""Jacobian determinant against closed forms (METHODS.md section 5)."""

from __future__ import annotations

import math

import pytest
import torch

from medexplain.core.jacobian import folding_fraction, log_jacobian
from medexplain.explain.generative import jacobian_determinant
from medexplain.explain.generative.spatial_transform import identity_grid

SHAPES = {2: (9, 11), 3: (6, 7, 8)}


def affine_field(matrix: torch.Tensor, shift: torch.Tensor, spatial) -> torch.Tensor:
    """u(p) = (A - I) p + t as (1, d, *spatial)."""
    dims = len(spatial)
    p = identity_grid(spatial, dtype=torch.float64)[0].reshape(dims, -1)
    u = (matrix - torch.eye(dims, dtype=torch.float64)) @ p + shift.view(-1, 1)
    return u.reshape(1, dims, *spatial)


@pytest.mark.parametrize("dims", [2, 3])
def test_zero_displacement_gives_one(dims):
    u = torch.zeros(2, dims, *SHAPES[dims])
    det = jacobian_determinant(u)
    assert det.shape == (2, 1, *SHAPES[dims])
    assert torch.equal(det, torch.ones_like(det))
    assert torch.equal(log_jacobian(u), torch.zeros_like(det))


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("scale", [0.5, 1.3, 2.0])
def test_uniform_scaling_gives_s_to_the_d(dims, scale):
    spatial = SHAPES[dims]
    eye = torch.eye(dims, dtype=torch.float64)
    centre = torch.tensor([(n - 1) / 2 for n in spatial], dtype=torch.float64)
    # phi(p) = centre + s (p - centre): scaling about the image centre
    u = affine_field(scale * eye, (1 - scale) * centre, spatial)
    det = jacobian_determinant(u)
    assert torch.allclose(det, torch.full_like(det, scale**dims), atol=1e-10)


@pytest.mark.parametrize("dims", [2, 3])
def test_affine_field_gives_det_a(dims):
    generator = torch.Generator().manual_seed(dims)
    spatial = SHAPES[dims]
    for _ in range(5):
        matrix = torch.eye(dims, dtype=torch.float64) + 0.6 * torch.randn(
            dims, dims, generator=generator, dtype=torch.float64
        )
        shift = torch.randn(dims, generator=generator, dtype=torch.float64)
        u = affine_field(matrix, shift, spatial)
        det = jacobian_determinant(u)
        expected = torch.linalg.det(matrix).item()
        assert torch.allclose(det, torch.full_like(det, expected), atol=1e-10)
        # negative determinants are folds: every voxel is counted
        assert folding_fraction(u).item() == (1.0 if expected <= 0 else 0.0)


def test_channel_order_matches_axes():
    # stretch only along the last axis (W) by 2: J = 2 whatever the order, but a shear
    # u_0 = a * p_1 (row displacement depends on the column) has J = 1 while a field
    # u_0 = a * p_0 has J = 1 + a: this pins channel 0 to axis 0.
    spatial = SHAPES[2]
    p = identity_grid(spatial, dtype=torch.float64)
    shear = torch.zeros(1, 2, *spatial, dtype=torch.float64)
    shear[:, 0] = 0.5 * p[:, 1]
    stretch = torch.zeros(1, 2, *spatial, dtype=torch.float64)
    stretch[:, 0] = 0.5 * p[:, 0]
    assert torch.allclose(
        jacobian_determinant(shear), torch.ones(1, 1, *spatial, dtype=torch.float64)
    )
    assert torch.allclose(
        jacobian_determinant(stretch), torch.full((1, 1, *spatial), 1.5, dtype=torch.float64)
    )


def test_smooth_field_matches_analytic_jacobian():
    # u = (a sin(w p_1), a cos(w p_0)): du0/dp1 = a w cos(w p1), du1/dp0 = -a w sin(w p0),
    # the diagonal derivatives vanish, so J = 1 + a^2 w^2 cos(w p1) sin(w p0)
    spatial = (64, 64)
    a, w = 2.0, 0.1
    p = identity_grid(spatial, dtype=torch.float64)[0]
    u = torch.stack([a * torch.sin(w * p[1]), a * torch.cos(w * p[0])]).unsqueeze(0)
    analytic = 1 + (a * w * torch.cos(w * p[1])) * (a * w * torch.sin(w * p[0]))
    det = jacobian_determinant(u)[0, 0]
    interior = (slice(1, -1), slice(1, -1))
    # central differences: error O(w^2 / 6) relative on each derivative
    assert torch.allclose(det[interior], analytic[interior], atol=5 * (a * w) ** 2 * w**2 / 6)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="channels"):
        jacobian_determinant(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="shape"):
        jacobian_determinant(torch.zeros(8, 8))
    assert math.isclose(float(jacobian_determinant(torch.zeros(1, 2, 1, 5)).min()), 1.0)
