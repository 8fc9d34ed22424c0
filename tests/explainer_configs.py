"""Fast parameters for every registered explainer, used by the cross-cutting tests.

One table (``CONFIGS``) drives ``tests/test_contract.py`` (the shared contract every explainer
must meet, on tiny 2D and 3D CNNs) and ``tests/test_third_party.py`` (MONAI DenseNet121), in
the spirit of Captum's ``captum/testing/attr/helpers/test_config.py``. Every name in
``medexplain.explain.available()`` MUST have an entry: the contract test fails otherwise. A
method you register is then tested automatically.

Add ONE entry per method to the ``CONFIGS`` dict literal below, keyed by the registered name
(wrappers by their template, e.g. ``"augmented:<name>"``). Every key is optional:

``params``   dict of keyword arguments for ``create(name, model, **params)``: the cheapest
             values that still exercise the method (e.g. ``n_steps=8``). The tests add
             ``batch_size=2`` unless you set it (so a batch of 3 images is split into chunks).
``factory``  ``factory(model, dims) -> Explainer`` builds the explainer instead of
             ``create``; needed for learned explainers (build AND fit them here, on a few
             synthetic images, in a few seconds) and for wrapper templates (e.g.
             ``lambda model, dims: create("augmented:saliency", model, n_augment=2)``). If the
             factory has a keyword parameter ``input_shape`` it also receives the
             ``(C, *spatial)`` shape of the test images. It must not modify ``model``.
``tol``      batch-invariance / target-form tolerance: the largest allowed absolute
             difference divided by the largest ``|value|`` of the reference map
             (default ``DEFAULT_TOL``). Loosen it for methods that optimise in float32.
``dims``     spatial dims the method supports (default ``(2, 3)``).
``slow``     True marks the method's contract tests ``@pytest.mark.slow`` (> 20 s).
``third_party``  False skips the MONAI DenseNet121 test for the method (give the reason in a
             comment); default True.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from medexplain.explain import Explainer, create

DEFAULT_TOL = 1e-4
#: The tests call explainers with this internal batch size unless ``params`` sets one.
TEST_BATCH_SIZE = 2
#: Image shapes (C, *spatial) of the contract test's tiny CNNs (2 channels in 2D so the
#: channel reduction is exercised).
INPUT_SHAPES = {2: (2, 20, 20), 3: (1, 10, 10, 10)}

CONFIGS: dict[str, dict[str, Any]] = {
    "saliency": {"params": {}},
    "input_x_gradient": {"params": {}},
    "integrated_gradients": {"params": {"n_steps": 8}},
    "smoothgrad": {"params": {"n_samples": 4}},
    "gradcam": {"params": {}},
    # Half-image windows, quarter-image stride: 3 positions per dim on the test sizes.
    "occlusion": {"params": {"window_fraction": 0.5}},
    # RISE (explain/rise.py): 8 random masks of 3 cells per axis, drawn once per call.
    "rise": {"params": {"n_masks": 8, "cells": 3}},
    # Mask optimisation (explain/igos.py): coarse 6-cell masks, 3 iterations, 4 integration
    # steps. The per-image Armijo decisions compare float32 losses, so allow float noise.
    # I-GOS with l1=0: the randomly initialised 3D DenseNet121 (test_third_party.py) barely
    # depends on its input, and with the L1 prior I-GOS then rightly keeps M = 1 (a constant
    # map, which that test rejects); tests/test_igos.py covers the L1 term.
    "igos": {
        "params": {"size": 6, "iterations": 3, "integration_steps": 4, "l1": 0.0},
        "tol": 1e-3,
    },
    "igos++": {"params": {"size": 6, "iterations": 2, "integration_steps": 2}, "tol": 1e-3},
    # Learned: fit one epoch on a few random images in the factory (explain/generative).
    "similar_adversarial": {
        "factory": lambda model, dims, input_shape: fit_tiny_similar_adversarial(model, input_shape)
    },
    # Structured Attention Graphs (explain/sag.py): 3 patches per axis, 4 candidates, stop
    # after 3 roots; a 1-iteration, 2-step I-GOS heuristic and a small graph.
    "sag": {
        "params": {
            "grid": 3,
            "candidates": 4,
            "max_roots": 3,
            "heuristic_iterations": 1,
            "heuristic_steps": 2,
            "max_nodes": 10,
        },
        # The random DenseNet121 barely depends on its input: the baseline alone keeps
        # >= 0.9 P, so the only minimal sufficient set is empty and the map is (rightly) 0.
        "third_party": False,
    },
    # Learned: a tiny conditional warping simulator fitted for one epoch on 6 random images
    # labelled with the model's own predictions (explain/generative/warp_simulator.py).
    "warp_simulator": {
        "factory": lambda model, dims, input_shape: fit_tiny_warp_simulator(model, input_shape),
        # ~4 s on the tiny CNNs, but ~45 s on MONAI's DenseNet121 (the fit backpropagates
        # through the classifier), so the entry is marked slow.
        "slow": True,
    },
    # Learned: XNN's explanation network fitted for 20 epochs on the features of 12 random
    # images (explain/generative/xnn.py); its maps are Grad-CAM maps of the x-features.
    "xnn": {"factory": lambda model, dims, input_shape: fit_tiny_xnn(model, input_shape)},
    # Wrapper template: two random rotations/zooms/flips around saliency (explain/augment.py).
    "augmented:<name>": {
        "factory": lambda model, dims: create("augmented:saliency", model, n=2, batch_size=2)
    },
}

KNOWN_KEYS = {"params", "factory", "tol", "dims", "slow", "third_party"}


def config_for(name: str) -> dict[str, Any]:
    """The table entry for ``name``; a clear error when it is missing or malformed."""
    if name not in CONFIGS:
        raise LookupError(
            f"explainer {name!r} is registered but has no entry in tests/explainer_configs.py: "
            f"add CONFIGS[{name!r}] = {{'params': {{...fast parameters...}}}} (see the top of "
            "that file for the format)"
        )
    entry = CONFIGS[name]
    unknown = set(entry) - KNOWN_KEYS
    if unknown:
        raise KeyError(f"CONFIGS[{name!r}] has unknown keys {sorted(unknown)}; known {KNOWN_KEYS}")
    return entry


def tolerance(name: str) -> float:
    return float(config_for(name).get("tol", DEFAULT_TOL))


def build_explainer(
    name: str, model: nn.Module, dims: int, input_shape: tuple[int, ...]
) -> Explainer:
    """Build the explainer ``name`` for ``model`` with the table's fast parameters."""
    entry = config_for(name)
    factory: Callable[..., Explainer] | None = entry.get("factory")
    if factory is not None:
        if "input_shape" in inspect.signature(factory).parameters:
            return factory(model, dims, input_shape=tuple(input_shape))
        return factory(model, dims)
    if ":" in name:
        raise LookupError(
            f"CONFIGS[{name!r}] is a wrapper template: give it a 'factory' that creates a "
            "concrete wrapped explainer, e.g. create('augmented:saliency', model)"
        )
    params = {"batch_size": TEST_BATCH_SIZE, **entry.get("params", {})}
    return create(name, model, **params)


def fit_tiny_similar_adversarial(model: nn.Module, input_shape: tuple[int, ...]) -> Explainer:
    """A similar/adversarial explainer fitted for one epoch on 6 random images (a few
    seconds). Targets other than the prediction are accepted silently (``other_target``):
    the contract tests call with arbitrary targets; the warning is tested in
    tests/test_similar_adversarial.py."""
    import torch
    from torch.utils.data import TensorDataset

    from medexplain.explain.generative.similar_adversarial import SimilarAdversarial

    x = torch.rand((6, *input_shape), generator=torch.Generator().manual_seed(0))
    data = TensorDataset(x, torch.zeros(6, dtype=torch.long))
    explainer = SimilarAdversarial(
        model,
        widths=(4, 8),
        epochs=1,
        train_batch_size=3,
        lr=1e-2,
        other_target="ignore",
        batch_size=TEST_BATCH_SIZE,
    )
    return explainer.fit(data, progress=False)


def fit_tiny_warp_simulator(model: nn.Module, input_shape: tuple[int, ...]) -> Explainer:
    """A warping simulator (widths 4-8) fitted for one epoch on 6 random images whose labels
    are the model's predictions, so every image counts as correctly classified and every
    class is trained (a few seconds). The model is left as found (model_guard)."""
    import torch
    from torch.utils.data import TensorDataset

    from medexplain.explain import model_guard
    from medexplain.explain.generative.warp_simulator import fit_warp_simulator

    x = torch.rand((6, *input_shape), generator=torch.Generator().manual_seed(0))
    with model_guard(model), torch.no_grad():
        labels = model(x).argmax(dim=1)
    return fit_warp_simulator(
        model,
        TensorDataset(x, labels),
        widths=(4, 8),
        epochs=1,
        lr=1e-2,
        train_batch_size=3,
        max_seconds=None,
        progress=False,
        batch_size=TEST_BATCH_SIZE,
    )


def fit_tiny_xnn(model: nn.Module, input_shape: tuple[int, ...]) -> Explainer:
    """XNN (k=2) fitted for 20 epochs on the layer features of 12 random images (about a
    second). The model is left as found (the fit runs under model_guard)."""
    import torch
    from torch.utils.data import TensorDataset

    from medexplain.explain.generative.xnn import fit_xnn

    x = torch.rand((12, *input_shape), generator=torch.Generator().manual_seed(0))
    data = TensorDataset(x, torch.zeros(12, dtype=torch.long))
    return fit_xnn(model, data, k=2, epochs=20, progress=False, batch_size=TEST_BATCH_SIZE)
