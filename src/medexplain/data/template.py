"""The anatomy-like template of the synthetic benchmark, defined once for 2D and 3D.

Everything lives in normalised template coordinates in ``[-1, 1]`` per axis, ordered like
the last axis of a :func:`torch.nn.functional.grid_sample` grid: ``(x, y)`` in 2D, ``(x, y, z)``
in 3D, where ``x`` runs along the last tensor axis (width), ``y`` along height and ``z`` along
depth. Pixel ``i`` of an axis of length ``S`` sits at ``-1 + 2 i / (S - 1)``
(``align_corners=True``). Shapes are written for 3D and truncated to the first ``dims``
coordinates for 2D, so the 2D template is exactly the ``z = 0`` slice of the 3D one.

Layout (image coordinates, ``y`` grows downwards, no paper fixes any of this):

- an ellipsoidal organ with a brighter outer rim ("cortex") and a darker interior;
- a dark central "ventricle";
- two bright round "nuclei", one on each side; the right one (region B) is the structure
  that the atrophy class shrinks;
- region A (upper left) where the lesion class puts its blob; in the redundant variant a
  second region A2 (lower right), far from A and B, is equally sufficient.

Tissues are rendered as a soft partition (channels summing to one), so that each subject
can get its own intensity per tissue by a weighted sum of warped channels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..core.spatial import check_dims

TISSUES = ("background", "rim", "interior", "ventricle", "nucleus")
# Mean intensity of each tissue in [0, 1] (a T1-like contrast; chosen, no paper).
TISSUE_INTENSITY = (0.04, 0.60, 0.42, 0.12, 0.75)


@dataclass(frozen=True)
class Ellipsoid:
    """Axis-aligned ellipsoid: ``center`` and ``semi_axes`` in (x, y, z) template units."""

    center: tuple[float, float, float]
    semi_axes: tuple[float, float, float]


@dataclass(frozen=True)
class Ball:
    """A disk (2D) or ball (3D) of ``radius`` template units around ``center`` (x, y, z)."""

    center: tuple[float, float, float]
    radius: float


@dataclass(frozen=True)
class Layout:
    """Where everything is in the template (all in normalised template units)."""

    organ: Ellipsoid = Ellipsoid((0.0, 0.0, 0.0), (0.84, 0.92, 0.80))
    rim_scale: float = 0.86  # the interior is the organ shrunk by this factor
    ventricle: Ellipsoid = Ellipsoid((0.0, 0.05, 0.0), (0.09, 0.27, 0.18))
    # Right nucleus: shrinks in the atrophy class; its region B is the ball of radius
    # ``atrophy_outer`` around it, outside which the atrophy deformation is exactly identity.
    nucleus: Ball = Ball((0.40, -0.30, 0.0), 0.19)
    atrophy_outer: float = 0.27
    contralateral_nucleus: Ball = Ball((-0.38, 0.38, 0.0), 0.19)
    # Lesion regions: A (A1) always, A2 only in the redundant variant.
    lesion_regions: tuple[Ball, Ball] = (
        Ball((-0.40, -0.38, 0.0), 0.25),
        Ball((0.32, 0.46, 0.0), 0.25),
    )

    def atrophy_region(self) -> Ball:
        return Ball(self.nucleus.center, self.atrophy_outer)


DEFAULT_LAYOUT = Layout()


def center_of(center: Sequence[float], dims: int, device=None) -> torch.Tensor:
    """The first ``dims`` coordinates of an (x, y, z) point as a float32 tensor ``(dims,)``."""
    return torch.tensor(list(center)[:dims], dtype=torch.float32, device=device)


def identity_grid(shape: Sequence[int], device=None) -> torch.Tensor:
    """Template coordinates of every pixel of an image of spatial ``shape``.

    Returns ``(*shape, dims)`` float32 in grid_sample order (x first, i.e. the last tensor
    axis), with ``align_corners=True`` spacing; usable as a grid_sample grid after adding a
    batch axis.
    """
    dims = check_dims(len(shape))
    axes = [torch.linspace(-1.0, 1.0, int(s), device=device) for s in shape]
    mesh = torch.meshgrid(*axes, indexing="ij")  # tensor axis order (D,) H, W
    return torch.stack(mesh[::-1], dim=-1)[..., :dims]


def pixel_size(size: int) -> float:
    """Width of one pixel in template units for an axis of ``size`` pixels."""
    return 2.0 / (int(size) - 1)


def ball_distance(points: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """Euclidean distance of ``points`` ``(..., dims)`` to ``center`` ``(..., dims)``."""
    return (points - center).norm(dim=-1)


def ball_mask(points: torch.Tensor, ball: Ball) -> torch.Tensor:
    """Bool ``points.shape[:-1]``: strictly inside ``ball``."""
    dims = points.shape[-1]
    return ball_distance(points, center_of(ball.center, dims, points.device)) < ball.radius


def soft_ellipsoid(points: torch.Tensor, shape: Ellipsoid, edge: float) -> torch.Tensor:
    """Soft membership in ``[0, 1]`` of ``points`` ``(..., dims)`` in an ellipsoid.

    The signed distance is approximated to first order, ``(q - 1) / |grad q|`` with
    ``q = |(p - c) / a|``, which needs no per-dimension formula; ``edge`` is the width of
    the logistic edge in template units.
    """
    dims = points.shape[-1]
    c = center_of(shape.center, dims, points.device)
    a = center_of(shape.semi_axes, dims, points.device)
    rel = (points - c) / a
    q = rel.norm(dim=-1)
    grad = (rel / a).norm(dim=-1) / q.clamp_min(1e-6)
    sdf = (q - 1.0) / grad.clamp_min(1e-6)
    return torch.sigmoid(-sdf / edge)


def _ball_as_ellipsoid(ball: Ball) -> Ellipsoid:
    return Ellipsoid(ball.center, (ball.radius,) * 3)


def _scaled(shape: Ellipsoid, factor: float) -> Ellipsoid:
    return Ellipsoid(shape.center, tuple(factor * a for a in shape.semi_axes))


def tissue_partition(points: torch.Tensor, edge: float, layout: Layout = DEFAULT_LAYOUT):
    """Soft tissue partition at ``points`` ``(*S, dims)`` -> ``(len(TISSUES), *S)``.

    Channels follow :data:`TISSUES` and sum to one at every point.
    """
    organ = soft_ellipsoid(points, layout.organ, edge)
    inner = torch.minimum(
        soft_ellipsoid(points, _scaled(layout.organ, layout.rim_scale), edge), organ
    )
    ventricle = soft_ellipsoid(points, layout.ventricle, edge)
    nuclei = soft_ellipsoid(points, _ball_as_ellipsoid(layout.nucleus), edge) + soft_ellipsoid(
        points, _ball_as_ellipsoid(layout.contralateral_nucleus), edge
    )
    # Inner structures are disjoint and lie well inside the interior; clip for the soft edges.
    ventricle = torch.minimum(ventricle, inner)
    nuclei = torch.minimum(nuclei, inner - ventricle)
    channels = [1.0 - organ, organ - inner, inner - ventricle - nuclei, ventricle, nuclei]
    return torch.stack(channels, dim=0).clamp_min(0.0)


def render_template(
    dims: int, size: int, oversample: int = 2, layout: Layout = DEFAULT_LAYOUT, device=None
) -> torch.Tensor:
    """The tissue partition on a grid ``oversample`` times finer than the images.

    Returns ``(1, len(TISSUES), *[oversample * size] * dims)`` float32, ready for grid_sample.
    Edges are about one image pixel wide, so that structures are anti-aliased at image size.
    """
    check_dims(dims)
    fine = identity_grid([oversample * int(size)] * dims, device=device)
    edge = 0.35 * pixel_size(size)
    return tissue_partition(fine, edge, layout).unsqueeze(0)


def template_image(dims: int, size: int, layout: Layout = DEFAULT_LAYOUT) -> torch.Tensor:
    """The mean-intensity template ``(1, *[size] * dims)`` (no subject variation)."""
    points = identity_grid([int(size)] * dims)
    parts = tissue_partition(points, 0.35 * pixel_size(size), layout)
    weights = torch.tensor(TISSUE_INTENSITY).view(-1, *[1] * dims)
    return (parts * weights).sum(0, keepdim=True)


def region_masks(
    dims: int, size: int, redundant: bool, layout: Layout = DEFAULT_LAYOUT
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Template regions on the image grid: (lesion parts, atrophy region), each ``(1, *S)`` bool.

    One lesion part (A) unless ``redundant``, then two (A1, A2).
    """
    points = identity_grid([int(size)] * dims)
    count = 2 if redundant else 1
    lesion = [ball_mask(points, ball).unsqueeze(0) for ball in layout.lesion_regions[:count]]
    atrophy = ball_mask(points, layout.atrophy_region()).unsqueeze(0)
    return lesion, atrophy


def marker_mask(dims: int, size: int) -> torch.Tensor:
    """The corner marker: a small square/cube near the top-left (-front) corner, ``(1, *S)``.

    Side ``max(2, round(size / 16))`` pixels, two pixels from the border (like a printed
    letter on a chest X-ray, it is far from the organ and never deformed).
    """
    check_dims(dims)
    side = max(2, math.floor(size / 16 + 0.5))
    offset = 2 if size >= 16 else 0
    mask = torch.zeros((1, *[int(size)] * dims), dtype=torch.bool)
    mask[(slice(None), *[slice(offset, offset + side)] * dims)] = True
    return mask
