"""Every registered explainer on a third-party architecture: MONAI's DenseNet121, 2D and 3D.

DenseNet121 brings what the tiny test nets lack: dense concatenations, in-place ReLUs,
BatchNorm everywhere, pooling transitions. Randomly initialised (nothing is downloaded).
Input sizes are the smallest DenseNet121 accepts: it downsamples by 32, and 16^3 fails in
its last transition, so both use 32 pixels per side. monai is a dev extra: imported only here.
"""

from __future__ import annotations

import pytest
import torch

from explainer_configs import CONFIGS, build_explainer
from test_contract import NAMES, MaxForwardRows, ModelSnapshot

monai_nets = pytest.importorskip("monai.networks.nets")

SHAPES = {2: (1, 32, 32), 3: (1, 32, 32, 32)}
NUM_CLASSES = 3


@pytest.fixture(scope="module", params=[2, 3], ids=["2d", "3d"])
def densenet(request):
    dims = request.param
    torch.manual_seed(0)
    model = monai_nets.DenseNet121(spatial_dims=dims, in_channels=1, out_channels=NUM_CLASSES)
    model.train()  # the explainers must switch to eval themselves and switch back
    return dims, model


def _params(name: str):
    entry = CONFIGS.get(name, {})
    marks = [pytest.mark.slow] if entry.get("slow") else []
    return pytest.param(name, marks=marks)


@pytest.mark.parametrize("name", [_params(name) for name in NAMES])
def test_explainer_on_monai_densenet121(densenet, name):
    dims, model = densenet
    if name not in CONFIGS:
        pytest.fail(f"{name!r} has no entry in tests/explainer_configs.py")
    entry = CONFIGS[name]
    if entry.get("third_party", True) is False:
        pytest.skip(f"{name}: third_party=False in tests/explainer_configs.py")
    if dims not in entry.get("dims", (2, 3)):
        pytest.skip(f"{name} does not support {dims}D")
    shape = SHAPES[dims]
    snapshot = ModelSnapshot(model)
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0))

    explainer = build_explainer(name, model, dims, shape)
    batch_size = explainer.batch_size
    with MaxForwardRows(model) as rows:
        maps = explainer(x)

    assert tuple(maps.shape) == (2, 1, *shape[1:]), f"{name}: maps {tuple(maps.shape)}"
    assert maps.dtype == torch.float32
    assert torch.isfinite(maps).all(), f"{name}: NaN or inf on DenseNet121 {dims}D"
    spread = maps.flatten(1).std(dim=1)
    assert (spread > 0).all(), f"{name}: a constant map on DenseNet121 {dims}D ({spread})"
    assert rows.max_rows <= batch_size, f"{name}: a forward pass of {rows.max_rows} images"
    snapshot.assert_unchanged(f"{name} on DenseNet121 {dims}D")
