"""PEPPR on models whose answer is known by construction.

The model reads only a region R of |R| = 12 pixels out of n = 100 (2D 10x10 or 3D 4x5x5)
and says class 1 when at least ``t`` pixels of R are bright. Class-1 images are bright
(1) on R, class-0 images dark (0); the rest of every image is noise the model ignores and
the fill is zero. Ranking R first, the top-f set at step s holds k_s = ceil(s/20 * 100)
= 5 s pixels, of which min(k_s, 12) lie in R, so:

- erase: class 1 is still recognised while 12 - min(k_s, 12) >= t  (else accuracy 1/2);
- restore: class 1 is recognised once min(k_s, 12) >= t;
- AUC is 1 while some R pixel separates the classes, 1/2 once none does (all scores tie).

With t = 1 erasing destroys accuracy at the first step whose fraction reaches 12/100,
s = ceil(0.12 * 20) = 3; with t = 12 restoring recovers it at that same step.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from medexplain.core.perturb import blur_baseline, rank_pixels, top_fraction_mask
from medexplain.metrics.peppr import peppr, peppr_many
from medexplain.report.peppr_plot import plot_peppr

N_STEPS = 20
N_PIXELS = 100
REGION_SIZE = 12


class RegionModel(nn.Module):
    """Logits per head k: ``sum_{R_k} x - (needed - 0.5)``; two-class form for one region."""

    def __init__(self, regions: torch.Tensor, needed: int, two_class: bool = True) -> None:
        super().__init__()
        self.register_buffer("regions", regions.float())  # (K, *S)
        self.needed = needed
        self.two_class = two_class
        self.seen: list[torch.Tensor] | None = None

    def forward(self, x):
        if self.seen is not None:
            self.seen.append(x.detach().clone())
        sums = (x[:, :1] * self.regions.unsqueeze(0)).flatten(2).sum(2)  # (B, K)
        evidence = sums - (self.needed - 0.5)
        if self.two_class:
            return torch.cat([torch.zeros_like(evidence), evidence], dim=1)
        return evidence


def _region(shape):
    r = torch.zeros(shape, dtype=torch.bool)
    if len(shape) == 2:
        r[2:5, 3:7] = True  # 3 x 4
    else:
        r[1:3, 1:3, 1:4] = True  # 2 x 2 x 3
    assert int(r.sum()) == REGION_SIZE and r.numel() == N_PIXELS
    return r


def _images(region_masks: torch.Tensor, labels: torch.Tensor, seed: int = 0):
    """Noise in [0, 1) everywhere, region k set to label k (0/1)."""
    g = torch.Generator().manual_seed(seed)
    labels2d = labels.view(len(labels), -1)
    shape = region_masks.shape[1:]
    x = torch.rand(len(labels), 1, *shape, generator=g)
    for k in range(region_masks.shape[0]):
        r = region_masks[k].expand_as(x[:, 0])
        x[:, 0][r] = labels2d[:, k].view(-1, *([1] * len(shape))).float().expand_as(x[:, 0])[r]
    return x


def _expected(needed):
    counts = np.array([math.ceil(s / N_STEPS * N_PIXELS - 1e-9) for s in range(N_STEPS + 1)])
    in_region = np.minimum(counts, REGION_SIZE)
    erase_acc = np.where(REGION_SIZE - in_region >= needed, 1.0, 0.5)
    restore_acc = np.where(in_region >= needed, 1.0, 0.5)
    erase_auc = np.where(in_region < REGION_SIZE, 1.0, 0.5)
    restore_auc = np.where(in_region >= 1, 1.0, 0.5)
    return counts, erase_acc, restore_acc, erase_auc, restore_auc


@pytest.mark.parametrize("shape", [(10, 10), (4, 5, 5)])
@pytest.mark.parametrize("needed", [1, REGION_SIZE])
def test_peppr_known_region_model(shape, needed):
    region = _region(shape)
    labels = torch.tensor([0, 1] * 8)
    x = _images(region.unsqueeze(0), labels)
    model = RegionModel(region.unsqueeze(0), needed)
    ranking = region.float().unsqueeze(0)  # (1, *S): R first
    result = peppr(
        model, x, labels, ranking, fill="zero", n_steps=N_STEPS, random_seeds=5, batch_size=32
    )

    counts, erase_acc, restore_acc, erase_auc, restore_auc = _expected(needed)
    np.testing.assert_allclose(result.fractions, np.linspace(0, 1, N_STEPS + 1))
    np.testing.assert_array_equal(result.accuracy.erase, erase_acc)
    np.testing.assert_array_equal(result.accuracy.restore, restore_acc)
    np.testing.assert_array_equal(result.auc.erase, erase_auc)
    np.testing.assert_array_equal(result.auc.restore, restore_auc)
    step = math.ceil(REGION_SIZE / N_PIXELS * N_STEPS)  # = 3
    if needed == 1:  # erasing destroys accuracy exactly when R's fraction has been erased
        assert erase_acc[step - 1] == 1.0 and erase_acc[step] == 0.5
        # random orders cannot erase all 12 R pixels with fewer than 12 pixels; at step 3
        # (15 pixels) only with probability C(88,3)/C(100,15) ~ 1e-15
        assert np.all(result.accuracy.random_erase[:, : step + 1] == 1.0)
        assert result.accuracy.areas()["erase_minus_random"] < -0.25
        assert result.erase_minus_random < -0.25  # headline AUC as well
    else:  # restoring recovers accuracy exactly when R's fraction has been restored
        assert restore_acc[step - 1] == 0.5 and restore_acc[step] == 1.0
        assert np.all(result.accuracy.random_restore[:, : step + 1] == 0.5)
        assert result.accuracy.areas()["restore_minus_random"] > 0.25
    # areas are trapezoids over the fraction axis
    assert result.accuracy.areas()["erase_area"] == pytest.approx(
        np.trapezoid(erase_acc, result.fractions)
    )
    # the k-counts are those of perturb.top_fraction_mask on the ranks of the map
    ranks = rank_pixels(ranking.unsqueeze(0))
    for s, f in enumerate(result.fractions):
        assert int(top_fraction_mask(ranks, f).sum()) == counts[s]
    summary = json.loads(json.dumps(result.summary()))
    assert summary["erase_area"] == summary["auc"]["erase_area"] == pytest.approx(result.erase_area)
    payload = json.loads(json.dumps(result.to_dict()))
    assert payload["auc"]["erase_area"] == pytest.approx(result.erase_area)
    assert len(payload["accuracy"]["random_erase_mean"]) == N_STEPS + 1


def test_peppr_streaming_batches_equal_tensor_input():
    region = _region((10, 10))
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1, 0])
    x = _images(region.unsqueeze(0), labels, seed=1)
    model = RegionModel(region.unsqueeze(0), needed=4)
    ranking = torch.rand(1, 10, 10, generator=torch.Generator().manual_seed(3))
    kwargs = dict(fill="zero", n_steps=10, random_seeds=2)
    whole = peppr(model, x, labels, ranking, batch_size=64, **kwargs)
    batches = [(x[i : i + 3], labels[i : i + 3]) for i in range(0, 10, 3)]
    streamed = peppr(model, batches, None, ranking, batch_size=3, **kwargs)
    assert whole.to_dict() == streamed.to_dict()


def test_peppr_many_shares_the_random_control_and_equals_separate_calls():
    region = _region((10, 10))
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1, 0])
    x = _images(region.unsqueeze(0), labels, seed=2)
    model = RegionModel(region.unsqueeze(0), needed=4)
    generator = torch.Generator().manual_seed(4)
    rankings = {
        "good": region.unsqueeze(0).float(),
        "noise": torch.rand(1, 10, 10, generator=generator),
        "labelwise": {0: torch.rand(1, 10, 10, generator=generator), 1: region[None].float()},
    }
    kwargs = dict(fill="zero", n_steps=10, random_seeds=3, batch_size=16)
    together = peppr_many(model, x, labels, rankings, **kwargs)
    for name, ranking in rankings.items():
        assert together[name].to_dict() == peppr(model, x, labels, ranking, **kwargs).to_dict()


def test_peppr_fills_are_the_blur_and_the_dataset_mean():
    region = _region((10, 10))
    labels = torch.tensor([0, 1, 0, 1])
    x = _images(region.unsqueeze(0), labels, seed=2)
    model = RegionModel(region.unsqueeze(0), needed=1)
    ranking = region.float().unsqueeze(0)
    for fill, expected in (
        ("blur", blur_baseline(x)),
        ("mean", x.mean(0, keepdim=True).expand_as(x)),
    ):
        model.seen = []
        peppr(model, x, labels, ranking, fill=fill, n_steps=4, random_seeds=1)
        seen = torch.cat(model.seen)
        model.seen = None
        # restore at f=0 and erase at f=1 show each image's pure fill
        for i in range(len(x)):
            diffs = (seen - expected[i : i + 1]).abs().flatten(1).amax(1)
            assert float(diffs.min()) < 1e-6, fill


def test_peppr_labelwise_ranking_multilabel():
    shape = (10, 10)
    ra = _region(shape)
    rb = torch.zeros(shape, dtype=torch.bool)
    rb[6:8, :] = True
    rb[8, :2] = True  # 22 pixels, disjoint from ra
    regions = torch.stack([ra, rb])
    labels = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]] * 4)
    x = _images(regions, labels, seed=4)
    model = RegionModel(regions, needed=1, two_class=False)
    names = ["a", "b"]
    kwargs = dict(fill="zero", n_steps=N_STEPS, random_seeds=2, class_names=names)
    counts = np.array([math.ceil(s * 5 - 1e-9) for s in range(N_STEPS + 1)])

    labelwise = peppr(model, x, labels, {"a": ra.float()[None], "b": rb.float()[None]}, **kwargs)
    auc_a = np.where(counts < 12, 1.0, 0.5)
    auc_b = np.where(counts < 22, 1.0, 0.5)
    np.testing.assert_array_equal(labelwise.auc_per_label["a"].erase, auc_a)
    np.testing.assert_array_equal(labelwise.auc_per_label["b"].erase, auc_b)
    np.testing.assert_array_equal(labelwise.auc.erase, (auc_a + auc_b) / 2)
    # once a label's region is gone every image is called negative: accuracy = 1/2 per label
    np.testing.assert_array_equal(labelwise.accuracy.erase, (auc_a + auc_b) / 2)

    # one shared map ranking R_a then R_b: label b only dies once 12 + 22 pixels are gone
    shared = peppr(model, x, labels, (2 * ra.float() + rb.float())[None], **kwargs)
    np.testing.assert_array_equal(shared.auc_per_label["a"].erase, auc_a)
    np.testing.assert_array_equal(shared.auc_per_label["b"].erase, np.where(counts < 34, 1.0, 0.5))


def test_plot_and_errors(tmp_path):
    region = _region((10, 10))
    labels = torch.tensor([0, 1, 0, 1])
    x = _images(region.unsqueeze(0), labels)
    model = RegionModel(region.unsqueeze(0), needed=1)
    result = peppr(model, x, labels, region.float()[None], fill="zero", n_steps=5, random_seeds=2)
    path = plot_peppr(result, tmp_path / "peppr.png")
    from PIL import Image

    with Image.open(path) as img:
        assert img.size[0] > 200 and img.size[1] > 200
    with pytest.raises(ValueError, match="maps must be one global map"):
        peppr(model, x, labels, torch.zeros(1, 8, 8), fill="zero")
    with pytest.raises(ValueError, match="fill must be one of"):
        peppr(model, x, labels, region.float()[None], fill="noise")
    with pytest.raises(ValueError, match="labels must be"):
        peppr(model, x, torch.tensor([0, 1, 2, 1]), region.float()[None], fill="zero")
