"""Model-parameter randomisation test (Adebayo et al. 2018, "Sanity Checks for Saliency Maps").

Cascading randomisation: starting from the output layer, the model's parameterised layers
are re-initialised one cumulative step at a time (top layer, then top two, ... until all),
the images are re-explained after every step, and each map is compared with the map of
the trained model by Spearman rank correlation. An explanation that depends on what the
model learned decorrelates quickly; one that stays highly correlated (e.g. an edge
detector) does not explain the model.

Choices (documented where the paper leaves freedom):

- the caller's model is never touched: the test runs on a ``copy.deepcopy``;
- "layer" = a module with parameters of its own (``Conv``, ``Linear``, norm layers, ...),
  ordered from the output down by *reverse registration order* (the forward order for
  ``nn.Sequential``-style models). ``granularity="block"`` uses the model's top-level
  children instead, and ``layers=`` takes an explicit top-down list of module names (a
  string per layer or a list of names per block) for models registered out of order;
- re-initialisation calls the module's own ``reset_parameters()`` (PyTorch's default
  initialisation; norm layers return to weight 1, bias 0 and fresh running statistics),
  or draws ``N(0, std(param)^2)`` for modules without it; it runs under a forked RNG seeded
  with ``seed + step``, so results are deterministic and the global RNG is left as it was;
- the targets are fixed before randomising (default: the trained model's predictions), so
  every map explains the same class;
- Spearman is computed on ``|map|`` by default (``absolute=True``; Adebayo et al. report
  both, absolute values being the usual choice for visualised maps) and on the signed maps;
  both are returned. A constant or near-constant map (range at most ``FLAT_TOLERANCE`` of
  its largest magnitude) has no ranking to correlate: its correlation is NaN, not 0, and it
  is counted as *degenerate* (``degenerate``); an explainer whose maps go flat does not
  pass the check by reading as uncorrelated.

Arguments follow the metrics' order ``(model, x, y, maps)``; the method under test comes
as ``make_explainer``, any callable ``model -> (x, targets) -> maps``
(:class:`ExplainerFactory`), so this module needs no explainer class. A lower correlation
once every layer is randomised is better (:data:`DIRECTIONS`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from ..core.model import model_device
from ..core.ranks import spearman
from ..core.scores import as_targets

GRANULARITIES = ("layer", "block")
#: A map whose range is at most this fraction of its largest magnitude counts as flat.
FLAT_TOLERANCE = 1e-6


def flat_maps(maps: torch.Tensor) -> torch.Tensor:
    """Which maps ``(B, ...)`` are constant or near-constant (see ``FLAT_TOLERANCE``), ``(B,)``
    bool; an all-zero map is flat."""
    flat = maps.flatten(1).double()
    spread = flat.amax(dim=1) - flat.amin(dim=1)
    return spread <= FLAT_TOLERANCE * flat.abs().amax(dim=1)


DIRECTIONS = {"rank_correlation_fully_randomized": "lower"}


class ExplainerFactory(Protocol):
    """Builds the method under test for a model: ``make(model)(x, targets) -> maps``.

    ``x`` ``(B, C, *S)``, ``targets`` long ``(B,)``, maps ``(B, 1, *S)``; e.g.
    ``lambda m: create("integrated_gradients", m)``.
    """

    def __call__(
        self, model: nn.Module
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]: ...


@dataclass
class SanityResult:
    """Rank correlations of randomised-model maps with the trained model's maps.

    ``steps[i]`` lists the module names re-initialised at step ``i`` (cumulative: step ``i``
    has randomised ``steps[0] ... steps[i]``). ``correlation_abs`` / ``correlation_signed``
    are float64 ``(L, B)`` (step, image), NaN where a map is flat; ``correlation`` is the one
    chosen by ``absolute``. ``degenerate`` ``(L, B)`` bool marks a flat trained-model or
    randomised map.
    ``maps`` (optional) is ``(L + 1, B, 1, *S)``: the original maps then one per step.
    """

    steps: list[list[str]]
    correlation_abs: torch.Tensor
    correlation_signed: torch.Tensor
    absolute: bool
    targets: torch.Tensor
    maps: torch.Tensor | None = None
    degenerate: torch.Tensor | None = None

    @property
    def step_names(self) -> list[str]:
        """One label per step (block members joined with '+')."""
        return ["+".join(names) for names in self.steps]

    @property
    def correlation(self) -> torch.Tensor:
        return self.correlation_abs if self.absolute else self.correlation_signed

    @property
    def mean(self) -> torch.Tensor:
        """Mean correlation over the images with non-flat maps, per step ``(L,)`` (NaN
        where every map is flat)."""
        return self.correlation.nanmean(dim=1)

    @property
    def degenerate_fraction(self) -> float:
        """Share of the images whose map is flat once every layer is randomised (or was
        flat for the trained model): 0 for a healthy explainer; above 0 is a failure."""
        if self.degenerate is None:
            return 0.0
        return float(self.degenerate[-1].double().mean())

    @property
    def rank_correlation_fully_randomized_per_image(self) -> torch.Tensor:
        """``(B,)`` correlation once every layer is randomised."""
        return self.correlation[-1]

    @property
    def rank_correlation_fully_randomized(self) -> float:
        """Mean over the images with non-flat maps of the correlation once every layer is
        randomised (NaN when all are flat: see :attr:`degenerate_fraction`)."""
        return float(self.correlation[-1].nanmean())

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (no maps)."""
        return {
            "steps": self.step_names,
            "absolute": self.absolute,
            "mean": self.mean.tolist(),
            "per_image": self.correlation.tolist(),
            "mean_abs": self.correlation_abs.mean(dim=1).tolist(),
            "mean_signed": self.correlation_signed.mean(dim=1).tolist(),
            "rank_correlation_fully_randomized": self.rank_correlation_fully_randomized,
            "degenerate_fraction": self.degenerate_fraction,
        }


def _own_parameters(module: nn.Module) -> list[nn.Parameter]:
    return list(module.parameters(recurse=False))


def parameterised_layers(model: nn.Module) -> list[str]:
    """Names of modules with parameters of their own, top (output) first, i.e. reverse
    registration order."""
    names = [name for name, module in model.named_modules() if _own_parameters(module)]
    return names[::-1]


def _blocks(model: nn.Module) -> list[list[str]]:
    steps = [[name] for name, child in model.named_children() if list(child.parameters())]
    if _own_parameters(model):
        steps.append([""])  # parameters held by the root module itself
    return steps[::-1]


def _resolve_steps(
    model: nn.Module, granularity: str, layers: Sequence[str | Sequence[str]] | None
) -> list[list[str]]:
    if layers is not None:
        modules = dict(model.named_modules())
        steps = [[item] if isinstance(item, str) else list(item) for item in layers]
        for names in steps:
            for name in names:
                if name not in modules:
                    raise ValueError(f"layers names an unknown module {name!r}")
                if not list(modules[name].parameters()):
                    raise ValueError(f"module {name!r} in layers has no parameters")
        if not steps:
            raise ValueError("layers must name at least one module")
        return steps
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    steps = (
        [[name] for name in parameterised_layers(model)]
        if granularity == "layer"
        else _blocks(model)
    )
    if not steps:
        raise ValueError("the model has no parameters to randomise")
    return steps


@torch.no_grad()
def reinitialise(module: nn.Module, seed: int, recurse: bool = True) -> None:
    """Re-initialise in place every parameterised module inside ``module`` (itself included;
    only ``module`` itself when ``recurse=False``).

    Each calls its own ``reset_parameters()`` when it has one, else its parameters are drawn
    from ``N(0, std^2)`` (std of the current values, 0.02 if constant). Runs under a forked
    RNG seeded with ``seed``, so the global RNG state is left untouched.
    """
    params = list(module.parameters())
    cuda = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(int(seed))
        for sub in module.modules() if recurse else [module]:
            own = _own_parameters(sub)
            if not own:
                continue
            if callable(getattr(sub, "reset_parameters", None)):
                sub.reset_parameters()
                continue
            for p in own:
                std = float(p.float().std()) if p.numel() > 1 else 0.0
                p.normal_(0.0, std if std > 0 else 0.02)


def _check_inputs(model: nn.Module, x: torch.Tensor, make_explainer: ExplainerFactory) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(make_explainer):
        raise TypeError("make_explainer must be a callable model -> explainer")
    if not isinstance(x, torch.Tensor) or x.dim() not in (4, 5):
        raise ValueError("x must be a tensor (B, C, H, W) or (B, C, D, H, W)")


def _fixed_targets(
    work: nn.Module, x: torch.Tensor, y: int | torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """``y`` as long ``(B,)``; None = the trained model's predicted classes (eval mode)."""
    if y is not None:
        return as_targets(y, x.shape[0], device=device)
    training = work.training
    work.eval()
    with torch.no_grad():
        logits = work(x)
    work.train(training)
    return as_targets(None, x.shape[0], device=device, logits=lambda: logits)


def _compare(
    original: torch.Tensor, randomised: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spearman of ``|maps|`` and of the signed maps ``(B,)`` (NaN where either map is flat)
    and which images have a flat map ``(B,)``, all on the CPU."""
    a, b = original.flatten(1), randomised.flatten(1)
    bad = flat_maps(original) | flat_maps(randomised)
    nan = torch.full(bad.shape, float("nan"), dtype=torch.float64, device=bad.device)
    on_abs = torch.where(bad, nan, spearman(a.abs(), b.abs()))
    signed = torch.where(bad, nan, spearman(a, b))
    return on_abs.cpu(), signed.cpu(), bad.cpu()


def cascading_randomization(
    model: nn.Module,
    x: torch.Tensor,
    y: int | torch.Tensor | None,
    maps: torch.Tensor | None = None,
    *,
    make_explainer: ExplainerFactory,
    absolute: bool = True,
    granularity: str = "layer",
    layers: Sequence[str | Sequence[str]] | None = None,
    seed: int = 0,
    return_maps: bool = False,
) -> SanityResult:
    """Cascading model-parameter randomisation test of an explanation method.

    Args:
        model: trained classifier (not modified: a deep copy is randomised).
        x: ``(B, C, *S)`` images (2D or 3D).
        y: class per image (int or ``(B,)``); None = the trained model's predicted classes,
            kept fixed.
        maps: ``(B, 1, *S)`` maps of the trained model, if already computed; None = made
            with ``make_explainer`` on the trained copy.
        make_explainer: ``model -> explainer`` (:class:`ExplainerFactory`), e.g.
            ``lambda m: create("integrated_gradients", m)``; called once per randomisation
            step (and once for the trained copy when ``maps`` is None).
        absolute: headline correlation on ``|map|`` (default, see module docstring) or on
            the signed maps; both are computed.
        granularity: ``"layer"`` (each parameterised module) or ``"block"`` (top-level
            children); ignored when ``layers`` lists the top-down steps explicitly.
        seed: seeds the re-initialisation (step ``i`` uses ``seed + i``).
        return_maps: keep every step's maps in the result (memory ``(L + 1) B prod(S)``).

    Returns a :class:`SanityResult`; ``rank_correlation_fully_randomized`` is the mean
    correlation with all layers randomised.
    """
    _check_inputs(model, x, make_explainer)
    work = copy.deepcopy(model)
    steps = _resolve_steps(work, granularity, layers)
    device = model_device(work)
    x = x.to(device)
    targets = _fixed_targets(work, x, y, device)
    expected = (x.shape[0], 1, *x.shape[2:])

    def explain(m: nn.Module) -> torch.Tensor:
        out = make_explainer(m)(x, targets)
        if tuple(out.shape) != expected:
            raise RuntimeError(f"explainer returned maps of shape {tuple(out.shape)}")
        return out.detach()

    if maps is None:
        original = explain(work)
    elif tuple(maps.shape) != expected:
        raise ValueError(f"maps must have shape {expected}, got {tuple(maps.shape)}")
    else:
        original = maps.detach().to(device)
    modules = dict(work.named_modules())
    corr_abs, corr_signed, degenerate = [], [], []
    kept = [original.cpu()] if return_maps else []
    # single layers reset only their own parameters; blocks and named modules everything inside
    recurse = layers is not None or granularity == "block"
    for step, names in enumerate(steps):
        for name in names:
            reinitialise(modules[name], seed + step, recurse=recurse and name != "")
        randomised = explain(work)
        step_abs, step_signed, bad = _compare(original, randomised)
        corr_abs.append(step_abs)
        corr_signed.append(step_signed)
        degenerate.append(bad)
        if return_maps:
            kept.append(randomised.cpu())
    return SanityResult(
        steps=steps,
        correlation_abs=torch.stack(corr_abs),
        correlation_signed=torch.stack(corr_signed),
        absolute=bool(absolute),
        targets=targets.cpu(),
        maps=torch.stack(kept) if return_maps else None,
        degenerate=torch.stack(degenerate),
    )
