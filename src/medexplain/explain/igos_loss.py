"""The pieces of the I-GOS / iGOS++ objective: regularisers, path scores, pass counters.

METHODS.md section 2 (Qi et al. 2020, arXiv 1905.00954; Khorram et al. 2021,
arXiv 2012.15783). Masks are ``(B, 1, *s)`` at the coarse resolution ``s``; images are
``(B, C, *spatial)`` with ``spatial`` 2D or 3D, one code path for both.

- :func:`l1_term` ``mean|1 - M|`` and :func:`total_variation` (mean squared forward
  difference along each axis, summed over the axes);
- :func:`bilateral_weights` / :func:`bilateral_tv` (iGOS++): half of TV(M) plus the
  image-guided smoothness of the upsampled mask; :func:`standardised_bilateral_weights`
  are the authors' weights (``variant="paper"``);
- :class:`PathScorer`: ``(1/S) sum_k f_c(phi(., ., a_k M) [+ noise_k])`` for many images
  and terms at once, every model pass chunked by ``batch_size`` and counted in a
  :class:`PassCounter`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.perturb import apply_mask
from ..core.scores import probabilities

#: Path kinds of :class:`PathScorer`: deletion walks ``phi(x, b, a M)`` (M = 1 keeps the
#: image), insertion walks ``phi(b, x, a M)`` (M = 1 shows the baseline).
DELETION, INSERTION = 0, 1


def _axis_differences(t: torch.Tensor, axis: int) -> torch.Tensor:
    """Forward differences of ``(B, C, *spatial)`` along spatial ``axis`` (0-based)."""
    dim = 2 + axis
    length = t.shape[dim]
    return t.narrow(dim, 1, length - 1) - t.narrow(dim, 0, length - 1)


def l1_term(mask: torch.Tensor) -> torch.Tensor:
    """``mean |1 - M|`` per image: ``(B,)`` for masks ``(B, 1, *s)``."""
    return (1 - mask).abs().flatten(1).mean(1)


def total_variation(mask: torch.Tensor) -> torch.Tensor:
    """TV of masks ``(B, 1, *s)``: for every spatial axis the mean of the squared forward
    differences, summed over the axes (METHODS.md; I-GOS uses beta = 2). Returns ``(B,)``.

    An axis of length 1 has no differences and contributes 0.
    """
    total = mask.new_zeros(mask.shape[0])
    for axis in range(mask.dim() - 2):
        if mask.shape[2 + axis] > 1:
            total = total + _axis_differences(mask, axis).pow(2).flatten(1).mean(1)
    return total


def normalise_image(x: torch.Tensor) -> torch.Tensor:
    """Min-max normalise every image of ``(B, C, *spatial)`` to [0, 1] (constant -> 0)."""
    flat = x.flatten(1)
    low = flat.min(1).values.view(-1, *([1] * (x.dim() - 1)))
    high = flat.max(1).values.view(-1, *([1] * (x.dim() - 1)))
    return (x - low) / (high - low).clamp_min(1e-12)


def bilateral_weights(x: torch.Tensor, sigma: float = 0.01) -> list[torch.Tensor]:
    """Edge-stopping weights ``exp(-(I_i - I_j)^2 / sigma)`` between neighbouring pixels.

    ``I`` is the image min-max normalised per image (iGOS++: sigma = 0.01 on the normalised
    image); for several channels ``(I_i - I_j)^2`` is the mean over channels of the squared
    difference. Returns one tensor per spatial axis, ``(B, 1, *spatial)`` shortened by one
    along that axis.
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    image = normalise_image(x)
    weights = []
    for axis in range(x.dim() - 2):
        squared = _axis_differences(image, axis).pow(2).mean(1, keepdim=True)
        weights.append(torch.exp(-squared / sigma))
    return weights


def standardised_bilateral_weights(
    x: torch.Tensor, sigma: float = 0.01, scale: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """Edge-stopping weights as the iGOS++ authors' code computes them (``variant="paper"``).

    ``I = x / scale`` is the image in units of ``scale`` ``(B,)`` (the network's standardised
    input in the authors' code; in medexplain each image's standard deviation, the unit of the
    noise). Along the first spatial axis the weight is ``exp(-(mean_c (I_i - I_j))^2 / sigma)``
    (channel mean of the difference, then squared), along every other axis
    ``mean_c exp(-(I_i - I_j)^2 / sigma)`` (mean of the per-channel weights); both agree for one
    channel. Returns one ``(B, 1, *spatial)`` tensor per axis, shortened by one along it.
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    image = x if scale is None else x / scale.view(-1, *([1] * (x.dim() - 1)))
    weights = []
    for axis in range(x.dim() - 2):
        diff = _axis_differences(image, axis)
        if axis == 0:
            weights.append(torch.exp(-diff.mean(1, keepdim=True).pow(2) / sigma))
        else:
            weights.append(torch.exp(-diff.pow(2) / sigma).mean(1, keepdim=True))
    return weights


def bilateral_tv(
    mask: torch.Tensor, up_mask: torch.Tensor, weights: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Bilateral TV of iGOS++ for masks ``(B, 1, *s)``: ``(B,)``.

    ``BTV(M) = 0.5 * [TV(M) + sum_axes mean(w * (up(M)_{i+1} - up(M)_i)^2)]`` where
    ``up_mask`` is ``up(M)`` ``(B, 1, *spatial)``, the mask upsampled to the image, and ``w``
    are the :func:`bilateral_weights` of the image. Like :func:`total_variation`, the
    image-space part is a mean per axis, summed over the axes.
    """
    if len(weights) != up_mask.dim() - 2:
        raise ValueError(
            f"{len(weights)} bilateral weight tensors for {up_mask.dim() - 2} spatial dims"
        )
    bilateral = mask.new_zeros(mask.shape[0])
    for axis, weight in enumerate(weights):
        if up_mask.shape[2 + axis] > 1:
            diff = _axis_differences(up_mask, axis).pow(2)
            bilateral = bilateral + (weight * diff).flatten(1).mean(1)
    return 0.5 * (total_variation(mask) + bilateral)


@dataclass
class PassCounter:
    """Model passes an explainer made, by kind and chunk size.

    ``forward[n]`` / ``backward[n]``: how many forward-only / forward+backward passes
    carried a chunk of ``n`` images. The benchmark replays exactly these passes on the bare
    model to measure how much of the wall time the model itself accounts for. ``padding``:
    rows added to one-image chunks (counted in the chunks; see :meth:`PathScorer.evaluate`).
    """

    forward: Counter = field(default_factory=Counter)
    backward: Counter = field(default_factory=Counter)
    padding: int = 0

    def add(self, kind: str, chunk: int) -> None:
        getattr(self, kind)[int(chunk)] += 1

    def images(self, kind: str) -> int:
        """Total images sent through the model by ``kind`` ("forward" or "backward")."""
        return sum(size * count for size, count in getattr(self, kind).items())

    def calls(self, kind: str) -> int:
        return sum(getattr(self, kind).values())

    def as_dict(self) -> dict:
        return {
            "forward_images": self.images("forward"),
            "forward_calls": self.calls("forward"),
            "backward_images": self.images("backward"),
            "backward_calls": self.calls("backward"),
            "forward_chunks": dict(sorted(self.forward.items())),
            "backward_chunks": dict(sorted(self.backward.items())),
            "padding": self.padding,
        }


class PathScorer:
    """``f_c`` along straight mask paths for many (image, term) pairs, chunked and counted.

    Holds the images ``x`` and baselines ``b`` ``(B, C, *spatial)``, the targets ``(B,)``
    and the fixed noise ``(2, S, C, *spatial)`` (one draw per path kind and integration
    step, shared by every image so that results never depend on the batch), multiplied per
    image by ``noise_scale`` ``(B,)`` when given. With ``fresh_noise = (seed, std)`` instead
    (the authors' code, ``variant="paper"``), every call draws new noise for every term and
    step (see :meth:`_fresh_table`).

    :meth:`evaluate` takes upsampled masks ``U`` ``(N, J, 1, *spatial)`` for N images
    (indices into the batch) and J terms, each term walking a deletion or an insertion path,
    and returns ``score[n, j] = (1/K) sum_k f_c(phi_j(a_k U[n, j]) + noise_k)`` for the
    coefficients ``a`` ``(K,)``. All ``N * J * K`` perturbed images go through the model in
    chunks of ``batch_size``; with ``weights`` ``(N, J)`` it also back-propagates
    ``sum_{n,j} weights[n, j] * score[n, j]`` into ``U.grad`` (U must require grad).
    """

    def __init__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        baseline: torch.Tensor,
        targets: torch.Tensor,
        *,
        activation: str = "auto",
        batch_size: int = 32,
        noise: torch.Tensor | None = None,
        noise_scale: torch.Tensor | None = None,
        counter: PassCounter | None = None,
        fresh_noise: tuple[int, float] | None = None,
    ) -> None:
        self.model = model
        # Rows [0, B): the images, [B, 2B): the baselines. Path DELETION blends
        # phi(x, b, M), path INSERTION phi(b, x, M): the kept rows are image + path * B.
        self.sources = torch.cat([x, baseline])
        self.n_images = x.shape[0]
        self.targets = targets
        self.activation = activation
        self.batch_size = int(batch_size)
        self.noise = noise
        self.noise_scale = noise_scale
        self.counter = PassCounter() if counter is None else counter
        self.fresh_noise = fresh_noise
        self.calls = torch.zeros(self.n_images, dtype=torch.long)

    def _fresh_table(
        self, images: torch.Tensor, n_terms: int, n_coef: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """New noise for this call: ``(U, J, K, C, *spatial)`` and each image's row ``(N,)``.

        An image's ``n``-th call draws from a generator seeded by ``(seed, n)``, so its noise
        depends only on its own history (never on the batch) and every call differs.
        """
        assert self.fresh_noise is not None
        seed, std = self.fresh_noise
        cpu = images.cpu()
        counts = self.calls[cpu]
        self.calls[cpu] += 1
        unique, slot = torch.unique(counts, return_inverse=True)
        shape = (n_terms, n_coef, *self.sources.shape[1:])
        draws = []
        for count in unique.tolist():
            generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(count))
            draws.append(torch.randn(shape, generator=generator) * std)
        table = torch.stack(draws).to(self.sources.device, self.sources.dtype)
        return table, slot.to(self.sources.device)

    def evaluate(
        self,
        images: torch.Tensor,
        up_masks: torch.Tensor,
        paths: Sequence[int],
        coefficients: torch.Tensor,
        *,
        noisy: bool,
        weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scores ``(N, J)`` and, with ``weights`` ``(N, J)``, the gradient of
        ``sum weights * scores`` w.r.t. ``up_masks`` (same shape; None without weights).

        Chunking never changes a result: every (image, term) pair sums its per-step values
        and gradients strictly in step order (``index_add_`` continues the running sum across
        chunk boundaries), and a chunk of one image is padded to two (PyTorch runs batch size
        1 through different kernels on the CPU).
        """
        n_images, n_terms = up_masks.shape[:2]
        if len(paths) != n_terms:
            raise ValueError(f"{n_terms} mask terms but {len(paths)} paths")
        if noisy and self.noise is None and self.fresh_noise is None:
            raise ValueError("noisy=True needs the scorer to hold noise")
        device = up_masks.device
        n_coef = coefficients.numel()
        path_of_term = torch.as_tensor(list(paths), device=device, dtype=torch.long)
        flat_masks = up_masks.detach().flatten(0, 1)  # (N*J, 1, *spatial)
        scores = torch.zeros(n_images * n_terms, device=device)
        grads = None if weights is None else torch.zeros_like(flat_masks)
        flat_weights = None if weights is None else weights.reshape(-1) / n_coef
        total = n_images * n_terms * n_coef
        spatial_ones = [1] * (up_masks.dim() - 3)
        kind = "forward" if weights is None else "backward"
        table = slot = None
        if noisy and self.fresh_noise is not None:
            table, slot = self._fresh_table(images, n_terms, n_coef)
        for start in range(0, total, self.batch_size):
            item = torch.arange(start, min(start + self.batch_size, total), device=device)
            n_items = item.numel()
            if n_items == 1:
                item = item.repeat(2)
                self.counter.padding += 1
            pair = item // n_coef  # index into the flattened (image, term) pairs
            step = item % n_coef
            image = images[pair // n_terms]
            path = path_of_term[pair % n_terms]
            coef = coefficients[step].view(-1, 1, *spatial_ones)
            mask = flat_masks[pair] * coef
            if grads is not None:
                mask.requires_grad_(True)
            with torch.set_grad_enabled(grads is not None):
                kept = image + path * self.n_images
                filled = image + (1 - path) * self.n_images
                perturbed = apply_mask(self.sources[kept], self.sources[filled], mask)
                if noisy:
                    if table is not None:
                        assert slot is not None
                        noise = table[slot[pair // n_terms], pair % n_terms, step]
                    else:
                        noise = self.noise[path, step]
                    if self.noise_scale is not None:
                        noise = noise * self.noise_scale[image].view(-1, 1, *spatial_ones)
                    perturbed = perturbed + noise
                probs = probabilities(self.model(perturbed), self.activation)
                f_c = probs.gather(1, self.targets[image].view(-1, 1)).squeeze(1)
                if grads is not None:
                    assert flat_weights is not None
                    (mask_grad,) = torch.autograd.grad((f_c * flat_weights[pair]).sum(), mask)
                    # d mask / d U = a_k for the item's own pair.
                    grads.index_add_(0, pair[:n_items], (mask_grad * coef)[:n_items])
            self.counter.add(kind, item.numel())
            scores.index_add_(0, pair[:n_items], f_c.detach()[:n_items])
        scores = (scores / n_coef).view(n_images, n_terms)
        return scores, None if grads is None else grads.view_as(up_masks)
