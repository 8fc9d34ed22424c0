"""Brain MRI cohort on the MNI152 T1 template: healthy, medial temporal atrophy, WM lesions.

Anatomy: nilearn's bundled ICBM 2009a nonlinear symmetric MNI152 template (T1 and its brain,
grey- and white-matter masks at 2 mm), read offline from the installed package (no
``fetch_*``). Each image lives on a coarse grid in MNI space: voxel ``(i, j, k)`` of a
``(X, Y, Z)`` volume sits at world point ``affine @ (i, j, k, 1)`` (mm, RAS: x to the right,
y forwards, z upwards); the affine is the template's with its diagonal scaled to the
chosen spacing (default 4 mm) and its origin moved to the corner of the brain's bounding box
plus a margin. Tensors hold the volume in that ``(i, j, k)`` order, so the affine applies
unchanged when writing NIfTI (:func:`save_cohort_nifti`, sform code MNI).
``dims=2`` gives one axial slice ``(X, Y)`` through both hippocampi (``z = -14`` mm).

Per subject (drawn from one seeded generator, bounded uniform draws): a small rotation and
scale about the brain centre, a shift, a smooth displacement (Gaussian partition-of-unity
interpolation of a few control values, at most ``MAX_DISPLACEMENT_MM``: its gradient stays
far below 1, so the map is a diffeomorphism), a smooth multiplicative bias field, Gaussian
noise. Intensities are clipped to ``[0, 1]``, the range of the template's intensities.

Classes (label: name):

- 0 ``"healthy"``: no effect, empty evidence, Jacobian 1 everywhere;
- 1 ``"atrophy"``: both medial temporal lobes shrink around the hippocampi (ellipsoids centred
  at MNI ``(-26, -22, -14)`` and ``(26, -22, -14)`` mm). The subject's image is its healthy
  image pulled back through ``psi(p) = p + a g(r) (p - c)`` with ``r`` the ellipsoidal radius
  ``|(p - c) / R|``, ``g = (1 - r^2)^3`` for ``r < 1`` and 0 beyond (exactly the identity
  there), ``a > 0`` per side. The tissue map healthy -> subject has Jacobian determinant
  ``J = 1 / det(D psi) = (1 + a g)^(1 - d) / (1 + a g + a r g'(r))``: ``J = (1 + a)^-d < 1``
  at the centre, ``J > 1`` in a shell around it (the surrounding tissue and CSF, among
  them the temporal horn of the lateral ventricle, expand: the ellipsoid keeps its volume),
  ``J = 1`` beyond ``R``. ``extra["jacobian"]`` holds ``J`` per voxel; evidence is the
  ellipsoid inside which ``|log J| > LOG_J_THRESHOLD`` (filled across the surface where
  ``J`` crosses 1);
- 2 ``"lesion"``: two to four bright smooth blobs (white-matter hyperintensities) centred in
  the eroded white matter of one lobe (``lobe``), added only where the subject's WM mask is;
  evidence is the blobs' support inside that mask. Hyperintense as on FLAIR/T2 by default;
  on T1 such lesions look dark, which ``lesion_polarity="dark"`` gives.

``effects=False`` renders the same subjects without their effect (same deformation, bias and
noise): the healthy counterfactual. Outside the evidence mask it equals the image exactly
for lesions, and for atrophy up to the sub-voxel displacement left where
``|log J| <= LOG_J_THRESHOLD`` (a few micrometres at most). No paper
fixes these constants; they are chosen so that a small classifier separates the classes at
``strength=1`` on the 4 mm grid, with effects of a clinically plausible place and size.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ...core.spatial import max_pool
from ..deform import random_rotation_scale, uniform
from .base import Cohort
from .mni import (
    SLICE_Z_MM,
    cohort_geometry,
    grid_sample_coordinates,
    load_mni152,
    sample_template,
    save_cohort_nifti,
    smooth_field,
    template_channels,
    world_points,
)

__all__ = [
    "BRAIN_CLASSES",
    "HIPPOCAMPI_MNI",
    "LOBES",
    "atrophy_displacement",
    "atrophy_jacobian",
    "make_brain",
    "save_cohort_nifti",
]

BRAIN_CLASSES = ("healthy", "atrophy", "lesion")
# Hippocampal centres in MNI mm (left, right) and the half-axes of the atrophy ellipsoid
# (x, y, z): the hippocampus is about 40 mm long front to back and 10-15 mm across.
HIPPOCAMPI_MNI = ((-26.0, -22.0, -14.0), (26.0, -22.0, -14.0))
ATROPHY_RADII_MM = (18.0, 28.0, 18.0)
ATROPHY_AMPLITUDE = (0.5, 0.7)  # a: J at the centre is (1 + a)^-3, about 0.30-0.20 in 3D
LOG_J_THRESHOLD = 0.01
# Lobes as MNI boxes (lo, hi) per axis in mm, coarse but anatomically on the right side.
LOBES = {
    "frontal": ((-90.0, 90.0), (0.0, 90.0), (-40.0, 90.0)),
    "parietal": ((-90.0, 90.0), (-75.0, -25.0), (20.0, 90.0)),
    "occipital": ((-90.0, 90.0), (-120.0, -70.0), (-20.0, 60.0)),
    "temporal": ((-90.0, 90.0), (-70.0, 5.0), (-50.0, 0.0)),
}
LESION_COUNT = (2, 4)
# Blobs of 6-10 mm (1.5-2.5 voxels at 4 mm) were not learnable in 3D within minutes (a
# DenseNet reached lesion-vs-rest AUC 0.7-0.8 on 600 volumes); 10-16 mm, the size of
# confluent periventricular lesions, reach 0.99.
LESION_RADIUS_MM = (10.0, 16.0)
LESION_CONTRAST = (0.25, 0.35)  # added to the template intensity (WM is about 0.78)
MAX_ANGLE = 0.04  # radians, about 2.3 degrees
MAX_SCALE = 0.03
MAX_SHIFT_MM = 2.0
MAX_DISPLACEMENT_MM = 3.0
CONTROL_POINTS = 4
MAX_LOG_BIAS = 0.1
CHUNK = 16  # subjects per rendering chunk (bounds the memory of the sampling grids)


def _bump(points: torch.Tensor, centre: torch.Tensor, radii: torch.Tensor):
    """``s = r^2`` (ellipsoidal) and ``g = (1 - s)^3`` inside, 0 outside: ``(*S,)`` each."""
    s = (((points - centre) / radii) ** 2).sum(-1)
    return s, torch.where(s < 1.0, (1.0 - s).clamp_min(0.0) ** 3, torch.zeros_like(s))


def atrophy_displacement(
    points: torch.Tensor, centre: torch.Tensor, radii: torch.Tensor, amplitude: torch.Tensor
) -> torch.Tensor:
    """Pull-back displacement ``psi(p) - p = a g(r) (p - c)`` in mm: ``(n, *S, d)``.

    points ``(*S, d)`` world mm; centre and radii ``(d,)`` mm; amplitude ``(n,)``.
    Exactly zero where ``r >= 1``.
    """
    _, g = _bump(points, centre, radii)
    a = amplitude.view(-1, *[1] * (points.dim() - 1), 1)
    return a * g[None, ..., None] * (points - centre)[None]


def atrophy_jacobian(
    points: torch.Tensor, centre: torch.Tensor, radii: torch.Tensor, amplitude: torch.Tensor
) -> torch.Tensor:
    """Jacobian determinant of the tissue map healthy -> subject at each voxel, ``(n, *S)``.

    ``J = 1 / det(D psi) = (1 + a g)^(1 - d) / (1 + a g - 6 a s (1 - s)^2)`` with
    ``s = r^2`` (``r g'(r) = -6 s (1 - s)^2``); exactly 1 where ``r >= 1``. The denominator
    stays positive for ``a < 1.5`` (``g + r g'`` is at least about -0.65), so nothing folds.
    """
    d = points.shape[-1]
    s, g = _bump(points, centre, radii)
    a = amplitude.view(-1, *[1] * (points.dim() - 1)).to(torch.float64)
    s, g = s.to(torch.float64)[None], g.to(torch.float64)[None]
    radial = 1.0 + a * g - 6.0 * a * s * torch.where(s < 1, (1.0 - s) ** 2, 0.0)
    return ((1.0 + a * g) ** (1 - d) / radial).float()


def _evidence_radius(amplitude: torch.Tensor, dims: int) -> torch.Tensor:
    """Per amplitude, the ellipsoidal radius beyond which ``|log J| <= LOG_J_THRESHOLD``."""
    r = torch.linspace(0.0, 1.0, 4001)
    line = torch.stack([r, torch.zeros_like(r), torch.zeros_like(r)][:dims], dim=-1)
    unit = torch.ones(dims)
    log_j = atrophy_jacobian(line, torch.zeros(dims), unit, amplitude).log().abs()
    above = log_j > LOG_J_THRESHOLD
    last = torch.where(above, torch.arange(r.numel()), torch.zeros(r.numel(), dtype=torch.long))
    return r[last.max(dim=1).values]


def _lesion_candidates(shape, affine, dims: int, lobe: str) -> tuple[torch.Tensor, torch.Tensor]:
    """World points ``(K, d)`` of the lobe's eroded WM (lesion centres) and the lobe's WM
    mask ``(1, *S)`` on the unwarped grid (the lesion class's template region)."""
    if lobe not in LOBES:
        raise ValueError(f"lobe must be one of {sorted(LOBES)}, got {lobe!r}")
    volumes, _ = load_mni152()
    points = world_points(shape, affine, dims)
    wm = sample_template(torch.from_numpy(volumes[3:4])[None], points[None])[0, 0] >= 0.5
    box = torch.ones(shape, dtype=torch.bool)
    for axis, (lo, hi) in enumerate(LOBES[lobe][:dims]):
        box &= (points[..., axis] >= lo) & (points[..., axis] <= hi)
    if dims == 2:
        lo, hi = LOBES[lobe][2]
        box &= lo <= SLICE_Z_MM <= hi
    region = wm & box
    dilate_gaps = max_pool(dims)(3, stride=1, padding=1)
    eroded = ~dilate_gaps((~wm)[None, None].float())[0, 0].bool() & box
    if not eroded.any():
        raise ValueError(f"no white matter of the {lobe} lobe on this grid")
    return points[eroded], region[None]


def _draw_subjects(g: torch.Generator, n: int, dims: int, strength: float, n_candidates: int):
    """Every random quantity of ``n`` subjects, drawn in a fixed order whatever the class."""
    k = LESION_COUNT[1]
    controls = [CONTROL_POINTS] * dims
    draws = {
        "labels": (torch.arange(n) % len(BRAIN_CLASSES))[torch.randperm(n, generator=g)],
        "matrix": random_rotation_scale(g, n, dims, MAX_ANGLE, MAX_SCALE),
        "shift": uniform(g, (n, dims), -MAX_SHIFT_MM, MAX_SHIFT_MM),
        "control": uniform(g, (n, dims, *controls), -MAX_DISPLACEMENT_MM, MAX_DISPLACEMENT_MM),
        "log_bias": uniform(g, (n, 1, *controls), -MAX_LOG_BIAS, MAX_LOG_BIAS),
        "amplitude": uniform(g, (n, 2), *ATROPHY_AMPLITUDE) * strength,
        "count": torch.randint(LESION_COUNT[0], k + 1, (n,), generator=g),
        "centre": torch.randint(n_candidates, (n, k), generator=g),
        "radius": uniform(g, (n, k), *LESION_RADIUS_MM),
        "contrast": uniform(g, (n, k), *LESION_CONTRAST) * strength,
        "noise_seed": int(torch.randint(2**62, (1,), generator=g)),
    }
    draws["amplitude"] = draws["amplitude"] * (draws["labels"] == 1)[:, None]
    draws["active"] = torch.arange(k)[None] < draws["count"][:, None]
    return draws


def _atrophy(points: torch.Tensor, amplitude: torch.Tensor):
    """Both medial temporal atrophies of ``m`` subjects on the grid ``points`` ``(*S, d)``.

    Returns the flat voxel indices of the two supports ``(K,)`` (disjoint ellipsoids), the
    pull-back displacement there ``(m, K, d)`` mm, the Jacobian ``(m, *S)`` (1 outside the
    supports) and the evidence ``(m, *S)`` (only for subjects with ``a > 0``).
    """
    dims = points.shape[-1]
    flat = points.reshape(-1, dims)
    m = amplitude.shape[0]
    jacobian = torch.ones(m, flat.shape[0])
    evidence = torch.zeros(m, flat.shape[0], dtype=torch.bool)
    radii = torch.tensor(ATROPHY_RADII_MM[:dims])
    supports, displacements = [], []
    for side, centre_mm in enumerate(HIPPOCAMPI_MNI):
        centre, a = torch.tensor(centre_mm[:dims]), amplitude[:, side]
        s, _ = _bump(flat, centre, radii)
        index = torch.nonzero(s < 1.0).flatten()
        inside = flat[index]
        displacements.append(atrophy_displacement(inside, centre, radii, a))
        jacobian[:, index] = atrophy_jacobian(inside, centre, radii, a)
        extent = _evidence_radius(a, dims)[:, None] ** 2
        evidence[:, index] = (s[index][None] < extent) & (a > 0)[:, None]
        supports.append(index)
    shape = (m, *points.shape[:-1])
    return (
        torch.cat(supports),
        torch.cat(displacements, dim=1),
        jacobian.view(shape),
        evidence.view(shape),
    )


def _lesions(points: torch.Tensor, centres: torch.Tensor, draws: dict, index: torch.Tensor):
    """Added intensity ``(m, *S)``: per voxel the largest ``contrast (1 - r^2/rho^2)^2`` of
    the subject's active blobs (0 outside every blob and for non-lesion subjects), times the
    polarity ``draws["sign"]`` (-1 for dark lesions; the largest is taken before the sign,
    so overlapping dark blobs darken as much as bright ones brighten)."""
    dims = points.shape[-1]
    out = torch.zeros(len(index), *points.shape[:-1])
    rows = torch.nonzero(draws["labels"][index] == 2).flatten()
    if len(rows) == 0:
        return out
    chosen = index[rows]
    c = centres[draws["centre"][chosen]]  # (l, k, d)
    r2 = ((points[None, None] - c.view(*c.shape[:2], *[1] * dims, dims)) ** 2).sum(-1)
    rho2 = draws["radius"][chosen].view(*c.shape[:2], *[1] * dims) ** 2
    profile = (1.0 - r2 / rho2).clamp_min(0.0) ** 2
    weight = draws["contrast"][chosen] * draws["active"][chosen]
    out[rows] = (profile * weight.view(*weight.shape, *[1] * dims)).amax(dim=1)
    return out * draws.get("sign", 1.0)


def _subject_field(points, affine, shape, control, support, displacement):
    """Subject displacement ``(m, *S, d)`` mm evaluated at ``psi(p)``.

    Where the atrophy moves nothing this is the smooth field on the grid itself (bitwise the
    same as without the atrophy); inside it the field is linearly interpolated at ``psi(p)``.
    """
    dims = points.shape[-1]
    field = smooth_field(control, shape)  # (m, d, *S)
    m = field.shape[0]
    flat = field.movedim(1, -1).reshape(m, -1, dims).clone()
    if displacement is None or support.numel() == 0:
        return flat.view(m, *shape, dims)
    q = points.reshape(-1, dims)[support][None] + displacement  # (m, K, d)
    grid = grid_sample_coordinates(q, affine, shape).view(m, *[1] * (dims - 1), -1, dims)
    sampled = F.grid_sample(
        field, grid, mode="bilinear", padding_mode="border", align_corners=True
    ).reshape(m, dims, -1)
    moved = (displacement != 0).any(-1, keepdim=True)
    flat[:, support] = torch.where(moved, sampled.transpose(1, 2), flat[:, support])
    return flat.view(m, *shape, dims)


def _render_chunk(index, points, shape, affine, draws, centres, noise_gen, options, atrophy):
    """Images, evidence, Jacobian and subject WM mask ``(m, *S)`` of the subjects at ``index``.

    ``options``: ``effects``, ``noise`` (standard deviation), ``spacing`` (mm, for the
    template's anti-aliasing blur).
    """
    dims = points.shape[-1]
    support, displacement = atrophy[0], atrophy[1][index] if options["effects"] else None
    field = _subject_field(points, affine, shape, draws["control"][index], support, displacement)
    q = points[None].repeat(len(index), *[1] * (dims + 1))
    if displacement is not None:
        q.view(len(index), -1, dims)[:, support] += displacement
    origin = points.flatten(0, -2).mean(0)
    moved = torch.bmm(
        (q - origin).view(len(index), -1, dims), draws["matrix"][index].transpose(1, 2)
    )
    shift = origin + draws["shift"][index].view(-1, *[1] * dims, dims)
    world = moved.view(q.shape) + shift + field
    channels = template_channels(options["spacing"])
    sampled = sample_template(channels, world)
    t1, wm = sampled[:, 0], sampled[:, 1] >= 0.5
    added = _lesions(points, centres, draws, index) * wm
    bias = torch.exp(smooth_field(draws["log_bias"][index], shape))[:, 0]
    noise = torch.randn(t1.shape, generator=noise_gen) * options["noise"]
    lesion = added if options["effects"] else torch.zeros_like(added)
    image = ((t1 + lesion) * bias + noise).clamp(0.0, 1.0)
    return image, atrophy[3][index] | (added != 0), wm


def _config(call: dict, shape: tuple[int, ...]) -> dict:
    """The call's parameters and the geometry and constants a reader of the ground truth needs."""
    return {
        "cohort": "brain",
        **call,
        "shape": tuple(shape),
        "value_range": (0.0, 1.0),
        "atrophy_centres_mm": HIPPOCAMPI_MNI,
        "atrophy_radii_mm": ATROPHY_RADII_MM,
        "log_j_threshold": LOG_J_THRESHOLD,
        "slice_z_mm": SLICE_Z_MM if call["dims"] == 2 else None,
        "template": "MNI152 ICBM 2009a nonlinear symmetric (nilearn), 2 mm",
    }


def make_brain(
    n: int = 200,
    size: int | tuple[int, ...] | None = None,
    seed: int = 0,
    *,
    dims: int = 3,
    spacing: float = 4.0,
    strength: float = 1.0,
    noise: float = 0.02,
    lobe: str = "frontal",
    lesion_polarity: str = "bright",
    effects: bool = True,
) -> Cohort:
    """Brain MRI cohort in MNI space (classes and ground truth in the module docstring).

    Returns a :class:`Cohort` with ``images`` ``(n, 1, *S)`` float32 in ``[0, 1]``, ``S`` =
    ``(X, Y, Z)`` (39 x 47 x 41 at the default 4 mm; ``size`` fixes the shape instead)
    or ``(X, Y)`` for ``dims=2``; ``labels`` balanced over ``BRAIN_CLASSES``; ``evidence``
    ``(n, 1, *S)``; ``regions`` ``{"atrophy": both evidence ellipsoids at the mean
    amplitude, "lesion": the lobe's white matter}`` ``(1, *S)``; ``affine`` ``(4, 4)`` voxel to
    MNI mm; ``extra``: ``"jacobian"`` ``(n, 1, *S)`` (1 except in atrophy subjects),
    ``"wm"`` ``(n, 1, *S)`` bool (the subject's white-matter mask), ``"atrophy_amplitude"``
    ``(n, 2)`` (``a`` for left and right, 0 outside the atrophy class). ``strength`` scales
    both effects (``>= 0``); ``lesion_polarity="dark"`` gives T1-like hypointense lesions;
    ``effects=False`` gives the healthy counterfactuals of the same subjects.
    """
    if n < 1 or not strength >= 0 or not noise >= 0:
        raise ValueError(f"need n >= 1, strength >= 0, noise >= 0; got {n}, {strength}, {noise}")
    if lesion_polarity not in ("bright", "dark"):
        raise ValueError(f"lesion_polarity must be 'bright' or 'dark', got {lesion_polarity!r}")
    shape, affine = cohort_geometry(dims, spacing, size)
    points = world_points(shape, affine, dims)
    centres, lobe_region = _lesion_candidates(shape, affine, dims, lobe)
    g = torch.Generator().manual_seed(seed)
    draws = _draw_subjects(g, n, dims, strength, len(centres))
    draws["sign"] = -1.0 if lesion_polarity == "dark" else 1.0
    noise_gen = torch.Generator().manual_seed(draws["noise_seed"])
    step = float(np.abs(np.diag(affine)[:dims]).max())
    options = {"effects": effects, "noise": noise, "spacing": step}
    atrophy = _atrophy(points, draws["amplitude"])
    parts = [
        _render_chunk(index, points, shape, affine, draws, centres, noise_gen, options, atrophy)
        for index in torch.arange(n).split(CHUNK)
    ]
    images, evidence, wm = (torch.cat(p)[:, None] for p in zip(*parts))
    jacobian = atrophy[2][:, None]
    mean_amplitude = torch.full((1, 2), sum(ATROPHY_AMPLITUDE) / 2 * max(strength, 1e-6))
    atrophy_region = _atrophy(points, mean_amplitude)[3]
    call = {"n": n, "seed": seed, "dims": dims, "spacing": spacing, "size": size}
    call |= {"strength": strength, "noise": noise, "lobe": lobe, "effects": effects}
    config = _config(call | {"lesion_polarity": lesion_polarity}, shape)
    return Cohort(
        images=images.float(),
        labels=draws["labels"].long(),
        evidence=evidence,
        class_names=BRAIN_CLASSES,
        regions={"atrophy": atrophy_region, "lesion": lobe_region},
        affine=affine,
        extra={"jacobian": jacobian, "wm": wm, "atrophy_amplitude": draws["amplitude"]},
        config=config,
    )
