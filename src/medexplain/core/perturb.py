"""Image perturbation shared by every method that blends an image with a baseline.

I-GOS/iGOS++ (mask optimisation), SAG (patch visibility), deletion/insertion and
PEPPR all perturb images the same way, so they all call this module:

- baselines: ``blur`` (Gaussian blur of the image, I-GOS default), ``zero``,
  ``mean`` (a dataset mean image, natural for aligned data), a number or any tensor,
  all validated by the one :func:`check_baseline`;
- ``apply_mask(x, baseline, mask)`` = ``x * up(M) + b * (1 - up(M))`` where
  ``up`` is linear upsampling with ``align_corners=True`` (METHODS.md notation
  ``phi(x, b, M)``; ``M = 1`` keeps the image);
- ranking pixels by a map and building the "top fraction" masks used by
  deletion/insertion and PEPPR.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .spatial import gaussian_blur, resize, spatial_dims_of

BASELINES = ("blur", "zero", "mean")

# I-GOS (Qi et al. 2019, authors' code): kernel 51, sigma 50 for 224-pixel images.
_IGOS_REFERENCE_SIZE = 224
_IGOS_KERNEL = 51
_IGOS_SIGMA = 50.0


def igos_blur_parameters(spatial: Sequence[int]) -> tuple[int, float]:
    """(kernel_size, sigma) of the I-GOS blur baseline scaled from 224 px to ``max(spatial)``.

    The authors blur 224 px images with a 51-pixel kernel of sigma 50; a 64 px image gets
    kernel 15 and sigma ~14.3, i.e. the same blur relative to the image.
    """
    scale = max(int(s) for s in spatial) / _IGOS_REFERENCE_SIZE
    kernel = max(3, round(_IGOS_KERNEL * scale))
    if kernel % 2 == 0:
        kernel += 1
    return kernel, _IGOS_SIGMA * scale


def blur_baseline(
    x: torch.Tensor, sigma: float | None = None, kernel_size: int | None = None
) -> torch.Tensor:
    """Gaussian-blurred copy of ``x`` ``(B, C, *spatial)``; I-GOS defaults scaled to the size."""
    spatial_dims_of(x)
    default_kernel, default_sigma = igos_blur_parameters(x.shape[2:])
    sigma = default_sigma if sigma is None else sigma
    kernel_size = default_kernel if kernel_size is None else kernel_size
    return gaussian_blur(x, sigma=sigma, kernel_size=kernel_size)


def check_baseline(baseline: object, mean_image: torch.Tensor | None = None) -> None:
    """Raise unless ``baseline`` is something :func:`make_baseline` accepts.

    Accepted: one of :data:`BASELINES`, a number (a constant image), or a tensor broadcastable
    to the images; ``"mean"`` also needs ``mean_image``. Explainers call this in their
    constructor so that a bad value fails before any work is done.
    """
    if isinstance(baseline, torch.Tensor):
        return
    if isinstance(baseline, bool) or not isinstance(baseline, (str, int, float)):
        raise TypeError(
            f"baseline must be one of {BASELINES}, a number or a tensor, "
            f"got {type(baseline).__name__}"
        )
    if isinstance(baseline, str):
        if baseline not in BASELINES:
            raise ValueError(
                f"baseline must be one of {BASELINES}, a number or a tensor, got {baseline!r}"
            )
        if baseline == "mean" and mean_image is None:
            raise ValueError(
                "baseline='mean' needs mean_image, the dataset mean image of shape (C, *spatial)"
            )


def make_baseline(
    x: torch.Tensor,
    baseline: str | float | torch.Tensor = "blur",
    mean_image: torch.Tensor | None = None,
) -> torch.Tensor:
    """Baseline image(s) for ``x`` ``(B, C, *spatial)``, same shape as ``x``.

    ``baseline`` is ``"blur"``, ``"zero"``, ``"mean"`` (needs ``mean_image`` of shape
    ``(C, *spatial)`` or ``(1, C, *spatial)``), a number (a constant image) or a tensor
    broadcastable to ``x``; :func:`check_baseline` says which values are accepted.
    """
    spatial_dims_of(x)
    check_baseline(baseline, mean_image)
    if isinstance(baseline, (int, float)):
        baseline = torch.tensor(float(baseline))
    if isinstance(baseline, torch.Tensor):
        return baseline.to(device=x.device, dtype=x.dtype).expand_as(x).clone()
    if baseline == "blur":
        return blur_baseline(x)
    if baseline == "zero":
        return torch.zeros_like(x)
    assert mean_image is not None  # "mean": check_baseline made sure
    mean = mean_image.to(device=x.device, dtype=x.dtype)
    if mean.dim() == x.dim() - 1:
        mean = mean.unsqueeze(0)
    return mean.expand_as(x).clone()


def upsample_mask(mask: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
    """Upsample a coarse mask ``(B, 1, *s)`` to ``spatial`` with linear interpolation
    (bilinear/trilinear, ``align_corners=True`` as in METHODS.md)."""
    return resize(mask, spatial)


def apply_mask(x: torch.Tensor, baseline: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``phi(x, b, M) = x * up(M) + b * (1 - up(M))``.

    x, baseline: ``(B, C, *spatial)``; mask: ``(B, 1, *s)`` at any resolution ``s`` (upsampled
    when coarser). ``M = 1`` keeps the image, ``M = 0`` shows the baseline.
    """
    up = upsample_mask(mask, x.shape[2:])
    return baseline + up * (x - baseline)


def rank_pixels(saliency: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Rank of every pixel, 0 = most important, for maps ``(B, 1, *spatial)``.

    Returns a long tensor of the same shape. Ties keep a deterministic order (stable sort on
    the flattened index) unless ``generator`` is given, in which case ties are broken randomly.
    """
    flat = saliency.flatten(1)
    if not flat.dtype.is_floating_point:
        flat = flat.float()
    if generator is not None:
        perm = torch.randperm(flat.shape[1], generator=generator, device="cpu").to(flat.device)
        order_in_perm = torch.argsort(-flat[:, perm], dim=1, stable=True)
        order = perm[order_in_perm]
    else:
        order = torch.argsort(-flat, dim=1, stable=True)
    ranks = torch.empty_like(order)
    positions = torch.arange(flat.shape[1], device=flat.device).expand_as(order)
    ranks.scatter_(1, order, positions)
    return ranks.view(saliency.shape)


def top_fraction_mask(ranks: torch.Tensor, fraction: float) -> torch.Tensor:
    """Float mask, 1 on the ``ceil(fraction * n)`` best-ranked pixels (ranks from rank_pixels)."""
    n = ranks[0].numel()
    k = math.ceil(float(fraction) * n - 1e-9)
    return (ranks < k).to(torch.float32)
