"""Localization scores against hand computations; rank AUROC against scipy's Mann-Whitney U."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from medexplain.core.ranks import average_ranks, rank_auroc
from medexplain.metrics.localization import (
    auroc,
    energy_inside,
    iou_top,
    localization_scores,
    pointing_game,
)


def test_average_ranks_match_scipy_rankdata():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, size=(4, 30)).astype(float)  # many ties
    ours = average_ranks(torch.from_numpy(x)).numpy()
    for row, ref in zip(ours, x):
        np.testing.assert_array_equal(row, stats.rankdata(ref, method="average"))


def test_rank_auroc_matches_mann_whitney():
    rng = np.random.default_rng(1)
    scores = np.round(rng.normal(size=(5, 200)), 1)  # rounding creates ties
    truth = rng.uniform(size=(5, 200)) < np.linspace(0.1, 0.6, 5)[:, None]
    ours = rank_auroc(torch.from_numpy(scores), torch.from_numpy(truth)).numpy()
    for k in range(5):
        pos, neg = scores[k][truth[k]], scores[k][~truth[k]]
        u = stats.mannwhitneyu(pos, neg, alternative="two-sided").statistic
        assert ours[k] == pytest.approx(u / (len(pos) * len(neg)), abs=1e-12)
    assert math.isnan(float(rank_auroc(torch.ones(4), torch.zeros(4, dtype=torch.bool))))


def _hand_batch():
    maps = torch.tensor(
        [
            [[0.9, 0.2, 0.5], [0.1, 0.5, 0.3]],
            [[0.1, 0.8, 0.7], [0.6, 0.0, -0.5]],
        ]
    ).unsqueeze(1)
    masks = torch.tensor(
        [
            [[1, 0, 1], [0, 0, 0]],
            [[0, 1, 0], [1, 1, 0]],
        ],
        dtype=torch.bool,
    ).unsqueeze(1)
    return maps, masks


def test_scores_by_hand():
    maps, masks = _hand_batch()
    scores = localization_scores(maps, masks)
    # image 0: positives {0.9, 0.5} vs negatives {0.2, 0.1, 0.5, 0.3}: 4 + 3.5 wins of 8
    # image 1: positives {0.8, 0.6, 0.0} vs negatives {0.1, 0.7, -0.5}: 3 + 2 + 1 of 9
    torch.testing.assert_close(scores["auroc"], torch.tensor([7.5 / 8, 6 / 9], dtype=torch.float64))
    # both maxima (0.9 and 0.8) lie in the mask
    torch.testing.assert_close(
        scores["pointing_game"], torch.tensor([1.0, 1.0], dtype=torch.float64)
    )
    # positive mass inside / total: 1.4 / 2.5 and (0.8 + 0.6) / (0.1 + 0.8 + 0.7 + 0.6)
    torch.testing.assert_close(
        scores["energy_inside"], torch.tensor([1.4 / 2.5, 1.4 / 2.2], dtype=torch.float64)
    )
    # image 0: top-2 = {0.9, first 0.5 (position 2)} = mask; image 1: top-3 = positions
    # {1, 2, 3}, mask = {1, 3, 4}: intersection 2, union 4
    torch.testing.assert_close(scores["iou_top"], torch.tensor([1.0, 0.5], dtype=torch.float64))


@pytest.mark.parametrize("shape", [(5, 5), (5, 5, 5)])
def test_pointing_game_tolerance_and_ties(shape):
    dims = len(shape)
    maps = torch.zeros(1, 1, *shape)
    maps[(0, 0, *([0] * dims))] = 1.0  # maximum in the corner
    masks = torch.zeros(1, 1, *shape, dtype=torch.bool)
    masks[(0, 0, *([2] * dims))] = True  # mask at the centre, Chebyshev distance 2
    assert float(pointing_game(maps, masks, tolerance=0)) == 0.0
    assert float(pointing_game(maps, masks, tolerance=1)) == 0.0
    assert float(pointing_game(maps, masks, tolerance=2)) == 1.0
    # a flat map: every pixel is a maximum, credit = mask share 1 / 5**dims
    flat = torch.zeros(1, 1, *shape)
    assert float(pointing_game(flat, masks)) == pytest.approx(1 / 5**dims)
    # flat map has no positive energy (NaN), no ranking information (AUROC 1/2)
    assert math.isnan(float(energy_inside(flat, masks)))
    assert float(auroc(flat, masks)) == 0.5


def test_empty_and_full_masks():
    maps = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    masks = torch.stack(
        [torch.zeros(1, 4, 4, dtype=torch.bool), torch.ones(1, 4, 4, dtype=torch.bool)]
    )
    scores = localization_scores(maps, masks)
    assert torch.isnan(scores["auroc"]).all()  # no ROC curve without both classes
    assert math.isnan(float(scores["pointing_game"][0])) and float(scores["pointing_game"][1]) == 1
    assert float(scores["energy_inside"][0]) == 0 and float(scores["energy_inside"][1]) == 1
    assert math.isnan(float(scores["iou_top"][0])) and float(scores["iou_top"][1]) == 1


def test_batched_3d_auroc_matches_mann_whitney_and_shared_mask():
    g = torch.Generator().manual_seed(3)
    maps = torch.randn(3, 1, 4, 5, 6, generator=g)
    mask = torch.rand(1, 1, 4, 5, 6, generator=g) < 0.3  # one mask for the batch (aligned data)
    ours = auroc(maps, mask)
    for b in range(3):
        values, m = maps[b].flatten().numpy(), mask.flatten().numpy()
        u = stats.mannwhitneyu(values[m], values[~m]).statistic
        assert float(ours[b]) == pytest.approx(u / (m.sum() * (~m).sum()), abs=1e-12)
    # iou_top on the mask itself as the map is perfect, on its negation zero
    assert float(iou_top(mask.float().expand(3, -1, -1, -1, -1), mask)[0]) == 1.0
    assert float(iou_top((~mask).float(), mask)[0]) == 0.0


def test_bad_inputs():
    maps, masks = _hand_batch()
    with pytest.raises(ValueError, match="masks must have shape"):
        auroc(maps, masks[:, :, :1])
    with pytest.raises(ValueError, match="0/1"):
        auroc(maps, masks.float() * 2)
    with pytest.raises(ValueError, match="tolerance"):
        pointing_game(maps, masks, tolerance=-1)


def test_iou_curve_and_its_mean_by_hand():
    from medexplain.metrics.localization import iou_curve, iou_percentile

    maps = torch.tensor([[[[4.0, 3.0], [2.0, 1.0]]]])
    masks = torch.tensor([[[[True, True], [False, False]]]])
    curve = iou_curve(maps, masks)[0]
    # q = 1..24 keeps all 4 pixels (IoU 2/4); 25..49 the top 3 (2/3); 50..74 the top 2 (1);
    # 75..99 the top pixel (1/2)
    expected = [0.5] * 24 + [2 / 3] * 25 + [1.0] * 25 + [0.5] * 25
    assert curve.tolist() == pytest.approx(expected)
    assert float(iou_percentile(maps, masks)[0]) == pytest.approx(sum(expected) / 99)
    assert math.isnan(float(iou_percentile(maps, torch.zeros_like(masks))[0]))


@pytest.mark.parametrize("shape", [(3, 1, 9, 7), (2, 1, 5, 6, 4)])
def test_ncc_is_pearsons_correlation_with_the_mask(shape):
    from medexplain.metrics.localization import ncc

    generator = torch.Generator().manual_seed(4)
    maps = torch.randn(shape, generator=generator)
    masks = torch.rand(shape, generator=generator) > 0.6
    got = ncc(maps, masks)
    for i in range(shape[0]):
        r = stats.pearsonr(maps[i].flatten().numpy(), masks[i].flatten().numpy().astype(float))
        assert float(got[i]) == pytest.approx(r.statistic, abs=1e-9)
    constant = torch.full(shape, 0.3)
    assert torch.isnan(ncc(constant, masks)).all()
    assert torch.isnan(ncc(maps, torch.ones(shape, dtype=torch.bool))).all()
