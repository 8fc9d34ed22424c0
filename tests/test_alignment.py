"""Alignment check: planted flips, shifts and rotations in aligned images are exactly the
flagged ones, in 2D and 3D, from tensors and from files."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from medexplain.data.alignment import check_alignment
from medexplain.data.files import ImageDataset
from medexplain.report.alignment_plot import plot_alignment


def smooth_subjects(n: int, size: int, dims: int, seed: int = 0) -> torch.Tensor:
    """Aligned, left-right asymmetric smooth "anatomy" ``(n, 1, *S)``: a fixed set of
    Gaussian blobs, each subject with its own blob intensities, a +-1 px jitter, a gain and
    noise (the kind of variation registration leaves). NumPy, so that many tiny ops do not
    pay torch's thread start-up on a busy machine."""
    rng = np.random.default_rng(seed)
    axes = np.meshgrid(*[np.linspace(-1, 1, size)] * dims, indexing="ij")
    centres = np.array([[0.3, -0.4, 0.2], [-0.35, 0.45, -0.1], [0.0, 0.1, 0.5], [0.5, 0.5, -0.4]])[
        :, :dims
    ]
    widths = np.array([0.25, 0.18, 0.3, 0.15])
    images = []
    for _ in range(n):
        jitter = (rng.random(dims) - 0.5) * (2 * 2 / size)
        image = np.zeros([size] * dims)
        for centre, width in zip(centres, widths):
            d2 = sum((a - c - j) ** 2 for a, c, j in zip(axes, centre, jitter))
            image += (0.6 + 0.4 * rng.random()) * np.exp(-d2 / (2 * width**2))
        image *= 0.8 + 0.4 * rng.random()
        images.append(image + 0.03 * rng.standard_normal(image.shape))
    return torch.from_numpy(np.stack(images)[:, None].astype(np.float32))


def plant(images: torch.Tensor, flip: int, shift: int, rotate: int) -> torch.Tensor:
    images = images.clone()
    size = images.shape[-1]
    images[flip] = images[flip].flip(-1)
    images[shift] = torch.roll(images[shift], shifts=size // 5, dims=-1)
    images[rotate] = torch.rot90(images[rotate], 1, dims=(-2, -1))
    return images


@pytest.mark.parametrize("dims,size,n", [(2, 40, 40), (3, 16, 24)])
def test_exactly_the_planted_images_are_flagged(dims, size, n):
    clean = smooth_subjects(n, size, dims)
    images = plant(clean, flip=3, shift=11, rotate=17)
    report = check_alignment(images)
    assert report.flagged == [3, 11, 17]
    assert report.flipped[3] and report.mirror_correlation[3] > report.correlation[3]
    assert report.low[11]
    assert report.fraction_flagged == pytest.approx(3 / n)
    # the clean set has nothing to flag, and the template is the streaming mean
    clean_report = check_alignment(clean)
    assert clean_report.flagged == []
    np.testing.assert_allclose(clean_report.template, clean.mean(0).numpy(), atol=1e-5)
    # a given template (e.g. an atlas) is used as is; an absolute threshold flags more
    report = check_alignment(images, template=clean.mean(0)[0])
    assert report.flagged == [3, 11, 17]
    loose = check_alignment(clean, threshold=float(np.sort(clean_report.correlation)[2]))
    assert len(loose.flagged) == 2


def test_leave_one_out_pearson_matches_a_hand_computation():
    images = smooth_subjects(6, 12, 2, seed=3)
    report = check_alignment(images)
    x = images.double().flatten(1).numpy()
    for i in range(6):
        others = np.delete(x, i, axis=0).mean(0)
        mirrored = np.delete(images.double().flip(-1).flatten(1).numpy(), i, axis=0).mean(0)
        assert report.correlation[i] == pytest.approx(np.corrcoef(x[i], others)[0, 1], abs=1e-9)
        assert report.mirror_correlation[i] == pytest.approx(
            np.corrcoef(x[i], mirrored)[0, 1], abs=1e-9
        )


def test_benchmark_images_with_planted_misalignments():
    synthetic = pytest.importorskip("medexplain.data.synthetic")
    bench = synthetic.make_benchmark(n=48, dims=2, size=48, seed=1)
    images = plant(bench.images, flip=5, shift=20, rotate=33)
    report = check_alignment(images)
    assert report.flagged == [5, 20, 33]


def test_dataset_from_files_with_errors_csv_and_plot(tmp_path):
    images = plant(smooth_subjects(20, 32, 2, seed=1), flip=2, shift=7, rotate=12)
    rows = ["path,label"]
    for i, image in enumerate(images):
        np.save(tmp_path / f"{i}.npy", image[0].numpy())
        rows.append(f"{i}.npy,0")
    rows.append("missing.npy,0")
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    ds = ImageDataset.from_csv(tmp_path / "d.csv")
    report = check_alignment(ds, n_previews=4)
    assert report.flagged == [2, 7, 12]
    assert list(report.errors) == [20] and "missing.npy" in report.errors[20]
    assert report.checked == 20 and report.fraction_flagged == pytest.approx(3 / 20)
    assert report.summary()["n_flipped"] >= 1

    with open(report.to_csv(tmp_path / "out" / "alignment.csv")) as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["index"]) for r in rows if r["flagged"] == "1"] == [2, 7, 12]
    assert rows[2]["reason"].startswith(("flipped", "low correlation"))
    assert rows[20]["reason"].startswith("error:") and rows[20]["correlation"] == ""
    assert float(rows[0]["correlation"]) == pytest.approx(report.correlation[0], abs=1e-6)

    path = plot_alignment(report, tmp_path / "out" / "alignment.png")
    assert path.stat().st_size > 10_000
    assert set(report.flagged) <= set(report.previews)


def test_bad_arguments():
    with pytest.raises(TypeError, match="ImageDataset, a tensor"):
        check_alignment(iter([torch.zeros(1, 4, 4)]))
    with pytest.raises(ValueError, match="shape"):
        check_alignment([torch.zeros(1, 4, 4), torch.zeros(1, 5, 4)])
    with pytest.raises(ValueError, match="threshold"):
        check_alignment(torch.zeros(3, 1, 4, 4), threshold=2.0)
