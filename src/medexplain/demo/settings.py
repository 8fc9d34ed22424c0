"""The demo's sizes (:class:`DemoSettings`), explainer parameters and per-method image counts.

Explainer parameters (:data:`DEMO_METHODS`) are the published defaults unless an entry says
otherwise: the quick variant trades accuracy of the estimate for time and the ``"3d"`` entries
are added for volumes. In 3D, occlusion's default window (1/8 of each side, stride half of it)
means 3,375 passes per 32^3 volume, so the demo uses windows of 1/4 (343 passes), integrated
gradients 20 steps and SmoothGrad 20 samples; I-GOS runs with 8^3 masks and the quick
iteration counts.

Image counts (:data:`DEMO_IMAGES`) are separate: mask optimisation costs seconds per image at
the papers' defaults (``benchmarks/igos.py``), so those methods explain only the first
``explain`` images of the explained set and run the sanity check on ``sanity`` of them; the
others explain the whole set. For volumes the smaller of the mode's and the ``"3d"`` count
is used; I-GOS skips the sanity check there, since its line searches back-track far more on
the randomised models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .cohorts import cohort_defaults

#: Explainer keyword arguments per method: ``{"default" | "quick" | "3d": {...}}``.
_MASK_OPTIMISATION: dict[str, dict[str, Any]] = {
    "default": {},
    "quick": {"iterations": 5, "integration_steps": 10},
    "3d": {"size": 8, "iterations": 5, "integration_steps": 10},
}
DEMO_METHODS: dict[str, dict[str, dict[str, Any]]] = {
    "saliency": {"default": {}, "quick": {}},
    "input_x_gradient": {"default": {}, "quick": {}},
    "integrated_gradients": {
        "default": {"n_steps": 50},
        "quick": {"n_steps": 16},
        "3d": {"n_steps": 20},
    },
    "smoothgrad": {
        "default": {"n_samples": 50},
        "quick": {"n_samples": 10},
        "3d": {"n_samples": 20},
    },
    "gradcam": {"default": {}, "quick": {}},
    "occlusion": {"default": {}, "quick": {}, "3d": {"window_fraction": 0.25}},
    "igos": _MASK_OPTIMISATION,
    "igos++": _MASK_OPTIMISATION,
}

#: Image counts per method, capped by the run's ``n_explain`` and ``n_sanity``:
#: ``{"explain" | "sanity": {"default" | "quick" | "3d": count}}``; a method or key not
#: listed uses the run's count.
_MASK_OPTIMISATION_IMAGES: dict[str, dict[str, int]] = {
    "explain": {"default": 24, "quick": 12, "3d": 6},
    "sanity": {"default": 1, "quick": 1, "3d": 0},
}
DEMO_IMAGES: dict[str, dict[str, dict[str, int]]] = {
    "occlusion": {"sanity": {"default": 6, "quick": 3, "3d": 1}},
    "igos": _MASK_OPTIMISATION_IMAGES,
    "igos++": _MASK_OPTIMISATION_IMAGES,
}


@dataclass
class DemoSettings:
    """Sizes of the demo run; ``for_run`` picks defaults that fit the time budgets
    (2D default < 5 min, quick < 90 s on 2 CPU cores; 3D longer, with the warping
    simulator).

    ``warp_seconds > 0`` fits a warping simulator for the atrophy class for at most that
    long (:mod:`medexplain.demo.warp`) and scores it on ``warp_images`` test images per
    direction; ``for_run`` turns it on for volumes (``--dims 3``); ``warp_params`` are the
    simulator's keywords (e.g. ``diffeomorphic=True``: a stationary velocity field
    integrated by scaling and squaring, so no voxel folds).

    ``cohort`` (None: the geometric benchmark) names a realistic cohort of
    :mod:`medexplain.demo.cohorts`, whose defaults ``for_run`` takes; ``arch`` is the
    classifier: ``"cnn"`` (the small VGG-style net of :mod:`medexplain.models.cnn`) or a
    MONAI ``"resnet"`` / ``"densenet"`` (:mod:`medexplain.models.standard`).
    ``generator_seconds > 0`` fits the similar/adversarial generator for at most that long
    and explains with it beside the other methods. ``mask_optimisation_images`` caps the
    images of the methods with their own counts in :data:`DEMO_IMAGES` (the cohorts' larger
    networks make each mask optimisation slower).
    """

    cohort: str | None = None
    arch: str = "cnn"
    dims: int = 2
    quick: bool = False
    seed: int = 0
    device: str = "cpu"
    n_images: int = 2000
    size: int | None = None
    shortcut: float = 0.7
    shortcut_class: int = 1
    widths: tuple[int, ...] = (8, 16, 32)
    train_epochs: int = 15
    train_lr: float = 3e-3
    train_seconds: float = 300.0
    train_patience: int = 5
    train_monitor: str = "accuracy"
    n_explain: int = 150
    n_peppr: int = 150
    n_deletion: int = 32
    n_sanity: int = 6
    n_examples: int = 4
    sag_images: int = 3
    warp_seconds: float = 0.0
    warp_images: int = 24
    warp_params: dict[str, Any] = field(default_factory=dict)
    generator_seconds: float = 0.0
    peppr_steps: int = 20
    peppr_seeds: int = 5
    normalise: str = "max"
    transform: str = "abs"
    methods: tuple[str, ...] = tuple(DEMO_METHODS)
    mask_optimisation_images: int | None = None

    @classmethod
    def for_run(
        cls, dims: int = 2, quick: bool = False, cohort: str | None = None, **overrides: Any
    ) -> DemoSettings:
        """The defaults for ``dims`` (2 or 3) and ``quick`` (or those of ``cohort``, with
        ``dims`` choosing the brain cohort's 2D slice), then ``overrides`` by field name."""
        settings = cls._cohort(cohort, dims, quick) if cohort else cls._benchmark(dims, quick)
        if quick:
            settings.peppr_steps = 10
            settings.warp_seconds = min(settings.warp_seconds, 90.0)
            settings.generator_seconds = min(settings.generator_seconds, 60.0)
        for key, value in overrides.items():
            setattr(settings, key, value)
        return settings

    @classmethod
    def _cohort(cls, cohort: str, dims: int, quick: bool) -> DemoSettings:
        """The sizes of a realistic cohort (:func:`~.cohorts.cohort_defaults`); a fitted
        generator is explained beside the other methods."""
        settings = cls(cohort=cohort, quick=quick, **cohort_defaults(cohort, quick, dims))
        if settings.generator_seconds > 0:
            settings.methods = (*settings.methods, "similar_adversarial")
        return settings

    @classmethod
    def _benchmark(cls, dims: int, quick: bool) -> DemoSettings:
        """The geometric benchmark's sizes for ``dims`` and ``quick``."""
        settings = cls(dims=dims, quick=quick)
        if dims == 3:
            settings = cls(
                dims=3,
                quick=quick,
                n_images=600,
                train_epochs=12,
                train_seconds=600.0,
                n_explain=32,
                n_peppr=48,
                n_deletion=8,
                n_sanity=2,
                warp_seconds=180.0,
            )
        if quick:
            settings.n_images = 1200 if dims == 2 else 300
            settings.train_epochs = 12
            settings.train_seconds = 120.0 if dims == 2 else 300.0
            settings.n_explain = 48 if dims == 2 else 24
            settings.n_peppr = 60 if dims == 2 else 24
            settings.n_deletion = 12 if dims == 2 else 6
            settings.n_sanity = 3 if dims == 2 else 2
        return settings

    @property
    def mode(self) -> str:
        """``"quick"`` or ``"default"``: the column of the method tables this run reads."""
        return "quick" if self.quick else "default"

    def method_params(self, name: str) -> dict[str, Any]:
        """The explainer keyword arguments of ``name`` for this run (without the seed)."""
        table = DEMO_METHODS.get(name, {})
        params = dict(table.get(self.mode, {}))
        if self.dims == 3:
            params.update(table.get("3d", {}))
        return params

    def method_images(self, name: str) -> tuple[int, int]:
        """How many images ``name`` explains and how many its sanity check uses."""
        table = DEMO_IMAGES.get(name, {})
        n_explain = self._count(table.get("explain", {}), self.n_explain)
        if "explain" in table and self.mask_optimisation_images is not None:
            n_explain = min(n_explain, self.mask_optimisation_images)
        return n_explain, self._count(table.get("sanity", {}), self.n_sanity)

    def _count(self, counts: dict[str, int], run_count: int) -> int:
        count = counts.get(self.mode, run_count)
        if self.dims == 3:
            count = min(count, counts.get("3d", count))
        return min(count, run_count)
