"""Occlusion (Zeiler & Fergus 2014) backed by Captum ``Occlusion``, 2D and 3D.

Same contract details as :mod:`.gradients`; the windows cover all channels at once, so the
map takes each pixel's output change once (channel mean), and it keeps its sign.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from captum.attr import Occlusion
from torch import nn

from ..core.perturb import check_baseline, make_baseline
from .base import Explainer, register
from .gradients import _map_chunks

__all__ = ["OcclusionExplainer", "default_occlusion_window"]


def default_occlusion_window(
    spatial: Sequence[int], fraction: float = 1 / 8
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(window, stride) per spatial dim: window = ``max(1, round(fraction * size))``, stride =
    ``max(1, window // 2)`` (half-overlapping windows)."""
    window = tuple(max(1, round(fraction * int(s))) for s in spatial)
    stride = tuple(max(1, w // 2) for w in window)
    return window, stride


def _per_dim(value: int | Sequence[int], dims: int, name: str) -> tuple[int, ...]:
    values = (value,) * dims if isinstance(value, int) else tuple(value)
    if len(values) != dims or any(isinstance(v, bool) or int(v) < 1 for v in values):
        raise ValueError(f"{name} must be a positive int or {dims} positive ints, got {value!r}")
    return tuple(int(v) for v in values)


@register("occlusion", "Output drop when sliding windows are occluded (Zeiler & Fergus 2014)")
class OcclusionExplainer(Explainer):
    """Occlusion (Zeiler & Fergus 2014) via Captum ``Occlusion``.

    Each window (all channels at once) is replaced by the baseline; the drop of the target
    logit ``f(x) - f(x_occluded)`` is credited to every pixel of the window, averaged over the
    windows that cover a pixel. Captum credits each channel the same amount, so the map is that
    value once (channel mean), not ``C`` times.

    Parameters
    ----------
    window, stride:
        Sliding window and stride in pixels (an int or one per spatial dim). The paper gives
        no rule for other image sizes (unspecified); default window = ``window_fraction`` of
        each spatial size (1/8), stride half the window.
    window_fraction:
        Used when ``window`` is None.
    baseline:
        ``"zero"`` (default), ``"blur"``, ``"mean"`` (needs ``mean_image``), a number or a tensor.
    batch_size:
        Images per chunk; Captum's ``perturbations_per_eval`` is ``batch_size // chunk`` so a
        forward pass carries at most ``batch_size`` occluded images.

    Signed. Shapes: x ``(B, C, *spatial)`` -> maps ``(B, 1, *spatial)``.
    """

    signed = True
    needs_gradients = False

    def __init__(
        self,
        model: nn.Module,
        *,
        window: int | Sequence[int] | None = None,
        stride: int | Sequence[int] | None = None,
        window_fraction: float = 1 / 8,  # unspecified in Zeiler & Fergus 2014: our choice
        baseline: str | float | torch.Tensor = "zero",
        mean_image: torch.Tensor | None = None,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__(model, batch_size=batch_size, seed=seed)
        if not 0 < window_fraction <= 1:
            raise ValueError(f"window_fraction must be in (0, 1], got {window_fraction!r}")
        check_baseline(baseline, mean_image)
        self.window = window
        self.stride = stride
        self.window_fraction = float(window_fraction)
        self.baseline = baseline
        self.mean_image = mean_image

    def windows(self, spatial: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(window, stride) in pixels for images of size ``spatial``."""
        dims = len(spatial)
        default_window, _ = default_occlusion_window(spatial, self.window_fraction)
        window = default_window if self.window is None else _per_dim(self.window, dims, "window")
        window = tuple(min(w, int(s)) for w, s in zip(window, spatial))
        if self.stride is None:
            stride = tuple(max(1, w // 2) for w in window)
        else:
            stride = _per_dim(self.stride, dims, "stride")
        if any(s > w for s, w in zip(stride, window)):
            raise ValueError(f"stride {stride} must not exceed the window {window}")
        return window, stride

    def _attribute(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        method = Occlusion(self.model)
        window, stride = self.windows(x.shape[2:])
        channels = x.shape[1]

        def one_chunk(xs: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
            attributions = method.attribute(
                xs,
                sliding_window_shapes=(channels, *window),
                strides=(channels, *stride),
                baselines=make_baseline(xs, self.baseline, self.mean_image),
                target=ts,
                perturbations_per_eval=max(1, self.batch_size // xs.shape[0]),
            )
            return attributions.mean(dim=1, keepdim=True)

        return _map_chunks(x, targets, self.batch_size, one_chunk)
