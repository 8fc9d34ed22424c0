"""A small end-to-end demo run: every file the issue lists, numbers with their meaning."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medexplain.demo import DemoSettings, run_demo

REQUIRED = [
    "seconds_per_image",
    "deletion_auc",
    "insertion_auc",
    "localization_auroc",
    "global.localization_auroc",
    "global.shortcut_fraction",
    "peppr.erase_area",
    "peppr.restore_area",
    "peppr.random_erase_area",
    "peppr.random_restore_area",
    "sanity.rank_correlation_fully_randomized",
]


def _get(tree, dotted):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


@pytest.mark.slow
def test_tiny_demo_writes_everything(tmp_path):
    settings = DemoSettings.for_run(
        dims=2,
        quick=True,
        n_images=300,
        shortcut=1.0,
        train_epochs=4,
        n_explain=30,
        n_peppr=20,
        n_deletion=4,
        n_sanity=2,
        peppr_steps=4,
        peppr_seeds=2,
        methods=("saliency", "gradcam"),
    )
    results = run_demo(tmp_path, settings, progress=False)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["methods"].keys() == {"saliency", "gradcam"}
    # Saliency is |gradient| (Simonyan et al. 2014) and Grad-CAM ReLU-ed (Selvaraju et al.
    # 2017): both unsigned at their defaults, as the explainer instances report.
    assert not on_disk["methods"]["saliency"]["signed"]
    assert not on_disk["methods"]["gradcam"]["signed"]
    for method in on_disk["methods"].values():
        for key in REQUIRED:
            assert _get(method, key) is not None, key
        # Areas under curves over [0, 1] of metrics in [0, 1].
        for key in ("erase_area", "restore_area", "random_erase_area"):
            assert 0.0 <= method["peppr"][key] <= 1.0
        assert 0.0 <= method["global"]["shortcut_fraction"] <= 1.0
    # SAG on the first examples: its figure in the report, its roots in the JSON.
    assert 1 <= len(on_disk["sag"]["images"]) <= settings.sag_images
    for rank, entry in enumerate(on_disk["sag"]["images"]):
        assert (tmp_path / "figures" / f"sag_{rank}.png").stat().st_size > 1000
        assert all(0 <= p < 49 for root in entry["roots"] for p in root)
    # One random-order control shared by every method.
    randoms = {m["peppr"]["random_erase_area"] for m in on_disk["methods"].values()}
    assert len(randoms) == 1
    assert 0.0 <= results["classifier"]["test_accuracy"] <= 1.0
    assert (tmp_path / "report.html").read_text().count("data:image/png;base64,") >= 5
    # Global maps as .npy, loadable, one per label group and method.
    lesion = np.load(tmp_path / "maps" / "gradcam" / "label__lesion_mean.npy")
    assert lesion.shape[-2:] == (64, 64) and np.isfinite(lesion).all()
    for name in ("examples", "global_saliency", "peppr_gradcam"):
        assert (tmp_path / "figures" / f"{name}.png").stat().st_size > 1000


def test_costly_methods_explain_a_subset_and_volumes_get_their_parameters():
    """The per-method image counts of ``DEMO_IMAGES`` and 3D parameters of ``DEMO_METHODS``
    reach the run: the smaller of the mode's and the 3D count, never more than the explained
    set."""
    from medexplain.demo import DEMO_IMAGES

    table = DEMO_IMAGES["igos++"]
    default, quick = DemoSettings.for_run(), DemoSettings.for_run(quick=True)
    volumes = DemoSettings.for_run(dims=3)
    assert default.method_images("igos++") == (table["explain"]["default"], 1)
    assert quick.method_images("igos++") == (table["explain"]["quick"], 1)
    assert volumes.method_images("igos++") == (table["explain"]["3d"], 0)
    occlusion = DEMO_IMAGES["occlusion"]["sanity"]
    assert default.method_images("occlusion") == (default.n_explain, occlusion["default"])
    # 3D: min(mode count 6, 3D count 1) = 1, within the run's n_sanity = 2.
    assert volumes.method_images("occlusion") == (volumes.n_explain, 1)
    assert default.method_images("saliency") == (default.n_explain, default.n_sanity)
    tiny = DemoSettings.for_run(n_explain=5)
    assert tiny.method_images("igos") == (5, 1)
    assert volumes.method_params("occlusion") == {"window_fraction": 0.25}
    assert default.method_params("occlusion") == {}
    assert volumes.method_params("igos")["size"] == 8


def test_warp_section_writes_a_loadable_simulator_its_maps_and_scores(tmp_path):
    """The demo's warping-simulator section on tiny volumes (16^3): the checkpoint reloads
    (weights_only) and reproduces the saved Jacobian NIfTI; the scores are fractions."""
    import nibabel as nib
    import torch

    from medexplain.data.synthetic import make_benchmark
    from medexplain.demo.warp import run_warp_section
    from medexplain.explain import create
    from medexplain.explain.batch import predicted_classes
    from medexplain.explain.generative import jacobian_determinant
    from medexplain.models.cnn import CNNConfig, build_classifier
    from medexplain.models.train import train_classifier

    bench = make_benchmark(90, dims=3, size=16, seed=0)
    train, val, test = bench.split(seed=0)
    model = build_classifier(CNNConfig(spatial_dims=3, num_classes=3, widths=(4, 8)))
    train_classifier(model, train.dataset(), None, epochs=3, seed=0, progress=False)
    model.eval()
    entry, figures = run_warp_section(
        model, train, val, test, tmp_path, max_seconds=5.0, n_images=4, progress=False
    )
    scores = entry["scores"]
    assert scores["n_removal"] + scores["n_injection"] > 0  # else nothing below is checked
    for key in ("reached_removal", "reached_injection", "folding_fraction"):
        if key in scores:
            assert 0.0 <= scores[key] <= 1.0
    for path in figures.values():
        assert path.stat().st_size > 1000
    explainer = create("warp_simulator", model, checkpoint=tmp_path / "warp_simulator.pt")
    compared = 0
    atrophy = bench.class_names.index("atrophy")
    correct = predicted_classes(model, test.images) == test.labels
    for name, direction in (("removal", -1), ("injection", 1)):
        saved = tmp_path / "maps" / "warp_simulator" / f"{name}_jacobian.nii.gz"
        if scores[f"n_{name}"] == 0:
            continue
        label = atrophy if direction == -1 else bench.class_names.index("healthy")
        first = (correct & (test.labels == label)).nonzero()[0, 0]
        _, u = explainer.simulate(test.images[first : first + 1], direction, atrophy)
        volume = np.asarray(nib.load(saved).dataobj)
        assert volume.shape == (16, 16, 16)
        assert np.allclose(volume, jacobian_determinant(u)[0, 0].numpy(), atol=1e-5)
        assert torch.isfinite(torch.from_numpy(volume)).all()
        compared += 1
    assert compared > 0
