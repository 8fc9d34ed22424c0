"""The one contract every registered explainer meets, on tiny 2D and 3D CNNs.

Parametrised over ``medexplain.explain.available()``, so a method registered later is tested
automatically with the fast parameters of ``tests/explainer_configs.py`` (it must have an
entry there). The contract (DESIGN.md, ``medexplain.explain.base``):

- maps are float32 ``(B, 1, *spatial)``, finite; unsigned methods never go below zero;
- a batch of N equals N single calls (batch invariance, chunking by ``batch_size``);
- no forward pass of the model carries more than ``batch_size`` images;
- two calls with the same seed are identical;
- target as an int, as a tensor and None (= the predicted class) agree;
- the model is left exactly as found: parameters and buffers (BatchNorm running statistics),
  every module's ``training`` flag, every parameter's ``requires_grad`` and ``grad``, no
  hooks left behind; the input tensor is not modified.

The tiny nets have BatchNorm and Dropout and are *in training mode* when handed over, so an
explainer that forgets eval mode breaks batch invariance and determinism.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from explainer_configs import CONFIGS, INPUT_SHAPES, build_explainer, config_for, tolerance
from medexplain.core.spatial import adaptive_avg_pool, batch_norm, conv
from medexplain.explain import available

NAMES = sorted(available())
N_IMAGES = 3
NUM_CLASSES = 3


# ---------------------------------------------------------------- helpers shared with
# tests/test_third_party.py


def _hook_counts(model: nn.Module) -> list[tuple[int, str, int]]:
    counts = []
    for index, module in enumerate(model.modules()):
        for attr, value in vars(module).items():
            if "hook" in attr and isinstance(value, dict):
                counts.append((index, attr, len(value)))
    return counts


def _global_hook_counts() -> dict[str, int]:
    from torch.nn.modules import module as module_mod

    return {
        name: len(value)
        for name, value in vars(module_mod).items()
        if name.startswith("_global") and "hook" in name and isinstance(value, dict)
    }


class ModelSnapshot:
    """Everything an explainer must leave unchanged on a model."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.training = [(name, m.training) for name, m in model.named_modules()]
        self.requires_grad = [(name, p.requires_grad) for name, p in model.named_parameters()]
        self.grads = [
            (name, None if p.grad is None else p.grad.clone())
            for name, p in model.named_parameters()
        ]
        self.hooks = _hook_counts(model)
        self.global_hooks = _global_hook_counts()

    def assert_unchanged(self, who: str) -> None:
        model = self.model
        state = model.state_dict()
        assert state.keys() == self.state.keys(), f"{who} changed the model's state_dict keys"
        for key, value in self.state.items():
            assert torch.equal(state[key], value), f"{who} changed {key} of the model"
        training = [(name, m.training) for name, m in model.named_modules()]
        assert training == self.training, f"{who} did not restore the modules' training flags"
        requires_grad = [(name, p.requires_grad) for name, p in model.named_parameters()]
        assert requires_grad == self.requires_grad, f"{who} did not restore requires_grad"
        for (name, before), p in zip(self.grads, model.parameters()):
            if before is None:
                assert p.grad is None, f"{who} left a .grad on parameter {name}"
            else:
                assert p.grad is not None and torch.equal(p.grad, before), (
                    f"{who} changed the existing .grad of parameter {name}"
                )
        assert _hook_counts(model) == self.hooks, f"{who} left hooks on the model's modules"
        assert _global_hook_counts() == self.global_hooks, f"{who} left global module hooks"


class MaxForwardRows:
    """Context manager recording the largest batch a model's forward pass receives."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.max_rows = 0

    def _hook(self, _module: nn.Module, inputs: tuple) -> None:
        if inputs and isinstance(inputs[0], torch.Tensor):
            self.max_rows = max(self.max_rows, int(inputs[0].shape[0]))

    def __enter__(self) -> MaxForwardRows:
        self.handle = self.model.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


def assert_maps_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    """Max |actual - expected| relative to the largest |expected| must be <= tol."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = expected.abs().max().clamp_min(1e-12)
    error = float((actual - expected).abs().max() / scale)
    assert error <= tol, f"{what}: relative difference {error:.3g} > tolerance {tol:.3g}"


# ---------------------------------------------------------------- tiny nets


def tiny_cnn(dims: int, in_channels: int, num_classes: int = NUM_CLASSES) -> nn.Module:
    """conv-BN-ReLU, strided conv-ReLU, global pool, Dropout, linear: 2D or 3D."""
    return nn.Sequential(
        conv(dims)(in_channels, 4, 3, padding=1),
        batch_norm(dims)(4),
        nn.ReLU(),
        conv(dims)(4, 6, 3, stride=2, padding=1),
        nn.ReLU(),
        adaptive_avg_pool(dims)(1),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(6, num_classes),
    )


def prepared_model(dims: int, seed: int = 0) -> nn.Module:
    """A tiny CNN in a deliberately awkward state: training mode (BatchNorm with non-trivial
    running statistics, active Dropout), one module in eval mode, one frozen parameter and
    one parameter with an existing ``.grad``."""
    torch.manual_seed(seed)
    model = tiny_cnn(dims, INPUT_SHAPES[dims][0])
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(8, *INPUT_SHAPES[dims]) * 2 + 0.5)  # moves the running stats
    model.train()
    model[2].eval()  # a ReLU: mixed training flags must be restored module by module
    model[0].bias.requires_grad_(False)
    model[-1].weight.grad = torch.full_like(model[-1].weight, 0.25)
    return model


def _param(name: str):
    entry = CONFIGS.get(name, {})
    return pytest.param(name, marks=[pytest.mark.slow] if entry.get("slow") else [])


# ---------------------------------------------------------------- tests


def test_every_registered_explainer_has_a_config_entry():
    missing = [name for name in NAMES if name not in CONFIGS]
    assert not missing, (
        f"registered explainers without an entry in tests/explainer_configs.py: {missing}; "
        "add one per method (format at the top of that file)"
    )
    stale = [name for name in CONFIGS if name not in NAMES]
    assert not stale, f"tests/explainer_configs.py has entries for unregistered names: {stale}"


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", [_param(name) for name in NAMES])
def test_explainer_contract(name: str, dims: int):
    try:
        entry = config_for(name)
    except LookupError as error:
        pytest.fail(str(error))
    if dims not in entry.get("dims", (2, 3)):
        pytest.skip(f"{name} does not support {dims}D (explainer_configs.py)")
    tol = tolerance(name)
    shape = INPUT_SHAPES[dims]
    model = prepared_model(dims)
    snapshot = ModelSnapshot(model)
    reference = copy.deepcopy(model).eval()
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(N_IMAGES, *shape, generator=generator)
    x_before = x.clone()
    with torch.no_grad():
        predicted = reference(x).argmax(1)

    explainer = build_explainer(name, model, dims, shape)
    batch_size = explainer.batch_size
    with MaxForwardRows(model) as rows:
        maps = explainer(x)  # target None: the predicted class

        # Output: shape, dtype, finite, sign.
        expected_shape = (N_IMAGES, 1, *shape[1:])
        assert tuple(maps.shape) == expected_shape, f"{name}: maps {tuple(maps.shape)}"
        assert maps.dtype == torch.float32, f"{name}: maps dtype {maps.dtype}"
        assert torch.isfinite(maps).all(), f"{name}: maps contain NaN or inf"
        if not explainer.signed:
            assert maps.min() >= 0, f"{name} is declared unsigned but returned negative values"

        # Deterministic for a seed.
        again = explainer(x)
        assert torch.equal(maps, again), f"{name}: two calls with the same seed differ"

        # Target forms agree: None == tensor of predicted classes; int == tensor of that int.
        assert_maps_close(explainer(x, predicted), maps, tol, f"{name}: target tensor vs None")
        t = int(predicted[0])
        by_int = explainer(x, t)
        by_tensor = explainer(x, torch.full((N_IMAGES,), t))
        assert_maps_close(by_int, by_tensor, tol, f"{name}: int target vs tensor target")

        # Batch invariance: N images at once equal N single calls.
        singles = torch.cat([explainer(x[i : i + 1], predicted[i : i + 1]) for i in range(3)])
        assert_maps_close(singles, maps, tol, f"{name}: batch of {N_IMAGES} vs single calls")
        assert_maps_close(explainer(x[:1], t), maps[:1], tol, f"{name}: single call, int target")

    assert rows.max_rows <= batch_size, (
        f"{name}: a forward pass carried {rows.max_rows} images, more than batch_size={batch_size}"
    )
    assert torch.equal(x, x_before) and not x.requires_grad, f"{name} modified its input"
    snapshot.assert_unchanged(name)


@pytest.mark.parametrize(
    "name", [n for n in NAMES if n in CONFIGS and "factory" not in CONFIGS[n] and ":" not in n]
)
def test_bad_input_is_a_clear_error(name: str):
    model = prepared_model(2)
    explainer = build_explainer(name, model, 2, INPUT_SHAPES[2])
    x = torch.rand(2, *INPUT_SHAPES[2])
    with pytest.raises(ValueError, match="out of range"):
        explainer(x, NUM_CLASSES)
    with pytest.raises(ValueError, match="x must have shape"):
        explainer(x[0])
