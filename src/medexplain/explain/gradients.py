"""The gradient family, backed by Captum; Grad-CAM and occlusion follow the same rules.

Grad-CAM lives in :mod:`.gradcam`, occlusion in :mod:`.occlusion`. Every class is a thin
:class:`~medexplain.explain.base.Explainer` around a Captum attribution method; Captum does
the attribution, these modules add what the medexplain contract asks for:

- **maps** ``(B, 1, *spatial)`` float32 at input resolution for 2D ``(H, W)`` and 3D
  ``(D, H, W)`` images alike;
- **channels** are reduced by *summing* the per-channel attributions (for a linear model this
  keeps completeness: the map sums to the total effect of the pixel). Occlusion is the one
  exception: its windows cover all channels at once, so Captum gives every channel of a pixel
  the same output change and the map takes it once (channel mean), not ``C`` times;
- **target score**: every method explains the model's raw output (the target *logit*), as
  Captum does; higher means more evidence for the target;
- **memory**: images are processed in chunks of ``batch_size`` and the forward passes a
  method makes inside Captum (integration steps, noise samples, occluded copies) are capped
  at about ``batch_size`` images per pass;
- **batch invariance and seeds**: SmoothGrad draws its noise per image from a generator
  seeded by ``seed`` (see :func:`smoothgrad_noise`), so an image's map never depends on its
  position in the batch (Captum's ``NoiseTunnel`` draws noise for the whole batch at once,
  which would break that).

Sign conventions (the ``signed`` attribute): ``saliency`` and ``smoothgrad`` return the
magnitude of the gradient (Simonyan et al. 2014; Smilkov et al. 2017 visualise the absolute
value), ``gradcam`` is ReLU-ed (Selvaraju et al. 2017): these are unsigned. ``input_x_gradient``,
``integrated_gradients`` and ``occlusion`` keep their sign.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from captum.attr import InputXGradient, IntegratedGradients, Saliency
from torch import nn

from ..core.model import seeded_generator
from ..core.perturb import check_baseline, make_baseline
from ..core.scores import chunked
from .base import Explainer, register

__all__ = [
    "InputXGradientExplainer",
    "IntegratedGradientsExplainer",
    "SaliencyExplainer",
    "SmoothGrad",
    "smoothgrad_noise",
]


# ---------------------------------------------------------------- helpers


def _sum_channels(attributions: torch.Tensor) -> torch.Tensor:
    """``(B, C, *spatial)`` -> ``(B, 1, *spatial)`` by summing over channels."""
    return attributions.sum(dim=1, keepdim=True)


def _map_chunks(
    x: torch.Tensor,
    targets: torch.Tensor,
    batch_size: int,
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    requires_grad: bool = False,
) -> torch.Tensor:
    """Apply ``fn(x_chunk, targets_chunk)`` to chunks of ``batch_size`` images and concatenate.

    Each chunk is a fresh leaf tensor (``detach().clone()``, requiring grad for gradient
    methods) so Captum never switches ``requires_grad`` on the caller's tensor.
    """
    return chunked(
        lambda xs, ts: fn(xs.detach().clone().requires_grad_(requires_grad), ts),
        x,
        batch_size,
        targets,
    )


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


# ---------------------------------------------------------------- saliency


@register("saliency", "Gradient magnitude |d logit / d x| summed over channels (Simonyan 2014)")
class SaliencyExplainer(Explainer):
    """Vanilla gradient saliency (Simonyan, Vedaldi & Zisserman 2014) via Captum ``Saliency``.

    map = ``sum_c |d f_target / d x_c|`` (``abs=True``, the classic saliency map; Simonyan et
    al. take the max over colour channels, we sum as every medexplain method does). With
    ``abs=False`` the signed gradient summed over channels is returned and the instance
    becomes ``signed``.

    Shapes: x ``(B, C, *spatial)`` -> maps ``(B, 1, *spatial)``.
    """

    signed = False

    def __init__(
        self, model: nn.Module, *, abs: bool = True, batch_size: int = 32, seed: int = 0
    ) -> None:
        super().__init__(model, batch_size=batch_size, seed=seed)
        self.abs = bool(abs)
        self.signed = not self.abs

    def _attribute(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        method = Saliency(self.model)
        return _map_chunks(
            x,
            targets,
            self.batch_size,
            lambda xs, ts: _sum_channels(method.attribute(xs, target=ts, abs=self.abs)),
            requires_grad=True,
        )


@register("input_x_gradient", "Input times gradient, summed over channels (Shrikumar 2016)")
class InputXGradientExplainer(Explainer):
    """``x * d f_target / d x`` summed over channels, via Captum ``InputXGradient``.

    Signed. Shapes: x ``(B, C, *spatial)`` -> maps ``(B, 1, *spatial)``.
    """

    signed = True

    def _attribute(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        method = InputXGradient(self.model)
        return _map_chunks(
            x,
            targets,
            self.batch_size,
            lambda xs, ts: _sum_channels(method.attribute(xs, target=ts)),
            requires_grad=True,
        )


# ---------------------------------------------------------------- integrated gradients

#: Captum's quadrature rules for the path integral.
IG_METHODS = (
    "gausslegendre",
    "riemann_trapezoid",
    "riemann_middle",
    "riemann_left",
    "riemann_right",
)


@register("integrated_gradients", "Integrated gradients from a baseline (Sundararajan 2017)")
class IntegratedGradientsExplainer(Explainer):
    """Integrated gradients (Sundararajan, Taly & Yan 2017) via Captum ``IntegratedGradients``.

    ``IG_c(x) = (x_c - b_c) * integral_0^1 d f(b + a (x - b)) / d x_c da``, summed over channels,
    so the map sums to ``f(x) - f(b)`` (completeness) up to the quadrature error.

    Parameters
    ----------
    n_steps:
        Integration steps; 50 is Captum's default (Sundararajan et al. report 20-300 steps
        suffice).
    method:
        Captum's quadrature rule; ``"gausslegendre"`` (Captum's default) converges faster
        than the paper's Riemann sum (``"riemann_trapezoid"`` etc. are accepted).
    baseline:
        ``"zero"`` (the paper's black image, default), ``"blur"`` (Gaussian blur, I-GOS
        scaling), ``"mean"`` (needs ``mean_image`` ``(C, *spatial)``), a number or a tensor.
    batch_size:
        Images per chunk, and Captum's ``internal_batch_size``: one forward pass carries at
        most ``batch_size`` (image, step) pairs.

    Signed. Shapes: x ``(B, C, *spatial)`` -> maps ``(B, 1, *spatial)``.
    """

    signed = True

    def __init__(
        self,
        model: nn.Module,
        *,
        n_steps: int = 50,  # Captum default (Sundararajan et al. 2017: 20-300 steps)
        method: str = "gausslegendre",  # Captum default quadrature
        baseline: str | float | torch.Tensor = "zero",  # Sundararajan et al.: black image
        mean_image: torch.Tensor | None = None,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__(model, batch_size=batch_size, seed=seed)
        self.n_steps = _positive_int(n_steps, "n_steps")
        if method not in IG_METHODS:
            raise ValueError(f"method must be one of {IG_METHODS}, got {method!r}")
        self.method = method
        check_baseline(baseline, mean_image)
        self.baseline = baseline
        self.mean_image = mean_image

    def _attribute(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        method = IntegratedGradients(self.model)

        def one_chunk(xs: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
            baselines = make_baseline(xs.detach(), self.baseline, self.mean_image)
            attributions = method.attribute(
                xs,
                baselines=baselines,
                target=ts,
                n_steps=self.n_steps,
                method=self.method,
                internal_batch_size=self.batch_size,
            )
            return _sum_channels(attributions)

        return _map_chunks(x, targets, self.batch_size, one_chunk, requires_grad=True)


# ---------------------------------------------------------------- smoothgrad


def smoothgrad_noise(
    shape: Sequence[int], n_samples: int, seed: int, device: torch.device | str
) -> Iterator[torch.Tensor]:
    """The ``n_samples`` standard normal draws, each of ``shape`` ``(C, *spatial)``, that
    SmoothGrad adds (scaled by sigma) to *every* image for a given ``seed``.

    Draws are made one at a time from one generator seeded by ``seed``, so the k-th draw never
    depends on how many images or samples share a forward pass (batch invariance).
    """
    generator = seeded_generator(seed, device)
    for _ in range(n_samples):
        yield torch.randn(tuple(shape), generator=generator, device=device)


@register("smoothgrad", "Saliency averaged over noisy copies, sigma 15% of range (Smilkov 2017)")
class SmoothGrad(Explainer):
    """SmoothGrad (Smilkov et al. 2017): the saliency map averaged over noisy copies of x.

    ``map(x) = 1/n sum_k saliency(x + sigma * eps_k)``, ``eps_k ~ N(0, I)`` drawn per image
    with :func:`smoothgrad_noise` (same draws for every image with the same seed), gradients
    by Captum ``Saliency``.

    Parameters
    ----------
    n_samples:
        Noisy copies; 50 as in Smilkov et al. (they see little gain beyond 50).
    noise_level:
        sigma = ``noise_level * (max(x) - min(x))`` per image; Smilkov et al. recommend
        10-20 % of the input range, we take 15 %.
    abs:
        Average ``|grad|`` (default, like :class:`SaliencyExplainer`; unsigned) or the signed
        gradient (``abs=False``, signed).
    batch_size:
        At most ``batch_size`` noisy images per forward/backward pass.

    Shapes: x ``(B, C, *spatial)`` -> maps ``(B, 1, *spatial)``.
    """

    signed = False

    def __init__(
        self,
        model: nn.Module,
        *,
        n_samples: int = 50,  # Smilkov et al. 2017
        noise_level: float = 0.15,  # Smilkov et al. 2017: 10-20 % of the input range
        abs: bool = True,  # Smilkov et al. visualise the absolute value
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__(model, batch_size=batch_size, seed=seed)
        self.n_samples = _positive_int(n_samples, "n_samples")
        if not noise_level >= 0:
            raise ValueError(f"noise_level must be >= 0, got {noise_level!r}")
        self.noise_level = float(noise_level)
        self.abs = bool(abs)
        self.signed = not self.abs

    def sigma(self, x: torch.Tensor) -> torch.Tensor:
        """Noise standard deviation per image ``(B,)``: ``noise_level * (max - min)``."""
        flat = x.flatten(1)
        return self.noise_level * (flat.amax(dim=1) - flat.amin(dim=1))

    def _attribute(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        method = Saliency(self.model)
        image_shape = tuple(x.shape[1:])
        view = (1, -1) + (1,) * len(image_shape)  # (sample, image, C, *spatial)

        def one_chunk(xs: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
            b = xs.shape[0]
            sigma = self.sigma(xs).view(view)
            per_pass = max(1, self.batch_size // b)
            total = torch.zeros((b, 1, *image_shape[1:]), device=xs.device)
            draws = smoothgrad_noise(image_shape, self.n_samples, self.seed, xs.device)
            for start in range(0, self.n_samples, per_pass):
                count = min(per_pass, self.n_samples - start)
                noise = torch.stack([next(draws) for _ in range(count)])  # (count, C, *sp)
                noisy = (xs.unsqueeze(0) + sigma * noise.unsqueeze(1)).flatten(0, 1)
                noisy = noisy.detach().requires_grad_(True)
                grads = method.attribute(noisy, target=ts.repeat(count), abs=self.abs)
                total += _sum_channels(grads).view(count, b, 1, *image_shape[1:]).sum(0)
            return total / self.n_samples

        return _map_chunks(x, targets, self.batch_size, one_chunk)
