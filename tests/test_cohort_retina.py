"""The retina cohort: landmarks of the real photograph, exact lesion evidence, mirroring,
the shortcut stamp, determinism and learnability."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("skimage", reason="the retina cohort needs scikit-image (cohorts extra)")

from medexplain.data.cohorts import retina as retina_module
from medexplain.data.cohorts.retina import (
    RETINA_CLASSES,
    RETINA_LANDMARKS,
    as_left_eyes,
    left_eyes,
    make_retina,
    retina_regions,
)
from medexplain.data.split import stratified_split

SIZE = 64


@pytest.fixture(scope="module")
def cohort():
    return make_retina(60, size=SIZE, seed=3, counterfactual=True)


def _pixel_grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = torch.meshgrid(
        torch.arange(size, dtype=torch.float32),
        torch.arange(size, dtype=torch.float32),
        indexing="ij",
    )
    return rows, cols


def test_landmarks_are_found_again_in_the_photograph():
    from scipy import ndimage
    from skimage import data

    photo = data.retina().astype(np.float64) / 255.0
    brightness = photo.sum(axis=2)
    field = brightness > 0.15  # the camera's circle against its black surround
    rows, cols = np.nonzero(field)
    centre = np.array(RETINA_LANDMARKS["fundus_centre"])
    assert np.allclose([rows.mean(), cols.mean()], centre, atol=10)
    assert math.sqrt(field.sum() / math.pi) == pytest.approx(
        RETINA_LANDMARKS["fundus_radius"], rel=0.02
    )
    yy, xx = np.mgrid[: photo.shape[0], : photo.shape[1]]
    dist = np.hypot(yy - centre[0], xx - centre[1])
    smooth = ndimage.gaussian_filter(brightness, 25)
    # Optic disc: the brightest smooth spot of the field; fovea: the darkest in its middle.
    disc = np.unravel_index(np.argmax(np.where(dist < 600, smooth, -1)), smooth.shape)
    fovea = np.unravel_index(np.argmin(np.where(dist < 350, smooth, 9)), smooth.shape)
    assert np.hypot(*(np.array(disc) - RETINA_LANDMARKS["disc"])) < 15
    assert np.hypot(*(np.array(fovea) - RETINA_LANDMARKS["fovea"])) < 15
    # Anatomy: the disc-fovea distance is about 2.5 disc diameters (2.2-3.0 across eyes).
    span = np.hypot(*(np.array(RETINA_LANDMARKS["disc"]) - RETINA_LANDMARKS["fovea"]))
    assert 2.2 < span / RETINA_LANDMARKS["disc_diameter"] < 3.0
    # The disc is bright: its disc-diameter neighbourhood is brighter than 95 % of the field.
    near_disc = np.hypot(yy - disc[0], xx - disc[1]) < RETINA_LANDMARKS["disc_diameter"] / 4
    assert brightness[near_disc].mean() > np.percentile(brightness[field], 95)


def test_shapes_range_and_balance(cohort):
    n = len(cohort)
    assert cohort.images.shape == (n, 3, SIZE, SIZE)
    assert cohort.images.dtype == torch.float32
    assert cohort.images.min() >= 0.0 and cohort.images.max() <= 1.0
    assert cohort.class_names == RETINA_CLASSES
    assert torch.bincount(cohort.labels).tolist() == [20, 20, 20]
    has_evidence = cohort.evidence.flatten(1).any(1)
    assert torch.equal(has_evidence, cohort.labels > 0)
    assert cohort.config["value_range"] == (0.0, 1.0)
    for name in ("macular", "peripheral"):
        assert cohort.regions[name].shape == (1, SIZE, SIZE)
    assert not (cohort.regions["macular"] & cohort.regions["peripheral"]).any()


def test_image_equals_healthy_counterfactual_outside_the_evidence(cohort):
    images, healthy = cohort.images, cohort.extra["counterfactual"]
    outside = ~cohort.evidence.expand_as(images)
    assert torch.equal(images[outside], healthy[outside])
    differs = (images != healthy).any(1, keepdim=True)
    assert not (differs & ~cohort.evidence).any()
    # Lesions darken: never brighter, and most evidence pixels change.
    assert (images <= healthy + 1e-7).all()
    assert differs[cohort.evidence].float().mean() > 0.9
    # Dark red: green falls relatively more than red where the lesion is opaque.
    diseased = cohort.labels > 0
    ev = cohort.evidence[diseased, 0]
    red_loss = 1 - images[diseased, 0][ev].sum() / healthy[diseased, 0][ev].sum()
    green_loss = 1 - images[diseased, 1][ev].sum() / healthy[diseased, 1][ev].sum()
    assert green_loss > red_loss > 0


def test_lesions_lie_in_the_region_of_their_class(cohort):
    rows, cols = _pixel_grid(SIZE)
    for i in range(len(cohort)):
        label = int(cohort.labels[i])
        if label == 0:
            continue
        fovea = cohort.extra["fovea"][i]
        dd = float(cohort.extra["disc_diameter"][i])
        dist = torch.hypot(rows - fovea[0], cols - fovea[1])[cohort.evidence[i, 0]]
        if label == 1:  # macula: within one disc diameter of the fovea
            assert dist.max() <= dd + 1e-4
        else:  # periphery: beyond two disc diameters, inside the field, off the disc
            assert dist.min() > 2 * dd - 1e-4
            assert (cohort.extra["counterfactual"][i].sum(0)[cohort.evidence[i, 0]] > 0.15).all()
            disc = cohort.extra["disc"][i]
            to_disc = torch.hypot(rows - disc[0], cols - disc[1])[cohort.evidence[i, 0]]
            assert to_disc.min() > 0.75 * dd - 1e-4


def test_without_rotation_unmirrored_evidence_lies_in_the_class_regions():
    c = make_retina(45, size=SIZE, seed=5, max_angle=0.0, max_scale=0.0)
    evidence = as_left_eyes(c.evidence, c.extra["flip"])
    assert torch.equal(as_left_eyes(evidence, c.extra["flip"]), c.evidence)
    for label, name in ((1, "macular"), (2, "peripheral")):
        ev = evidence[c.labels == label]
        assert ev.any()
        assert not (ev & ~c.regions[name]).any()
    # The regions themselves, by hand: macula = one disc diameter around the fovea.
    scale = SIZE / RETINA_LANDMARKS["shape"][0]
    fr, fc = ((p + 0.5) * scale - 0.5 for p in RETINA_LANDMARKS["fovea"])
    rows, cols = _pixel_grid(SIZE)
    dd = RETINA_LANDMARKS["disc_diameter"] * scale
    assert torch.equal(retina_regions(SIZE)["macular"][0], torch.hypot(rows - fr, cols - fc) <= dd)


def test_mirrored_eye_puts_disc_and_fovea_on_the_other_side(cohort):
    flip = cohort.extra["flip"]
    assert 0 < int(flip.sum()) < len(cohort)
    disc_col, fovea_col = cohort.extra["disc"][:, 1], cohort.extra["fovea"][:, 1]
    assert (disc_col[~flip] < fovea_col[~flip]).all()
    assert (disc_col[flip] > fovea_col[flip]).all()
    # In the images themselves the brightest smooth spot (the disc) is at extra["disc"].
    healthy = cohort.extra["counterfactual"].sum(1, keepdim=True)
    kernel = torch.ones(1, 1, 7, 7) / 49
    smooth = F.conv2d(healthy, kernel, padding=3)[:, 0].flatten(1)
    peak = smooth.argmax(1)
    found = torch.stack([peak // SIZE, peak % SIZE], 1).float()
    error = (found - cohort.extra["disc"]).norm(dim=1)
    assert (error < 0.5 * cohort.extra["disc_diameter"]).all()


def test_left_eyes_mirror_every_right_eye_back_with_its_truth(cohort):
    left = left_eyes(cohort)
    flip = cohort.extra["flip"]
    # Every image now has the disc on the viewer's left of the fovea, as the source photograph.
    assert (left.extra["disc"][:, 1] < left.extra["fovea"][:, 1]).all()
    for key in ("disc", "fovea"):
        torch.testing.assert_close(left.extra[key][~flip], cohort.extra[key][~flip])
        torch.testing.assert_close(left.extra[key][flip, 0], cohort.extra[key][flip, 0])
    # Images, evidence and counterfactuals move together: still equal outside the evidence.
    torch.testing.assert_close(left.images[flip], cohort.images[flip].flip(-1))
    torch.testing.assert_close(left.images[~flip], cohort.images[~flip])
    assert torch.equal(left.evidence[flip], cohort.evidence[flip].flip(-1))
    outside = ~left.evidence.expand_as(left.images)
    assert torch.equal(left.images[outside], left.extra["counterfactual"][outside])
    # The mirrored disc is where the brightest smooth spot of the mirrored image is.
    healthy = left.extra["counterfactual"].sum(1, keepdim=True)
    smooth = F.conv2d(healthy, torch.ones(1, 1, 7, 7) / 49, padding=3)[:, 0].flatten(1)
    peak = smooth.argmax(1)
    found = torch.stack([peak // SIZE, peak % SIZE], 1).float()
    assert ((found - left.extra["disc"]).norm(dim=1) < 0.5 * left.extra["disc_diameter"]).all()
    assert left.config["left_eyes"] and not cohort.config.get("left_eyes")


def test_mirror_without_other_variation_is_the_exact_left_right_flip():
    c = make_retina(
        8,
        size=SIZE,
        seed=2,
        max_angle=0.0,
        max_scale=0.0,
        illumination=(1.0, 1.0),
        colour_gain=(1.0, 1.0),
        vessel_contrast=(1.0, 1.0),
        counterfactual=True,
    )
    background, vessels, _ = retina_module.retina_source(SIZE)
    source = (background + vessels).clamp(0, 1)
    flip = c.extra["flip"]
    assert flip.any() and (~flip).any()
    healthy = c.extra["counterfactual"]
    assert torch.allclose(healthy[~flip], source.expand(int((~flip).sum()), -1, -1, -1), atol=1e-5)
    assert torch.allclose(
        healthy[flip].flip(-1), source.expand(int(flip.sum()), -1, -1, -1), atol=1e-5
    )


def test_deterministic_by_seed_and_streams_independent():
    a = make_retina(12, size=32, seed=7)
    b = make_retina(12, size=32, seed=7)
    c = make_retina(12, size=32, seed=8)
    assert torch.equal(a.images, b.images) and torch.equal(a.evidence, b.evidence)
    assert torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)


def test_shortcut_mask_is_where_the_stamp_differs():
    plain = make_retina(60, size=SIZE, seed=4)
    stamped = make_retina(60, size=SIZE, seed=4, shortcut=0.5, shortcut_class=2)
    mask = stamped.extra["shortcut"]
    differs = (stamped.images != plain.images).any(1, keepdim=True)
    assert torch.equal(differs, mask)
    has = mask.flatten(1).any(1)
    assert (stamped.labels[has] == 2).all()
    assert 0 < int(has.sum()) < int((stamped.labels == 2).sum())
    assert not (mask & stamped.evidence).any()
    # Everything else is untouched: labels, evidence, and no stamp without the option.
    assert torch.equal(stamped.labels, plain.labels)
    assert torch.equal(stamped.evidence, plain.evidence)
    assert not plain.extra["shortcut"].any()
    every = make_retina(30, size=SIZE, seed=4, shortcut=1.0, shortcut_class=1)
    assert torch.equal(every.extra["shortcut"].flatten(1).any(1), every.labels == 1)


def test_stamp_lies_on_the_black_surround_from_96_pixels():
    c = make_retina(30, size=96, seed=6, shortcut=1.0, shortcut_class=2)
    mask = c.extra["shortcut"]
    assert int(mask.flatten(1).any(1).sum()) == 10
    mask_one = mask[mask.flatten(1).any(1)][0, 0]
    # Every subject's field (its sampled photograph) is black under the stamp.
    plain = make_retina(30, size=96, seed=6)
    assert (plain.images.sum(1)[:, mask_one] < 0.05).all()


def test_invalid_arguments():
    with pytest.raises(ValueError):
        make_retina(0)
    with pytest.raises(ValueError):
        make_retina(3, size=SIZE, shortcut=1.5)
    with pytest.raises(ValueError):
        make_retina(3, size=SIZE, shortcut_class=3)


def _dark_spot_features(c) -> np.ndarray:
    """Per 8 x 8 cell, the mean black top-hat of the green channel (dark details smaller
    than 5 px), after mirroring right eyes back: a generic, label-free image feature."""
    green = as_left_eyes(c.images, c.extra["flip"])[:, 1:2]
    closing = -F.max_pool2d(-F.max_pool2d(green, 5, 1, 2), 5, 1, 2)
    return F.avg_pool2d(closing - green, 8).flatten(1).numpy()


def test_learnable_by_a_small_classifier():
    linear_model = pytest.importorskip("sklearn.linear_model")
    metrics = pytest.importorskip("sklearn.metrics")
    train = make_retina(180, size=SIZE, seed=0)
    test = make_retina(90, size=SIZE, seed=1)
    x_train, x_test = _dark_spot_features(train), _dark_spot_features(test)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    clf = linear_model.LogisticRegression(max_iter=2000)
    clf.fit((x_train - mean) / std, train.labels.numpy())
    proba = clf.predict_proba((x_test - mean) / std)
    y = test.labels.numpy()
    for k in range(3):  # one class against the rest
        assert metrics.roc_auc_score(y == k, proba[:, k]) >= 0.8


@pytest.mark.slow
def test_learnable_from_raw_pixels_by_a_tiny_cnn():
    metrics = pytest.importorskip("sklearn.metrics")
    torch.manual_seed(0)
    train = make_retina(240, size=SIZE, seed=0)
    test = make_retina(90, size=SIZE, seed=1)
    x = as_left_eyes(train.images, train.extra["flip"])
    x_test = as_left_eyes(test.images, test.extra["flip"])
    nn = torch.nn
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(4),
        nn.Flatten(), nn.Linear(16 * (SIZE // 8) ** 2, 3),
    )  # fmt: skip
    optimiser = torch.optim.Adam(net.parameters(), 3e-3)
    order = torch.Generator().manual_seed(0)
    for _ in range(10):
        net.train()
        perm = torch.randperm(len(train), generator=order)
        for start in range(0, len(train), 32):
            batch = perm[start : start + 32]
            loss = F.cross_entropy(net(x[batch]), train.labels[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    net.eval()
    with torch.no_grad():
        proba = net(x_test).softmax(1).numpy()
    y = test.labels.numpy()
    for k in range(3):
        assert metrics.roc_auc_score(y == k, proba[:, k]) >= 0.8


def test_split_is_stratified_disjoint_and_subset_takes_a_boolean_mask(cohort):
    # 20 images per class; fractions (0.5, 0.25, 0.25) cut each class at 10 and 15.
    fractions = (0.5, 0.25, 0.25)
    indices = stratified_split(cohort.labels, 3, fractions, seed=1)
    assert torch.equal(torch.cat(indices).sort().values, torch.arange(len(cohort)))
    parts = cohort.split(fractions, seed=1)
    for part, index, per_class in zip(parts, indices, (10, 5, 5)):
        assert torch.bincount(part.labels, minlength=3).tolist() == [per_class] * 3
        assert torch.equal(part.images, cohort.images[index])
        assert torch.equal(part.extra["flip"], cohort.extra["flip"][index])
    macular = cohort.labels == 1
    chosen = cohort.subset(macular)
    assert len(chosen) == 20 and (chosen.labels == 1).all()
    assert torch.equal(chosen.evidence, cohort.evidence[macular])
