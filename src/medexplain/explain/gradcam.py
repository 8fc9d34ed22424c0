"""Grad-CAM (Selvaraju et al. 2017) backed by Captum ``LayerGradCam``, 2D and 3D.

Same contract details as :mod:`.gradients` (chunks of ``batch_size`` images, maps at input
resolution); the map is ReLU-ed, so unsigned.
"""

from __future__ import annotations

import torch
from captum.attr import LayerGradCam
from torch import nn

from ..core.spatial import conv, resize, spatial_dims_of
from .base import Explainer, register
from .gradients import _map_chunks

__all__ = ["GradCAM", "find_gradcam_layer"]


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
