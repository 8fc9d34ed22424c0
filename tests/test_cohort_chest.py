"""Chest cohort: real annotations decoded right, evidence exactly where the image changed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

pytest.importorskip("PIL", reason="the chest cohort decodes lung masks with Pillow")

from medexplain.data.cohorts import chest_sources as sources
from medexplain.data.cohorts.chest import CLASS_NAMES, make_chest

try:
    WHEEL = sources.find_wheel()
except FileNotFoundError:
    WHEEL = None


def test_rle_decoder_matches_hand_made_example():
    # 4 rows x 3 columns, pixels counted down each column: flat index = column * 4 + row.
    # "1 2 3 1": skip 1 -> pixels 1, 2 (column 0, rows 1 and 2); then skip 3 after pixel 2,
    # i.e. pixels 3, 4, 5 -> pixel 6 (column 1, row 2).
    expected = np.zeros((4, 3), dtype=bool)
    expected[1, 0] = expected[2, 0] = expected[2, 1] = True
    np.testing.assert_array_equal(sources.decode_siim_rle("1 2 3 1", height=4, width=3), expected)
    # A run crossing a column boundary continues at the top of the next column.
    crossing = np.zeros((4, 3), dtype=bool)
    crossing[3, 0] = crossing[0, 1] = crossing[1, 1] = True
    np.testing.assert_array_equal(sources.decode_siim_rle("3 3", height=4, width=3), crossing)
    assert not sources.decode_siim_rle("-1", height=4, width=3).any()


def test_missing_wheel_error_names_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv(sources.WHEEL_ENV, str(tmp_path / "absent.whl"))
    with pytest.raises(FileNotFoundError, match="make cohort-data"):
        sources.find_wheel()


needs_wheel = pytest.mark.skipif(
    WHEEL is None,
    reason="torchxrayvision wheel (chest annotations) absent; fetch it with "
    + sources.FETCH_COMMAND,
)


@pytest.fixture(scope="module")
def cohort():
    return make_chest(90, size=64, seed=3, shortcut=0.5, counterfactual=True)


@needs_wheel
def test_lung_masks_are_binary_and_two_lunged():
    masks = sources.lung_masks(WHEEL, 24, 64)
    assert masks.dtype == bool and masks.shape == (24, 64, 64)
    for mask in masks:
        labels, count = ndimage.label(mask)
        assert count == 2
        columns = [np.nonzero(labels == k)[1].mean() for k in (1, 2)]
        assert min(columns) < 32 < max(columns)  # one lung on each side of the midline


@needs_wheel
def test_siim_masks_come_from_real_codes():
    masks = sources.siim_masks(WHEEL, 8, 64)
    assert masks.shape == (8, 64, 64) and masks.min() >= 0 and masks.max() <= 1
    assert all(m.sum() > 0 for m in masks)  # only images with a pneumothorax are used


@needs_wheel
def test_siim_codes_decode_upright_apical_pneumothoraces():
    # In upright radiographs free pleural air collects at the apex: decoded column-major, most
    # SIIM masks lie in the upper half of the image (decoded row-major, i.e. transposed, about
    # half of them would).
    masks = sources.siim_masks(WHEEL, 60, 32)
    rows = np.arange(32)[None, :, None]
    centre = (masks * rows).sum((1, 2)) / masks.sum((1, 2))
    assert (centre < 16).mean() > 0.75


@needs_wheel
def test_shapes_range_balance(cohort):
    assert cohort.images.shape == (90, 1, 64, 64) and cohort.images.dtype == torch.float32
    assert cohort.images.min() >= 0 and cohort.images.max() <= 1
    assert cohort.class_names == CLASS_NAMES
    assert torch.bincount(cohort.labels).tolist() == [30, 30, 30]
    assert not cohort.evidence[cohort.labels == 0].any()
    assert all(cohort.evidence[i].any() for i in torch.nonzero(cohort.labels > 0).flatten())


@needs_wheel
def test_disease_only_changes_the_image_inside_its_evidence(cohort):
    healthy = cohort.extra["counterfactual"]
    outside = ~cohort.evidence
    assert torch.equal(cohort.images[outside], healthy[outside])
    assert torch.equal(cohort.images[cohort.labels == 0], healthy[cohort.labels == 0])
    changed = (cohort.images != healthy) & cohort.evidence
    assert changed.sum() > 0.8 * cohort.evidence.sum()  # the evidence is not inflated
    for k, sign in ((1, 1.0), (2, -1.0)):  # opacity brightens, pneumothorax darkens
        members = cohort.labels == k
        diff = (cohort.images - healthy)[members][cohort.evidence[members]]
        assert sign * diff.mean() > 0.03


@needs_wheel
def test_evidence_lies_in_the_lung_field(cohort):
    assert not (cohort.evidence & ~cohort.extra["lungs"]).any()
    for k, name in enumerate(CLASS_NAMES[1:], start=1):
        assert cohort.regions[name].shape == (1, 64, 64) and cohort.regions[name].any()
        # The documented rule: where the class's evidence frequency is >= half its maximum.
        frequency = cohort.evidence[cohort.labels == k].float().mean(0)
        assert torch.equal(cohort.regions[name], frequency >= 0.5 * frequency.max())


@needs_wheel
def test_marker_mask_marks_bright_pixels_of_one_class(cohort):
    marker = cohort.extra["shortcut"]
    marked = marker.flatten(1).any(1)
    assert marked.any() and (cohort.labels[marked] == 1).all()
    assert 0.2 < marked[cohort.labels == 1].float().mean() < 0.8  # about half of the class
    assert torch.all(cohort.images[marker] == 0.95)
    assert not (marker & cohort.evidence).any()
    glyph = marker[marked][0, 0]
    rows, cols = torch.nonzero(glyph, as_tuple=True)
    assert rows.max() < 16 and cols.min() > 48  # top right corner
    plain = make_chest(90, size=64, seed=3)
    assert not plain.extra["shortcut"].any()


@needs_wheel
def test_deterministic_by_seed():
    a = make_chest(30, size=48, seed=7, masks=12)
    b = make_chest(30, size=48, seed=7, masks=12)
    c = make_chest(30, size=48, seed=8, masks=12)
    assert torch.equal(a.images, b.images) and torch.equal(a.evidence, b.evidence)
    assert torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)


@needs_wheel
def test_small_cnn_learns_the_classes():
    roc_auc_score = pytest.importorskip("sklearn.metrics").roc_auc_score

    train = make_chest(300, size=32, seed=0, masks=48)
    test = make_chest(120, size=32, seed=1, masks=48)
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for c_in, c_out in ((1, 16), (16, 32), (32, 32)):
        layers += [torch.nn.Conv2d(c_in, c_out, 3, padding=1), torch.nn.BatchNorm2d(c_out)]
        layers += [torch.nn.ReLU(), torch.nn.MaxPool2d(2)]
    net = torch.nn.Sequential(
        *layers[:-1], torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 3)
    )
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(30):
        for batch in torch.randperm(len(train)).split(50):
            loss = torch.nn.functional.cross_entropy(net(train.images[batch]), train.labels[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    net.eval()
    with torch.no_grad():
        probs = net(test.images).softmax(1).numpy()
    for k in (1, 2):  # each disease against the healthy images
        keep = (test.labels == 0) | (test.labels == k)
        auc = roc_auc_score((test.labels[keep] == k).numpy(), probs[keep.numpy(), k])
        assert auc >= 0.8, (CLASS_NAMES[k], auc)
