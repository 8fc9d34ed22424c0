"""A small U-Net with one shared encoder/decoder and several image heads, 2D and 3D.

Used by the similar/adversarial generators (Charachon et al., METHODS.md section 4): the
network maps an image ``x`` ``(B, C, *spatial)`` to ``heads`` images of the same shape
(head 0 = similar ``x_s``, head 1 = adversarial ``x_a``). Convolutions, pooling and norms
come from :mod:`medexplain.core.spatial`, so one code path serves 2D and 3D.

The paper does not fix the architecture; ours (documented choice):

- ``widths`` gives the channels per level (depth = ``len(widths)``), each level two 3x3
  convolutions + norm + LeakyReLU(0.2), max-pooling by 2 between levels;
- the decoder upsamples linearly to the skip's exact size (so any image size works, no
  divisibility requirement), concatenates the skip and applies two convolutions;
- each head is a 1x1 convolution; with ``residual=True`` (default) a head predicts an edit
  ``x + delta`` with ``delta`` initialised at zero, so an untrained generator is the identity
  and the reconstruction terms of the loss start at zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...core.spatial import (
    batch_norm,
    check_dims,
    conv,
    instance_norm,
    interpolation_mode,
    max_pool,
)

NORMS = ("batch", "instance", "none")


@dataclass
class UNetConfig:
    """Plain configuration of :class:`UNet` (saved in checkpoints).

    ``widths``: channels per level, e.g. ``(16, 32, 64)`` = 3 levels (the paper leaves the
    architecture open; this is a small default that trains in minutes on a CPU at 64 px).
    """

    in_channels: int = 1
    spatial_dims: int = 2
    widths: tuple[int, ...] = (16, 32, 64)
    heads: int = 2
    norm: str = "batch"
    residual: bool = True

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        check_dims(int(self.spatial_dims))
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {self.in_channels}")
        if not self.widths or min(self.widths) < 1:
            raise ValueError(
                f"widths must be a non-empty sequence of positive ints, got {self.widths}"
            )
        if self.heads < 1:
            raise ValueError(f"heads must be >= 1, got {self.heads}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")


def _norm(kind: str, dims: int, channels: int) -> nn.Module:
    if kind == "batch":
        return batch_norm(dims)(channels)
    if kind == "instance":
        return instance_norm(dims)(channels, affine=True)
    return nn.Identity()


class _Block(nn.Sequential):
    """Two (conv 3 -> norm -> LeakyReLU) layers."""

    def __init__(self, dims: int, cin: int, cout: int, norm: str) -> None:
        layers: list[nn.Module] = []
        for c in (cin, cout):
            layers += [
                conv(dims)(c, cout, kernel_size=3, padding=1, bias=norm == "none"),
                _norm(norm, dims, cout),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        super().__init__(*layers)


class UNet(nn.Module):
    """Shared encoder/decoder with ``config.heads`` output images.

    ``forward(x)``: ``x`` ``(B, in_channels, *spatial)`` -> ``(B, heads, in_channels,
    *spatial)``. ``config`` is kept on the module for :mod:`medexplain.models.checkpoint`.
    """

    def __init__(self, config: UNetConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or UNetConfig()
        dims, widths = config.spatial_dims, config.widths
        self.encoders = nn.ModuleList()
        cin = config.in_channels
        for w in widths:
            self.encoders.append(_Block(dims, cin, w, config.norm))
            cin = w
        self.pool = max_pool(dims)(2)
        self.decoders = nn.ModuleList()
        for level in range(len(widths) - 2, -1, -1):
            self.decoders.append(
                _Block(dims, widths[level + 1] + widths[level], widths[level], config.norm)
            )
        self.heads = nn.ModuleList(
            conv(dims)(widths[0], config.in_channels, kernel_size=1) for _ in range(config.heads)
        )
        if config.residual:
            for head in self.heads:
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = self.config.spatial_dims
        if x.dim() != dims + 2 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"x must have shape (B, {self.config.in_channels}, <{dims} spatial dims>), "
                f"got {tuple(x.shape)}"
            )
        skips = []
        h = x
        for index, encoder in enumerate(self.encoders):
            if index > 0:
                # Pool only while every spatial size is at least 2.
                h = self.pool(h) if min(h.shape[2:]) >= 2 else h
            h = encoder(h)
            skips.append(h)
        for decoder, skip in zip(self.decoders, reversed(skips[:-1])):
            h = F.interpolate(
                h, size=skip.shape[2:], mode=interpolation_mode(dims), align_corners=False
            )
            h = decoder(torch.cat([h, skip], dim=1))
        outputs = [head(h) for head in self.heads]
        if self.config.residual:
            outputs = [x + out for out in outputs]
        return torch.stack(outputs, dim=1)
