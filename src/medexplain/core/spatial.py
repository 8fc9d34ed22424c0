"""One place that picks 2D or 3D operators, so no method is written twice.

Every image tensor in medexplain is ``(B, C, *spatial)`` with ``spatial`` either
``(H, W)`` or ``(D, H, W)``. Modules that need a convolution, a pooling layer,
an interpolation mode or a blur ask this module with the number of spatial
dimensions instead of branching themselves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_DIMS = (2, 3)


def spatial_dims_of(x: torch.Tensor, name: str = "x") -> int:
    """Number of spatial dims of a batch ``(B, C, *spatial)``; raises on anything else."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, C, H, W) or (B, C, D, H, W)")
    dims = x.dim() - 2
    if dims not in SUPPORTED_DIMS:
        raise ValueError(
            f"{name} must have shape (B, C, H, W) or (B, C, D, H, W); got {tuple(x.shape)}"
        )
    return dims


def check_dims(dims: int) -> int:
    if dims not in SUPPORTED_DIMS:
        raise ValueError(f"spatial_dims must be 2 or 3, got {dims}")
    return dims


def conv(dims: int) -> type[nn.Module]:
    return {2: nn.Conv2d, 3: nn.Conv3d}[check_dims(dims)]


def conv_transpose(dims: int) -> type[nn.Module]:
    return {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[check_dims(dims)]


def max_pool(dims: int) -> type[nn.Module]:
    return {2: nn.MaxPool2d, 3: nn.MaxPool3d}[check_dims(dims)]


def avg_pool(dims: int) -> type[nn.Module]:
    return {2: nn.AvgPool2d, 3: nn.AvgPool3d}[check_dims(dims)]


def adaptive_avg_pool(dims: int) -> type[nn.Module]:
    return {2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[check_dims(dims)]


def batch_norm(dims: int) -> type[nn.Module]:
    return {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[check_dims(dims)]


def instance_norm(dims: int) -> type[nn.Module]:
    return {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[check_dims(dims)]


def functional_conv(dims: int) -> Callable[..., torch.Tensor]:
    return {2: F.conv2d, 3: F.conv3d}[check_dims(dims)]


def interpolation_mode(dims: int) -> str:
    """Linear interpolation mode for the dimension: bilinear in 2D, trilinear in 3D."""
    return {2: "bilinear", 3: "trilinear"}[check_dims(dims)]


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Linearly resample ``(B, C, *spatial)`` to ``size`` (align_corners=True, as METHODS.md fixes
    for mask upsampling). A no-op when the size already matches."""
    dims = spatial_dims_of(x)
    size = tuple(int(s) for s in size)
    if len(size) != dims:
        raise ValueError(f"size {size} does not match the {dims} spatial dims of the input")
    if tuple(x.shape[2:]) == size:
        return x
    return F.interpolate(x, size=size, mode=interpolation_mode(dims), align_corners=True)


def gaussian_kernel1d(
    sigma: float,
    kernel_size: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Normalised 1D Gaussian of odd length ``kernel_size``."""
    if kernel_size % 2 == 0 or kernel_size < 1:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    radius = kernel_size // 2
    t = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    kernel = torch.exp(-0.5 * (t / max(float(sigma), 1e-6)) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(x: torch.Tensor, sigma: float, kernel_size: int | None = None) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, C, *spatial)`` with reflect padding (replicate where the
    image is too small to reflect). ``kernel_size`` defaults to ``2*ceil(3*sigma)+1``, capped so
    that it never exceeds twice the image size."""
    dims = spatial_dims_of(x)
    if kernel_size is None:
        kernel_size = 2 * math.ceil(3 * sigma) + 1
    kernel = gaussian_kernel1d(sigma, kernel_size, device=x.device, dtype=x.dtype)
    channels = x.shape[1]
    out = x
    for axis in range(dims):
        length = out.shape[2 + axis]
        radius = kernel_size // 2
        shape = [1] * dims
        shape[axis] = kernel_size
        weight = kernel.view(1, 1, *shape).repeat(channels, 1, *([1] * dims))
        pad = [0] * (2 * dims)
        # F.pad lists pads from the last dim backwards.
        pad_index = 2 * (dims - 1 - axis)
        pad[pad_index] = pad[pad_index + 1] = radius
        mode = "reflect" if radius < length else "replicate"
        out = F.pad(out, pad, mode=mode)
        out = functional_conv(dims)(out, weight, groups=channels)
    return out
