"""Global maps: normalisation by hand, groups by hand, exact sharded merging, Welch t
against scipy, BH q-values against the definition by hand and in exact arithmetic,
persistence."""

from __future__ import annotations

import itertools
import json
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy import stats

from medexplain.globalmaps import (
    GlobalMaps,
    GlobalResult,
    benjamini_hochberg,
    normalise_maps,
)

# --------------------------------------------------------------------------- normalisation


def _tiny():
    # one 2x2 map [[1, -2], [0, 4]] and one all-zero map
    return torch.tensor([[[[1.0, -2.0], [0.0, 4.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])


@pytest.mark.parametrize(
    ("normalise", "transform", "expected"),
    [
        ("none", "signed", [[1, -2], [0, 4]]),
        ("max", "signed", [[1 / 4, -2 / 4], [0, 1]]),
        ("mass", "signed", [[1 / 7, -2 / 7], [0, 4 / 7]]),
        ("max", "abs", [[1 / 4, 2 / 4], [0, 1]]),
        ("mass", "abs", [[1 / 7, 2 / 7], [0, 4 / 7]]),
        ("mass", "positive", [[1 / 5, 0], [0, 4 / 5]]),
        ("max", "positive", [[1 / 4, 0], [0, 1]]),
    ],
)
def test_normalisation_by_hand(normalise, transform, expected):
    out = normalise_maps(_tiny().double(), normalise, transform)
    torch.testing.assert_close(out[0, 0], torch.tensor(expected, dtype=torch.float64))
    assert torch.equal(out[1], torch.zeros(1, 2, 2, dtype=torch.float64))  # all-zero: no NaN


def test_transform_applies_before_normalisation():
    # A negative-only map under "positive" becomes all zero and must stay zero (not NaN);
    # under "max"+"positive" the scale is the max of the positive part, not of |map|.
    maps = torch.tensor([[[[-3.0, -1.0]]], [[[2.0, -8.0]]]], dtype=torch.float64)
    out = normalise_maps(maps, "max", "positive")
    assert torch.equal(out[0], torch.zeros(1, 1, 2, dtype=torch.float64))
    torch.testing.assert_close(out[1, 0, 0], torch.tensor([1.0, 0.0], dtype=torch.float64))


def test_all_zero_map_in_accumulator_is_not_nan():
    acc = GlobalMaps((2, 2), ["a"], normalise="mass", transform="abs")
    acc.update(torch.zeros(3, 1, 2, 2), labels=torch.zeros(3, dtype=torch.long))
    res = acc.result()
    assert torch.equal(res.overall.mean, torch.zeros(1, 2, 2, dtype=torch.float64))
    assert torch.equal(res.overall.std, torch.zeros(1, 2, 2, dtype=torch.float64))


# --------------------------------------------------------------------------- groups by hand


def test_groups_and_outcomes_by_hand_multiclass():
    # image i is the constant map (i + 1); labels / predictions chosen by hand
    maps = torch.arange(1, 5, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 1, 2, 3)
    labels = torch.tensor([0, 1, 1, 0])
    preds = torch.tensor([0, 1, 0, 1])
    res = GlobalMaps((2, 3), ["a", "b"], normalise="none").update(maps, labels, preds).result()

    def check(key, values):
        group = res.groups[key]
        assert group.count == len(values)
        assert torch.allclose(
            group.mean, torch.full((1, 2, 3), float(np.mean(values)), dtype=torch.float64)
        )
        std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        assert torch.allclose(group.std, torch.full((1, 2, 3), std, dtype=torch.float64))

    check(("overall",), [1, 2, 3, 4])
    check(("label", "a"), [1, 4])
    check(("label", "b"), [2, 3])
    check(("prediction", "a"), [1, 3])
    check(("prediction", "b"), [2, 4])
    # one-vs-rest outcomes for label a: TP img0, FN img3 (truth a, said b), FP img2, TN img1
    check(("outcome", "a", "TP"), [1])
    check(("outcome", "a", "FN"), [4])
    check(("outcome", "a", "FP"), [3])
    check(("outcome", "a", "TN"), [2])
    check(("outcome", "b", "TP"), [2])
    check(("outcome", "b", "FN"), [3])
    check(("outcome", "b", "FP"), [4])
    check(("outcome", "b", "TN"), [1])
    assert res.overall is not None and res.counts[("outcome", "a", "TP")] == 1


def test_groups_by_hand_multilabel_and_empty_groups():
    maps = torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1, 1).expand(3, 1, 2, 2)
    labels = torch.tensor([[1, 1], [1, 0], [0, 0]])
    preds = torch.tensor([[1, 0], [1, 0], [1, 0]])
    acc = GlobalMaps((2, 2), ["x", "y"], normalise="none", multilabel=True)
    res = acc.update(maps, labels, preds).result()
    assert res.groups[("label", "x")].count == 2  # images 0, 1
    assert res.groups[("label", "y")].count == 1  # image 0 is in both label groups
    assert float(res.groups[("label", "x")].mean[0, 0, 0]) == pytest.approx(1.5)
    assert float(res.groups[("outcome", "x", "FP")].mean[0, 0, 0]) == pytest.approx(3.0)
    assert float(res.groups[("outcome", "y", "FN")].mean[0, 0, 0]) == pytest.approx(1.0)
    assert res.groups[("outcome", "y", "TN")].count == 2
    # nobody is predicted y: the group is empty, listed with count 0, absent from groups
    assert res.counts[("prediction", "y")] == 0
    assert ("prediction", "y") not in res.groups
    with pytest.raises(KeyError, match="no image"):
        res.group(("prediction", "y"))


# --------------------------------------------------------------------------- streaming / merging


def _data(n, shape, k, seed):
    g = torch.Generator().manual_seed(seed)
    maps = torch.randn(n, 1, *shape, generator=g) * 3 + 1
    labels = torch.randint(0, k, (n,), generator=g)
    preds = torch.randint(0, k, (n,), generator=g)
    return maps, labels, preds


@pytest.mark.parametrize("shape", [(5, 6), (3, 4, 5)])
def test_sharded_merge_any_order_equals_single_pass_and_direct(shape):
    names = ["n", "p", "q"]
    maps, labels, preds = _data(40, shape, 3, seed=1)
    kwargs = dict(normalise="mass", transform="abs")
    single = GlobalMaps(shape, names, **kwargs).update(maps, labels, preds).result()

    # direct numpy reference on the normalised maps
    x = np.abs(maps.double().numpy())
    x = x / x.reshape(40, -1).sum(1).reshape(40, 1, *([1] * len(shape)))
    for key, sel in [
        (("overall",), np.ones(40, bool)),
        (("label", "p"), labels.numpy() == 1),
        (("prediction", "q"), preds.numpy() == 2),
        (("outcome", "n", "FP"), (labels.numpy() != 0) & (preds.numpy() == 0)),
    ]:
        np.testing.assert_allclose(single.groups[key].mean.numpy(), x[sel].mean(0), rtol=1e-12)
        np.testing.assert_allclose(
            single.groups[key].std.numpy(), x[sel].std(0, ddof=1), rtol=1e-10
        )

    # shards of uneven sizes, each updated with small batches, merged in many orders
    bounds = [0, 3, 4, 17, 29, 40]
    shards = []
    for lo, hi in itertools.pairwise(bounds):
        acc = GlobalMaps(shape, names, **kwargs)
        for s in range(lo, hi, 2):
            e = min(s + 2, hi)
            acc.update(maps[s:e], labels[s:e], preds[s:e])
        shards.append(acc)
    orders = [list(range(5)), [4, 2, 0, 3, 1], [1, 3, 4, 0, 2]]
    results = []
    for order in orders:
        merged = shards[order[0]]
        for i in order[1:]:
            merged = merged.merge(shards[i])
        results.append(merged.result())
    # a tree-shaped merge as well
    results.append(((shards[0] + shards[1]) + (shards[2] + (shards[3] + shards[4]))).result())
    for res in results:
        assert res.counts == single.counts
        for key, group in single.groups.items():
            torch.testing.assert_close(res.groups[key].mean, group.mean, rtol=0, atol=1e-10)
            torch.testing.assert_close(res.groups[key].std, group.std, rtol=0, atol=1e-10)


def test_merge_returns_new_object_and_leaves_inputs_untouched():
    maps, labels, preds = _data(6, (3, 3), 2, seed=2)
    a = GlobalMaps((3, 3), ["u", "v"]).update(maps[:3], labels[:3], preds[:3])
    b = GlobalMaps((3, 3), ["u", "v"]).update(maps[3:], labels[3:], preds[3:])
    mean_a = a.result().overall.mean.clone()
    merged = a.merge(b)
    assert merged is not a and merged is not b
    assert len(a) == 3 and len(b) == 3 and len(merged) == 6
    assert torch.equal(a.result().overall.mean, mean_a)
    with pytest.raises(ValueError, match="different settings"):
        a.merge(GlobalMaps((3, 3), ["u", "v"], normalise="mass"))


def test_memory_does_not_grow_with_the_number_of_images():
    def state_numel(n):
        maps, labels, preds = _data(n, (4, 4), 2, seed=3)
        # make every group non-empty in both runs
        labels[:4] = torch.tensor([0, 0, 1, 1])
        preds[:4] = torch.tensor([0, 1, 0, 1])
        acc = GlobalMaps((4, 4), ["u", "v"])
        for s in range(0, n, 5):
            acc.update(maps[s : s + 5], labels[s : s + 5], preds[s : s + 5])
        state = acc.state_dict()
        return sum(g["mean"].numel() + g["m2"].numel() for g in state["groups"])

    # 1 overall + 2 label + 2 prediction + 8 outcome groups, two maps of 16 values each
    assert state_numel(10) == state_numel(200) == 13 * 2 * 16


def test_state_dict_roundtrip_and_resume(tmp_path):
    maps, labels, preds = _data(12, (2, 3, 4), 2, seed=4)
    full = GlobalMaps((2, 3, 4), ["u", "v"], transform="positive").update(maps, labels, preds)
    part = GlobalMaps((2, 3, 4), ["u", "v"], transform="positive").update(
        maps[:5], labels[:5], preds[:5]
    )
    path = tmp_path / "acc.pt"
    torch.save(part.state_dict(), path)
    resumed = GlobalMaps.from_state_dict(torch.load(path, weights_only=True))
    resumed.update(maps[5:], labels[5:], preds[5:])
    for key, group in full.result().groups.items():
        torch.testing.assert_close(
            resumed.result().groups[key].mean, group.mean, rtol=0, atol=1e-12
        )
        torch.testing.assert_close(resumed.result().groups[key].std, group.std, rtol=0, atol=1e-12)


def test_save_writes_npy_and_index(tmp_path):
    maps, labels, preds = _data(8, (3, 3), 2, seed=5)
    res = GlobalMaps((3, 3), ["healthy", "le sion"]).update(maps, labels, preds).result()
    index_path = res.save(tmp_path)
    index = json.loads(index_path.read_text())
    by_key = {tuple(e["key"]): e for e in index["groups"]}
    assert by_key[("overall",)]["count"] == 8
    assert by_key[("label", "le sion")]["count"] == int((labels == 1).sum())
    arr = np.load(tmp_path / by_key[("label", "le sion")]["mean"])
    np.testing.assert_array_equal(arr, res.groups[("label", "le sion")].mean[0].numpy())
    files = {e[stat].removesuffix(".npy") for e in index["groups"] for stat in ("mean", "std")}
    assert set(res.to_arrays()) == files
    loaded = GlobalResult.load(tmp_path)
    assert loaded.counts == res.counts
    torch.testing.assert_close(loaded.overall.std, res.overall.std)


def test_bad_inputs_have_clear_errors():
    acc = GlobalMaps((3, 3), ["u", "v"])
    with pytest.raises(ValueError, match=r"maps must have shape \(B, 1, 3, 3\)"):
        acc.update(torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match="labels holds a class index"):
        acc.update(torch.zeros(2, 1, 3, 3), labels=torch.tensor([0, 2]))
    with pytest.raises(TypeError, match="integer class indices"):
        acc.update(torch.zeros(2, 1, 3, 3), labels=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="normalise must be one of"):
        GlobalMaps((3, 3), ["u"], normalise="l2")
    with pytest.raises(ValueError, match="no maps were added"):
        acc.result()


# --------------------------------------------------------------------------- statistics


def test_welch_contrast_matches_scipy_and_handles_zero_variance():
    g = torch.Generator().manual_seed(6)
    n = 30
    maps = torch.randn(n, 1, 4, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([0] * 12 + [1] * 18)
    maps[labels == 1] = maps[labels == 1] * 2.0 + 0.7  # unequal variance and shifted mean
    maps[:, :, 0, 0] = 0.0  # always-zero background pixel
    maps[:, :, 0, 1] = 0.3  # constant but non-zero
    maps[:, :, 0, 2] = torch.where(labels == 0, 0.0, 1.0).view(n, 1).double()  # separation
    acc = GlobalMaps((4, 5), ["c0", "c1"], normalise="none", kinds=["label"])
    for s in range(0, n, 7):
        acc.update(maps[s : s + 7], labels[s : s + 7])
    con = acc.contrast(("label", "c1"), ("label", "c0"))

    a = maps[labels == 1, 0].numpy()
    b = maps[labels == 0, 0].numpy()
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy on the constant pixels
        ref = stats.ttest_ind(a, b, axis=0, equal_var=False)
    regular = np.ones((4, 5), bool)
    regular[0, :3] = False
    np.testing.assert_allclose(con.t[0].numpy()[regular], ref.statistic[regular], rtol=1e-9)
    np.testing.assert_allclose(con.p[0].numpy()[regular], ref.pvalue[regular], rtol=1e-8)
    np.testing.assert_allclose(con.df[0].numpy()[regular], ref.df[regular], rtol=1e-9)
    # zero variance in both groups: t=0, p=1 for equal means; +inf, p=0 for separation
    assert con.t[0, 0, 0] == 0 and con.p[0, 0, 0] == 1
    assert con.t[0, 0, 1] == 0 and con.p[0, 0, 1] == 1
    assert con.t[0, 0, 2] == float("inf") and con.p[0, 0, 2] == 0
    for name in ("t", "df", "p", "q"):
        assert not torch.isnan(getattr(con, name)).any()
    # q-values are BH over all pixels
    np.testing.assert_allclose(
        con.q.numpy().ravel(),
        stats.false_discovery_control(con.p.numpy().ravel(), method="bh"),
        rtol=1e-12,
    )
    assert con.count_a == 18 and con.count_b == 12


def test_contrast_mask_excludes_pixels_from_fdr():
    g = torch.Generator().manual_seed(7)
    maps = torch.randn(20, 1, 3, 3, generator=g)
    labels = torch.tensor([0, 1] * 10)
    acc = GlobalMaps((3, 3), ["a", "b"], normalise="none", kinds=["label"]).update(maps, labels)
    mask = torch.zeros(1, 3, 3, dtype=torch.bool)
    mask[0, 1:, 1:] = True
    con = acc.contrast(("label", "a"), ("label", "b"), mask=mask)
    full = acc.contrast(("label", "a"), ("label", "b"))
    assert torch.all(con.q[~mask] == 1) and torch.all(con.t[~mask] == 0)
    np.testing.assert_allclose(
        con.q[mask].numpy(),
        stats.false_discovery_control(full.p[mask].numpy(), method="bh"),
        rtol=1e-12,
    )


def _bh_by_hand(p: np.ndarray) -> np.ndarray:
    """Benjamini & Hochberg (1995) step-up q-values, straight from the definition:
    ``q_(i) = min_{j >= i} min(1, m p_(j) / j)`` in float64, loops only."""
    flat = p.ravel()
    m = flat.size
    order = sorted(range(m), key=lambda i: flat[i])
    q = np.empty(m)
    running = 1.0
    for rank in range(m, 0, -1):
        i = order[rank - 1]
        running = min(running, flat[i] * m / rank)
        q[i] = running
    return q.reshape(p.shape)


def _bh_exact(p: np.ndarray) -> list[Fraction]:
    """The same q-values in exact rational arithmetic (no rounding at all)."""
    flat = [Fraction(float(v)) for v in p.ravel()]
    m = len(flat)
    order = sorted(range(m), key=lambda i: flat[i])
    q: list[Fraction] = [Fraction(0)] * m
    running = Fraction(1)
    for rank in range(m, 0, -1):
        i = order[rank - 1]
        running = min(running, flat[i] * m / rank)
        q[i] = running
    return q


def _random_p_values(rng: np.random.Generator, m: int) -> np.ndarray:
    """Uniform p-values with many exact ties, tiny values, zeros and ones."""
    p = rng.uniform(size=m)
    p[: m // 4] = rng.choice(p[m // 4 :], size=m // 4)  # ties
    p[rng.uniform(size=m) < 0.1] *= 1e-6
    p[rng.uniform(size=m) < 0.03] = 0.0
    p[rng.uniform(size=m) < 0.03] = 1.0
    return rng.permutation(p)


def test_benjamini_hochberg_against_hand_and_exact_arithmetic():
    rng = np.random.default_rng(8)
    for m in (1, 2, 7, 224, 1000):
        p = _random_p_values(rng, m)
        shape = (4, m // 4) if m % 4 == 0 else (m,)
        ours = benjamini_hochberg(torch.from_numpy(p).view(shape))
        assert ours.dtype == torch.float64 and tuple(ours.shape) == shape
        ours = ours.numpy().ravel()
        # The same definition by hand; both round twice (m p / j), in a different order,
        # so they agree to a few units in the last place, not bit for bit.
        np.testing.assert_allclose(ours, _bh_by_hand(p), rtol=4 * np.finfo(float).eps, atol=0)
        exact = _bh_exact(p)
        for value, truth in zip(ours.tolist(), exact):
            assert abs(Fraction(value) - truth) <= 2 * Fraction(float(np.spacing(float(truth))))
        # Tied p-values get the same q-value, and q is monotone in p.
        for v in np.unique(p):
            assert np.unique(ours[p == v]).size == 1
        by_p = np.argsort(p, kind="stable")
        assert np.all(np.diff(ours[by_p]) >= 0)
        assert np.all((ours >= p) & (ours <= 1))


def test_benjamini_hochberg_rejects_nan_and_out_of_range_and_keeps_empty():
    for bad in ([0.2, 1.5], [0.2, float("nan")], [-0.1, 0.5]):
        with pytest.raises(ValueError, match="p-values"):
            benjamini_hochberg(torch.tensor(bad))
    empty = benjamini_hochberg(torch.zeros(0, 3))
    assert empty.shape == (0, 3) and empty.dtype == torch.float64


def test_updates_never_write_into_caller_tensors():
    maps, labels, preds = _data(6, (3, 3), 2, seed=9)
    maps = maps.double()  # CPU float64 + "none": no conversion copy happens on the way in
    original = maps.clone()
    acc = GlobalMaps((3, 3), ["u", "v"], normalise="none").update(maps, labels, preds)
    state = acc.state_dict()
    saved = [g["mean"].clone() for g in state["groups"]]
    resumed = GlobalMaps.from_state_dict(state)
    resumed.update(maps, labels, preds)
    acc.update(maps, labels, preds)
    assert torch.equal(maps, original)
    assert all(torch.equal(g["mean"], s) for g, s in zip(state["groups"], saved))
