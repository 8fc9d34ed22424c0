"""The realistic cohorts in the demo: which generator, network and sizes each one uses.

``medexplain demo --cohort brain|retina|chest`` runs the demo's chain on a cohort of
:mod:`medexplain.data.cohorts` instead of the geometric benchmark, with a MONAI network
(:mod:`medexplain.models.standard`). The sizes below keep each cohort's default run within
15 minutes on two CPU cores (``--quick`` within about 5):

- ``brain``: 600 volumes on the MNI152 template at 4 mm (39 x 47 x 41; ``--dims 2``: the
  axial slice through both hippocampi), T1 contrast, so the white-matter lesions are
  hypointense as on T1; a DenseNet (its 3D passes are ten times cheaper than the ResNet's at
  the default widths, ``benchmarks/cohorts.py``). No shortcut. The warping simulator is
  fitted for the atrophy class, whose ground truth is the deformation's Jacobian.
- ``retina``: 1,200 colour fundus photographs of 96 px, right eyes mirrored to left eyes
  before training (:func:`~medexplain.data.cohorts.retina.left_eyes`), the camera stamp on
  70% of the macular images; a DenseNet. The similar/adversarial generator is fitted and
  explained beside the other methods.
- ``chest``: 2,400 radiographs of 64 px on the real lung masks, the laterality marker on
  90% of the pneumonia images (with fewer marked images the DenseNet leans on the opacity
  and little on the marker; with all of them it ignores the opacity); a DenseNet.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from ..data.cohorts import Cohort

#: Cohort name -> DemoSettings fields of its default run (``quick`` entries override).
COHORT_SETTINGS: dict[str, dict[str, Any]] = {
    "brain": {
        "dims": 3,
        "n_images": 600,
        "arch": "densenet",
        "shortcut": 0.0,
        "train_epochs": 60,
        # At the default 3e-3 the volumes' atrophy-vs-healthy split is learnt late or, on
        # some floating-point paths, not at all; 1e-3 learns it on every path tried
        # (benchmarks/results/README.md, cohorts_faithfulness_brain3d.json).
        "train_lr": 1e-3,
        "train_seconds": 240.0,
        "train_patience": 15,
        "train_monitor": "loss",
        "n_explain": 48,
        "n_peppr": 48,
        "n_deletion": 8,
        "n_sanity": 2,
        "warp_seconds": 360.0,
        # Diffeomorphic, a required shift of 1.5x the median |log-odds|, a stronger
        # displacement penalty and the field on a 4x coarser grid, barely smoothed:
        # with the library defaults the simulator fooled the DenseNet with warps of the
        # whole brain instead of the medial temporal lobes; a step on the 4x grid costs
        # about a quarter of one on the 2x grid, and 3D fits are limited by their steps
        # (benchmarks/warp_brain.py).
        "warp_params": {
            "diffeomorphic": True,
            "margin_fraction": 1.5,
            "magnitude_weight": 3.0,
            "field_downsample": 4,
            "field_sigma": 0.5,
        },
        "quick": {"n_images": 300, "train_seconds": 120.0, "n_explain": 24, "n_peppr": 24},
        # --dims 2, the axial slice: slices are cheap, so as many as the 2D cohorts.
        "slice": {
            "dims": 2,
            "n_images": 1200,
            "n_explain": 120,
            "n_peppr": 100,
            "n_deletion": 24,
            # The slice takes a stronger displacement penalty than the volumes and 40 epochs
            # on the 2x field grid: at 1.0 the removal warps moved one hippocampus and the
            # posterior midline; at 10 they act on both (benchmarks/warp_brain.py).
            "warp_seconds": 180.0,
            "warp_params": {
                "diffeomorphic": True,
                "margin_fraction": 1.5,
                "magnitude_weight": 10.0,
                "epochs": 40,
            },
            "quick": {"n_images": 600, "n_explain": 48, "n_peppr": 48, "n_deletion": 12},
        },
    },
    "retina": {
        "dims": 2,
        "n_images": 1200,
        "arch": "densenet",
        "shortcut": 0.7,
        "shortcut_class": 1,
        "train_epochs": 40,
        "train_seconds": 240.0,
        "train_patience": 8,
        "train_monitor": "loss",
        "n_explain": 120,
        "n_peppr": 100,
        "n_deletion": 24,
        "n_sanity": 4,
        "generator_seconds": 150.0,
        "mask_optimisation_images": 12,
        "quick": {"n_images": 600, "train_seconds": 90.0, "n_explain": 48, "n_peppr": 48},
    },
    "chest": {
        "dims": 2,
        "n_images": 2400,
        "arch": "densenet",
        "shortcut": 0.9,
        "shortcut_class": 1,
        "train_epochs": 40,
        "train_seconds": 240.0,
        "train_patience": 8,
        "train_monitor": "loss",
        "n_explain": 150,
        "n_peppr": 120,
        "n_deletion": 24,
        "n_sanity": 4,
        "mask_optimisation_images": 12,
        "quick": {"n_images": 1200, "train_seconds": 90.0, "n_explain": 60, "n_peppr": 60},
    },
}

COHORTS = tuple(COHORT_SETTINGS)


def cohort_defaults(name: str, quick: bool, dims: int = 2) -> dict[str, Any]:
    """The DemoSettings fields of cohort ``name``: its entries, then its ``quick`` ones when
    ``quick``, then (the brain cohort with ``dims=2``) those of its ``slice``."""
    if name not in COHORT_SETTINGS:
        raise ValueError(f"unknown cohort {name!r}; choose one of {', '.join(COHORTS)}")
    table = COHORT_SETTINGS[name]
    fields = {k: v for k, v in table.items() if k not in ("quick", "slice")}
    if quick:
        fields.update(table["quick"])
    if dims == 2 and "slice" in table:
        fields.update({k: v for k, v in table["slice"].items() if k != "quick"})
        if quick:
            fields.update(table["slice"]["quick"])
    return copy.deepcopy(fields)


def _brain(n: int, dims: int, seed: int, shortcut: float, shortcut_class: int) -> Cohort:
    from ..data.cohorts import make_brain

    return make_brain(n, seed=seed, dims=dims, lesion_polarity="dark")


def _retina(n: int, dims: int, seed: int, shortcut: float, shortcut_class: int) -> Cohort:
    from ..data.cohorts.retina import left_eyes, make_retina

    cohort = make_retina(n, seed=seed, shortcut=shortcut, shortcut_class=shortcut_class)
    return left_eyes(cohort)


def _chest(n: int, dims: int, seed: int, shortcut: float, shortcut_class: int) -> Cohort:
    from ..data.cohorts import make_chest

    return make_chest(n, seed=seed, shortcut=shortcut, shortcut_class=shortcut_class)


_MAKERS: dict[str, Callable[[int, int, int, float, int], Cohort]] = {
    "brain": _brain,
    "retina": _retina,
    "chest": _chest,
}


def make_cohort(
    name: str, n: int, *, dims: int, seed: int, shortcut: float, shortcut_class: int
) -> Cohort:
    """The cohort ``name`` as the demo uses it (see the module docstring)."""
    if name not in _MAKERS:
        raise ValueError(f"unknown cohort {name!r}; choose one of {', '.join(COHORTS)}")
    if name != "brain" and dims != 2:
        raise ValueError(f"the {name} cohort is 2D; --dims 3 applies to the brain cohort only")
    return _MAKERS[name](n, dims, seed, shortcut, shortcut_class)


def describe_cohort(name: str | None, data: dict[str, Any]) -> str:
    """One sentence for the report on what the images are."""
    shape = "x".join(str(s) for s in data["shape"])
    sources = {
        None: f"{data['n_images']} synthetic aligned images",
        "brain": f"{data['n_images']} brain MRI on the MNI152 template (nilearn)",
        "retina": f"{data['n_images']} colour fundus photographs (scikit-image's fundus image)",
        "chest": f"{data['n_images']} chest radiographs on real lung masks",
    }
    return f"{sources.get(name, sources[None])} ({data['dims']}D, shape {shape})"
