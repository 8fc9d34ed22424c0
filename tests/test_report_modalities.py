"""Report figures in each modality's convention: colour fundus photographs in RGB, grey
radiographs and MRI in grey, 3D volumes as axial slices through a chosen voxel and as
nilearn's orthogonal views cut through the region's centre of mass in world millimetres."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from medexplain.report import figures, ortho_plot
from medexplain.report.figures import plot_examples, plot_global_maps
from medexplain.report.ortho_plot import plot_global_maps_ortho


def _pixels(path) -> np.ndarray:
    from matplotlib.image import imread

    return imread(path)[..., :3]


def _corner_map(size: int = 16) -> torch.Tensor:
    heat = torch.zeros(1, size, size)
    heat[0, :4, :4] = 1.0
    return heat


def _grey_pixels(rgb: np.ndarray, value: float) -> np.ndarray:
    return (np.abs(rgb - value) < 0.01).all(axis=-1)


def _red_pixels(rgb: np.ndarray) -> np.ndarray:
    return (rgb[..., 0] > 0.99) & (rgb[..., 1] < 0.01) & (rgb[..., 2] < 0.01)


def test_three_channel_mean_image_is_drawn_in_colour_where_the_map_is_zero(tmp_path):
    red = torch.zeros(3, 16, 16)
    red[0] = 1.0
    grey = torch.full((1, 16, 16), 0.5)
    grey[0, 0, :2] = torch.tensor([0.0, 1.0])  # grey range 0..1, hidden under the map
    maps = {"a": _corner_map()}
    colour = _pixels(plot_global_maps(red, maps, tmp_path / "red.png"))
    reference = _pixels(plot_global_maps(grey, maps, tmp_path / "grey.png"))
    assert colour.shape == reference.shape
    # Same layout: where the grey render shows the bare background, the RGB one is pure red.
    background = _grey_pixels(reference, 0.5)
    assert background.sum() > 0.2 * background.size
    assert _red_pixels(colour)[background].mean() > 0.99
    assert not _red_pixels(reference).any()


def test_rgb_examples_show_the_photograph_in_colour_and_grey_stays_grey(tmp_path):
    red = torch.zeros(2, 3, 16, 16)
    red[:, 0] = 2.0  # clipped to 1
    grey = torch.linspace(0, 1, 16).repeat(2, 1, 16, 1)
    masks = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    maps = {"m": torch.zeros(2, 1, 16, 16)}
    colour = _pixels(plot_examples(red, masks, maps, tmp_path / "red.png"))
    plain = _pixels(plot_examples(grey, masks, maps, tmp_path / "grey.png"))
    # Two image panels per row (image, ground truth) and the zero map's panel over it.
    red_count = _red_pixels(colour).sum()
    assert red_count > 0.2 * colour.shape[0] * colour.shape[1]
    assert np.ptp(plain, axis=-1).max() < 0.01  # R = G = B everywhere
    assert len(np.unique(np.round(plain[..., 0], 2))) > 10  # the gradient is visible


def test_three_channel_grey_equals_one_channel_grey(tmp_path):
    grey = torch.rand(1, 12, 12)
    grey[0, 0, :2] = torch.tensor([0.0, 1.0])  # grey is stretched to its range: make it 0..1
    maps = {"a": _corner_map(12)}
    one = _pixels(plot_global_maps(grey, maps, tmp_path / "one.png"))
    three = _pixels(plot_global_maps(grey.expand(3, -1, -1), maps, tmp_path / "three.png"))
    np.testing.assert_allclose(one, three, atol=2 / 255)  # 8-bit colour table


def _capture_figure(monkeypatch, module):
    captured = {}
    save = module._save

    def keep(fig, path):
        captured["figure"] = fig
        return save(fig, path)

    monkeypatch.setattr(module, "_save", keep)
    return captured


def test_axial_cut_of_examples_shows_the_requested_slice(tmp_path, monkeypatch):
    shape, (a, b, k) = (9, 11, 7), (2, 8, 5)
    volume = np.zeros((1, 1, *shape))
    volume[0, 0, a, b, k] = 1.0  # a marker only in slice k
    heat = np.zeros_like(volume)
    heat[0, 0, a, b, k] = 3.0
    captured = _capture_figure(monkeypatch, figures)
    plot_examples(volume, None, {"m": heat}, tmp_path / "cut.png", cut=(4, 4, k))
    axes = captured["figure"].axes
    shown = np.asarray(axes[0].images[0].get_array())
    # Radiological axial view of a RAS volume: rows run from anterior (top) to posterior.
    expected = volume[0, 0, :, :, k].T[::-1]
    np.testing.assert_array_equal(shown, expected)
    assert shown[shape[1] - 1 - b, a] == 1.0 and shown.sum() == 1.0
    overlay = np.asarray(axes[2].images[1].get_array())
    assert (
        overlay[shape[1] - 1 - b, a, 3] > 0
        and overlay[..., 3].sum() == overlay[shape[1] - 1 - b, a, 3]
    )
    plot_examples(volume, None, {"m": heat}, tmp_path / "middle.png")
    middle = np.asarray(captured["figure"].axes[0].images[0].get_array())
    np.testing.assert_array_equal(middle, volume[0, 0, shape[0] // 2])  # default unchanged


def test_3d_global_maps_are_three_views_on_one_scale(tmp_path, monkeypatch):
    from medexplain.report import panels

    captured = _capture_figure(monkeypatch, panels)
    maps = {"a": torch.rand(1, 6, 7, 8), "b": 2 * torch.rand(6, 7, 8)}
    plot_global_maps(torch.rand(1, 6, 7, 8), maps, tmp_path / "g.png")
    axes = captured["figure"].axes
    colour_bars = [ax for ax in axes if not ax.images]
    assert len(axes) == 7 and len(colour_bars) == 1  # 2 maps x 3 views, one colour bar
    views = [ax.get_title().split("·")[1].split()[0] for ax in axes if ax.images]
    assert views == ["axial", "coronal", "sagittal"] * 2
    top = max(float(m.abs().max()) for m in maps.values())
    assert colour_bars[0].get_ylim()[1] == pytest.approx(top)


def test_2d_global_maps_share_one_scale_and_colour_bar(tmp_path, monkeypatch):
    captured = _capture_figure(monkeypatch, figures)
    weak, strong = _corner_map(), 4 * _corner_map()
    plot_global_maps(torch.rand(1, 16, 16), {"weak": weak, "strong": strong}, tmp_path / "g.png")
    axes = captured["figure"].axes
    colour_bars = [ax for ax in axes if not ax.images]
    assert len(colour_bars) == 1 and colour_bars[0].get_ylim()[1] == pytest.approx(4.0)
    # on one scale the weak map is drawn a quarter as opaque as the strong one
    alpha = [np.asarray(ax.images[1].get_array())[..., 3].max() for ax in axes if ax.images]
    assert alpha[0] == pytest.approx(alpha[1] / 4)


def _brain(shape=(12, 14, 10)):
    """A mean volume, an affine with unequal voxel sizes and offset, an irregular region
    and a map whose peak lies outside the region."""
    affine = np.array([[2.0, 0, 0, -11.0], [0, 3.0, 0, -20.0], [0, 0, 2.5, 4.0], [0, 0, 0, 1.0]])
    region_voxels = [(3, 4, 5), (3, 5, 5), (4, 4, 6), (7, 9, 2)]
    region = np.zeros(shape, dtype=bool)
    for voxel in region_voxels:
        region[voxel] = True
    heat = np.zeros(shape)
    heat[region] = 0.5
    peak = (9, 2, 8)
    heat[peak] = 1.0
    mean = np.random.default_rng(0).random(shape)
    return mean, affine, region, heat, region_voxels, peak


def test_ortho_cut_goes_through_the_region_centre_of_mass_in_world_mm(tmp_path, monkeypatch):
    pytest.importorskip("nilearn")
    from matplotlib import pyplot
    from nilearn import plotting

    mean, affine, region, heat, region_voxels, peak = _brain()
    calls, contours = [], []
    real = plotting.plot_stat_map

    def spy(*args, **kwargs):
        calls.append(kwargs)
        display = real(*args, **kwargs)
        add_contours = display.add_contours

        def record(image, **options):
            contours.append(np.asarray(image.get_fdata()))
            return add_contours(image, **options)

        display.add_contours = record
        return display

    monkeypatch.setattr(plotting, "plot_stat_map", spy)
    open_before = pyplot.get_fignums()
    path = plot_global_maps_ortho(
        mean[None],
        {"with region": heat[None], "no region": torch.as_tensor(heat)},
        tmp_path / "ortho.png",
        affine=affine,
        regions={"with region": torch.as_tensor(region)[None]},
        title="t",
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pyplot.get_fignums() == open_before
    centre = [sum(v[axis] for v in region_voxels) / len(region_voxels) for axis in range(3)]
    # The centre of mass (4.25, 5.5, 4.5) lies outside this region in two parts, so the cut
    # snaps to the region voxel nearest to it: squared distances 4.06, 2.06, 4.56 and 41.6
    # to the four voxels, hence (3, 5, 5).
    assert tuple(round(c) for c in centre) not in region_voxels
    nearest = min(region_voxels, key=lambda v: sum((a - b) ** 2 for a, b in zip(v, centre)))
    assert nearest == (3, 5, 5)
    expected = [
        affine @ np.array([*nearest, 1.0]),
        affine @ np.array([*peak, 1.0]),
    ]
    assert len(calls) == 2
    for call, world in zip(calls, expected):
        np.testing.assert_allclose(call["cut_coords"], world[:3])
        assert call["display_mode"] == "ortho" and call["colorbar"] is True
    np.testing.assert_allclose(calls[1]["cut_coords"], [7.0, -14.0, 24.0])  # by hand
    assert len(contours) == 1 and np.array_equal(contours[0] > 0.5, region)  # outlined once


def test_ortho_falls_back_to_voxel_slices_without_nilearn(tmp_path, monkeypatch):
    mean, affine, region, heat, _, _ = _brain()
    monkeypatch.setitem(sys.modules, "nilearn", None)
    captured = _capture_figure(monkeypatch, ortho_plot)
    path = plot_global_maps_ortho(
        mean, {"a": heat}, tmp_path / "fallback.png", affine=affine, regions={"a": region}
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    axes = captured["figure"].axes
    assert len(axes) == 4 and not axes[3].images  # three slices and a colour bar
    # The region's centre of mass lies outside it; the nearest region voxel is (3, 5, 5)
    # (worked out in the test above).
    i, j, k = 3, 5, 5
    for ax, view in zip(axes[:3], (mean[i], mean[:, j], mean[:, :, k])):
        np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), view.T[::-1])
