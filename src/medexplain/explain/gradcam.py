"""Grad-CAM (Selvaraju et al. 2017) backed by Captum ``LayerGradCam``, 2D and 3D.

Same contract details as :mod:`.gradients` (chunks of ``batch_size`` images, maps at input
resolution); the map is ReLU-ed, so unsigned.
"""

from __future__ import annotations

import torch
from captum.attr import LayerGradCam
from torch import nn

from ..core.spatial import conv, resize, spatial_dims_of
from .base import Explainer, NeedsGradientsError, register
from .gradients import _map_chunks

__all__ = ["GradCAM", "NeedsHooksError", "conv_layer_names", "find_gradcam_layer"]

_CONVS = ("Conv1d", "Conv2d", "Conv3d")


class NeedsHooksError(NeedsGradientsError):
    """Grad-CAM was asked for a TorchScript model: it reads a layer's activations through a
    forward hook, which compiled modules do not accept. Handled like
    :class:`NeedsGradientsError`: the method cannot run on this kind of model."""


def _kind(module: nn.Module) -> str:
    """The class name of ``module``; for a TorchScript submodule, that of the module it was
    compiled from (``Conv2d``...)."""
    if isinstance(module, torch.jit.ScriptModule):
        return str(getattr(module, "original_name", type(module).__name__))
    return type(module).__name__


def conv_layer_names(model: nn.Module) -> list[str]:
    """Dotted names of the model's convolutions (``nn.ConvNd`` or TorchScript submodules
    compiled from one), in definition order: the values ``layer=`` accepts (relative to the
    network when ``model`` wraps one network, as :class:`~medexplain.models.external.LoadedModel`
    does)."""
    children = [name for name, _ in model.named_children()]
    strip = len(children[0]) + 1 if len(children) == 1 else 0  # a wrapper's one network
    return [
        name[strip:]
        for name, module in model.named_modules()
        if name and (isinstance(module, nn.modules.conv._ConvNd) or _kind(module) in _CONVS)
    ]


def _choices(model: nn.Module) -> str:
    names = conv_layer_names(model)
    if not names:
        return "the model has no convolution; name another module with layer=NAME"
    more = f" (and {len(names) - 8} more)" if len(names) > 8 else ""
    return "its convolutions: " + ", ".join(names[-8:]) + more


def _check_not_scripted(model: nn.Module) -> None:
    """NeedsHooksError when ``model`` is or holds a TorchScript module."""
    if not any(isinstance(m, torch.jit.ScriptModule) for m in model.modules()):
        return
    names = conv_layer_names(model)
    last = f" (its last convolution is {names[-1]!r})" if names else ""
    raise NeedsHooksError(
        "gradcam reads a layer's activations through a forward hook, which a TorchScript "
        f"model does not accept{last}; use a method without hooks (integrated_gradients, "
        "saliency, smoothgrad, occlusion), or load the weights as a state dict with "
        "--model-factory to use gradcam"
    )


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
            f"gradcam found no {conv_type.__name__} in the model; pass layer=NAME "
            f"(a module of the model or its dotted name): {_choices(model)}"
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
        _check_not_scripted(self.model)
        self.layer = self._resolve_layer(layer)
        self._found_layers: dict[tuple[int, ...], nn.Module] = {}  # input shape -> layer
        self.relu = bool(relu)
        self.signed = not self.relu

    def _resolve_layer(self, layer: nn.Module | str | int | None) -> nn.Module | None:
        if layer is None:
            return None
        if isinstance(layer, int) and not isinstance(layer, bool):
            layer = str(layer)  # ``--param layer=2`` reads as a number: a Sequential's index
            if not any(name.split(".")[-1] == layer for name, _ in self.model.named_modules()):
                raise TypeError(
                    f"layer must be an nn.Module, a dotted name or None, got {layer}; "
                    f"{_choices(self.model)}"
                )
        if isinstance(layer, str):
            return self._named_layer(layer)
        if isinstance(layer, nn.Module):
            if not any(m is layer for m in self.model.modules()):
                raise ValueError("layer must be a module of the model being explained")
            return layer
        raise TypeError(f"layer must be an nn.Module, a dotted name or None, got {layer!r}")

    def _named_layer(self, name: str) -> nn.Module:
        """The submodule called ``name``, or the one whose dotted name ends with ``.name``
        (a name inside a wrapped network, e.g. ``features.3`` for ``net.features.3``)."""
        modules = dict(self.model.named_modules())
        if name in modules and name:
            return modules[name]
        found = [m for key, m in modules.items() if key.endswith("." + name)]
        if len(found) == 1:
            return found[0]
        what = "names several submodules" if found else "is not a submodule of the model"
        raise ValueError(f"layer {name!r} {what}; {_choices(self.model)}")

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
