"""Which layer XNN embeds, how its features are read, and the classifier seen through XNN.

Default layer (:func:`default_layer`): the input of the last ``nn.Linear`` the classifier
runs, when that input is a flat ``(B, D)`` vector: for the usual CNN (conv blocks, global
pooling, linear head: this package's SmallCNN, ResNets, DenseNets) it is the last
convolutional block's pooled features. Without such a layer, the output of the last
convolution executed, spatially averaged. ``layer="name"`` takes that module's output
(averaged over its spatial axes when it is a feature map).

:class:`XFeatureModel` wraps the frozen classifier and a fitted :class:`~.xnn_network.XNNNetwork`
into one module ``x -> e`` ``(B, k)``: any gradient explainer (Grad-CAM at a convolution,
integrated gradients) then explains an x-feature as if it were a logit.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ...core.spatial import conv, spatial_dims_of
from .xnn_network import XNNNetwork

__all__ = ["XFeatureModel", "default_layer", "layer_features", "resolve_module"]


def resolve_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name``, or the one whose dotted name ends with ``.name`` (a
    name inside a wrapped network). ValueError listing some module names otherwise."""
    modules = dict(model.named_modules())
    if name and name in modules:
        return modules[name]
    found = [m for key, m in modules.items() if key.endswith("." + name)]
    if len(found) == 1:
        return found[0]
    names = [key for key in modules if key][-8:]
    what = "names several submodules" if found else "is not a submodule of the model"
    raise ValueError(f"layer {name!r} {what}; its last modules: {', '.join(names)}")


def _name_of(model: nn.Module, module: nn.Module) -> str:
    """``module``'s dotted name, relative to the network when ``model`` wraps one network
    (as a loaded model does), so a checkpoint works with the bare network too."""
    name = next(name for name, m in model.named_modules() if m is module)
    children = [child for child, _ in model.named_children()]
    if len(children) == 1 and name.startswith(children[0] + "."):
        return name[len(children[0]) + 1 :]
    return name


def default_layer(model: nn.Module, x: torch.Tensor) -> tuple[str, str]:
    """``(name, tap)`` of the default XNN layer for inputs like ``x`` ``(B, C, *S)`` (module
    docstring): ``(last linear, "input")`` or ``(last convolution, "output")``."""
    conv_type = conv(spatial_dims_of(x))
    linear_inputs: list[tuple[nn.Module, int]] = []
    convs: list[nn.Module] = []

    def on_linear(module: nn.Module, inputs: tuple) -> None:
        linear_inputs.append((module, inputs[0].dim() if inputs else 0))

    def on_conv(module: nn.Module, _inputs: tuple, _output: torch.Tensor) -> None:
        convs.append(module)

    handles = [
        m.register_forward_pre_hook(on_linear) for m in model.modules() if isinstance(m, nn.Linear)
    ]
    handles += [
        m.register_forward_hook(on_conv) for m in model.modules() if isinstance(m, conv_type)
    ]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for handle in handles:
            handle.remove()
    if linear_inputs and linear_inputs[-1][1] == 2:
        return _name_of(model, linear_inputs[-1][0]), "input"
    if convs:
        return _name_of(model, convs[-1]), "output"
    raise ValueError(
        "xnn found neither a final linear layer nor a convolution in the model; name the "
        "layer to embed with layer=NAME"
    )


def _flat(value: torch.Tensor) -> torch.Tensor:
    """``(B, C, *S)`` -> ``(B, C)`` by the spatial mean; ``(B, D)`` unchanged."""
    if value.dim() > 2:
        return value.flatten(2).mean(2)
    if value.dim() != 2:
        raise ValueError(f"xnn layer gives features of shape {tuple(value.shape)}, expected (B, D)")
    return value


class _Tap:
    """Records one module's input or output (flattened) during a forward pass."""

    def __init__(self, module: nn.Module, tap: str) -> None:
        self.module, self.tap = module, tap
        self.value: torch.Tensor | None = None

    def __enter__(self) -> _Tap:
        if self.tap == "input":
            self.handle = self.module.register_forward_pre_hook(self._pre)
        else:
            self.handle = self.module.register_forward_hook(self._post)
        return self

    def _pre(self, _module: nn.Module, inputs: tuple) -> None:
        self.value = _flat(inputs[0])

    def _post(self, _module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        self.value = _flat(output)

    def __exit__(self, *_exc: object) -> None:
        self.handle.remove()

    def features(self) -> torch.Tensor:
        if self.value is None:
            raise RuntimeError("the xnn layer was not run by the model's forward pass")
        return self.value


def layer_features(
    model: nn.Module, module: nn.Module, tap: str, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z (B, D), logits (B, K))`` of ``model`` on ``x`` in one forward pass."""
    with _Tap(module, tap) as hook:
        logits = model(x)
    return hook.features(), logits


def collect_features(
    model: nn.Module, module: nn.Module, tap: str, batches: Iterable[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``(N, D)`` and logits ``(N, K)`` (float32, CPU) of every image batch."""
    zs, ys = [], []
    with torch.no_grad():
        for x in batches:
            z, y = layer_features(model, module, tap, x)
            zs.append(z.float().cpu())
            ys.append(y.float().cpu())
    return torch.cat(zs), torch.cat(ys)


class XFeatureModel(nn.Module):
    """``x`` ``(B, C, *S)`` -> x-features ``(B, k)`` through the classifier and the XNN
    encoder. The classifier is a submodule, so its convolutions can be Grad-CAM layers."""

    def __init__(self, model: nn.Module, network: XNNNetwork) -> None:
        super().__init__()
        self.model = model
        self.network = network
        self.layer = resolve_module(model, network.config.layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z, _ = layer_features(self.model, self.layer, self.network.config.tap, x)
        return self.network.encode(z)
