"""MONAI ResNet/DenseNet classifiers: rebuilt exactly from safe checkpoints, seeded, and
explained like the small CNN (saliency checked against autograd, Grad-CAM finds a layer)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("monai.networks.nets")

from medexplain.explain import create
from medexplain.models.checkpoint import save_checkpoint
from medexplain.models.external import load_model
from medexplain.models.standard import StandardNetConfig, build_standard_network

SHAPES = {2: (1, 32, 32), 3: (1, 16, 16, 16)}
CASES = [("resnet", 2), ("resnet", 3), ("densenet", 2), ("densenet", 3)]


def _net(arch: str, dims: int, seed: int = 0):
    return build_standard_network(StandardNetConfig(arch=arch, spatial_dims=dims, seed=seed))


@pytest.mark.parametrize(("arch", "dims"), CASES)
def test_checkpoint_round_trip_through_load_model(tmp_path, arch, dims):
    net = _net(arch, dims).eval()
    save_checkpoint(tmp_path / "net.pt", net, extra={"class_names": ["a", "b", "c"]})
    loaded = load_model(tmp_path / "net.pt")
    x = torch.rand(3, *SHAPES[dims], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    assert loaded.labels == ["a", "b", "c"]


def test_the_seed_fixes_the_weights_whatever_the_global_rng():
    torch.manual_seed(123)
    a = _net("resnet", 2, seed=5)
    torch.manual_seed(456)
    b = _net("resnet", 2, seed=5)
    c = _net("resnet", 2, seed=6)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert any(not torch.equal(p, r) for p, r in zip(a.parameters(), c.parameters()))


def test_widths_must_match_the_architecture():
    with pytest.raises(ValueError, match="one width per stage"):
        build_standard_network(StandardNetConfig(arch="resnet", widths=(8, 16), depth=(1, 1, 1)))
    with pytest.raises(ValueError, match="arch must be one of"):
        build_standard_network(StandardNetConfig(arch="vgg"))


@pytest.mark.parametrize(("arch", "dims"), CASES)
def test_saliency_equals_autograd_and_gradcam_finds_a_layer(arch, dims):
    net = _net(arch, dims)
    net.train()  # the explainers must evaluate in eval mode and restore train mode
    x = torch.rand(2, *SHAPES[dims], generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([0, 2])
    maps = create("saliency", net)(x, targets)
    assert net.training
    reference = net.eval()
    xr = x.clone().requires_grad_(True)
    reference(xr)[torch.arange(2), targets].sum().backward()
    torch.testing.assert_close(maps, xr.grad.abs().sum(1, keepdim=True))
    cam = create("gradcam", net)(x, targets)
    assert cam.shape == (2, 1, *SHAPES[dims][1:]) and torch.isfinite(cam).all()
    assert (cam >= 0).all()  # Selvaraju et al.: the ReLU keeps positive evidence only
