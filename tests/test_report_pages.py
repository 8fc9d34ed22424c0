"""The run report's pieces against independent references: probabilities (scipy),
confusion counts and outcome groups (recounted from items.csv), the viewer's 8-bit data
(block means by reshaping, maps recomputed from the chunks), orientation letters (nibabel
axis codes), the 3D figures' slices (where a block placed left-anterior-superior must
appear), the evaluation checks, and that ``report`` leaves ``RUN/global`` as it was."""

from __future__ import annotations

import base64
import csv
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from scipy.special import expit, softmax
from scipy.stats import spearmanr

from medexplain.models.checkpoint import save_checkpoint
from medexplain.models.cnn import CNNConfig, build_classifier
from medexplain.report import panels
from medexplain.report.predictions import choose_examples, confusion_matrix, probabilities
from medexplain.report.viewer import axis_letters, downsample, quantise, view_names
from medexplain.runs import ExplainSettings, RunStore, explain_run, global_run, report_run
from report_data import write_two_class_images


def test_probabilities_match_scipy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 4)) * 3
    np.testing.assert_allclose(probabilities(logits, 4, sigmoid=False), softmax(logits, axis=1))
    # softmax of log-probabilities gives the probabilities back
    p = softmax(logits, axis=1)
    np.testing.assert_allclose(probabilities(np.log(p), 4, sigmoid=False), p, atol=1e-12)
    np.testing.assert_allclose(probabilities(logits, 4, sigmoid=True), expit(logits))
    one = probabilities(logits[:, :1], 2, sigmoid=False)  # one logit, two groups
    np.testing.assert_allclose(one[:, 1], expit(logits[:, 0]))
    np.testing.assert_allclose(one.sum(axis=1), 1.0)


def test_confusion_matrix_and_examples_by_hand():
    labels = np.array([0, 0, 1, 1, -1, 2])
    preds = np.array([0, 1, 1, 1, 0, 1])
    expected = np.array([[1, 1, 0], [0, 2, 0], [0, 1, 0]])  # the unlabelled image left out
    np.testing.assert_array_equal(confusion_matrix(labels, preds, 3), expected)
    conf = np.array([0.9, 0.5, 0.99, 0.7, 0.6, 0.4])
    mistaken = (labels >= 0) & (labels != preds)
    chosen = choose_examples(conf, mistaken, n_confident=2, n_mistaken=12)
    positions = [p for p, _ in chosen]
    assert len(positions) == len(set(positions))
    assert [p for p, why in chosen if why == "most confident"] == [2, 0]
    assert [p for p, why in chosen if why == "least confident"] == [5, 1]
    # every mistaken image is shown, once, under the first reason that picked it
    assert set(np.flatnonzero(mistaken)) <= set(positions)


def test_downsample_is_a_block_mean_and_quantise_inverts_within_a_step():
    rng = np.random.default_rng(1)
    volume = rng.normal(size=(8, 6, 4))
    blocks = volume.reshape(4, 2, 3, 2, 2, 2).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(downsample(volume, 2), blocks)
    image = rng.normal(size=(5, 4))
    small = downsample(image, 2)  # the last row of blocks holds one row of pixels
    assert small.shape == (3, 2)
    np.testing.assert_allclose(small[2, 0], image[4, 0:2].mean())
    scale = float(np.abs(volume).max())
    signed = (quantise(volume, scale, True).astype(float) - 127.5) / 127.5 * scale
    assert np.abs(signed - volume).max() <= scale / 255 + 1e-12
    magnitude = quantise(np.abs(volume), scale, False).astype(float) / 255 * scale
    assert np.abs(magnitude - np.abs(volume)).max() <= scale / 510 + 1e-12


def test_axis_letters_follow_the_affine():
    from nibabel.orientations import aff2axcodes

    assert axis_letters(None) == [("L", "R"), ("P", "A"), ("I", "S")]
    flipped = np.diag([-2.0, 2.0, 2.0, 1.0])
    permuted = np.array([[0, 0, 1, 0], [1, 0, 0, 0], [0, -1, 0, 0], [0, 0, 0, 1.0]])
    for affine in (flipped, permuted):
        letters = axis_letters(affine)
        assert [positive for _, positive in letters] == list(aff2axcodes(affine))
    assert view_names(axis_letters(None)) == ["sagittal", "coronal", "axial"]
    assert view_names(axis_letters(permuted)) == ["coronal", "axial", "sagittal"]


def test_3d_panels_show_a_left_anterior_superior_block_there(tmp_path, monkeypatch):
    captured = {}

    def keep(fig, path):
        captured["fig"] = fig
        return Path(path)

    monkeypatch.setattr(panels, "_save", keep)
    shape = (10, 12, 8)
    heat = np.zeros(shape)
    heat[1:3, 9:11, 5:7] = 1.0  # low x (left), high y (anterior), high z (superior)
    other = 0.5 * heat
    panels.plot_group_panels(
        np.zeros((1, *shape)),
        {"a": heat, "b": other},
        tmp_path / "f.png",
        signed=False,
        title="by label",
    )
    fig = captured["fig"]
    assert fig._suptitle.get_text() == "by label"
    views = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title().split("·")[1].split()[0] for ax in views] == [
        "axial",
        "coronal",
        "sagittal",
    ] * 2
    for ax in views:
        letters = {t.get_text() for t in ax.texts}
        assert len(letters) == 4 and letters <= set("LRAPSI")
        alpha = ax.images[1].get_array()[..., 3]
        rows, cols = np.nonzero(alpha)
        # left (L) / posterior ... the block is in the upper half (A or S up) of every view
        assert rows.max() < alpha.shape[0] / 2
        name = ax.get_title().split("·")[1].split()[0]
        if name in ("axial", "coronal"):  # columns run left to right: the block is left
            assert cols.max() < alpha.shape[1] / 2
        else:  # sagittal: columns run posterior to anterior: the block is anterior
            assert cols.min() > alpha.shape[1] / 2
    # one colour bar for the figure, on the scale of the larger map
    bars = [ax for ax in fig.axes if not ax.get_title()]
    assert len(bars) == 1
    assert bars[0].get_ylim()[1] == pytest.approx(1.0)


@pytest.fixture(scope="module")
def run2d(tmp_path_factory):
    """16 images 16x16 in two classes, a tiny CNN, a saliency run with `global` done."""
    root = tmp_path_factory.mktemp("pages")
    write_two_class_images(root)
    net = build_classifier(CNNConfig(num_classes=2, widths=(4,), norm="none"))
    save_checkpoint(root / "m.pt", net, extra={"class_names": ["a", "b"]})
    settings = ExplainSettings(
        data=str(root / "data.csv"), method="saliency", model=str(root / "m.pt")
    )
    run = root / "run"
    explain_run(settings, run, progress=False, log=lambda *_: None)
    global_run(run, by="label", log=lambda *_: None)
    return run


def _viewer_data(page: str) -> dict:
    block = re.search(r"<script type='application/json'>(.*?)</script>", page, re.S)
    return json.loads(block.group(1).replace("<\\/", "</"))


def test_run_report_counts_maps_and_leaves_global_alone(run2d):
    before = {p.name: p.read_bytes() for p in (run2d / "global").iterdir()}
    page = report_run(run2d, log=lambda *_: None).read_text()
    assert {p.name: p.read_bytes() for p in (run2d / "global").iterdir()} == before
    with open(run2d / "items.csv") as handle:
        items = list(csv.DictReader(handle))
    pairs = Counter((row["label"], row["prediction"]) for row in items)
    for true in "01":
        cells = "".join(f"<td>{pairs[(true, pred)]}</td>" for pred in "01")
        assert f"<td>true {'ab'[int(true)]}</td>{cells}" in page
    data = _viewer_data(page)
    groups = data["methods"]["saliency"]["groups"]
    # outcome counts, one-vs-rest for class b: TP = labelled b and predicted b
    tp = pairs[("1", "1")]
    fp = pairs[("0", "1")]
    if tp:
        assert f"outcome: b TP (n={tp})" in groups
    if fp:
        assert f"outcome: b FP (n={fp})" in groups
    # the label-b map: per-image |map| / its max, averaged (recomputed from the chunks)
    chunks = list(RunStore(run2d).iter_chunks())
    maps = np.concatenate([c.maps for c in chunks])[:, 0].astype(np.float64)
    labels = np.concatenate([c.label for c in chunks])
    chosen = np.abs(maps[labels == 1])
    expected = (chosen / chosen.reshape(len(chosen), -1).max(axis=1)[:, None, None]).mean(0)
    name = next(g for g in groups if g.startswith("label: b"))
    scale = groups[name]["scale"]
    codes = np.frombuffer(base64.b64decode(groups[name]["data"]), np.uint8).reshape(16, 16)
    assert np.abs(codes / 255 * scale - expected).max() <= scale / 510 + 1e-9
    assert data["shape"] == [16, 16] and data["views"] == [{"name": "image", "axis": None}]
    # each example image: its own map (|E|, on its own scale) over the image itself
    examples = [g for g in groups if g.startswith("image #")]
    assert examples
    rows = {int(c.index[j]): c.maps[j, 0] for c in chunks for j in range(len(c))}
    for name in examples:
        row = int(name.split("#")[1].split()[0])
        entry = groups[name]
        heat = np.abs(rows[row].astype(np.float64))
        codes = np.frombuffer(base64.b64decode(entry["data"]), np.uint8).reshape(16, 16)
        assert entry["scale"] == pytest.approx(heat.max())
        assert np.abs(codes / 255 * entry["scale"] - heat).max() <= entry["scale"] / 510 + 1e-9
        shown = np.frombuffer(base64.b64decode(data["backgrounds"][entry["background"]]), np.uint8)
        image = np.load(run2d.parent / f"i{row:02d}.npy").ravel()
        assert spearmanr(shown, image)[0] > 0.95  # 8 bits between percentiles: monotone
    for heading in ("Predictions", "Image-wise explanations", "Interactive view", "model sha256"):
        assert heading in page


def test_failing_checks_are_marked(run2d):
    evaluation = {
        "peppr": {
            "erase_area": 0.8,
            "random_erase_area": 0.6,  # erasing by the map hurts less than random: fails
            "restore_area": 0.9,
            "random_restore_area": 0.5,
        },
        "sanity": {"rank_correlation_fully_randomized": 0.9},  # maps ignore the weights
    }
    (run2d / "evaluation.json").write_text(json.dumps(evaluation))
    try:
        page = report_run(run2d, log=lambda *_: None).read_text()
    finally:
        (run2d / "evaluation.json").unlink()
    assert "<li class='fail'><b>FAIL</b> PEPPR erase below random" in page
    assert "<li class='pass'><b>PASS</b> PEPPR restore above random" in page
    assert re.search(r"<li class='fail'><b>FAIL</b> sanity[^<]*: ρ = 0.900", page)
    # maps that collapse to a constant are a failure, not a pass by "no correlation"
    evaluation["sanity"] = {"rank_correlation_fully_randomized": None, "degenerate_fraction": 1}
    (run2d / "evaluation.json").write_text(json.dumps(evaluation))
    try:
        page = report_run(run2d, log=lambda *_: None).read_text()
    finally:
        (run2d / "evaluation.json").unlink()
    assert re.search(r"<li class='fail'><b>FAIL</b> sanity[^<]*: 100% of the maps became", page)


def test_viewer_keeps_colour_photographs_in_rgb_and_thin_volumes_grey():
    from medexplain.report.viewer import viewer_html

    rng = np.random.default_rng(2)
    photo = rng.random((3, 10, 12))
    data = _viewer_data(viewer_html(photo, {"m": (False, {"g": rng.random((10, 12))})}))
    assert data["rgb"] and len(base64.b64decode(data["background"])) == 3 * 10 * 12
    thin = rng.random((1, 9, 7, 3))  # a volume whose last axis happens to hold 3 slices
    data = _viewer_data(viewer_html(thin, {"m": (True, {"g": rng.normal(size=(9, 7, 3))})}))
    assert not data["rgb"] and data["shape"] == [9, 7, 3]
    assert len(base64.b64decode(data["background"])) == 9 * 7 * 3
    # a budget below the data downsamples by block means: 2x per axis here
    big = rng.random((1, 40, 40, 40))
    data = _viewer_data(
        viewer_html(big, {"m": (False, {"g": big[0]})}, budget=2 * 20**3, max_size=128)
    )
    assert data["factor"] == 2 and data["shape"] == [20, 20, 20]


def test_unexplained_images_are_grouped_by_cause(tmp_path):
    rows = ["path"]
    for i in range(3):
        np.save(tmp_path / f"i{i}.npy", np.random.default_rng(i).normal(size=(8, 8)))
        rows.append(f"i{i}.npy")
    for name in ("bad1.npy", "bad2.npy"):
        (tmp_path / name).write_bytes(b"not an array")
        rows.append(name)
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    net = build_classifier(CNNConfig(num_classes=3, widths=(4,), norm="none"))
    save_checkpoint(tmp_path / "m.pt", net, extra={"class_names": ["a", "b", "c"]})
    settings = ExplainSettings(
        data=str(tmp_path / "data.csv"),
        method="saliency",
        model=str(tmp_path / "m.pt"),
        label_column=None,
    )
    explain_run(settings, tmp_path / "run", progress=False, log=lambda *_: None)
    page = report_run(tmp_path / "run", log=lambda *_: None).read_text()
    errors = RunStore(tmp_path / "run").errors()
    assert len(errors) == 2
    causes = {reason.replace(path, "<file>") for _, path, reason in errors}
    assert len(causes) == 1  # the same cause, said of two files
    assert "<li>2 image(s): " in page
    # unlabelled: counts of predictions, no confusion matrix, no outcome groups
    assert "Confusion matrix" not in page and "images predicted" in page
    assert not [g for g in _viewer_data(page)["methods"]["saliency"]["groups"] if "outcome" in g]


@pytest.mark.parametrize("signed", [True, False])
def test_signed_maps_get_a_symmetric_diverging_scale(tmp_path, monkeypatch, signed):
    captured = {}
    monkeypatch.setattr(panels, "_save", lambda fig, path: captured.setdefault("fig", fig))
    heat = np.zeros((8, 8))
    heat[1, 1], heat[6, 6] = -3.0, 1.0
    panels.plot_group_panels(
        np.zeros((1, 8, 8)), {"a": heat, "b": heat / 2}, tmp_path / "f.png", signed=signed
    )
    from matplotlib import colormaps

    (bar,) = [ax for ax in captured["fig"].axes if not ax.get_title()]
    low, high = bar.get_ylim()
    if signed:  # diverging, symmetric about 0 at the largest |value| of the figure
        assert (low, high) == pytest.approx((-3.0, 3.0))
    else:  # sequential from 0
        assert (low, high) == pytest.approx((0.0, 3.0))
    ax = next(ax for ax in captured["fig"].axes if ax.get_title() == "a")
    colours = np.asarray(ax.images[1].get_array())
    name = "RdBu_r" if signed else "inferno"
    value = (-3.0 + 3.0) / 6.0 if signed else 0.0  # where -3 lands on the colour scale
    np.testing.assert_allclose(colours[1, 1, :3], colormaps[name](value)[:3], atol=1e-6)
