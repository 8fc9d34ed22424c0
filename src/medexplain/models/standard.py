"""Standard architectures for the realistic cohorts: MONAI's ResNet and DenseNet, 2D and 3D.

Users bring ResNets and DenseNets; the methods, defaults and speeds must hold on them, not
only on the small VGG-style net of :mod:`.cnn`. ``build_standard_network`` builds MONAI's
implementations (``monai.networks.nets.ResNet`` and ``DenseNet``, He et al. 2016, Huang et al.
2017) at widths that train on two CPU cores in minutes, and wraps them so that they save and
load as medexplain checkpoints (kind ``"standard_network"``): the architecture is rebuilt from
:class:`StandardNetConfig`, the weights come from the state dict, nothing is unpickled.

Defaults (ours; the papers' ImageNet widths are far too slow on a CPU):

- ``resnet``: basic blocks, ``depth`` blocks per stage (1, 1, 1, 1: a ResNet-10 layout),
  ``widths`` (16, 32, 64, 128) channels per stage (the paper's ResNet-18 has 64..512), a
  3-wide stride-1 stem without max pooling (small medical images lose too much to the
  paper's 7-wide stride-2 stem plus pooling);
- ``densenet``: ``widths[0]`` initial features (16; paper 64), growth rate ``widths[1]``
  (8; paper 32), ``depth`` dense layers per block (2, 2, 2; DenseNet-121 has 6, 12, 24, 16).

monai is an optional dependency (the ``cohorts`` extra): it is imported when a network is
built, not when this module is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.spatial import check_dims

__all__ = ["ARCHITECTURES", "StandardNet", "StandardNetConfig", "build_standard_network"]

ARCHITECTURES = ("resnet", "densenet")
_DEFAULTS = {
    "resnet": {"widths": (16, 32, 64, 128), "depth": (1, 1, 1, 1)},
    "densenet": {"widths": (16, 8), "depth": (2, 2, 2)},
}


@dataclass
class StandardNetConfig:
    """Plain hyper-parameters of a :class:`StandardNet` (stored in checkpoints).

    ``arch``: ``"resnet"`` or ``"densenet"``; ``widths``/``depth``: None takes the
    architecture's default (module docstring); ``seed`` fixes the initialisation (None: the
    global torch RNG).
    """

    arch: str = "resnet"
    spatial_dims: int = 2
    in_channels: int = 1
    num_classes: int = 3
    widths: tuple[int, ...] | None = None
    depth: tuple[int, ...] | None = None
    seed: int | None = 0

    def resolved(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(widths, depth)`` with the architecture's defaults filled in."""
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"arch must be one of {ARCHITECTURES}, got {self.arch!r}")
        defaults = _DEFAULTS[self.arch]
        widths = tuple(int(w) for w in (self.widths or defaults["widths"]))
        depth = tuple(int(d) for d in (self.depth or defaults["depth"]))
        if min(widths) < 1 or min(depth) < 1:
            raise ValueError(f"widths and depth must be positive, got {widths} and {depth}")
        if self.arch == "resnet" and len(widths) != len(depth):
            raise ValueError(f"a resnet needs one width per stage: {widths} vs depth {depth}")
        if self.arch == "densenet" and len(widths) != 2:
            raise ValueError(f"densenet widths are (initial features, growth rate), got {widths}")
        return widths, depth


class StandardNet(nn.Module):
    """A MONAI ResNet or DenseNet with its :class:`StandardNetConfig`; ``forward`` maps
    ``(B, C, *S)`` to logits ``(B, num_classes)``."""

    def __init__(self, config: StandardNetConfig, net: nn.Module) -> None:
        super().__init__()
        self.config = config
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _monai_net(config: StandardNetConfig) -> nn.Module:
    try:
        from monai.networks import nets
    except ImportError as error:  # pragma: no cover - the extra is installed by make test
        raise ImportError(
            "standard networks need MONAI: pip install 'medexplain[cohorts]'"
        ) from error
    widths, depth = config.resolved()
    if config.arch == "resnet":
        return nets.ResNet(
            block="basic",
            layers=list(depth),
            block_inplanes=list(widths),
            spatial_dims=config.spatial_dims,
            n_input_channels=config.in_channels,
            conv1_t_size=3,
            conv1_t_stride=1,
            no_max_pool=True,
            num_classes=config.num_classes,
        )
    return nets.DenseNet(
        spatial_dims=config.spatial_dims,
        in_channels=config.in_channels,
        out_channels=config.num_classes,
        init_features=widths[0],
        growth_rate=widths[1],
        block_config=depth,
        bn_size=2,
    )


def build_standard_network(config: StandardNetConfig | dict[str, Any] | None = None) -> StandardNet:
    """Build a :class:`StandardNet` from a config or a plain dict of its fields."""
    if config is None:
        config = StandardNetConfig()
    elif isinstance(config, dict):
        from .checkpoint import config_from_dict

        config = config_from_dict(StandardNetConfig, config)
    elif not isinstance(config, StandardNetConfig):
        raise TypeError(f"config must be a StandardNetConfig or a dict, got {type(config)}")
    check_dims(config.spatial_dims)
    config.resolved()
    with torch.random.fork_rng(devices=[], enabled=config.seed is not None):
        if config.seed is not None:
            torch.manual_seed(config.seed)
        return StandardNet(config, _monai_net(config))
