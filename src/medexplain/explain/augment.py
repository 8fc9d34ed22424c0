"""Random geometric transforms (2D/3D) and the ``augmented:<name>`` explainer wrapper.

Charachon et al. (METHODS.md section 4) regularise their generators with random geometric
augmentation (small rotation, zoom 0.8-1, flips) and report that the same augmentation also
improves other explanation methods. Medical images are usually aligned (registered volumes,
fundus photographs mirrored to one eye), where a left-right flip moves one side's evidence to
the other: by default nothing is flipped or zoomed and rotations stay within +-5 degrees (the
similar/adversarial generator's rotation); zoom and flips are opt-in. This module provides
both:

- :class:`RandomAffine`: random affine matrices in the normalised coordinates of
  :func:`torch.nn.functional.affine_grid` (``align_corners=False``), one code path for 2D
  and 3D; :func:`warp` applies them and :func:`invert_affine` undoes them;
- :func:`augmented` (registered as the wrapper ``"augmented"``): explain ``n`` randomly
  transformed copies of each image with an inner explainer, map every result back to the
  original geometry with the inverse transform, and average (weighted by how much of each
  back-mapped copy lies inside the transformed field of view, so borders that a zoomed copy
  never saw are not diluted with zeros).

>>> maps = create("augmented:integrated_gradients", model, n=8, n_steps=32)(x, target)

Batch invariance: the ``n`` transforms are drawn once from a generator seeded by ``seed``
and applied identically to every image of the batch, so an image's map never depends on
its batch neighbours.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.model import seeded_generator
from ..core.spatial import check_dims, spatial_dims_of
from .base import Explainer, create, register_wrapper

PADDING_MODES = ("zeros", "border", "reflection")


@dataclass
class RandomAffine:
    """Distribution of random affine transforms about the image centre.

    Defaults keep aligned images aligned: +-5 degrees per rotation plane (1 plane in 2D, 3 in
    3D, the rotation of the successor code of Charachon et al.; their paper says "small
    rotation, zoom 0.8-1, flips" without a range), no zoom and no flips
    (``zoom=(0.8, 1.0)`` adds their zoom). :meth:`all_flips` (preset ``"all_flips"``) is the
    former default: +-10 degrees, zoom 0.8-1 and random flips of every axis.

    - ``rotation``: maximum absolute angle in degrees, uniform in ``[-rotation, rotation]``
      for each plane; rotations are in physical (pixel) units, so non-square images rotate
      rigidly;
    - ``zoom``: ``(low, high)`` zoom factor, uniform; a factor ``s <= 1`` samples the central
      ``s`` fraction of the image, i.e. magnifies it (``(1, 1)`` = no zoom);
    - ``flip``: ``True`` flips every spatial axis independently with probability 1/2,
      ``False`` none (default), or a tuple of spatial axes (0 = first spatial dim) to flip
      randomly;
    - ``translate``: maximum shift as a fraction of the image size per axis (0 = none);
    - ``padding_mode``: how :func:`warp` fills samples outside the image when augmenting
      images (``"border"`` default; maps are always mapped back with zeros + coverage).
    """

    rotation: float = 5.0
    zoom: tuple[float, float] = (1.0, 1.0)
    flip: bool | tuple[int, ...] = False
    translate: float = 0.0
    padding_mode: str = "border"

    def __post_init__(self) -> None:
        if self.rotation < 0:
            raise ValueError(f"rotation must be >= 0 degrees, got {self.rotation}")
        zoom = tuple(float(z) for z in self.zoom)
        if len(zoom) != 2 or not 0 < zoom[0] <= zoom[1]:
            raise ValueError(f"zoom must be (low, high) with 0 < low <= high, got {self.zoom}")
        self.zoom = zoom  # type: ignore[assignment]
        if not isinstance(self.flip, bool):
            self.flip = tuple(int(a) for a in self.flip)
        if self.translate < 0:
            raise ValueError(f"translate must be >= 0, got {self.translate}")
        if self.padding_mode not in PADDING_MODES:
            raise ValueError(
                f"padding_mode must be one of {PADDING_MODES}, got {self.padding_mode!r}"
            )

    @classmethod
    def flips_only(cls) -> RandomAffine:
        """Random flips of every axis, nothing else (exactly invertible)."""
        return cls(rotation=0.0, zoom=(1.0, 1.0), flip=True, translate=0.0)

    @classmethod
    def all_flips(cls) -> RandomAffine:
        """Rotation +-10 degrees, zoom 0.8-1 and random flips of every axis (mirrors left and
        right: for data that is not aligned)."""
        return cls(rotation=10.0, zoom=(0.8, 1.0), flip=True, translate=0.0)

    @classmethod
    def none(cls) -> RandomAffine:
        """The identity transform."""
        return cls(rotation=0.0, zoom=(1.0, 1.0), flip=False, translate=0.0)

    def flip_axes(self, dims: int) -> tuple[int, ...]:
        if self.flip is True:
            return tuple(range(dims))
        if self.flip is False:
            return ()
        bad = [a for a in self.flip if not 0 <= a < dims]
        if bad:
            raise ValueError(f"flip axes {bad} out of range for {dims} spatial dims")
        return tuple(self.flip)

    def sample(
        self,
        n: int,
        spatial: Sequence[int],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """``n`` random matrices ``(n, d, d+1)`` for images of size ``spatial`` (``d`` dims).

        Matrices follow :func:`torch.nn.functional.affine_grid`: they map output coordinates
        (in ``x, y[, z]`` order = reversed spatial order) to input coordinates. Random numbers
        come from ``generator`` (a CPU generator, for results independent of the device).
        """
        spatial = tuple(int(s) for s in spatial)
        dims = check_dims(len(spatial))
        g = generator

        def uniform(*shape: int) -> torch.Tensor:
            return torch.rand(*shape, generator=g, dtype=torch.float64)

        # Half-sizes in affine_grid's (x, y, z) axis order: physical = normalised * half.
        half = torch.tensor(spatial[::-1], dtype=torch.float64) / 2
        rotation = torch.eye(dims, dtype=torch.float64).repeat(n, 1, 1)
        planes = [(i, j) for i in range(dims) for j in range(i + 1, dims)]
        angles = (2 * uniform(n, len(planes)) - 1) * math.radians(self.rotation)
        for p, (i, j) in enumerate(planes):
            plane = torch.eye(dims, dtype=torch.float64).repeat(n, 1, 1)
            c, s = torch.cos(angles[:, p]), torch.sin(angles[:, p])
            plane[:, i, i], plane[:, i, j], plane[:, j, i], plane[:, j, j] = c, -s, s, c
            rotation = plane @ rotation
        linear = (rotation * half.view(1, 1, dims)) / half.view(1, dims, 1)  # D^-1 R D
        low, high = self.zoom
        zoom = low + (high - low) * uniform(n)
        signs = torch.ones(n, dims, dtype=torch.float64)
        for axis in self.flip_axes(dims):
            flip = uniform(n) < 0.5
            signs[flip, dims - 1 - axis] = -1.0  # spatial axis -> affine_grid column
        linear = linear * (zoom.view(n, 1, 1) * signs.view(n, 1, dims))
        shift = (2 * uniform(n, dims) - 1) * 2 * self.translate
        theta = torch.cat([linear, shift.unsqueeze(2)], dim=2)
        return theta.to(device=device or "cpu", dtype=torch.float32)


def invert_affine(theta: torch.Tensor) -> torch.Tensor:
    """Inverse of affine matrices ``(n, d, d+1)``: ``[A t]^-1 = [A^-1, -A^-1 t]``."""
    linear, shift = theta[..., :-1].double(), theta[..., -1:].double()
    inverse = torch.linalg.inv(linear)
    return torch.cat([inverse, -inverse @ shift], dim=-1).to(theta.dtype)


def warp(
    x: torch.Tensor, theta: torch.Tensor, padding_mode: str = "zeros", mode: str = "bilinear"
) -> torch.Tensor:
    """Resample ``x`` ``(B, C, *spatial)`` with affine matrices ``theta`` ``(B or 1, d, d+1)``.

    ``out(p) = x(theta @ [p, 1])`` in normalised coordinates (``align_corners=False``);
    ``mode="bilinear"`` is trilinear for 3D inputs (PyTorch's naming).
    """
    dims = spatial_dims_of(x)
    if theta.dim() != 3 or tuple(theta.shape[1:]) != (dims, dims + 1):
        raise ValueError(
            f"theta must have shape (B, {dims}, {dims + 1}) for {dims}D images, "
            f"got {tuple(theta.shape)}"
        )
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    theta = theta.to(device=x.device, dtype=x.dtype)
    if theta.shape[0] == 1 and x.shape[0] != 1:
        theta = theta.expand(x.shape[0], -1, -1)
    if theta.shape[0] != x.shape[0]:
        raise ValueError(f"theta has {theta.shape[0]} matrices for a batch of {x.shape[0]}")
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode=padding_mode, align_corners=False)


#: Preset name -> the transform distribution it names.
PRESETS = {
    "default": RandomAffine,
    "flips": RandomAffine.flips_only,
    "all_flips": RandomAffine.all_flips,
    "none": RandomAffine.none,
}


def as_random_affine(transforms: RandomAffine | Mapping[str, Any] | str | None) -> RandomAffine:
    """Accept a :class:`RandomAffine`, a dict of its fields, a preset name (:data:`PRESETS`:
    ``"default"``, ``"flips"``, ``"all_flips"``, ``"none"``) or None (the default)."""
    if transforms is None:
        return RandomAffine()
    if isinstance(transforms, RandomAffine):
        return transforms
    if isinstance(transforms, str) and transforms in PRESETS:
        return PRESETS[transforms]()
    if isinstance(transforms, Mapping):
        known = {f.name for f in fields(RandomAffine)}
        unknown = set(transforms) - known
        if unknown:
            raise ValueError(
                f"transforms has unknown fields {sorted(unknown)}; known: {sorted(known)}"
            )
        return RandomAffine(**transforms)
    raise TypeError(
        f"transforms must be a RandomAffine, a dict of its fields or one of {tuple(PRESETS)}; "
        f"got {transforms!r}"
    )


class AugmentedExplainer(Explainer):
    """Average an inner explainer's maps over ``n`` random geometric transforms.

    For each of ``n`` transforms ``T_k`` (the same for every image, seeded by ``seed``):
    ``m_k = T_k^-1(inner(T_k(x), target))``; the result is ``sum_k m_k / sum_k c_k`` where
    ``c_k = T_k^-1(1)`` is the part of the original image that copy k saw (0 where no copy
    saw a pixel). The target is the one of the original image (with ``target=None``, the
    class predicted on the untransformed image). Maps keep the inner explainer's sign.
    """

    def __init__(
        self,
        inner: Explainer,
        *,
        n: int = 8,
        transforms: RandomAffine | Mapping[str, Any] | str | None = None,
        batch_size: int | None = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(inner, Explainer):
            raise TypeError(f"inner must be an Explainer, got {type(inner).__name__}")
        super().__init__(
            inner.model,
            batch_size=inner.batch_size if batch_size is None else batch_size,
            seed=seed,
        )
        if int(n) < 1:
            raise ValueError(f"n must be >= 1 transformed copies, got {n}")
        self.inner = inner
        self.n = int(n)
        self.transforms = as_random_affine(transforms)
        self.signed = inner.signed  # type: ignore[misc]
        self.name = f"augmented:{inner.name}"  # type: ignore[misc]

    def matrices(self, spatial: Sequence[int]) -> torch.Tensor:
        """The ``n`` transforms ``(n, d, d+1)`` used for images of size ``spatial``."""
        return self.transforms.sample(self.n, spatial, seeded_generator(self.seed, "cpu"))

    def _attribute(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        thetas = self.matrices(x.shape[2:]).to(x.device)
        ones = torch.ones((1, 1, *x.shape[2:]), device=x.device, dtype=x.dtype)
        total = torch.zeros((x.shape[0], 1, *x.shape[2:]), device=x.device, dtype=x.dtype)
        coverage = torch.zeros_like(ones)
        for theta in thetas:
            theta = theta.unsqueeze(0)
            inverse = invert_affine(theta)
            maps = self.inner(warp(x, theta, self.transforms.padding_mode), targets)
            total += warp(maps.to(x.dtype), inverse, "zeros")
            coverage += warp(ones, inverse, "zeros")
        seen = coverage > 1e-6
        return torch.where(seen, total / coverage.clamp_min(1e-6), torch.zeros_like(total))

    def __repr__(self) -> str:
        return (
            f"AugmentedExplainer(inner={self.inner!r}, n={self.n}, transforms={self.transforms}, "
            f"seed={self.seed})"
        )


@register_wrapper(
    "augmented",
    "average of an explainer over random rotations/zooms/flips mapped back (Charachon et al.)",
)
def augmented(
    explainer_or_name: str | Explainer,
    model: nn.Module | None = None,
    *,
    n: int = 8,
    transforms: RandomAffine | Mapping[str, Any] | str | None = None,
    rotation: float | None = None,
    zoom: Sequence[float] | None = None,
    flip: bool | Sequence[int] | None = None,
    seed: int = 0,
    **inner_params: Any,
) -> AugmentedExplainer:
    """Wrap an explainer (a registered name, or an instance) in :class:`AugmentedExplainer`.

    ``create("augmented:integrated_gradients", model, n=8, **inner_params)`` calls this with
    the inner name; ``inner_params`` (including ``batch_size`` and ``seed``) go to the inner
    explainer, ``seed`` also seeds the transforms. ``n = 8`` copies is our default (the paper
    does not fix it). With an instance, ``model`` may be omitted and ``inner_params`` must be
    empty; a different ``model`` raises.

    The transforms: ``transforms`` (a :class:`RandomAffine`, a dict of its fields or a
    preset name; default: +-5 degrees, no zoom, no flips), then ``rotation`` (maximum
    degrees), ``zoom`` (``(low, high)``) and ``flip`` (True = every axis, a list of spatial
    axes, False) replace its fields when given: ``flip=True, rotation=10, zoom=(0.8, 1)`` is
    the former default.
    """
    overrides = {"rotation": rotation, "zoom": zoom, "flip": flip}
    chosen = {k: v for k, v in overrides.items() if v is not None}
    if chosen:
        transforms = replace(as_random_affine(transforms), **chosen)
    if isinstance(explainer_or_name, Explainer):
        if inner_params:
            raise ValueError(
                f"inner parameters {sorted(inner_params)} can only be given with an explainer name"
            )
        if model is not None and model is not explainer_or_name.model:
            raise ValueError("model differs from the model of the given explainer instance")
        inner = explainer_or_name
    elif isinstance(explainer_or_name, str):
        if model is None:
            raise ValueError("model is required when the explainer is given by name")
        inner = create(explainer_or_name, model, seed=seed, **inner_params)
    else:
        raise TypeError(
            "explainer_or_name must be a registered explainer name or an Explainer, "
            f"got {type(explainer_or_name).__name__}"
        )
    return AugmentedExplainer(inner, n=n, transforms=transforms, seed=seed)
