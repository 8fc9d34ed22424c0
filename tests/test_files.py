"""User files: each format written by its own library and read back, manifests, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from medexplain.data.files import ImageDataset, collate, open_dataset
from medexplain.data.readers import DataError, is_image_path, load_image

# --------------------------------------------------------------------------- helpers


def write_png(path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path)


def write_dicom(path, stored, photometric="MONOCHROME2", slope=1.0, intercept=0.0, bits=12, **tags):
    """A DICOM file written by pydicom's own writer (Part 10, explicit VR little endian)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.set_pixel_data(stored, photometric, bits)
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)


def one_line(message: str) -> bool:
    return "\n" not in message and len(message) < 400


rng = np.random.default_rng(0)


# --------------------------------------------------------------------------- formats


def test_png_8_and_16_bit_round_trip(tmp_path):
    grey8 = rng.integers(0, 256, (12, 17), dtype=np.uint8)
    grey16 = rng.integers(0, 65536, (12, 17), dtype=np.uint16)
    rgb = rng.integers(0, 256, (12, 17, 3), dtype=np.uint8)
    write_png(tmp_path / "g8.png", grey8)
    write_png(tmp_path / "g16.png", grey16)
    write_png(tmp_path / "rgb.png", rgb)

    array, meta = load_image(tmp_path / "g8.png")
    assert array.shape == (1, 12, 17) and array.dtype == np.float32
    np.testing.assert_array_equal(array[0], grey8)
    assert meta.value_range == (0.0, 255.0)

    array, meta = load_image(tmp_path / "g16.png")
    np.testing.assert_array_equal(array[0], grey16)
    assert meta.value_range == (0.0, 65535.0)

    array, _ = load_image(tmp_path / "rgb.png")
    np.testing.assert_array_equal(array, np.moveaxis(rgb, -1, 0))

    # normalise="range" divides by the type's maximum; channels=1 is Pillow's "L" luma.
    ds = ImageDataset.from_paths([tmp_path / "g16.png"], normalise="range")
    np.testing.assert_allclose(ds[0]["image"][0].numpy(), grey16 / 65535.0, rtol=1e-6)
    ds = ImageDataset.from_paths([tmp_path / "rgb.png"], channels=1)
    pil_grey = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.float32)
    assert np.abs(ds[0]["image"][0].numpy() - pil_grey).max() <= 1.0
    ds = ImageDataset.from_paths([tmp_path / "g8.png"], channels=3)
    np.testing.assert_array_equal(ds[0]["image"].numpy(), np.repeat(grey8[None], 3, 0))


def test_jpeg_and_multipage_tiff(tmp_path):
    rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=95)
    array, _ = load_image(tmp_path / "a.jpg")
    np.testing.assert_array_equal(
        array, np.moveaxis(np.asarray(Image.open(tmp_path / "a.jpg")), -1, 0)
    )
    pages = [rng.integers(0, 256, (8, 9), dtype=np.uint8) for _ in range(3)]
    images = [Image.fromarray(p) for p in pages]
    images[0].save(tmp_path / "v.tif", save_all=True, append_images=images[1:])
    array, _ = load_image(tmp_path / "v.tif")
    np.testing.assert_array_equal(array[0], np.stack(pages))
    floats = rng.normal(size=(8, 9)).astype(np.float32)
    Image.fromarray(floats, mode="F").save(tmp_path / "f.tif")
    array, meta = load_image(tmp_path / "f.tif")
    np.testing.assert_array_equal(array[0], floats)
    assert meta.value_range is None


def test_nifti_keeps_a_non_identity_affine_through_resampling(tmp_path):
    import nibabel as nib

    data = rng.normal(size=(6, 7, 8)).astype(np.float32)
    # axis 1 runs along world x (a permuted, oblique, shifted grid)
    affine = np.array(
        [[0.0, -1.5, 0.1, 30.0], [2.0, 0.0, 0.0, -20.0], [0.0, 0.2, 1.2, 5.0], [0, 0, 0, 1]]
    )
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "v.nii.gz")
    array, meta = load_image(tmp_path / "v.nii.gz")
    # read in the closest RAS+ orientation, as nibabel's as_closest_canonical gives it
    canonical = nib.as_closest_canonical(nib.load(tmp_path / "v.nii.gz"))
    data, affine = canonical.get_fdata(dtype=np.float32), canonical.affine
    np.testing.assert_array_equal(array[0], data)
    np.testing.assert_allclose(meta.affine, affine)
    assert meta.lr_axis == 0 and data.shape == (7, 6, 8)

    item = ImageDataset.from_paths([tmp_path / "v.nii.gz"])[0]
    np.testing.assert_allclose(item["affine"], affine)
    item = ImageDataset.from_paths([tmp_path / "v.nii.gz"], shape=(11, 4, 15))[0]
    assert item["image"].shape == (1, 11, 4, 15) and item["affine"].dtype == np.float64
    # align_corners=True: the first and last voxel centres keep their world positions,
    # and the resampled value there equals the original voxel's value.
    for old, new in (((0, 0, 0), (0, 0, 0)), ((6, 5, 7), (10, 3, 14))):
        np.testing.assert_allclose(item["affine"] @ [*new, 1], affine @ [*old, 1], atol=1e-9)
        assert item["image"][(0, *new)] == pytest.approx(float(data[old]), abs=1e-5)


def test_dicom_rescale_monochrome1_and_multiframe(tmp_path):
    stored = rng.integers(0, 4096, (9, 11)).astype(np.uint16)
    write_dicom(tmp_path / "m2.dcm", stored, "MONOCHROME2", slope=2.0, intercept=-1024.0)
    write_dicom(tmp_path / "m1.dcm", stored, "MONOCHROME1", slope=2.0, intercept=-1024.0)
    array, meta = load_image(tmp_path / "m2.dcm")
    np.testing.assert_array_equal(array[0], 2.0 * stored - 1024.0)
    assert meta.value_range == (-1024.0, 2.0 * 4095 - 1024.0)
    # MONOCHROME1 shows stored 0 as white: inverted within the 12-bit range, so the result
    # is the rescaled value of the complemented stored value (4095 - s): higher = brighter.
    array, _ = load_image(tmp_path / "m1.dcm")
    np.testing.assert_array_equal(array[0], 2.0 * (4095.0 - stored) - 1024.0)

    frames = rng.integers(0, 4096, (4, 9, 11)).astype(np.uint16)
    write_dicom(tmp_path / "mf.dcm", frames, "MONOCHROME2", slope=0.5, intercept=10.0)
    array, _ = load_image(tmp_path / "mf.dcm")
    assert array.shape == (1, 4, 9, 11)
    np.testing.assert_array_equal(array[0], 0.5 * frames + 10.0)

    # enhanced multi-frame: the rescale lives in per-frame functional groups
    from pydicom.dataset import Dataset

    groups = []
    for k in range(4):
        transform = Dataset()
        transform.RescaleSlope = k + 1
        transform.RescaleIntercept = -k
        group = Dataset()
        group.PixelValueTransformationSequence = [transform]
        groups.append(group)
    write_dicom(tmp_path / "enh.dcm", frames, slope=None, PerFrameFunctionalGroupsSequence=groups)
    array, _ = load_image(tmp_path / "enh.dcm")
    for k in range(4):
        np.testing.assert_array_equal(array[0, k], (k + 1) * frames[k].astype(np.float64) - k)

    # an extensionless DICOM (common on PACS exports) is recognised by its DICM magic
    (tmp_path / "noext").write_bytes((tmp_path / "m2.dcm").read_bytes())
    assert is_image_path(tmp_path / "noext")
    np.testing.assert_array_equal(load_image(tmp_path / "noext")[0][0], 2.0 * stored - 1024.0)


def test_pydicom_bundled_ct_is_rescaled():
    import pydicom
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")  # ships inside the pydicom wheel
    ds = pydicom.dcmread(path)
    expected = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(
        ds.RescaleIntercept
    )
    array, meta = load_image(path)
    np.testing.assert_array_equal(array[0], expected.astype(np.float32))
    assert meta.format == "dicom" and array.shape == (1, *ds.pixel_array.shape)


def test_dicom_series_folder_is_sorted_with_an_affine(tmp_path):
    series = tmp_path / "series"
    series.mkdir()
    slices = [rng.integers(0, 1000, (5, 6)).astype(np.uint16) for _ in range(4)]
    spacing, origin = 2.5, np.array([-10.0, 20.0, 30.0])
    for k in (2, 0, 3, 1):  # file names in an order that is not the slice order
        write_dicom(
            series / f"f{(k * 7) % 4}.dcm",
            slices[k],
            ImagePositionPatient=[*origin[:2], origin[2] + spacing * k],
            ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
            PixelSpacing=[0.8, 0.5],
            InstanceNumber=k + 1,
        )
    array, meta = load_image(series)
    np.testing.assert_array_equal(array[0], np.stack(slices).astype(np.float32))
    # (slice, row, col) -> LPS = origin + slice*2.5 z + row*0.8 y + col*0.5 x; RAS negates x, y
    for index in ((0, 0, 0), (3, 4, 5), (1, 2, 3)):
        k, r, c = index
        lps = origin + np.array([0.5 * c, 0.8 * r, spacing * k])
        np.testing.assert_allclose(meta.affine @ [*index, 1], [-lps[0], -lps[1], lps[2], 1])


def test_npy_round_trip_and_pickles_refused(tmp_path):
    image = rng.normal(size=(10, 12)).astype(np.float32)
    volume = rng.normal(size=(4, 10, 12)).astype(np.float32)
    np.save(tmp_path / "i.npy", image)
    np.save(tmp_path / "v.npy", volume)
    np.testing.assert_array_equal(load_image(tmp_path / "i.npy")[0], image[None])
    np.testing.assert_array_equal(load_image(tmp_path / "v.npy")[0], volume[None])
    # with spatial_dims=2 a 3-dim array is channels-first
    np.testing.assert_array_equal(load_image(tmp_path / "v.npy", spatial_dims=2)[0], volume)
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"o\.npy"):
        load_image(tmp_path / "o.npy")


# --------------------------------------------------------------------------- datasets


def make_csv_study(tmp_path):
    """images/<i>.png, masks/<i>.png and data/study.csv with paths relative to the CSV."""
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "data").mkdir()
    images, masks = [], []
    for i in range(4):
        image = rng.integers(0, 256, (10, 14), dtype=np.uint8)
        mask = np.zeros((10, 14), dtype=np.uint8)
        mask[2:5, 1 + i : 4 + i] = 255
        write_png(tmp_path / "images" / f"{i}.png", image)
        write_png(tmp_path / "masks" / f"{i}.png", mask)
        images.append(image)
        masks.append(mask > 0)
    rows = [
        "path,label,mask,flip,DR,AMD,site",
        "../images/0.png,normal,../masks/0.png,0,0,0,A",
        "../images/1.png,DR,../masks/1.png,1,1,0,B",
        "../images/2.png,AMD,,0,0,1,A",
        f"{tmp_path / 'images' / '3.png'},DR,../masks/3.png,yes,1,1,B",
    ]
    (tmp_path / "data" / "study.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "data" / "study.csv", images, masks


def test_csv_manifest_labels_flip_masks_and_groups(tmp_path):
    csv_path, images, masks = make_csv_study(tmp_path)
    ds = ImageDataset.from_csv(csv_path)
    assert ds.class_names == ["AMD", "DR", "normal"]  # text labels sorted
    assert ds.targets().tolist() == [2, 1, 0, 1]
    assert ds.column("site") == ["A", "B", "A", "B"] and len(ds) == 4
    assert ds.shape == (10, 14) and ds.channels == 1
    for i in range(4):
        item = ds[i]
        flipped = i in (1, 3)
        expected = images[i][:, ::-1] if flipped else images[i]
        np.testing.assert_array_equal(item["image"][0].numpy(), expected)
        assert item["label"].dtype == torch.long and item["index"] == i
        assert item["path"].endswith(f"{i}.png") and item["affine"] is None
        if i == 2:
            assert "mask" not in item
        else:
            truth = masks[i][:, ::-1] if flipped else masks[i]
            assert item["mask"].dtype == torch.bool
            np.testing.assert_array_equal(item["mask"][0].numpy(), truth)

    # class order fixed by the user; integer labels index it
    ds = ImageDataset.from_csv(csv_path, class_names=["normal", "DR", "AMD"])
    assert ds.targets().tolist() == [0, 1, 2, 1]

    # multi-label 0/1 columns
    ds = ImageDataset.from_csv(csv_path, labels=["DR", "AMD"])
    assert ds.multilabel and ds.class_names == ["DR", "AMD"]
    assert ds[3]["label"].tolist() == [1.0, 1.0] and ds[3]["label"].dtype == torch.float32

    batch = collate([ds[i] for i in range(4)])
    assert batch["image"].shape == (4, 1, 10, 14) and batch["label"].shape == (4, 2)
    assert batch["has_mask"].tolist() == [True, True, False, True]
    assert not batch["mask"][2].any() and batch["index"].tolist() == [0, 1, 2, 3]
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate)
    assert [b["image"].shape[0] for b in loader] == [2, 2]


def test_integer_labels_and_resampling_with_masks(tmp_path):
    ramp = np.tile(np.arange(9, dtype=np.float32), (5, 1))  # value = column index
    np.save(tmp_path / "ramp.npy", ramp)
    mask = np.zeros((5, 9), dtype=np.uint8)
    mask[:, :3] = 1
    np.save(tmp_path / "mask.npy", mask)
    (tmp_path / "m.csv").write_text("path,label,mask\nramp.npy,2,mask.npy\n")
    ds = ImageDataset.from_csv(tmp_path / "m.csv", shape=(3, 17))
    assert ds.class_names == ["0", "1", "2"] and ds[0]["label"].item() == 2
    item = ds[0]
    # linear resampling on the align_corners grid maps column j to 8 j / 16: a ramp stays a ramp
    np.testing.assert_allclose(item["image"][0, 1].numpy(), np.arange(17) * 8 / 16, atol=1e-5)
    # nearest neighbour on the same grid: output column j reads input round(j / 2)
    expected = np.round(np.arange(17) * 8 / 16) < 3
    np.testing.assert_array_equal(item["mask"][0, 1].numpy(), expected)


@pytest.mark.parametrize("method", ["minmax", "zscore", "percentile"])
def test_intensity_normalisation(tmp_path, method):
    image = rng.normal(50.0, 10.0, size=(20, 30)).astype(np.float32)
    image[0, 0] = 1000.0  # a hot pixel
    np.save(tmp_path / "x.npy", image)
    out = ImageDataset.from_paths([tmp_path / "x.npy"], normalise=method)[0]["image"][0]
    out = out.numpy().astype(np.float64)
    if method == "minmax":
        np.testing.assert_allclose(
            out, (image - image.min()) / (image.max() - image.min()), atol=1e-6
        )
    elif method == "zscore":
        assert out.mean() == pytest.approx(0.0, abs=1e-5)
        assert out.std() == pytest.approx(1.0, abs=1e-5)
    else:
        lo, hi = np.percentile(image, [1, 99])
        np.testing.assert_allclose(out, (np.clip(image, lo, hi) - lo) / (hi - lo), atol=1e-5)
        assert out[0, 0] == pytest.approx(1.0)


def test_folder_per_class_and_flat_folder(tmp_path):
    root = tmp_path / "root"
    for name, count in (("pneumonia", 2), ("normal", 3)):
        (root / name).mkdir(parents=True)
        for i in range(count):
            write_png(root / name / f"{i}.png", np.full((6, 6), 10 * i, dtype=np.uint8))
    (root / "normal" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    ds = open_dataset(root)
    assert ds.class_names == ["normal", "pneumonia"]
    assert ds.targets().tolist() == [0, 0, 0, 1, 1]
    assert ds[4]["image"].max().item() == 10.0

    flat = tmp_path / "dicoms"
    flat.mkdir()
    for i in range(2):
        write_dicom(flat / f"p{i}.dcm", np.full((4, 5), i, dtype=np.uint16))
    ds = open_dataset(flat)
    assert not ds.labelled and ds.class_names == [] and len(ds) == 2
    assert ds[1]["label"].item() == -1


# --------------------------------------------------------------------------- bad input


def test_bad_files_give_one_line_errors_per_item(tmp_path):
    good = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    write_png(tmp_path / "good.png", good)
    write_png(tmp_path / "full.png", good)
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.dcm").write_bytes(b"this is not a dicom file" * 20)
    (tmp_path / "dir.png").mkdir()
    paths = ["good.png", "missing.png", "truncated.png", "garbage.dcm", "dir.png", "full.png"]
    ds = ImageDataset.from_paths([tmp_path / p for p in paths])
    assert ds.missing_files() == [str(tmp_path / "missing.png")]
    expected = {
        "missing.png": "does not exist",
        "truncated.png": "truncated",
        "garbage.dcm": "not a valid DICOM",
        "dir.png": "not a regular file",
    }
    for i, name in enumerate(paths):
        item, error = ds.try_get(i)
        if name in expected:
            assert item is None and name in error and expected[name] in error, error
            assert one_line(error)
            with pytest.raises(DataError):
                ds[i]
        else:
            assert error is None
            np.testing.assert_array_equal(item["image"][0].numpy(), good)


def test_wrong_channels_and_inconsistent_shapes(tmp_path):
    write_png(tmp_path / "grey.png", np.zeros((8, 8), dtype=np.uint8))
    write_png(tmp_path / "rgb.png", np.zeros((8, 8, 3), dtype=np.uint8))
    write_png(tmp_path / "wide.png", np.zeros((8, 12), dtype=np.uint8))
    np.save(tmp_path / "two.npy", np.zeros((2, 8, 8), dtype=np.float32))

    ds = ImageDataset.from_paths([tmp_path / "grey.png", tmp_path / "rgb.png"])
    _, error = ds.try_get(1)
    assert "rgb.png has 3 channel(s) but" in error and "grey.png has 1" in error
    assert one_line(error)
    assert ImageDataset.from_paths([tmp_path / "rgb.png"], channels=1)[0]["image"].shape[0] == 1

    ds = ImageDataset.from_paths([tmp_path / "two.npy"], channels=1, spatial_dims=2)
    _, error = ds.try_get(0)
    assert "two.npy has 2 channel(s); expected 1" in error

    ds = ImageDataset.from_paths([tmp_path / "grey.png", tmp_path / "wide.png"])
    _, error = ds.try_get(1)
    assert "wide.png has shape (8, 12)" in error and "grey.png has shape (8, 8)" in error
    assert one_line(error)
    fixed = ImageDataset.from_paths([tmp_path / "grey.png", tmp_path / "wide.png"], shape=(8, 8))
    assert fixed[1]["image"].shape == (1, 8, 8)

    ds = ImageDataset.from_paths([tmp_path / "grey.png"], shape=(4, 4, 4))
    with pytest.raises(DataError, match=r"grey\.png is 2D"):
        ds[0]


def test_manifest_errors_name_columns_and_classes(tmp_path):
    write_png(tmp_path / "a.png", np.zeros((4, 4), dtype=np.uint8))
    (tmp_path / "nolabel.csv").write_text("path,diagnosis\na.png,DR\n")
    with pytest.raises(DataError) as error:
        ImageDataset.from_csv(tmp_path / "nolabel.csv")
    assert "'label'" in str(error.value) and "['path', 'diagnosis']" in str(error.value)
    assert one_line(str(error.value))
    ds = ImageDataset.from_csv(tmp_path / "nolabel.csv", label_column="diagnosis")
    assert ds.class_names == ["DR"]

    (tmp_path / "unknown.csv").write_text("path,label\na.png,DR\na.png,cataract\n")
    with pytest.raises(DataError) as error:
        ImageDataset.from_csv(tmp_path / "unknown.csv", class_names=["normal", "DR"])
    message = str(error.value)
    assert "row 3" in message and "'cataract'" in message and "['normal', 'DR']" in message

    (tmp_path / "multi.csv").write_text("path,DR\na.png,2\n")
    with pytest.raises(DataError, match="'DR' holds '2'; expected 0 or 1"):
        ImageDataset.from_csv(tmp_path / "multi.csv", labels=["DR"])
    with pytest.raises(DataError, match=r"lacks label column\(s\) \['AMD'\]"):
        ImageDataset.from_csv(tmp_path / "multi.csv", labels=["DR", "AMD"])
    (tmp_path / "flip.csv").write_text("path,label,flip\na.png,0,left\n")
    with pytest.raises(DataError, match="row 2: flip value 'left'"):
        ImageDataset.from_csv(tmp_path / "flip.csv")
    with pytest.raises(DataError, match="normalise must be one of"):
        ImageDataset.from_paths([tmp_path / "a.png"], normalise="max")
    with pytest.raises(DataError, match="float data"):
        np.save(tmp_path / "f.npy", np.zeros((4, 4), dtype=np.float32))
        ImageDataset.from_paths([tmp_path / "f.npy"], normalise="range")[0]


def test_flip_follows_the_left_right_axis_of_a_nifti(tmp_path):
    import nibabel as nib

    data = rng.normal(size=(4, 5, 6)).astype(np.float32)
    affine = np.array([[0, 2.0, 0, 0], [0, 0, 2.0, 0], [2.0, 0, 0, 0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "v.nii")  # voxel axis 1 = world x
    (tmp_path / "d.csv").write_text("path,label,flip\nv.nii,0,1\n")
    ds = ImageDataset.from_csv(tmp_path / "d.csv")
    # read in RAS+ order (nibabel's as_closest_canonical): world x is voxel axis 0
    canonical = nib.as_closest_canonical(nib.load(tmp_path / "v.nii"))
    assert ds.lr_axis == 0
    expected = canonical.get_fdata(dtype=np.float32)[::-1]
    np.testing.assert_array_equal(ds[0]["image"][0].numpy(), expected)
    np.testing.assert_allclose(ds[0]["affine"], canonical.affine)  # mirrored content, same grid


def test_flat_folder_keeps_dicom_series_and_skips_other_folders(tmp_path):
    root = tmp_path / "scans"
    (root / "series1").mkdir(parents=True)
    (root / "masks").mkdir()
    write_png(root / "masks" / "m.png", np.zeros((4, 5), dtype=np.uint8))
    for k in range(3):
        write_dicom(
            root / "series1" / f"s{k}.dcm",
            np.full((4, 5), k, dtype=np.uint16),
            InstanceNumber=k + 1,
        )
    write_dicom(root / "single.dcm", np.zeros((3, 4, 5), dtype=np.uint16))
    ds = open_dataset(root)
    assert [p.split("/")[-1] for p in ds.paths] == ["series1", "single.dcm"]
    volume = ds[0]["image"]
    assert volume.shape == (1, 3, 4, 5) and volume[0, :, 0, 0].tolist() == [0.0, 1.0, 2.0]
