"""The warping simulator on the brain cohort's atrophy, one run per setting.

Data and classifier are the brain cohort demo's (``medexplain demo --cohort brain``, 3D or
its axial slice with ``--dims 2``): the same cohort, split and MONAI DenseNet, trained once
and kept in ``--cache`` (``classifier_<dims>d.pt``) so that every setting explains the same
network. Each ``--setting`` (``key=value,key=value``: warping-simulator parameters, e.g.
``magnitude_weight=10,epochs=40``; ``demo`` for the demo's own ``warp_params``) fits one
simulator through the demo's own step (:func:`medexplain.demo.warp.run_warp_section`) and is
scored on the test volumes the classifier gets right, as the demo scores it
(:func:`medexplain.metrics.warp.evaluate_warp_simulator`): the fraction reaching the
requested log-odds shift per direction, the localisation AUROC of ``|log J|`` against the
atrophy evidence (removal) and the template's atrophy region (injection), folding, and the
cycle error. ``epochs`` bounds a fit by steps so that settings compare at equal training
(``--seconds`` is only a safety cap); the seconds and steps of each fit are reported.

``anatomy``: what the true anatomy allows, on the scored removal volumes ``x`` and their
healthy counterfactuals ``h`` (the cohort renders each subject with ``effects=False``). The
log-odds shift of the atrophy class that each of these buys, as quantiles, and per run the
fraction of volumes whose shift reaches the run's margin (``anatomy_reached``):
``rendered`` ``f(x) - f(h)``; ``exact_removal`` ``f(x) - f(warp(x, r))`` and
``exact_injection`` ``f(warp(h, i)) - f(h)`` with the exact warps ``r``/``i`` of
:func:`medexplain.data.cohorts.brain_warps.atrophy_warps`; ``grid<k>_removal`` /
``grid<k>_injection``: the same warps sampled on the field grid ``field_downsample=k`` (k
= 2, 3, 4 and each run's) and resampled to the image as the simulator's field is (what that
grid can express of them). Where these fall short of the margin, a simulator can reach it
only by warping somewhere else than the atrophy.

Prints one JSON document. Usage: ``python benchmarks/warp_brain.py --dims 2
--setting demo --setting magnitude_weight=3 [--cache DIR] [--threads 1]``;
``--anatomy-only`` prints the anatomy part without fitting.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from medexplain.cli import parse_params
from medexplain.core.spatial import interpolation_mode
from medexplain.data.cohorts import make_brain
from medexplain.data.cohorts.brain_warps import atrophy_warps
from medexplain.demo.prepare import generate_data, train_model
from medexplain.demo.settings import DemoSettings
from medexplain.demo.state import DemoState
from medexplain.demo.warp import WARP_CLASS, run_warp_section, scored_indices
from medexplain.explain.generative.spatial_transform import warp
from medexplain.explain.generative.warp_network import DEFAULT_FIELD_DOWNSAMPLE
from medexplain.explain.generative.warp_training import class_log_odds
from medexplain.models.checkpoint import load_checkpoint

SCORES = (
    "margin",
    "reached_removal",
    "reached_injection",
    "auroc_removal",
    "auroc_injection",
    "folding_fraction",
    "cycle_relative_mse",
)


#: Field grids (``field_downsample``) whose ``grid<k>_*`` shifts every run reports.
GRIDS = (2, 3, 4)


def _setting(text: str, demo_params: dict) -> dict:
    if text == "demo":
        return dict(demo_params)
    return {**demo_params, **parse_params([p for p in text.split(",") if p])}


def _on_field_grid(displacement: torch.Tensor, downsample: int) -> torch.Tensor:
    """``displacement`` ``(B, d, *S)`` sampled on the simulator's field grid for
    ``field_downsample`` (``(n - 1) // k + 1`` points per axis, linear, corners aligned) and
    resampled to ``S`` (voxel units cancel both ways)."""
    spatial = tuple(displacement.shape[2:])
    coarse = tuple((n - 1) // downsample + 1 for n in spatial)
    mode = interpolation_mode(len(spatial))
    low = F.interpolate(displacement, size=coarse, mode=mode, align_corners=True)
    return F.interpolate(low, size=spatial, mode=mode, align_corners=True)


@torch.no_grad()
def anatomy_shifts(state: DemoState, n_images: int, downsamples: set[int]) -> dict:
    """Log-odds shifts ``(n,)`` per kind (module docstring) of the removal volumes the demo's
    warp step scores: correctly classified atrophy test volumes, the first ``n_images``."""
    call = state.bench.config
    names = ("n", "seed", "dims", "spacing", "size", "strength", "noise", "lobe", "lesion_polarity")
    healthy = make_brain(**{key: call[key] for key in names}, effects=False)
    healthy = healthy.split(seed=state.settings.seed)[2]
    test, model = state.test, state.model
    cls = list(test.class_names).index(WARP_CLASS)
    index = scored_indices(model, test, n_images)["removal"]
    x, h = test.images[index], healthy.images[index]
    injection, removal = atrophy_warps(test.subset(index))
    target = torch.full((len(index),), cls)

    def f(images: torch.Tensor) -> torch.Tensor:
        return class_log_odds(model(images), target)

    f_x, f_h = f(x), f(h)
    shifts = {
        "rendered": f_x - f_h,
        "exact_removal": f_x - f(warp(x, removal)),
        "exact_injection": f(warp(h, injection)) - f_h,
    }
    for k in sorted(downsamples):
        shifts[f"grid{k}_removal"] = f_x - f(warp(x, _on_field_grid(removal, k)))
        shifts[f"grid{k}_injection"] = f(warp(h, _on_field_grid(injection, k))) - f_h
    return shifts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, default=2, choices=(2, 3))
    parser.add_argument("--setting", action="append", default=None)
    parser.add_argument("--seconds", type=float, default=1800.0, help="safety cap per fit")
    parser.add_argument("--images", type=int, default=24, help="test images per direction")
    parser.add_argument("--cache", default=None, help="folder keeping the trained classifier")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--anatomy-only", action="store_true", help="print what the anatomy allows, fit nothing"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cache = Path(args.cache or tempfile.mkdtemp(prefix="warp_brain_"))
    cache.mkdir(parents=True, exist_ok=True)
    settings = DemoSettings.for_run(dims=args.dims, cohort="brain")
    state = generate_data(DemoState(cache, settings, False, torch.device("cpu")))
    checkpoint = cache / f"classifier_{args.dims}d.pt"
    if checkpoint.exists():
        state.model, _ = load_checkpoint(checkpoint)
    else:
        state = train_model(state)
        (cache / "classifier.pt").replace(checkpoint)
    state.model.eval()
    runs_params = [
        (text, _setting(text, settings.warp_params)) for text in args.setting or ["demo"]
    ]
    if args.anatomy_only:
        runs_params = []
    downsamples = {p.get("field_downsample") or DEFAULT_FIELD_DOWNSAMPLE for _, p in runs_params}
    anatomy = anatomy_shifts(state, args.images, downsamples | set(GRIDS))
    runs = []
    for text, params in runs_params:
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            entry, _ = run_warp_section(
                state.model,
                state.train,
                state.val,
                state.test,
                Path(out),
                max_seconds=args.seconds,
                n_images=args.images,
                progress=False,
                **params,
            )
        scores = entry["scores"]
        runs.append(
            {
                "setting": text,
                "parameters": params,
                **{key: scores.get(key) for key in SCORES},
                "anatomy_reached": {
                    kind: float((shift >= scores["margin"]).float().mean())
                    for kind, shift in anatomy.items()
                },
                "fit": entry["fit"],
                "seconds_total": time.perf_counter() - started,
            }
        )
    print(
        json.dumps(
            {
                "dims": args.dims,
                "shape": list(state.test.images.shape[2:]),
                "anatomy_shift_quantiles": {
                    kind: {str(q): float(shift.quantile(q)) for q in (0.1, 0.5, 0.9)}
                    for kind, shift in anatomy.items()
                },
                "runs": runs,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
