"""Conditional convolution (CondConv, Yang et al. 2019) with a condition vector, 2D and 3D.

The warping simulators (Liu, Adeli, Pohl, Zhao; METHODS.md section 5) make every
convolution conditional: per sample, the kernel is a routed sum of expert kernels

    W(x, c) = sum_e r_e W_e,   r = sigmoid(FC([global-avg-pool(x), c]))

so that one network serves every condition (class and direction). Biases are routed the
same way. The routing weights get dropout (rate 0.1, the authors' setting) during training
only — applied to ``r`` itself, i.e. an expert is dropped for a sample (a choice: the sources
say "dropout in the routing" without fixing where).

Per-sample kernels are applied in one call with the grouped-convolution trick: the batch is
folded into channels and ``groups = B``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...core.spatial import check_dims, functional_conv

#: CondConv experts per layer in the warping simulators (authors' setting).
DEFAULT_EXPERTS = 3
#: Dropout on the routing weights (authors' setting).
DEFAULT_ROUTING_DROPOUT = 0.1


class CondConv(nn.Module):
    """Conditional convolution ``(B, C_in, *spatial), (B, cond_dim) -> (B, C_out, *spatial')``.

    Parameters: ``in_channels``, ``out_channels``, ``kernel_size`` (odd; ``padding`` defaults
    to ``kernel_size // 2``, "same" at stride 1), ``cond_dim`` (length of the condition
    vector, may be 0), ``spatial_dims`` (2 or 3), ``num_experts`` (3), ``routing_dropout``
    (0.1), ``stride``, ``bias``.

    ``forward(x, cond, routing=None)``: ``routing`` ``(B, num_experts)`` overrides the
    learned routing (used by tests and to inspect experts).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        cond_dim: int,
        spatial_dims: int = 2,
        num_experts: int = DEFAULT_EXPERTS,
        routing_dropout: float = DEFAULT_ROUTING_DROPOUT,
        stride: int = 1,
        padding: int | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        check_dims(spatial_dims)
        for name, value in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("kernel_size", kernel_size),
            ("num_experts", num_experts),
            ("stride", stride),
        ):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if cond_dim < 0:
            raise ValueError(f"cond_dim must be >= 0, got {cond_dim}")
        if not 0.0 <= routing_dropout < 1.0:
            raise ValueError(f"routing_dropout must be in [0, 1), got {routing_dropout}")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = int(kernel_size)
        self.cond_dim = int(cond_dim)
        self.spatial_dims = int(spatial_dims)
        self.num_experts = int(num_experts)
        self.routing_dropout = float(routing_dropout)
        self.stride = int(stride)
        self.padding = self.kernel_size // 2 if padding is None else int(padding)
        shape = (num_experts, out_channels, in_channels, *([kernel_size] * spatial_dims))
        self.weight = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.empty(num_experts, out_channels)) if bias else None
        self.route = nn.Linear(in_channels + cond_dim, num_experts)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert initialised like a PyTorch convolution (Kaiming uniform, a=sqrt(5))."""
        fan_in = self.in_channels * self.kernel_size**self.spatial_dims
        for expert in range(self.num_experts):
            nn.init.kaiming_uniform_(self.weight[expert], a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def routing_weights(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``r`` ``(B, num_experts)`` = sigmoid(FC([GAP(x), c])), with dropout in training."""
        pooled = x.flatten(2).mean(dim=2)
        features = torch.cat([pooled, cond.to(pooled.dtype)], dim=1) if self.cond_dim else pooled
        r = torch.sigmoid(self.route(features))
        return F.dropout(r, p=self.routing_dropout, training=self.training)

    def forward(
        self, x: torch.Tensor, cond: torch.Tensor, routing: torch.Tensor | None = None
    ) -> torch.Tensor:
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"x must have shape (B, {self.in_channels}, *spatial) with {self.spatial_dims} "
                f"spatial dims, got {tuple(x.shape)}"
            )
        batch = x.shape[0]
        if cond.dim() != 2 or cond.shape != (batch, self.cond_dim):
            raise ValueError(
                f"cond must have shape ({batch}, {self.cond_dim}), got {tuple(cond.shape)}"
            )
        if routing is None:
            routing = self.routing_weights(x, cond)
        elif tuple(routing.shape) != (batch, self.num_experts):
            raise ValueError(
                f"routing must have shape ({batch}, {self.num_experts}), got {tuple(routing.shape)}"
            )
        routing = routing.to(x.dtype)
        kernels = torch.einsum("be,e...->b...", routing, self.weight)  # (B, out, in, *k)
        kernels = kernels.reshape(batch * self.out_channels, *kernels.shape[2:])
        bias = (routing @ self.bias).reshape(-1) if self.bias is not None else None
        folded = x.reshape(1, batch * self.in_channels, *x.shape[2:])
        out = functional_conv(self.spatial_dims)(
            folded, kernels, bias, stride=self.stride, padding=self.padding, groups=batch
        )
        return out.reshape(batch, self.out_channels, *out.shape[2:])

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"cond_dim={self.cond_dim}, spatial_dims={self.spatial_dims}, "
            f"num_experts={self.num_experts}, routing_dropout={self.routing_dropout}"
        )
