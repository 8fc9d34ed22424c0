"""The demo on the realistic cohorts: settings per cohort, the shortcut's ground truth, maps
in MNI space, the fitted generator, against references computed independently here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medexplain.demo import COHORTS, DemoSettings, run_demo

pytest.importorskip("monai", reason="the cohort demos use MONAI networks (cohorts extra)")


def _tiny(cohort: str, dims: int = 2, **overrides) -> DemoSettings:
    fields = dict(
        n_images=120,
        train_epochs=2,
        n_explain=9,
        n_peppr=6,
        n_deletion=3,
        n_sanity=1,
        peppr_steps=3,
        peppr_seeds=1,
        sag_images=0,
        warp_seconds=0.0,
        methods=("saliency", "gradcam"),
    )
    fields.update(overrides)
    return DemoSettings.for_run(dims=dims, quick=True, cohort=cohort, **fields)


def test_cohort_settings_choose_a_monai_network_and_their_own_steps():
    assert set(COHORTS) == {"brain", "retina", "chest"}
    brain = DemoSettings.for_run(dims=3, cohort="brain")
    assert brain.arch == "densenet" and brain.dims == 3 and brain.warp_seconds > 0
    assert brain.shortcut == 0.0 and brain.generator_seconds == 0.0
    assert DemoSettings.for_run(dims=2, cohort="brain").dims == 2
    retina = DemoSettings.for_run(cohort="retina")
    assert retina.generator_seconds > 0 and retina.methods[-1] == "similar_adversarial"
    assert retina.warp_seconds == 0.0
    # Mask optimisation is capped by the cohort's count, whatever the mode's table says.
    assert retina.method_images("igos++")[0] == retina.mask_optimisation_images
    assert retina.method_images("saliency")[0] == retina.n_explain
    quick = DemoSettings.for_run(quick=True, cohort="chest")
    assert quick.n_images < DemoSettings.for_run(cohort="chest").n_images
    assert DemoSettings.for_run(cohort="chest", n_explain=7).n_explain == 7
    with pytest.raises(ValueError, match="unknown cohort 'knee'"):
        DemoSettings.for_run(cohort="knee")


def test_cli_refuses_a_volume_of_a_photograph(tmp_path):
    from typer.testing import CliRunner

    from medexplain.cli import app

    result = CliRunner().invoke(
        app, ["demo", "--cohort", "retina", "--dims", "3", "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 2 and "brain cohort only" in result.output
    result = CliRunner().invoke(app, ["demo", "--cohort", "knee", "--out", str(tmp_path / "k")])
    assert result.exit_code == 2 and "brain, retina, chest" in result.output
    assert not (tmp_path / "r").exists() and not (tmp_path / "k").exists()


@pytest.mark.slow
def test_chest_demo_measures_the_marker_share_of_the_shortcut_class(tmp_path):
    """The shortcut metrics of a chest run, recomputed from the saved global map and the
    cohort's own marker masks."""
    from medexplain.data.cohorts import make_chest

    settings = _tiny("chest", shortcut=1.0)
    results = run_demo(tmp_path, settings, progress=False)
    cohort = make_chest(settings.n_images, seed=settings.seed, shortcut=1.0, shortcut_class=1)
    marker = cohort.extra["shortcut"].any(0)[0].numpy()  # every marker pixel of the cohort
    assert marker.any() and not cohort.extra["shortcut"][cohort.labels != 1].any()
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["data"]["cohort"] == "chest" and on_disk["settings"]["arch"] == "densenet"
    for name in settings.methods:
        mean = np.load(tmp_path / "maps" / name / "label__pneumonia_mean.npy")
        positive = np.clip(mean.reshape(marker.shape), 0, None)
        expected = positive[marker].sum() / positive.sum()
        found = results["methods"][name]["global"]
        assert found["shortcut_fraction"] == pytest.approx(expected, rel=1e-5)
        assert found["marker_share_of_image"] == pytest.approx(marker.mean())


@pytest.mark.slow
def test_brain_slice_demo_writes_its_maps_in_mni_space(tmp_path):
    nib = pytest.importorskip("nibabel")
    from medexplain.data.cohorts import make_brain

    settings = _tiny("brain", dims=2)
    run_demo(tmp_path, settings, progress=False)
    reference = make_brain(1, dims=2)
    affine, affine_shape = reference.affine, tuple(reference.images.shape[2:])
    written = sorted((tmp_path / "maps" / "saliency").glob("*.nii.gz"))
    assert {p.name for p in written} >= {"label_atrophy.nii.gz", "overall.nii.gz"}
    for path in written:
        image = nib.load(path)
        assert int(image.header["sform_code"]) == 4 and int(image.header["qform_code"]) == 4
        np.testing.assert_allclose(image.affine, affine, atol=1e-5)
        assert image.shape == (*affine_shape, 1)
    for nii, npy in (("label_atrophy", "label__atrophy"), ("overall", "overall")):
        stored = np.load(tmp_path / "maps" / "saliency" / f"{npy}_mean.npy").squeeze()
        written_map = np.asarray(nib.load(tmp_path / "maps" / "saliency" / f"{nii}.nii.gz").dataobj)
        np.testing.assert_allclose(written_map[..., 0], stored, atol=1e-6)


@pytest.mark.slow
def test_retina_demo_fits_the_generator_and_explains_with_it(tmp_path):
    """The generator's JSON rates are those of its checkpoint, reloaded and scored again on
    the same test images (mirrored to left eyes, as the demo trains)."""
    from medexplain.data.cohorts.retina import left_eyes, make_retina
    from medexplain.explain import create
    from medexplain.models.checkpoint import load_checkpoint

    settings = _tiny("retina", generator_seconds=3.0)
    settings.methods = ("saliency", "similar_adversarial")
    results = run_demo(tmp_path, settings, progress=False)
    entry = results["learned_explainers"]["similar_adversarial"]
    rates = entry["test_decision_rates"]
    model, _ = load_checkpoint(tmp_path / "classifier.pt")
    explainer = create(
        "similar_adversarial", model.eval(), checkpoint=tmp_path / "similar_adversarial.pt"
    )
    cohort = left_eyes(make_retina(settings.n_images, seed=0, shortcut=settings.shortcut))
    test = cohort.split(seed=settings.seed)[2]
    again = explainer.decision_rates(test.images)
    assert again["n"] == rates["n"] == len(test)
    assert again["kept"] == pytest.approx(rates["kept"]) and again["flipped"] == pytest.approx(
        rates["flipped"]
    )
    method = results["methods"]["similar_adversarial"]
    assert method["sanity"] is None and "refit" in method["sanity_note"]
    assert method["n_explained"] == settings.n_explain
    assert torch.isfinite(torch.tensor(method["global"]["localization_auroc"]))
