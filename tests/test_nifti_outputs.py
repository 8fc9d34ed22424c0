"""Neuroimaging outputs: per-image NIfTI maps with their own source's affine and header
codes, global NIfTI only on one shared grid, orientation- and spacing-aware reading and
resampling, and a contrast restricted to a brain mask (checked against scipy by hand)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import stats
from typer.testing import CliRunner

from medexplain.cli import app
from medexplain.data.files import ImageDataset
from medexplain.models.checkpoint import save_checkpoint
from medexplain.models.cnn import CNNConfig, build_classifier
from medexplain.runs import ExplainSettings, RunError, RunStore, explain_run, global_run
from medexplain.runs.nifti_maps import map_bytes

runner = CliRunner()
SHAPE = (8, 8, 8)
CLASSES = ["a", "b"]


def _oblique_affines() -> list[np.ndarray]:
    """Three 8^3 grids: RAS 2 mm, LAS with axes permuted and anisotropic, and a rotated
    (oblique) LPS grid; none shares another's affine."""
    ras = np.array([[2.0, 0, 0, -8], [0, 2, 0, -10], [0, 0, 2, 4], [0, 0, 0, 1]])
    permuted = np.array([[0, -1.5, 0, 20], [0, 0, 1.0, -3], [3.0, 0, 0, -12], [0, 0, 0, 1]])
    c, s = np.cos(0.2), np.sin(0.2)
    oblique = np.array([[-c, -s, 0, 9], [s, -c, 0, 7], [0, 0, 1.2, -5], [0, 0, 0, 1]])
    return [ras, permuted, oblique]


def _save(path: Path, data: np.ndarray, affine: np.ndarray, sform: int, qform: int) -> None:
    image = nib.Nifti1Image(data.astype(np.float32), affine)
    image.set_sform(affine, code=sform)
    image.set_qform(affine, code=qform)
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, str(path))


def _model(root: Path) -> Path:
    net = build_classifier(CNNConfig(spatial_dims=3, num_classes=2, widths=(4,)))
    save_checkpoint(root / "model.pt", net, extra={"class_names": CLASSES})
    return root / "model.pt"


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Six 8^3 volumes on three different grids with non-identity codes, one with a space
    and a non-ASCII character in its name, one row mirrored (flip), and a 3D classifier."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    affines = _oblique_affines()
    codes = [(4, 1), (1, 1), (2, 0)]
    rows = ["path,label,flip"]
    for i in range(6):
        name = "sub jé 00.nii.gz" if i == 0 else f"s{i}.nii.gz"
        sform, qform = codes[i % 3]
        _save(root / name, rng.normal(size=SHAPE), affines[i % 3], sform, qform)
        rows.append(f"{name},{CLASSES[i % 2]},{1 if i == 4 else 0}")
    (root / "data.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root, _model(root)


def _settings(root: Path, model: Path, **overrides) -> ExplainSettings:
    values = dict(data=str(root / "data.csv"), method="saliency", model=str(model), chunk_size=2)
    values.update(overrides)
    return ExplainSettings(**values)


def _stored(run: Path) -> dict[int, tuple[np.ndarray, np.ndarray, str, str]]:
    """index -> (map (*S), item affine, path, key) from the run's chunks."""
    out = {}
    for chunk in RunStore(run).iter_chunks():
        for j in range(len(chunk)):
            out[int(chunk.index[j])] = (
                chunk.maps[j, 0],
                chunk.affine[j],
                str(chunk.path[j]),
                str(chunk.key[j]),
            )
    return out


@pytest.fixture(scope="module")
def mixed_run(mixed):
    root, model = mixed
    out = root / "run"
    explain_run(_settings(root, model), out, progress=False, log=lambda m: None)
    return out


def test_per_image_maps_keep_their_source_affine_and_codes_exactly(mixed_run):
    stored = _stored(mixed_run)
    files = sorted((mixed_run / "maps").iterdir())
    assert len(files) == 6 and all(f.name.isascii() and " " not in f.name for f in files)
    for i in range(6):
        (written,) = [f for f in files if f.name.startswith(f"{i:06d}_")]
        source = nib.load(stored[i][2])
        image = nib.load(str(written))
        # the source's own matrix, bit for bit, its shape, codes and units
        assert np.array_equal(image.affine, source.affine)
        assert image.shape == source.shape
        for field in ("sform_code", "qform_code"):
            assert int(image.header[field]) == int(source.header[field])
        assert image.header.get_xyzt_units() == ("mm", "sec")
        # the content: nibabel's own canonical reorientation of the written map gives the
        # map the run computed on the RAS+ grid (mirrored back for the flipped row)
        expected = stored[i][0][::-1] if i == 4 else stored[i][0]
        canonical = nib.as_closest_canonical(image)
        np.testing.assert_allclose(canonical.get_fdata(), expected, rtol=1e-6)
        np.testing.assert_allclose(canonical.affine, stored[i][1], atol=1e-9)


def test_a_resumed_run_writes_the_missing_maps(mixed, mixed_run):
    root, model = mixed
    files = sorted((mixed_run / "maps").iterdir())
    before = files[2].read_bytes()
    files[2].unlink()
    summary = explain_run(_settings(root, model), mixed_run, progress=False, log=lambda m: None)
    assert summary["n_computed"] == 0
    assert files[2].read_bytes() == before
    assert sorted(p.name for p in (mixed_run / "maps").iterdir()) == [f.name for f in files]


def test_global_nifti_is_refused_on_differing_affines_and_npy_kept(mixed, mixed_run):
    lines = []
    global_run(mixed_run, by="label", log=lines.append)
    directory = mixed_run / "global"
    assert not list(directory.glob("*.nii.gz"))
    assert (directory / "label__a_mean.npy").is_file()
    (line,) = [m for m in lines if "NIfTI" in m]
    # image 1 is the first whose grid differs from image 0's
    assert "image 1 (" in line and "s1.nii.gz" in line and "differs" in line


def test_same_world_image_stored_in_two_orientations_reads_the_same(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.normal(size=(5, 6, 7)).astype(np.float32)
    ras = np.diag([1.0, 1.0, 3.0, 1.0])
    ras[:3, 3] = [-2, -3, 10]
    _save(tmp_path / "ras.nii.gz", data, ras, 1, 1)
    # the same voxels stored with x mirrored and the axes in (z, x, y) order
    other = np.transpose(data[::-1], (2, 0, 1))
    # voxel (k, i', j) of `other` holds data[4 - i', j, k]: world = ras @ (4 - i', j, k)
    permuted = np.zeros((4, 4))
    permuted[:3, 0] = ras[:3, 2]
    permuted[:3, 1] = -ras[:3, 0]
    permuted[:3, 2] = ras[:3, 1]
    permuted[:3, 3] = ras[:3, 3] + 4 * ras[:3, 0]
    permuted[3, 3] = 1
    _save(tmp_path / "lps.nii.gz", other, permuted, 1, 1)
    items = ImageDataset.from_paths([tmp_path / "ras.nii.gz", tmp_path / "lps.nii.gz"])
    np.testing.assert_array_equal(items[0]["image"][0].numpy(), data)
    np.testing.assert_array_equal(items[1]["image"][0].numpy(), data)
    np.testing.assert_allclose(items[1]["affine"], ras, atol=1e-12)


def test_resampling_keeps_a_landmark_at_its_world_position(tmp_path):
    """An anisotropic 1 x 1 x 3 mm volume, stored LAS, resized to 8^3: the landmark's
    world coordinate is preserved within half a (new) voxel on each axis."""
    data = np.zeros((12, 10, 6), np.float32)
    data[7, 3, 4] = 100.0
    affine = np.array([[-1.0, 0, 0, 30], [0, 1, 0, -5], [0, 0, 3, 2], [0, 0, 0, 1]])
    _save(tmp_path / "v.nii.gz", data, affine, 1, 1)
    world = affine @ [7, 3, 4, 1]
    item = ImageDataset.from_paths([tmp_path / "v.nii.gz"], shape=(8, 8, 8))[0]
    image = item["image"][0].numpy()
    peak = np.unravel_index(np.argmax(image), image.shape)
    found = item["affine"] @ [*peak, 1]
    spacing = np.linalg.norm(item["affine"][:3, :3], axis=0)
    # the resized grid covers the same extent: (n_old - 1) * old = (n_new - 1) * new
    np.testing.assert_allclose(sorted(spacing), sorted([11 / 7, 9 / 7, 15 / 7]), rtol=1e-9)
    assert np.all(np.abs(found[:3] - world[:3]) <= spacing / 2 + 1e-9)


def test_resampled_maps_carry_the_resampled_grid(mixed, tmp_path):
    root, model = mixed
    out = tmp_path / "resized"
    explain_run(_settings(root, model, shape=(6, 6, 6)), out, progress=False, log=lambda m: None)
    stored = _stored(out)
    for i in (0, 1):
        (written,) = (out / "maps").glob(f"{i:06d}_*.nii.gz")
        image = nib.load(str(written))
        assert image.shape == (6, 6, 6)
        canonical = nib.as_closest_canonical(image)
        # the header stores the matrix in float32
        np.testing.assert_allclose(canonical.affine, stored[i][1], atol=1e-5)
        np.testing.assert_allclose(canonical.get_fdata(), stored[i][0], rtol=1e-6)
        # the corner voxel centres keep their world positions in the source's space
        source = nib.load(stored[i][2])
        for corner in ((0, 0, 0), (5, 5, 5)):
            old = np.asarray(corner) * 7 / 5
            np.testing.assert_allclose(
                image.affine @ [*corner, 1], source.affine @ [*old, 1], atol=1e-5
            )


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    """Eight volumes on one MNI grid (sform code 4), class b brighter in one corner."""
    root = tmp_path_factory.mktemp("aligned")
    rng = np.random.default_rng(2)
    affine = np.array([[2.0, 0, 0, -8], [0, 2, 0, -8], [0, 0, 2, -8], [0, 0, 0, 1]])
    rows = ["path,label"]
    for i in range(8):
        data = rng.normal(size=SHAPE)
        if i % 2:
            data[:3, :3, :3] += 2.0
        _save(root / f"v{i}.nii.gz", data, affine, 4, 4)
        rows.append(f"v{i}.nii.gz,{CLASSES[i % 2]}")
    (root / "data.csv").write_text("\n".join(rows) + "\n")
    model = _model(root)
    out = root / "run"
    explain_run(_settings(root, model), out, progress=False, log=lambda m: None)
    return root, out, affine


def test_global_nifti_on_a_shared_grid_keeps_its_affine_and_mni_code(aligned):
    _, run, affine = aligned
    global_run(run, by="label", log=lambda m: None)
    image = nib.load(str(run / "global" / "label__b_mean.nii.gz"))
    np.testing.assert_allclose(image.affine, affine)
    assert int(image.header["sform_code"]) == 4
    np.testing.assert_allclose(
        image.get_fdata(), np.load(run / "global" / "label__b_mean.npy"), rtol=1e-6
    )


def test_contrast_mask_restricts_the_test_and_the_fdr_count(aligned):
    root, run, affine = aligned
    mask = np.zeros(SHAPE, np.uint8)
    mask[:4, :5, :6] = 1
    _save(root / "brain.nii.gz", mask, affine, 4, 4)
    lines = []
    global_run(
        run,
        by="label",
        normalise="none",
        transform="signed",
        contrast=("b", "a"),
        mask=root / "brain.nii.gz",
        alpha=0.2,
        log=lines.append,
    )
    stored = _stored(run)
    maps = np.stack([stored[i][0] for i in range(8)])
    inside = mask.astype(bool)
    t, p = stats.ttest_ind(maps[1::2][:, inside], maps[0::2][:, inside], equal_var=False)
    q = stats.false_discovery_control(p, method="bh")
    stem = run / "global" / "contrast_b_vs_a"
    got_t, got_q = np.load(f"{stem}_t.npy"), np.load(f"{stem}_q.npy")
    # the accumulator streams float32 maps: agreement to float32 precision
    np.testing.assert_allclose(got_t[inside], t, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_q[inside], q, rtol=1e-4, atol=1e-6)
    assert (got_q[~inside] == 1).all() and (got_t[~inside] == 0).all()
    summary = json.loads(Path(f"{stem}.json").read_text())
    assert summary["n_tested"] == int(inside.sum()) == 120
    assert summary["n_significant"] == int((q < 0.2).sum())
    assert summary["alpha"] == 0.2
    assert f"{int((q < 0.2).sum())} of 120 tested voxel(s) with q < 0.2" in lines[-1]
    image = nib.load(f"{stem}_q.nii.gz")
    np.testing.assert_allclose(image.get_fdata(), got_q, rtol=1e-6)


def test_bad_mask_and_alpha_are_one_line_errors_and_keep_the_run(aligned, tmp_path):
    _, run, affine = aligned
    np.save(tmp_path / "small.npy", np.ones((4, 4, 4), np.uint8))
    shifted = affine.copy()
    shifted[0, 3] += 1.0
    _save(tmp_path / "shifted.nii.gz", np.ones(SHAPE), shifted, 4, 4)
    _save(tmp_path / "empty.nii.gz", np.zeros(SHAPE), affine, 4, 4)
    chunks = sorted(p.read_bytes() for p in (run / "chunks").glob("*.npz"))
    cases = [
        (["--alpha", "0"], "--alpha must be a number in (0, 1)"),
        (["--alpha", "1.5"], "--alpha must be a number in (0, 1)"),
        (["--mask", str(tmp_path / "small.npy")], "expected one channel on the maps' grid"),
        (["--mask", str(tmp_path / "shifted.nii.gz")], "differs from the maps' grid by up to 1"),
        (["--mask", str(tmp_path / "empty.nii.gz")], "has no voxel > 0"),
        (["--mask", str(tmp_path / "absent.nii.gz")], "does not exist"),
    ]
    for extra, message in cases:
        result = runner.invoke(app, ["global", str(run), "--contrast", "b:a", *extra])
        assert result.exit_code == 2, (extra, result.output)
        assert message in result.output, (extra, result.output)
        assert result.output.count("\n") <= 2, result.output
    with pytest.raises(RunError, match="--mask restricts a contrast"):
        global_run(run, mask=tmp_path / "small.npy", log=lambda m: None)
    assert sorted(p.read_bytes() for p in (run / "chunks").glob("*.npz")) == chunks


def test_2d_maps_are_nifti_only_when_asked(tmp_path):
    rng = np.random.default_rng(3)
    rows = ["path,label"]
    for i in range(4):
        np.save(tmp_path / f"i{i}.npy", rng.normal(size=(12, 12)).astype(np.float32))
        rows.append(f"i{i}.npy,{CLASSES[i % 2]}")
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    net = build_classifier(CNNConfig(spatial_dims=2, num_classes=2, widths=(4,)))
    save_checkpoint(tmp_path / "m2.pt", net, extra={"class_names": CLASSES})
    plain = _settings(tmp_path, tmp_path / "m2.pt")
    explain_run(plain, tmp_path / "plain", progress=False, log=lambda m: None)
    assert not (tmp_path / "plain" / "maps").exists()
    asked = _settings(tmp_path, tmp_path / "m2.pt", nifti_maps=True)
    explain_run(asked, tmp_path / "asked", progress=False, log=lambda m: None)
    stored = _stored(tmp_path / "asked")
    for i in range(4):
        (written,) = (tmp_path / "asked" / "maps").glob(f"{i:06d}_i{i}_*.nii.gz")
        image = nib.load(str(written))
        assert image.shape == (12, 12, 1)
        assert int(image.header["sform_code"]) == 0 and int(image.header["qform_code"]) == 0
        np.testing.assert_allclose(image.get_fdata()[:, :, 0], stored[i][0], rtol=1e-6)


def test_dicom_like_grid_without_header_gets_scanner_codes():
    """A map of a source without a NIfTI header but with an affine (a DICOM series) is
    written with that affine and scanner codes."""
    affine = np.array([[-0.5, 0, 0, 10], [0, -0.5, 0, 20], [0, 0, 2.5, -30], [0, 0, 0, 1]])
    volume = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
    image = nib.Nifti1Image.from_bytes(gzip.decompress(map_bytes(volume, affine, "series")))
    np.testing.assert_allclose(image.affine, affine)
    assert int(image.header["sform_code"]) == 1 and int(image.header["qform_code"]) == 1
    np.testing.assert_array_equal(image.get_fdata(), volume)


def test_map_names_are_ascii_unique_and_recognised_as_medexplain_s_own():
    from medexplain.runs.nifti_maps import _OWN, map_file_name

    keys = ["0f" * 16, "a1" * 16, "/old/run keyed by path/é.nii.gz"]
    names = [map_file_name(7, f"/data/{d}/sub jé 01.nii.gz", k) for d, k in zip("abc", keys)]
    assert len(set(names)) == 3
    for name in names:
        assert name.isascii() and "/" not in name and " " not in name
        assert name.startswith("000007_sub_je_01_") and _OWN.match(name)
    assert not _OWN.match("sub-01_T1w.nii.gz")  # a user's file is never taken for a map
