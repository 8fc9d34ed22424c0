"""The gradient family (and occlusion), backed by Captum.

Every class here is a thin :class:`~medexplain.explain.base.Explainer` around a Captum
attribution method; Captum does the attribution, this module adds what the medexplain
contract asks for:

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
from captum.attr import (
    InputXGradient,
    IntegratedGradients,
    LayerGradCam,
    Occlusion,
    Saliency,
)
from torch import nn

from ..core.model import seeded_generator
from ..core.perturb import check_baseline, make_baseline
from ..core.scores import chunked
from ..core.spatial import conv, resize, spatial_dims_of
from .base import Explainer, register

__all__ = [
    "GradCAM",
    "InputXGradientExplainer",
    "IntegratedGradientsExplainer",
    "OcclusionExplainer",
    "SaliencyExplainer",
    "SmoothGrad",
    "default_occlusion_window",
    "find_gradcam_layer",
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


# ---------------------------------------------------------------- grad-cam


def find_gradcam_layer(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """The convolution Grad-CAM uses by default for inputs shaped like ``x`` ``(B, C, *sp)``.

    One forward pass on ``x[:1]`` records the ``Conv2d``/``Conv3d`` modules (matching the
    input's dimension) in *execution* order; the last one whose output is larger than one
    pixel/voxel is chosen (a 1-pixel feature map only gives a constant map), else the last
    one executed. Hooks are removed before returning.
    """
    conv_type = conv(spatial_dims_of(x))
    executed: list[tuple[nn.Module, int]] = []

    def record(module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        executed.append((module, int(torch.Size(output.shape[2:]).numel())))

    candidates = [m for m in model.modules() if isinstance(m, conv_type)]
    if not candidates:
        raise ValueError(
            f"gradcam found no {conv_type.__name__} in the model; "
            "pass layer= (a module of the model or its dotted name)"
        )
    handles = [m.register_forward_hook(record) for m in candidates]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for handle in handles:
            handle.remove()
    if not executed:
        raise ValueError(
            f"gradcam found no {conv_type.__name__} run by the model's forward pass; "
            "pass layer= (a module of the model or its dotted name)"
        )
    larger = [module for module, size in executed if size > 1]
    return larger[-1] if larger else executed[-1][0]


@register("gradcam", "Grad-CAM on the last convolution, ReLU, upsampled (Selvaraju 2017)")
class GradCAM(Explainer):
    """Grad-CAM (Selvaraju et al. 2017) via Captum ``LayerGradCam``.

    With feature maps ``A_k`` of ``layer`` and ``alpha_k = mean_spatial(d f_target / d A_k)``:
    ``map = ReLU(sum_k alpha_k A_k)``, upsampled to the input with
    :func:`medexplain.core.spatial.resize` (bilinear/trilinear, ``align_corners=True``).

    Parameters
    ----------
    layer:
        A convolution module of the model, or its dotted name (``"features.conv5"``). None:
        :func:`find_gradcam_layer` (the last convolution executed whose output is larger than
        one pixel).
    relu:
        Apply the ReLU of the paper (default; the map is then unsigned). ``relu=False`` keeps
        the signed map.

    Shapes: x ``(B, C, *spatial)`` -> maps ``(B, 1, *spatial)``.
    """

    signed = False

    def __init__(
        self,
        model: nn.Module,
        *,
        layer: nn.Module | str | None = None,
        relu: bool = True,  # Selvaraju et al. 2017
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__(model, batch_size=batch_size, seed=seed)
        self.layer = self._resolve_layer(layer)
        self._found_layers: dict[tuple[int, ...], nn.Module] = {}  # input shape -> layer
        self.relu = bool(relu)
        self.signed = not self.relu

    def _resolve_layer(self, layer: nn.Module | str | None) -> nn.Module | None:
        if layer is None:
            return None
        if isinstance(layer, str):
            try:
                return self.model.get_submodule(layer)
            except AttributeError as error:
                raise ValueError(f"layer {layer!r} is not a submodule of the model") from error
        if isinstance(layer, nn.Module):
            if not any(m is layer for m in self.model.modules()):
                raise ValueError("layer must be a module of the model being explained")
            return layer
        raise TypeError(f"layer must be an nn.Module, a dotted name or None, got {layer!r}")

    def _attribute(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if layer is None:
            key = tuple(x.shape[1:])
            if key not in self._found_layers:
                self._found_layers[key] = find_gradcam_layer(self.model, x)
            layer = self._found_layers[key]
        method = LayerGradCam(self.model, layer)

        def one_chunk(xs: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
            cam = method.attribute(xs, target=ts, relu_attributions=self.relu)
            if cam.dim() != xs.dim():
                raise ValueError(
                    f"gradcam layer output has shape {tuple(cam.shape)}; it must be a feature "
                    f"map with the input's {xs.dim() - 2} spatial dims"
                )
            return resize(cam, xs.shape[2:])

        return _map_chunks(x, targets, self.batch_size, one_chunk, requires_grad=True)


# ---------------------------------------------------------------- occlusion


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
