"""XNN in the run store (runs/xnn_run.py, runs/xnn_summary.py): the per-x-feature maps,
contributions and x-features stored with each chunk equal XNNExplainer.explain() on the same
images; the stored map is their contribution-weighted sum; contributions plus the head's bias
are the head's logit; a resumed run keeps them; ``global`` gives each x-feature's label-wise
global map (checked by hand from the chunks) and the per-class mean contributions; the report
has the XNN section with those numbers."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from medexplain.explain import create
from medexplain.explain.generative.xnn import fit_xnn
from medexplain.models.checkpoint import save_checkpoint
from medexplain.models.cnn import CNNConfig, build_classifier
from medexplain.runs import Chunk, ExplainSettings, RunStore, explain_run, global_run, report_run
from medexplain.runs.xnn_run import xnn_image, xnn_table
from medexplain.runs.xnn_summary import _top_images

N_IMAGES = 10
CLASSES = ("a", "b", "c")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Ten 16x16 images (labels a, b, c in turn) in a CSV manifest, a SmallCNN saved as a
    checkpoint and an XNN (k = 3) fitted on other images for it."""
    root = tmp_path_factory.mktemp("xnnrun")
    rng = np.random.default_rng(0)
    (root / "data").mkdir()
    rows = ["path,label"]
    for i in range(N_IMAGES):
        np.save(root / "data" / f"i{i}.npy", rng.random((16, 16)).astype(np.float32))
        rows.append(f"data/i{i}.npy,{CLASSES[i % 3]}")
    (root / "data.csv").write_text("\n".join(rows) + "\n")
    net = build_classifier(CNNConfig(num_classes=3, widths=(4, 8), norm="none", seed=0))
    with torch.no_grad():
        net.head.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(1))
    save_checkpoint(root / "model.pt", net, extra={"class_names": list(CLASSES)})
    train = torch.rand((48, 1, 16, 16), generator=torch.Generator().manual_seed(5))
    fit_xnn(
        net,
        TensorDataset(train, torch.zeros(48, dtype=torch.long)),
        out=root / "xnn.ckpt",
        progress=False,
        k=3,
        epochs=30,
        batch_size=8,
    )
    explainer = create("xnn", net.eval(), checkpoint=root / "xnn.ckpt")
    return root, explainer


def _settings(root, **overrides) -> ExplainSettings:
    values = dict(
        data=str(root / "data.csv"),
        method="xnn",
        model=str(root / "model.pt"),
        explainer_checkpoint=str(root / "xnn.ckpt"),
        chunk_size=3,
        batch_size=2,
        target="label",  # every class is a target somewhere
    )
    values.update(overrides)
    return ExplainSettings(**values)


@pytest.fixture(scope="module")
def run(setup):
    root, _ = setup
    out = root / "run"
    explain_run(_settings(root), out, progress=False, log=lambda m: None)
    return out


def _image(root, index: int) -> torch.Tensor:
    return torch.from_numpy(np.load(root / "data" / f"i{index}.npy"))[None]


def _stored(run) -> dict[str, np.ndarray]:
    chunks = list(RunStore(run).iter_chunks())
    out = {
        name: np.concatenate([c.extra[name] for c in chunks if len(c)])
        for name in ("xnn_feature_maps", "xnn_contributions", "xnn_x_features")
    }
    for name in ("index", "maps", "target"):
        out[name] = np.concatenate([getattr(c, name) for c in chunks])
    return out


def test_stored_arrays_equal_explain_on_the_same_images(setup, run):
    root, explainer = setup
    stored = _stored(run)
    assert len(RunStore(run).chunk_numbers()) == 4 and sorted(stored["index"]) == list(range(10))
    assert sorted(set(stored["target"].tolist())) == [0, 1, 2]
    x = torch.stack([_image(root, int(i)) for i in stored["index"]])
    reference = explainer.explain(x, torch.from_numpy(stored["target"]))
    assert stored["xnn_feature_maps"].shape == (N_IMAGES, 3, 1, 16, 16)
    scale = float(reference.feature_maps.abs().max())
    fmaps = torch.from_numpy(stored["xnn_feature_maps"][:, :, 0])
    assert (fmaps - reference.feature_maps).abs().max() <= 1e-6 * max(scale, 1.0)
    for name, ref in (
        ("xnn_contributions", reference.contributions),
        ("xnn_x_features", reference.x_features),
    ):
        np.testing.assert_allclose(stored[name], ref.numpy(), atol=1e-6, rtol=1e-6)
    # one image through the reader
    one = xnn_image(run, 4)
    row = list(stored["index"]).index(4)
    np.testing.assert_array_equal(one["feature_maps"], stored["xnn_feature_maps"][row])
    np.testing.assert_array_equal(one["map"], stored["maps"][row])
    assert one["path"].endswith("i4.npy")


def test_map_is_the_weighted_sum_and_contributions_add_up_to_the_head_logit(setup, run):
    root, explainer = setup
    stored = _stored(run)
    weighted = stored["xnn_contributions"][:, :, None, None, None] * stored["xnn_feature_maps"]
    np.testing.assert_allclose(weighted.sum(1), stored["maps"], atol=1e-6, rtol=1e-5)
    # the linear head by hand: logit_t = sum_j W[t, j] e_j + b_t
    weight, bias = (a.double().numpy() for a in explainer.head())
    e, t = stored["xnn_x_features"].astype(np.float64), stored["target"]
    by_hand = (weight[t] * e).sum(1) + bias[t]
    table = xnn_table(run)
    order = np.argsort(stored["index"])
    np.testing.assert_allclose(
        table["contributions"].sum(1) + table["bias"], by_hand[order], rtol=1e-5, atol=1e-5
    )
    x = torch.stack([_image(root, int(i)) for i in table["index"]])
    _, head_logits = explainer.x_features(x)
    np.testing.assert_allclose(
        by_hand[order],
        head_logits.double().numpy()[np.arange(N_IMAGES), table["target"]],
        rtol=1e-5,
        atol=1e-5,
    )
    # xnn.csv: one row per image, the same numbers
    with open(run / "xnn.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["index"]) for r in rows] == list(range(N_IMAGES))
    from_csv = np.array([[float(r[f"contribution_{j}"]) for j in range(3)] for r in rows])
    np.testing.assert_allclose(from_csv, table["contributions"], rtol=1e-6, atol=1e-7)


def test_other_methods_chunks_keep_their_arrays_and_extras_round_trip(setup, tmp_path):
    root, _ = setup
    explain_run(
        _settings(root, method="saliency", explainer_checkpoint=None),
        tmp_path / "s",
        progress=False,
        log=lambda m: None,
    )
    with np.load(RunStore(tmp_path / "s").chunk_path(0)) as data:
        assert not any(name.startswith("xnn") for name in data.files)
    assert "xnn" not in RunStore(tmp_path / "s").record()
    assert not (tmp_path / "s" / "xnn.csv").exists()
    # a chunk with extra arrays: digested, subset by row, map arrays skipped without maps
    extra = {
        "xnn_feature_maps": np.arange(24.0).reshape(2, 3, 1, 2, 2),
        "xnn_x_features": np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]),
    }
    chunk = Chunk(
        0,
        np.array([7, 8]),
        np.zeros((2, 1, 2, 2), np.float32),
        np.array([0, 1]),
        np.array([0, 1]),
        np.array([0, 1]),
        np.zeros((2, 3)),
        np.zeros((2, 4, 4)),
        np.array(["p", "q"]),
        extra=extra,
    )
    store = RunStore(tmp_path / "c")
    store.write_chunk(chunk)
    back = store.read_chunk(0)
    for name, array in extra.items():
        np.testing.assert_array_equal(back.extra[name], array)
    assert set(store.read_chunk(0, maps=False).extra) == {"xnn_x_features"}
    np.testing.assert_array_equal(
        back.subset([1], [3]).extra["xnn_x_features"], extra["xnn_x_features"][1:]
    )


def test_resume_after_killed_and_damaged_chunks_keeps_them(setup, run):
    root, _ = setup
    copy = root / "resumed"
    shutil.copytree(run, copy)
    chunks = copy / "chunks"
    (chunks / "000003.npz").unlink()  # the last chunk never finished: only its temporary
    (chunks / "000003.npz.tmp").write_bytes(b"partial")
    damaged = chunks / "000001.npz"
    damaged.write_bytes(damaged.read_bytes()[:200])
    summary = explain_run(_settings(root), copy, progress=False, log=lambda m: None)
    assert summary["n_computed"] == 3 + 1 and summary["n_done"] == N_IMAGES
    a, b = _stored(run), _stored(copy)
    order_a, order_b = np.argsort(a["index"]), np.argsort(b["index"])
    for name in ("xnn_feature_maps", "xnn_contributions", "xnn_x_features", "maps"):
        np.testing.assert_allclose(a[name][order_a], b[name][order_b], atol=1e-6)
    assert (copy / "xnn.csv").read_text() == (run / "xnn.csv").read_text()


def test_global_x_feature_maps_and_class_contributions_by_hand(setup, run):
    _, explainer = setup
    global_run(run, by="label", log=lambda m: None)
    view = json.loads((run / "global" / "xnn" / "xnn.json").read_text())
    stored = _stored(run)
    labels = stored["index"] % 3  # image i is labelled CLASSES[i % 3]
    # default normalisation max, transform abs: |m| / max |m| per image, then the mean
    fmaps = np.abs(stored["xnn_feature_maps"][:, :, 0].astype(np.float64))
    fmaps /= fmaps.max(axis=(2, 3), keepdims=True)
    for j in range(3):
        for c, name in enumerate(CLASSES):
            mean = np.load(run / "global" / "xnn" / f"feature_{j}" / f"label__{name}_mean.npy")
            np.testing.assert_allclose(mean, fmaps[labels == c, j].mean(0), atol=1e-6)
    weight, bias = (a.double().numpy() for a in explainer.head())
    e = stored["xnn_x_features"].astype(np.float64)
    for c, name in enumerate(CLASSES):
        entry = view["contributions"][name]
        assert entry["n"] == int((labels == c).sum())
        np.testing.assert_allclose(
            entry["mean_contribution"], (weight[c] * e[labels == c]).mean(0), rtol=1e-6, atol=1e-7
        )
        assert entry["bias"] == pytest.approx(bias[c])
    for j, top in enumerate(view["top_activating"]):
        expected = sorted(range(N_IMAGES), key=lambda i: (-e[i, j], stored["index"][i]))
        assert top["index"] == [int(stored["index"][i]) for i in expected[:8]]


def test_report_has_the_xnn_section_with_the_numbers(setup, run):
    global_run(run, by="label", log=lambda m: None)
    page = report_run(run, log=lambda m: None).read_text()
    assert "XNN: x-features and their contributions" in page
    view = json.loads((run / "global" / "xnn" / "xnn.json").read_text())
    for entry in view["contributions"].values():
        for value in entry["mean_contribution"]:
            assert f"<td>{value:.4g}</td>" in page
    first = view["top_activating"][0]
    assert f"#{first['index'][0]} ({first['value'][0]:.3g})" in page
    assert (run / "figures" / "report_xnn.png").stat().st_size > 0
    # without global (its defaults are label, max, abs), the page computes the same numbers
    bare = run.parent / "bare"
    shutil.copytree(run, bare)
    shutil.rmtree(bare / "global")
    assert report_run(bare, log=lambda m: None).read_text().count("<td>") == page.count("<td>")
    entry = next(iter(view["contributions"].values()))
    assert f"<td>{entry['mean_contribution'][0]:.4g}</td>" in (bare / "report.html").read_text()
    # the figure's top-activating images are the images of those manifest rows
    images, shown, names = _top_images(RunStore(run), RunStore(run).record(), view, print)
    root, _ = setup
    for top, drawn in zip(view["top_activating"], shown["top_activating"]):
        for row, position in zip(top["index"], drawn["index"]):
            assert names[position] == f"#{row}"
            np.testing.assert_array_equal(images[position].numpy(), _image(root, row).numpy())


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_ray_engine_stores_the_same_x_features(setup, run):
    """The Ray engine's actors explain chunks with the local engine's per-chunk function:
    the same stored x-feature arrays and xnn.csv."""
    ray = pytest.importorskip("ray")
    from medexplain.runs.ray_engine import RayEngine, RayOptions

    root, _ = setup
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        engine = RayEngine(RayOptions(workers=1))
        explain_run(
            _settings(root), root / "ray", progress=False, log=lambda m: None, engine=engine
        )
    finally:
        ray.shutdown()
    a, b = _stored(run), _stored(root / "ray")
    order_a, order_b = np.argsort(a["index"]), np.argsort(b["index"])
    for name in ("xnn_feature_maps", "xnn_contributions", "xnn_x_features", "maps"):
        np.testing.assert_allclose(a[name][order_a], b[name][order_b], atol=1e-6)
    assert (root / "ray" / "xnn.csv").read_text() == (run / "xnn.csv").read_text()


def test_volumes_x_feature_global_maps_as_nifti_and_chunks_sized_by_stored_maps(
    tmp_path, monkeypatch
):
    """3D: each x-feature's label-wise global map is also a NIfTI on the scans' grid, equal
    to the mean of the stored maps by hand; the default chunk holds as many images as fit
    the chunk budget with k + 1 maps per image."""
    import nibabel as nib

    import medexplain.runs.explain as explain_module

    rng = np.random.default_rng(1)
    affine = np.array([[2.0, 0, 0, -8], [0, 2.0, 0, 4], [0, 0, 2.0, 1], [0, 0, 0, 1]])
    for i in range(6):
        folder = tmp_path / "data" / "ab"[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        volume = rng.random((8, 8, 8)).astype(np.float32)
        nib.save(nib.Nifti1Image(volume, affine), str(folder / f"s{i}.nii.gz"))
    net = build_classifier(CNNConfig(spatial_dims=3, num_classes=2, widths=(4, 8), norm="none"))
    save_checkpoint(tmp_path / "model.pt", net, extra={"class_names": ["a", "b"]})
    train = torch.rand((16, 1, 8, 8, 8), generator=torch.Generator().manual_seed(2))
    fit_xnn(
        net,
        TensorDataset(train, torch.zeros(16)),
        out=tmp_path / "x.ckpt",
        progress=False,
        k=2,
        epochs=5,
    )
    budget = 4 * 512 * (1 + 2) * 2  # two images with their map and two x-feature maps
    monkeypatch.setattr(explain_module, "CHUNK_BYTES", budget)
    settings = ExplainSettings(
        data=str(tmp_path / "data"),
        method="xnn",
        model=str(tmp_path / "model.pt"),
        explainer_checkpoint=str(tmp_path / "x.ckpt"),
    )
    explain_run(settings, tmp_path / "run", progress=False, log=lambda m: None)
    record = RunStore(tmp_path / "run").record()
    assert record["identity"]["chunk_size"] == 2
    global_run(
        tmp_path / "run", by="label", normalise="none", transform="signed", log=lambda m: None
    )
    chunks = list(RunStore(tmp_path / "run").iter_chunks())
    fmaps = np.concatenate([c.extra["xnn_feature_maps"] for c in chunks]).astype(np.float64)
    labels = np.concatenate([c.label for c in chunks])
    for j in range(2):
        image = nib.load(
            str(tmp_path / "run" / "global" / "xnn" / f"feature_{j}" / "label__b_mean.nii.gz")
        )
        np.testing.assert_allclose(image.affine, affine)
        expected = fmaps[labels == 1, j, 0].mean(0)
        np.testing.assert_allclose(image.get_fdata(), expected, atol=1e-5 * np.abs(expected).max())
