"""RISE: randomised input sampling (Petsiuk, Das & Saenko, BMVC 2018), 2D and 3D.

A black-box method: it only runs the model forward, so it explains ONNX models too. ``N``
random binary grids of ``s`` cells per axis, each cell kept with probability ``p``, are
upsampled (bilinear in 2D, trilinear in 3D) to ``(s + 1)`` cells of ``ceil(size / s)``
pixels and cropped at a random shift of less than one cell, giving smooth masks
``M_i`` in [0, 1]. The map is the Monte-Carlo estimate of ``E[f_c(phi(x, b, M)) | M(u) = 1]``::

    S(u) = 1 / (N p) * sum_i f_c(phi(x, b, M_i)) M_i(u)

with ``phi(x, b, M) = b + M (x - b)`` (:mod:`medexplain.core.perturb`; the paper's ``I . M``
is the zero baseline) and ``f_c`` the class probability (softmax, or sigmoid for a one-logit
or multi-label model, :func:`medexplain.core.scores.probabilities`).

The masks are drawn once per call from a generator seeded by ``seed`` (on the CPU, so every
device draws the same masks) and shared by every image of the batch: an image's map never
depends on its batch neighbours. They are upsampled ``batch_size`` at a time, and every
forward pass carries ``batch_size`` masked copies of one image, so memory stays bounded
whatever ``N``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.perturb import check_baseline, make_baseline
from ..core.scores import class_score
from ..core.spatial import interpolation_mode
from .base import Explainer, register

__all__ = ["RISE", "default_masks"]

#: Masks per image when ``n_masks`` is None: the paper uses 4000 on ImageNet (224 px, 2D);
#: ours is smaller for CPUs, and smaller again for volumes, whose forward passes cost more.
DEFAULT_MASKS = {2: 1000, 3: 500}
#: Class scores RISE averages: probabilities, as in the paper (never raw logits).
RISE_ACTIVATIONS = ("auto", "softmax", "sigmoid")


def default_masks(dims: int) -> int:
    """The default number of masks for images with ``dims`` spatial dimensions."""
    return DEFAULT_MASKS[dims]


@register("rise", "Random masks weighted by the class probability (Petsiuk et al. 2018)")
class RISE(Explainer):
    """RISE (Petsiuk, Das & Saenko 2018), forward passes only.

    Parameters
    ----------
    n_masks:
        ``N``, random masks per image; None: 1000 in 2D, 500 in 3D (the paper uses 4000 on
        ImageNet). The estimate's noise falls as ``1 / sqrt(N)``.
    cells:
        ``s``, grid cells per spatial axis (an int or one per axis); 7 as in the paper.
    p:
        Probability of keeping a cell (0.5 as in the paper); ``E[M] = p``.
    baseline:
        What masked-out pixels show: ``"zero"`` (the paper), ``"blur"``, ``"mean"`` (with
        ``mean_image``), a number or a tensor.
    activation:
        ``"auto"`` (softmax, or sigmoid for one logit), ``"softmax"`` or ``"sigmoid"``
        (multi-label heads).
    batch_size:
        Masked images per forward pass.
    seed:
        Seeds the masks (same seed, same map).

    Unsigned (probabilities times masks). Shapes: x ``(B, C, *S)`` -> maps ``(B, 1, *S)``.
    """

    signed: ClassVar[bool] = False
    needs_gradients: ClassVar[bool] = False

    def __init__(
        self,
        model: nn.Module,
        *,
        n_masks: int | None = None,
        cells: int | Sequence[int] = 7,
        p: float = 0.5,
        baseline: str | float | torch.Tensor = "zero",
        mean_image: torch.Tensor | None = None,
        activation: str = "auto",
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__(model, batch_size=batch_size, seed=seed)
        if n_masks is not None and (
            isinstance(n_masks, bool) or not isinstance(n_masks, int) or n_masks < 1
        ):
            raise ValueError(f"n_masks must be an int >= 1 or None, got {n_masks!r}")
        values = (cells,) if isinstance(cells, int) else tuple(cells)
        if not values or any(
            isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in values
        ):
            raise ValueError(f"cells must be a positive int or one per spatial axis, got {cells!r}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < float(p) <= 1.0:
            raise ValueError(f"p must be a probability in (0, 1], got {p!r}")
        if activation not in RISE_ACTIVATIONS:
            raise ValueError(f"activation must be one of {RISE_ACTIVATIONS}, got {activation!r}")
        check_baseline(baseline, mean_image)
        self.n_masks = n_masks
        self.cells = values
        self.p = float(p)
        self.baseline = baseline
        self.mean_image = mean_image
        self.activation = activation

    def cells_for(self, spatial: Sequence[int]) -> tuple[int, ...]:
        """Cells per axis for images of size ``spatial``."""
        cells = self.cells * len(spatial) if len(self.cells) == 1 else self.cells
        if len(cells) != len(spatial):
            raise ValueError(
                f"cells {self.cells} has {len(cells)} entries for images of size {tuple(spatial)}"
            )
        if any(c > int(n) for c, n in zip(cells, spatial)):
            raise ValueError(f"cells {cells} are finer than the image {tuple(spatial)}")
        return cells

    def draw(self, spatial: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The random part of every mask for images of size ``spatial``: the binary grids
        ``(N, 1, *cells)`` (float, 1 = kept) and the shifts ``(N, dims)`` in pixels, each in
        ``[0, ceil(size / cells))``, drawn on the CPU from ``seed``."""
        spatial = tuple(int(s) for s in spatial)
        cells = self.cells_for(spatial)
        n = self.n_masks if self.n_masks is not None else default_masks(len(spatial))
        generator = torch.Generator().manual_seed(self.seed)
        grids = (torch.rand((n, 1, *cells), generator=generator) < self.p).to(torch.float32)
        cell_size = [math.ceil(s / c) for s, c in zip(spatial, cells)]
        shifts = torch.stack(
            [torch.randint(0, size, (n,), generator=generator) for size in cell_size], dim=1
        )
        return grids, shifts

    def masks(
        self, grids: torch.Tensor, shifts: torch.Tensor, spatial: Sequence[int]
    ) -> torch.Tensor:
        """Smooth masks ``(n, 1, *spatial)`` in [0, 1] from grids ``(n, 1, *cells)`` and
        shifts ``(n, dims)``: linear upsampling to ``(cells + 1) * ceil(size / cells)`` pixels
        per axis (pixel centres, ``align_corners=False``), cropped at each mask's shift."""
        spatial = tuple(int(s) for s in spatial)
        cells = grids.shape[2:]
        up_size = [(c + 1) * math.ceil(s / c) for s, c in zip(spatial, cells)]
        up = F.interpolate(
            grids, size=up_size, mode=interpolation_mode(len(spatial)), align_corners=False
        )
        out = []
        for mask, shift in zip(up, shifts.tolist()):
            window = tuple(slice(o, o + s) for o, s in zip(shift, spatial))
            out.append(mask[(slice(None), *window)])
        return torch.stack(out)

    @torch.no_grad()
    def _attribute(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        spatial = tuple(x.shape[2:])
        grids, shifts = self.draw(spatial)
        baseline = make_baseline(x, self.baseline, self.mean_image)
        saliency = torch.zeros((x.shape[0], 1, *spatial), dtype=torch.float64, device=x.device)
        for start in range(0, len(grids), self.batch_size):
            part = slice(start, start + self.batch_size)
            masks = self.masks(grids[part], shifts[part], spatial).to(x.device, x.dtype)
            weights_shape = (len(masks),) + (1,) * (x.dim() - 1)
            for i in range(x.shape[0]):
                inputs = baseline[i : i + 1] + masks * (x[i : i + 1] - baseline[i : i + 1])
                scores = class_score(
                    self.model, inputs, targets[i].expand(len(masks)), self.activation
                )
                saliency[i] += (scores.view(weights_shape) * masks).sum(dim=0).to(torch.float64)
        return (saliency / (len(grids) * self.p)).to(torch.float32)
