"""Brain cohort on the MNI152 template: ground truth against independent references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("nilearn", reason="the brain cohort needs nilearn's bundled MNI152 template")
nib = pytest.importorskip("nibabel")

from medexplain.data.cohorts import brain  # noqa: E402
from medexplain.data.cohorts.brain import make_brain, save_cohort_nifti  # noqa: E402
from medexplain.data.cohorts.brain_warps import atrophy_warps  # noqa: E402
from medexplain.explain.generative.spatial_transform import warp  # noqa: E402


@pytest.fixture(scope="module")
def cohort3d():
    return make_brain(9, seed=4)


@pytest.fixture(scope="module")
def healthy3d():
    return make_brain(9, seed=4, effects=False)


def _voxel_world(cohort) -> np.ndarray:
    """World mm of every voxel, ``(*S, 3)``, straight from the affine (z fixed in 2D)."""
    shape = cohort.images.shape[2:]
    index = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1)
    if len(shape) == 2:
        index = np.concatenate([index, np.zeros((*shape, 1))], axis=-1)
    return index @ cohort.affine[:3, :3].T + cohort.affine[:3, 3]


def _numpy_atrophy_displacement(cohort, i: int, world: np.ndarray | None = None) -> np.ndarray:
    """The documented pull-back displacement ``a (1 - r^2)^3 (p - c)`` (mm), ``(*S, d)``,
    rebuilt with numpy from the config and the subject's amplitudes, at the voxels (or at
    the world points ``world`` ``(*S, d)`` mm)."""
    dims = cohort.config["dims"]
    if world is None:
        world = _voxel_world(cohort)[..., :dims]
    radii = np.asarray(cohort.config["atrophy_radii_mm"])[:dims]
    out = np.zeros_like(world)
    for side, centre in enumerate(cohort.config["atrophy_centres_mm"]):
        rel = world - np.asarray(centre)[:dims]
        s = ((rel / radii) ** 2).sum(-1)
        g = np.where(s < 1, np.clip(1 - s, 0, None) ** 3, 0.0)
        out += float(cohort.extra["atrophy_amplitude"][i, side]) * g[..., None] * rel
    return out


def _finite_difference_jacobian(displacement_mm: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """``1 / det(I + grad u)`` by numpy.gradient of the displacement in voxel units."""
    dims = displacement_mm.shape[-1]
    u = displacement_mm / spacing
    grad = np.stack([np.stack(np.gradient(u[..., k]), axis=-1) for k in range(dims)], axis=-2)
    return 1.0 / np.linalg.det(np.eye(dims) + grad)


def _ellipsoid_radius(cohort) -> np.ndarray:
    """Smallest ellipsoidal radius ``|(p - c) / R|`` to either atrophy centre, ``(*S,)``."""
    dims = cohort.config["dims"]
    world = _voxel_world(cohort)[..., :dims]
    radii = np.asarray(cohort.config["atrophy_radii_mm"])[:dims]
    centres = cohort.config["atrophy_centres_mm"]
    r = [np.sqrt((((world - np.asarray(c)[:dims]) / radii) ** 2).sum(-1)) for c in centres]
    return np.minimum(*r)


def test_shapes_labels_affine_and_regions(cohort3d):
    c = cohort3d
    n, shape = 9, c.images.shape[2:]
    assert c.images.shape == (n, 1, *shape) and c.images.dtype == torch.float32
    assert c.evidence.shape == (n, 1, *shape) and c.evidence.dtype == torch.bool
    assert c.extra["jacobian"].shape == (n, 1, *shape)
    assert torch.bincount(c.labels, minlength=3).tolist() == [3, 3, 3]
    assert c.class_names == ("healthy", "atrophy", "lesion")
    # The template's affine scaled from 2 mm to 4 mm voxels: same axes, 4 mm diagonal.
    assert np.allclose(c.affine[:3, :3], np.diag([4.0, 4.0, 4.0]))
    assert set(c.regions) == {"atrophy", "lesion"}
    assert all(r.shape == (1, *shape) and r.any() for r in c.regions.values())
    assert not c.evidence[c.labels == 0].any()
    assert all(c.evidence[i].any() for i in range(n) if c.labels[i] > 0)


def test_affine_places_images_in_mni_space(cohort3d):
    """nilearn's own resampling of the template onto (affine, shape) matches the mean healthy
    image: the affine maps our voxels to the MNI coordinates they show."""
    from nilearn import datasets, image

    c = cohort3d
    target = image.resample_img(
        datasets.load_mni152_template(resolution=2),
        target_affine=c.affine,
        target_shape=tuple(c.images.shape[2:]),
        interpolation="linear",
        force_resample=True,
        copy_header=True,
    ).get_fdata()
    mean = c.images[c.labels == 0, 0].mean(0).numpy()
    assert np.corrcoef(mean.ravel(), target.ravel())[0, 1] > 0.95
    # A shift of one voxel along any axis fits worse: the alignment is voxel-exact.
    for axis in range(3):
        shifted = np.roll(target, 1, axis=axis)
        assert (
            np.corrcoef(mean.ravel(), shifted.ravel())[0, 1]
            < np.corrcoef(mean.ravel(), target.ravel())[0, 1]
        )


def test_atrophy_jacobian_matches_finite_differences(cohort3d):
    c = cohort3d
    spacing = np.abs(np.diag(c.affine)[:3])
    radius = _ellipsoid_radius(c)
    for i in torch.nonzero(c.labels == 1).flatten().tolist():
        jac = c.extra["jacobian"][i, 0].numpy().astype(np.float64)
        reference = _finite_difference_jacobian(_numpy_atrophy_displacement(c, i), spacing)
        core, far = radius < 0.4, radius > 1.25
        assert core.any() and far.any()
        assert (jac[core] < 1).all() and (reference[core] < 1).all()
        assert np.abs(jac[far] - 1).max() < 1e-3 and np.abs(reference[far] - 1).max() < 1e-3
        # The centre has the strongest shrinkage, (1 + a)^-3; the grid need not hit it.
        a = c.extra["atrophy_amplitude"][i].numpy()
        assert (1 + a.max()) ** -3 - 1e-5 <= jac.min() < 0.6
        assert jac.min() > 0  # no folding
        # Evidence is where the documented |log J| exceeds the threshold (filled).
        above = np.abs(np.log(jac)) > c.config["log_j_threshold"]
        assert c.evidence[i, 0].numpy()[above].all()
    others = c.labels != 1
    assert (c.extra["jacobian"][others] == 1).all()


def _largest_difference_error(cohort) -> float:
    spacing = np.abs(np.diag(cohort.affine)[: cohort.config["dims"]])
    errors = []
    for i in torch.nonzero(cohort.labels == 1).flatten().tolist():
        jac = cohort.extra["jacobian"][i, 0].numpy().astype(np.float64)
        reference = _finite_difference_jacobian(_numpy_atrophy_displacement(cohort, i), spacing)
        errors.append(np.abs(jac - reference).max())
    return max(errors)


@pytest.mark.parametrize("dims", [3, 2])
def test_finite_difference_jacobian_converges_to_the_ground_truth(dims):
    """Central differences converge to the analytic Jacobian: halving the voxel size
    (4 mm -> 2 mm) divides their largest deviation by more than two (first order would
    halve it; second order quarters it once the grid resolves the 18 mm half-axis)."""
    coarse = _largest_difference_error(make_brain(3, seed=4, dims=dims))
    fine = _largest_difference_error(make_brain(3, seed=4, dims=dims, spacing=2.0))
    assert fine < 0.45 * coarse


def test_images_equal_their_healthy_counterfactual_outside_the_evidence(cohort3d, healthy3d):
    c, h = cohort3d, healthy3d
    spacing = np.abs(np.diag(c.affine)[:3])
    assert torch.equal(c.labels, h.labels) and torch.equal(c.evidence, h.evidence)
    for i in range(len(c)):
        diff = (c.images[i, 0] - h.images[i, 0]).abs().numpy()
        outside = ~c.evidence[i, 0].numpy()
        if c.labels[i] == 1:
            # Outside the evidence the atrophy moves tissue by at most `move` voxels, so the
            # image changes by at most move * (steepest voxel step) * (largest bias gain).
            move = np.linalg.norm(_numpy_atrophy_displacement(c, i) / spacing, axis=-1)
            step = max(np.abs(np.diff(h.images[i, 0].numpy(), axis=k)).max() for k in range(3))
            bound = move[outside].max() * 2 * step * np.exp(brain.MAX_LOG_BIAS) + 1e-6
            assert diff[outside].max() <= bound < 0.01
        else:
            assert diff[outside].max() == 0.0
        if c.labels[i] > 0:
            assert diff[~outside].max() > 0.05
        else:
            assert diff.max() == 0.0


def test_lesions_lie_in_the_white_matter_of_one_lobe(cohort3d, healthy3d):
    c = cohort3d
    world = _voxel_world(c)
    box = brain.LOBES[c.config["lobe"]]
    for i in torch.nonzero(c.labels == 2).flatten().tolist():
        evidence = c.evidence[i, 0].numpy()
        assert evidence.any()
        assert not (evidence & ~c.extra["wm"][i, 0].numpy()).any()
        points = world[evidence]
        reach = max(brain.LESION_RADIUS_MM) + brain.MAX_DISPLACEMENT_MM
        for axis, (lo, hi) in enumerate(box):
            assert points[:, axis].min() >= lo - reach and points[:, axis].max() <= hi + reach
        # Bright: the lesion raises the intensity of its voxels above the healthy ones.
        assert (c.images[i, 0][evidence] >= healthy3d.images[i, 0][evidence] - 1e-6).all()
    # The counterfactual's intensity under the lesions is that of white matter on the T1
    # template (white matter is the brightest tissue, about 0.78; grey matter about 0.6).
    lesion = c.labels == 2
    under = healthy3d.images[lesion][c.evidence[lesion]]
    assert under.mean() > 0.65


def test_dark_lesions_darken_the_same_voxels_the_bright_ones_brighten(cohort3d, healthy3d):
    dark = make_brain(9, seed=4, lesion_polarity="dark")
    assert torch.equal(dark.evidence, cohort3d.evidence)
    for i in torch.nonzero(dark.labels == 2).flatten().tolist():
        evidence = dark.evidence[i, 0]
        change = dark.images[i, 0] - healthy3d.images[i, 0]
        assert evidence.any() and change[evidence].max() <= 1e-6
        # Away from the clip at 1 the darkening mirrors the brightening voxel by voxel.
        bright_change = cohort3d.images[i, 0] - healthy3d.images[i, 0]
        unclipped = evidence & (cohort3d.images[i, 0] < 1.0) & (dark.images[i, 0] > 0.0)
        torch.testing.assert_close(change[unclipped], -bright_change[unclipped])
        assert change[evidence].min() < -0.05


def test_intensities_stay_in_the_template_range(cohort3d):
    from nilearn import datasets

    template = datasets.load_mni152_template(resolution=2).get_fdata()
    low, high = cohort3d.config["value_range"]
    assert low == 0.0 and high == 1.0 and template.min() >= 0.0 and template.max() <= 1.0
    assert cohort3d.images.min() >= low and cohort3d.images.max() <= high
    clean = make_brain(6, seed=2, noise=0.0, effects=False)
    assert clean.images.min() >= 0.0
    assert clean.images.max() <= template.max() * np.exp(brain.MAX_LOG_BIAS) + 1e-5


def test_deterministic_by_seed():
    a, b, other = (
        make_brain(4, seed=7, dims=2),
        make_brain(4, seed=7, dims=2),
        make_brain(4, seed=8, dims=2),
    )
    assert torch.equal(a.images, b.images) and torch.equal(a.evidence, b.evidence)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.extra["jacobian"], b.extra["jacobian"])
    assert not torch.equal(a.images, other.images)


def test_two_dimensional_slice_through_the_hippocampi():
    c = make_brain(12, seed=1, dims=2)
    h = make_brain(12, seed=1, dims=2, effects=False)
    assert c.images.dim() == 4 and c.evidence.shape == c.images.shape
    # Voxel (i, j, 0) maps to the axial plane z = -14 mm through both hippocampal centres.
    assert c.affine[2, 3] == pytest.approx(-14.0) and np.allclose(c.affine[:2, :2], 4 * np.eye(2))
    centre = np.linalg.inv(c.affine) @ np.array([-26.0, -22.0, -14.0, 1.0])
    i, j = np.round(centre[:2]).astype(int)
    radius = _ellipsoid_radius(c)
    spacing = np.abs(np.diag(c.affine)[:2])
    for k in range(len(c)):
        outside = ~c.evidence[k, 0]
        assert (c.images[k, 0] - h.images[k, 0]).abs()[outside].max() <= 1e-3
        if c.labels[k] == 1:
            assert c.evidence[k, 0, i, j] and c.extra["jacobian"][k, 0, i, j] < 1
            jac = c.extra["jacobian"][k, 0].numpy()
            reference = _finite_difference_jacobian(_numpy_atrophy_displacement(c, k), spacing)
            assert (jac[radius < 0.4] < 1).all() and (reference[radius < 0.4] < 1).all()
            assert np.abs(jac[radius > 1.25] - 1).max() < 1e-3


def _to_mm(cohort, displacement: torch.Tensor) -> np.ndarray:
    """A voxel displacement ``(d, *S)`` as world mm ``(*S, d)`` through the affine."""
    linear = cohort.affine[: displacement.shape[0], : displacement.shape[0]]
    return np.moveaxis(displacement.numpy().astype(np.float64), 0, -1) @ linear.T


@pytest.mark.parametrize("dims", [3, 2])
def test_atrophy_warps_are_the_documented_map_and_its_inverse(dims, cohort3d):
    c = cohort3d if dims == 3 else make_brain(9, seed=4, dims=2)
    injection, removal = atrophy_warps(c)
    world = _voxel_world(c)[..., :dims]
    atrophy = (c.labels == 1).nonzero().flatten().tolist()
    assert atrophy
    for i in atrophy:
        documented = _numpy_atrophy_displacement(c, i)
        assert np.abs(_to_mm(c, injection[i]) - documented).max() < 1e-4
        # removal undoes psi: psi(q + r(q)) = q, psi from the documented formula
        pre_image = world + _to_mm(c, removal[i])
        moved = pre_image + _numpy_atrophy_displacement(c, i, pre_image)
        assert np.abs(moved - world).max() < 1e-3
        assert np.abs(_to_mm(c, removal[i])).max() > 1.0  # a real move, in mm
    others = c.labels != 1
    assert (injection[others] == 0).all() and (removal[others] == 0).all()


def test_atrophy_warps_turn_each_subject_into_its_counterfactual(cohort3d, healthy3d):
    """On the voxel grid the exact warps bring each image closer to the other one, and the
    reversed warps take it further away: the maps point the right way, with the right
    sign, in the spatial transformer's convention."""
    injection, removal = atrophy_warps(cohort3d)
    for i in (cohort3d.labels == 1).nonzero().flatten().tolist():
        x, h = cohort3d.images[i : i + 1], healthy3d.images[i : i + 1]
        inject, remove = injection[i : i + 1], removal[i : i + 1]

        def error(a, b):
            return float(((a - b) ** 2).sum())

        before = error(x, h)
        assert error(warp(h, inject), x) < before < error(warp(h, -inject), x)
        assert error(warp(x, remove), h) < before < error(warp(x, -remove), h)
        # nothing moves outside the ellipsoids
        still = (inject == 0).all(1, keepdim=True) & (remove == 0).all(1, keepdim=True)
        assert float((warp(h, inject) - h)[still].abs().max()) < 1e-5


def test_nifti_carries_the_mni_affine(tmp_path, cohort3d):
    c = cohort3d
    k = int(torch.nonzero(c.labels == 1)[0])
    path = save_cohort_nifti(c.extra["jacobian"][k], tmp_path / "jacobian.nii.gz", c)
    loaded = nib.load(str(path))
    assert np.allclose(loaded.affine, c.affine)
    sform, code = loaded.header.get_sform(coded=True)
    assert int(code) == 4 and np.allclose(sform, c.affine)  # 4 = NIFTI_XFORM_MNI_152
    assert np.allclose(loaded.get_fdata(), c.extra["jacobian"][k, 0].numpy())
    # The voxel the affine sends to the left hippocampal centre shows the atrophy.
    voxel = np.round(np.linalg.inv(loaded.affine) @ np.array([-26.0, -22.0, -14.0, 1.0]))
    assert loaded.get_fdata()[tuple(voxel[:3].astype(int))] < 1
    slice2d = make_brain(3, seed=0, dims=2)
    loaded2 = nib.load(str(save_cohort_nifti(slice2d.images[0], tmp_path / "slice.nii", slice2d)))
    assert loaded2.shape == (*slice2d.images.shape[2:], 1)
    assert int(loaded2.header["sform_code"]) == 4
    assert np.allclose(loaded2.affine @ [0, 0, 0, 1], slice2d.affine @ [0, 0, 0, 1])


def test_classes_are_learnable_on_the_axial_slice():
    """A two-layer CNN trained for a few dozen full-batch steps separates each class from the
    others (one-vs-rest AUROC, rank statistic of sklearn) on held-out slices."""
    from sklearn.metrics import roc_auc_score

    cohort = make_brain(300, seed=3, dims=2)
    train, test = cohort.split((0.6, 0.4), seed=0)
    mean, scale = train.images.mean(0), train.images.std(0) + 0.05
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.LazyLinear(3),
    )
    x = (train.images - mean) / scale
    net(x[:1])
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(80):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(net(x), train.labels).backward()
        optimiser.step()
    with torch.no_grad():
        prob = net((test.images - mean) / scale).softmax(1).numpy()
    for k in range(3):
        assert roc_auc_score(test.labels.numpy() == k, prob[:, k]) >= 0.8
