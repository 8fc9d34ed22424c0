"""Model helpers every layer needs: the guard that leaves a model untouched, its device, seeds.

:func:`model_guard` is what makes the explainer contract's last clause hold ("the model is
left exactly as found: train/eval flags, ``requires_grad``, hooks"); metrics and runs use it
for the same reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


def _hook_ids(modules: list[nn.Module]) -> dict[tuple[int, str], set[int]]:
    """The keys of every non-empty hook dictionary, by (module index, dictionary name)."""
    ids: dict[tuple[int, str], set[int]] = {}
    for index, module in enumerate(modules):
        for attr in HOOK_DICTS:
            hooks = getattr(module, attr, None)
            if hooks:
                ids[(index, attr)] = set(hooks.keys())
    return ids


@contextmanager
def model_guard(model: nn.Module, eval_mode: bool = True, freeze: bool = True) -> Iterator[None]:
    """Run a block with the model in eval mode and frozen parameters, then restore it exactly.

    Restores every module's ``training`` flag and every parameter's ``requires_grad``, and
    removes any hook a library registered inside the block but failed to remove.
    Freezing the parameters means backward passes only compute input gradients (cheaper)
    and never accumulate into ``param.grad``.

    Only what differs is changed, in both directions: a one-pass explainer on a small
    network calls this once per batch, and touching every module of an already frozen
    eval-mode model would cost as much as the network's own pass.
    """
    modules = list(model.modules())
    training_flags = [m.training for m in modules]
    params = list(model.parameters())
    requires_grad = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    hooks_before = _hook_ids(modules)
    try:
        if eval_mode and any(training_flags):
            model.eval()
        if freeze:
            for p, flag in zip(params, requires_grad):
                if flag:
                    p.requires_grad_(False)
        yield
    finally:
        for module, flag in zip(modules, training_flags):
            if module.training != flag:
                module.training = flag
        for p, flag, grad in zip(params, requires_grad, grads):
            if p.requires_grad != flag:
                p.requires_grad_(flag)
            if p.grad is not grad:
                p.grad = grad
        for index, module in enumerate(modules):
            for attr in HOOK_DICTS:
                hooks = getattr(module, attr, None)
                if not hooks:
                    continue
                for key in set(hooks.keys()) - hooks_before.get((index, attr), set()):
                    del hooks[key]


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a parameter-free model)."""
    for parameter in model.parameters():
        return parameter.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def seeded_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A torch.Generator on ``device`` seeded with ``seed``."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    return generator


def per_image_noise(
    shape: tuple[int, ...], batch: int, seed: int, device: torch.device | str, std: float = 1.0
) -> torch.Tensor:
    """Gaussian noise ``(batch, *shape)`` where every image gets the same draw for a seed.

    Used by random methods so that an image's result never depends on what else is in its
    batch (the batch-invariance contract): the noise is drawn once per image shape from a
    generator seeded by ``seed`` and broadcast over the batch.
    """
    generator = seeded_generator(seed, device)
    noise = torch.randn(shape, generator=generator, device=device) * std
    return noise.unsqueeze(0).expand(batch, *shape)
