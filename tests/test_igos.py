"""I-GOS / iGOS++ against hand computations, independent re-implementations of the
objective, a model whose evidence is known by construction, and the benchmark classifier."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medexplain.core.model import per_image_noise
from medexplain.core.perturb import blur_baseline
from medexplain.explain import create
from medexplain.explain.igos import IGOS, QUICK_PARAMS, IGOSPlusPlus
from medexplain.explain.igos_loss import bilateral_tv, bilateral_weights, total_variation


class SquareReader(nn.Module):
    """A conv net that only sees the pixels inside ``region`` (a square or a cube).

    The input is multiplied by the window before a 3x3 conv (zero padding), and the
    feature map is averaged over the window only: the logits depend on no other pixel.
    logit_1 - logit_0 = scale * (mean features - offset) grows with the window's brightness.
    """

    def __init__(
        self,
        spatial: tuple[int, ...],
        region: tuple[slice, ...],
        offset: float,
        scale: float = 25.0,
    ) -> None:
        super().__init__()
        dims = len(spatial)
        window = torch.zeros(1, 1, *spatial)
        window[(slice(None), slice(None), *region)] = 1.0
        self.register_buffer("window", window)
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.conv = conv(1, 2, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0] += 1.0 / 3**dims  # local mean
            self.conv.weight[1, 0][(1,) * dims] = 1.0  # the pixel itself
            self.conv.bias.zero_()
        self.head = nn.Linear(2, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[0.0, 0.0], [scale, scale]]))
            self.head.bias.copy_(torch.tensor([0.0, -scale * offset]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x * self.window)) * self.window
        pooled = h.flatten(2).sum(-1) / self.window.sum()
        return self.head(pooled)


def square_problem(dims: int, n: int = 3, seed: int = 0):
    # The offset sits between the window features of the images (about 1.36 in 2D, 1.17
    # in 3D) and of their blurred baselines (about 0.99 and 0.81): f_1 ~ 0.99 vs ~ 0.01.
    size, lo, hi, offset = (24, 9, 15, 1.18) if dims == 2 else (12, 4, 8, 1.0)
    spatial = (size,) * dims
    region = (slice(lo, hi),) * dims
    gen = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.rand(n, 1, *spatial, generator=gen)
    x[(slice(None), slice(None), *region)] += 0.6
    return SquareReader(spatial, region, offset).eval(), x, region


def region_mask(shape, region, grow: int = 0):
    out = torch.zeros(shape, dtype=torch.bool)
    grown = tuple(slice(max(r.start - grow, 0), r.stop + grow) for r in region)
    out[(slice(None), slice(None), *grown)] = True
    return out


# ----------------------------------------------------------------- regularisers by hand


def test_total_variation_by_hand_2d_and_3d():
    mask = torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 1.0]])[None, None]
    # vertical differences -1, .5, 1 -> mean of squares 2.25/3; horizontal -.5, -.5, 1, 0
    # -> 1.5/4; TV = 0.75 + 0.375.
    assert total_variation(mask).item() == pytest.approx(1.125)
    cube = torch.zeros(1, 1, 2, 2, 2)
    cube[0, 0, 0, 0, 0] = 1.0
    # one corner set: along each axis 1 of the 4 differences is 1 -> 3 * 1/4.
    assert total_variation(cube).item() == pytest.approx(0.75)


def test_bilateral_tv_by_hand_with_upsampling():
    # 2x2 mask upsampled (bilinear, corners aligned) to 3x3:
    # [[0, .5, 1], [.5, .75, 1], [1, 1, 1]]
    mask = torch.tensor([[0.0, 1.0], [1.0, 1.0]])[None, None]
    up = torch.tensor([[0.0, 0.5, 1.0], [0.5, 0.75, 1.0], [1.0, 1.0, 1.0]])
    up_mask = F.interpolate(mask, size=(3, 3), mode="bilinear", align_corners=True)
    torch.testing.assert_close(up_mask[0, 0], up)
    # A two-channel image in [0, 4]; normalised per image to [0, 1].
    image = torch.tensor(
        [
            [[0.0, 1.0, 2.0], [4.0, 4.0, 0.0], [2.0, 2.0, 2.0]],
            [[0.0, 2.0, 2.0], [4.0, 0.0, 0.0], [2.0, 3.0, 2.0]],
        ]
    )[None]
    sigma = 0.25
    norm = (image / 4.0)[0]
    bilateral = 0.0
    for axis_pairs in (
        [((i, j), (i + 1, j)) for i in range(2) for j in range(3)],  # vertical
        [((i, j), (i, j + 1)) for i in range(3) for j in range(2)],  # horizontal
    ):
        total = 0.0
        for p, q in axis_pairs:
            d2 = float(((norm[:, p[0], p[1]] - norm[:, q[0], q[1]]) ** 2).mean())
            total += math.exp(-d2 / sigma) * float(up[p] - up[q]) ** 2
        bilateral += total / len(axis_pairs)
    tv = (1.0 + 0.0) / 2 + (1.0 + 0.0) / 2  # coarse mask: one unit jump per axis of 2
    expected = 0.5 * (tv + bilateral)
    weights = bilateral_weights(image, sigma)
    assert bilateral_tv(mask, up_mask, weights).item() == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------- independent objective (test)


def ref_tv(m: torch.Tensor) -> torch.Tensor:
    return sum(torch.diff(m, dim=d).pow(2).flatten(1).mean(1) for d in range(2, m.dim()))


def ref_up(m: torch.Tensor, spatial) -> torch.Tensor:
    mode = "bilinear" if len(spatial) == 2 else "trilinear"
    return F.interpolate(m, size=tuple(spatial), mode=mode, align_corners=True)


def ref_fc(model, images, target):
    return torch.softmax(model(images), 1)[:, target]


def ref_igos_objective(model, x, b, target, m, l1, l2):
    """I-GOS line-search objective R(M) + f_c(phi(x, b, M)), per METHODS.md."""
    up = ref_up(m, x.shape[2:])
    phi = x * up + b * (1 - up)
    return ref_fc(model, phi, target) + l1 * (1 - m).abs().flatten(1).mean(1) + l2 * ref_tv(m)


def ref_igos_integrated(model, x, b, target, m, steps, noise):
    """(1/S) sum_k f_c(phi(x, b, (k/S) M) + noise_k) for one image: (1,)."""
    up = ref_up(m, x.shape[2:])
    total = 0
    for k in range(1, steps + 1):
        a = k / steps
        total = total + ref_fc(model, x * a * up + b * (1 - a * up) + noise[k - 1], target)
    return total / steps


def ref_igospp_objective(model, x, b, target, md, mi, steps, noise, l1, l2, sigma):
    """iGOS++ objective of METHODS.md written out term by term for one image."""
    spatial = x.shape[2:]

    def path(first, second, m, noise_path):
        up = ref_up(m, spatial)
        return (
            sum(
                ref_fc(
                    model, first * (k / steps) * up + second * (1 - (k / steps) * up) + n, target
                )
                for k, n in zip(range(1, steps + 1), noise_path)
            )
            / steps
        )

    m = md * mi
    loss = path(x, b, md, noise[0]) - path(b, x, mi, noise[1])
    loss = loss + path(x, b, m, noise[0]) - path(b, x, m, noise[1])
    img = (x - x.min()) / (x.max() - x.min())
    up = ref_up(m, spatial)
    bil = 0
    for d in range(2, x.dim()):
        w = torch.exp(-torch.diff(img, dim=d).pow(2).mean(1, keepdim=True) / sigma)
        bil = bil + (w * torch.diff(up, dim=d).pow(2)).flatten(1).mean(1)
    btv = 0.5 * (ref_tv(m) + bil)
    return loss + l1 * (1 - m).abs().flatten(1).mean(1) + l2 * btv


def test_igos_trace_matches_independent_objective_gradient_and_armijo():
    model, x, _ = square_problem(2, n=2)
    explainer = IGOS(model, size=8, iterations=6, integration_steps=5, batch_size=7)
    maps, trace = explainer.explain_with_trace(x, 1)
    l2 = explainer.effective_l2((8, 8))
    assert l2 == pytest.approx(20 * 8 / 28)
    b = blur_baseline(x)
    noise = per_image_noise((2, 5, *x.shape[1:]), 1, explainer.seed, "cpu", 0.2)[0]
    # noise_relative (default): in units of each image's standard deviation.
    scale = x.flatten(1).std(1, unbiased=False)
    masks = trace.masks  # (T + 1, B, 1, 8, 8)
    assert masks.min() >= 0 and masks.max() <= 1 and maps.min() >= 0 and maps.max() <= 1
    assert bool(trace.accepted[0].all()), "the first step must move every mask"
    for i in range(2):
        xi, bi = x[i : i + 1], b[i : i + 1]
        for t in range(6):
            if torch.isnan(trace.loss[t, i]):
                continue
            m = masks[t, i : i + 1].clone().requires_grad_(True)
            loss_t = ref_igos_objective(model, xi, bi, 1, m, 1.0, l2)
            assert loss_t.item() == pytest.approx(trace.loss[t, i].item(), abs=1e-5)
            # The direction: integrated gradient of the noisy path plus grad R.
            objective = ref_igos_integrated(model, xi, bi, 1, m, 5, noise[0] * scale[i])
            objective = objective + (1 - m).abs().mean() + l2 * ref_tv(m)
            (g,) = torch.autograd.grad(objective.sum(), m)
            assert g.pow(2).sum().item() == pytest.approx(trace.grad_sq[t, i].item(), rel=1e-4)
            alpha = trace.alpha[t, i].item()
            if trace.accepted[t, i]:
                expected = (m.detach() - alpha * g).clamp(0, 1)
                torch.testing.assert_close(masks[t + 1, i : i + 1], expected, atol=1e-5, rtol=0)
                new = ref_igos_objective(model, xi, bi, 1, masks[t + 1, i : i + 1], 1.0, l2)
                # Armijo at the accepted step, recomputed independently.
                bound = loss_t.item() - 1e-4 * alpha * g.pow(2).sum().item()
                assert new.item() <= bound + 2e-6  # armijo_slack 1e-6 and rounding
                # Back-tracking: the previous (5x larger) step size failed the test.
                if alpha < explainer.alpha0:
                    bigger = (m.detach() - alpha / 0.2 * g).clamp(0, 1)
                    bigger_loss = ref_igos_objective(model, xi, bi, 1, bigger, 1.0, l2)
                    assert (
                        bigger_loss.item()
                        > loss_t.item() - 1e-4 * alpha / 0.2 * float(g.pow(2).sum()) - 1e-6
                    )
            else:
                assert alpha == 0 and trace.stopped_at[i] == t
                torch.testing.assert_close(masks[t + 1, i], masks[t, i])


def test_igospp_objective_matches_independent_formula_and_loss_decreases():
    model, x, _ = square_problem(2, n=2, seed=1)
    explainer = IGOSPlusPlus(model, size=6, iterations=5, integration_steps=4, batch_size=13)
    maps, trace = explainer.explain_with_trace(x, 1)
    l2 = explainer.effective_l2((6, 6))
    b = blur_baseline(x)
    noise = per_image_noise((2, 4, *x.shape[1:]), 1, explainer.seed, "cpu", 0.2)[0]
    scale = x.flatten(1).std(1, unbiased=False)
    masks = trace.masks  # (T + 1, B, 2, 6, 6)
    assert masks.min() >= 0 and masks.max() <= 1
    for i in range(2):
        xi, bi = x[i : i + 1], b[i : i + 1]
        for t in range(5):
            if torch.isnan(trace.loss[t, i]):
                continue
            leaf = masks[t, i : i + 1].clone().requires_grad_(True)
            md, mi = leaf[:, 0:1], leaf[:, 1:2]
            noise_i = noise * scale[i]
            loss = ref_igospp_objective(model, xi, bi, 1, md, mi, 4, noise_i, 1.0, l2, 0.01)
            assert loss.item() == pytest.approx(trace.loss[t, i].item(), abs=1e-5)
            (g,) = torch.autograd.grad(loss.sum(), leaf)
            assert g.pow(2).sum().item() == pytest.approx(trace.grad_sq[t, i].item(), rel=1e-3)
            if trace.accepted[t, i]:
                alpha = trace.alpha[t, i].item()
                expected = (leaf.detach() - alpha * g).clamp(0, 1)
                torch.testing.assert_close(masks[t + 1, i : i + 1], expected, atol=1e-5, rtol=0)
                nd, ni = masks[t + 1, i : i + 1, 0:1], masks[t + 1, i : i + 1, 1:2]
                new = ref_igospp_objective(model, xi, bi, 1, nd, ni, 4, noise_i, 1.0, l2, 0.01)
                assert new.item() <= loss.item() - 1e-4 * alpha * float(g.pow(2).sum()) + 2e-6
    # Heatmap = 1 - up(Md * Mi).
    final = masks[-1, :, 0:1] * masks[-1, :, 1:2]
    torch.testing.assert_close(maps, 1 - ref_up(final, x.shape[2:]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["igos", "igos++"])
def test_loss_never_increases_armijo_holds_and_passes_are_counted(name):
    model, x, _ = square_problem(2, n=3, seed=2)
    steps = 6
    params = dict(size=12, iterations=8, integration_steps=steps, batch_size=16)
    explainer = create(name, model, early_reject=False, **params)
    maps, trace = explainer.explain_with_trace(x, 1)
    B = trace.loss.shape[1]
    for i in range(B):
        losses = [v for v in trace.loss[:, i].tolist() if not math.isnan(v)]
        losses.append(trace.final_loss[i].item())
        # never increases (up to armijo_slack = 1e-6 and float rounding)
        assert all(b <= a + 2e-6 for a, b in itertools.pairwise(losses)), losses
        assert losses[-1] < losses[0]  # the optimisation made progress
    accepted = trace.accepted
    bound = trace.loss - trace.armijo_c * trace.alpha * trace.grad_sq
    bound = bound + trace.armijo_slack * trace.loss.abs().clamp_min(1)
    assert trace.armijo_slack == 1e-6
    assert bool((trace.new_loss[accepted] <= bound[accepted] + 1e-7).all())
    assert bool((trace.alpha[accepted] >= explainer.min_alpha).all())
    # Counters: every active image-iteration makes one pass over its path images with
    # gradients; every line-search trial one forward pass per term and step.
    active = ~torch.isnan(trace.loss)
    terms = 1 if name == "igos" else 4
    assert explainer.passes.images("backward") == terms * steps * int(active.sum())
    per_trial = 1 if name == "igos" else terms * steps
    initial = B if name == "igos" else 0  # I-GOS evaluates L(M = 1) once per image
    forward = per_trial * int(trace.trials.sum()) + initial
    assert explainer.passes.images("forward") - explainer.passes.padding == forward
    assert max(explainer.passes.backward) <= 16 and max(explainer.passes.forward) <= 16
    # Early rejection (bounds from 0 <= f_c <= 1) skips passes but changes nothing.
    pruned = create(name, model, **params)
    pruned_maps, pruned_trace = pruned.explain_with_trace(x, 1)
    torch.testing.assert_close(pruned_maps, maps, atol=1e-6, rtol=0)
    torch.testing.assert_close(pruned_trace.alpha, trace.alpha, equal_nan=True)
    assert pruned.passes.images("backward") == explainer.passes.images("backward")
    assert pruned.passes.images("forward") - pruned.passes.padding < forward


@pytest.mark.parametrize("name", ["igos", "igos++"])
def test_batch_gives_the_same_masks_as_single_calls(name):
    model, x, _ = square_problem(2, n=3, seed=3)
    explainer = create(name, model, size=8, iterations=6, integration_steps=6, batch_size=10)
    batch = explainer(x, torch.tensor([1, 0, 1]))
    singles = torch.cat([explainer(x[i : i + 1], [1, 0, 1][i]) for i in range(3)])
    # Same per-image noise, per-pair sums in step order whatever the chunking, no one-image
    # chunks: equal up to the model's own last-ulp batch-size effects.
    torch.testing.assert_close(batch, singles, atol=1e-6, rtol=0)
    assert batch[[0, 2]].std() > 0.05  # the masks of the target-1 images are not trivial


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", ["igos", "igos++"])
def test_heatmap_energy_lies_in_the_region_the_model_reads(name, dims):
    model, x, region = square_problem(dims, n=2, seed=4)
    size = 12  # 24 px images (2 px cells) and 12^3 volumes (1 voxel cells)
    maps = create(name, model, size=size, iterations=10, integration_steps=8)(x, 1)
    assert maps.shape == (2, 1, *x.shape[2:])
    assert maps.min() >= 0 and maps.max() <= 1
    # Outside the region the model gives no gradient: only the smoothness terms (TV, and
    # the upsampling between cells) spread heat, so allow a margin of two mask cells.
    cell = math.ceil((x.shape[-1] - 1) / (size - 1))
    near = region_mask(maps.shape, region, grow=2 * cell)
    inside = region_mask(maps.shape, region)
    energy = maps.flatten(1).sum(1)
    share_near = (maps * near).flatten(1).sum(1) / energy
    share_inside = (maps * inside).flatten(1).sum(1) / energy
    mean_in = (maps * inside).flatten(1).sum(1) / inside[0].sum()
    mean_out = (maps * ~inside).flatten(1).sum(1) / (~inside[0]).sum()
    assert bool((share_near >= 0.95).all()), share_near
    assert bool((share_inside >= 0.25).all()), share_inside  # the region is 1/16 or 1/27
    assert bool((mean_in >= 5 * mean_out).all()), (mean_in, mean_out)


def test_baselines_and_model_is_left_as_found():
    model, x, _ = square_problem(2, n=1, seed=5)
    model.train()
    params = dict(size=6, iterations=3, integration_steps=3)
    zero = create("igos++", model, baseline="zero", **params)(x, 1)
    mean = create("igos++", model, baseline="mean", mean_image=torch.zeros(1, 24, 24), **params)
    torch.testing.assert_close(mean(x, 1), zero)
    blur = create("igos++", model, **params)(x, 1)
    explicit = create("igos++", model, baseline=blur_baseline(x), **params)(x, 1)
    torch.testing.assert_close(blur, explicit)
    assert (blur - zero).abs().max() > 1e-3  # the baseline matters
    assert model.training and all(p.requires_grad and p.grad is None for p in model.parameters())


def test_size_validation_and_errors():
    model, x, _ = square_problem(2, n=1)
    with pytest.raises(ValueError, match="size must be between 4 and the image size"):
        create("igos", model, size=32)(x, 1)
    with pytest.raises(ValueError, match="size must be an int >= 4"):
        create("igos", model, size=3)
    with pytest.raises(ValueError, match="entries for images with 2 spatial dims"):
        create("igos", model, size=(8, 8, 8))(x, 1)
    with pytest.raises(ValueError, match="mean_image"):
        create("igos++", model, baseline="mean")
    with pytest.raises(ValueError, match="baseline must be one of"):
        create("igos++", model, baseline="noise")
    with pytest.raises(ValueError, match="invalid beta"):
        create("igos", model, beta=1.5)
    # Default size: 28 clamped to the image (24 px here), non-square masks allowed.
    assert IGOS(model).mask_size((24, 40)) == (24, 28)
    assert IGOS(model, size=(4, 6)).mask_size((24, 40)) == (4, 6)
    assert set(QUICK_PARAMS) <= {"iterations", "integration_steps", "size"}


# ------------------------------------------------------ the trained benchmark classifier


@pytest.mark.slow
def test_igospp_beats_gradients_on_deletion_and_insertion(bench2d, classifier2d):
    """iGOS++ (dataset-mean baseline, natural for aligned data; the benchmark classifier
    calls blurred images "atrophy") against saliency and integrated gradients at their
    defaults, scored with the same mean-image deletion/insertion metric on 16 test images.

    iGOS++ runs 10 iterations of 10 integration steps here (a third of the default cost:
    the default run is 460 s on one test worker); benchmarks/igos.py measures the defaults
    (deletion 0.29 / insertion 0.74 against 0.47 / 0.63 for integrated gradients)."""
    from medexplain.metrics.deletion import deletion_insertion

    train, _, test = bench2d
    mean = train.mean_image()
    x = test.images[:16]
    model = classifier2d
    with torch.no_grad():
        target = model(x).argmax(1)
    params = {
        "igos++": {
            "baseline": "mean",
            "mean_image": mean,
            "iterations": 10,
            "integration_steps": 10,
        }
    }
    aucs = {}
    for name in ("igos++", "saliency", "integrated_gradients"):
        maps = create(name, model, **params.get(name, {}))(x, target)
        result = deletion_insertion(model, x, target, maps, baseline="mean", mean_image=mean)
        aucs[name] = (result.deletion_auc.mean().item(), result.insertion_auc.mean().item())
    assert np.isfinite(np.array(list(aucs.values()))).all()
    for other in ("saliency", "integrated_gradients"):
        assert aucs["igos++"][0] < aucs[other][0], aucs
        assert aucs["igos++"][1] > aucs[other][1], aucs


# ------------------------------------------------ variant="paper": the authors' code


def test_standardised_bilateral_weights_by_hand():
    """The authors' edge weights on the image in units of its standard deviation: along the
    first axis exp(-(channel-mean difference)^2 / sigma), along the second the channel mean
    of exp(-difference^2 / sigma)."""
    from medexplain.explain.igos_loss import standardised_bilateral_weights

    image = np.array(
        [
            [[0.0, 0.1, 0.3], [0.2, 0.2, 0.0]],
            [[0.1, 0.1, 0.0], [0.4, 0.1, 0.2]],
        ]
    )  # (C=2, 2, 3)
    sigma = 0.5
    std = image.std()  # over pixels and channels, the noise unit
    z = image / std
    rows = np.zeros((1, 3))
    for j in range(3):
        rows[0, j] = math.exp(
            -((((z[0, 1, j] - z[0, 0, j]) + (z[1, 1, j] - z[1, 0, j])) / 2) ** 2) / sigma
        )
    cols = np.zeros((2, 2))
    for i in range(2):
        for j in range(2):
            cols[i, j] = np.mean(
                [math.exp(-((z[c, i, j + 1] - z[c, i, j]) ** 2) / sigma) for c in range(2)]
            )
    x = torch.tensor(image, dtype=torch.float64)[None]
    scale = IGOS.noise_scales(x)
    assert scale.item() == pytest.approx(std)
    w_rows, w_cols = standardised_bilateral_weights(x, sigma, scale)
    np.testing.assert_allclose(w_rows[0, 0].numpy(), rows, rtol=1e-12)
    np.testing.assert_allclose(w_cols[0, 0].numpy(), cols, rtol=1e-12)
    # One channel, an edge of contrast 0.1 on an image of standard deviation 0.25: the
    # weight is exp(-(0.1 / 0.25)^2 / 0.01) = exp(-16) on the standardised image, but
    # exp(-0.1^2 / 0.01) = exp(-1) after min-max normalisation to a range of 1.
    edge = torch.tensor([[0.0, 0.1]], dtype=torch.float64)[None, None]
    w, _ = standardised_bilateral_weights(edge.transpose(2, 3), 0.01, torch.tensor([0.25]))
    assert w.item() == pytest.approx(math.exp(-16.0), rel=1e-9)


def test_paper_combined_mask_is_the_product_of_the_upsampled_masks():
    from medexplain.explain.igos import path_masks

    md = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    mi = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    masks = torch.stack([md, mi])[None]  # (1, 2, 2, 2)
    # Bilinear, corners aligned, 2x2 -> 3x3 by hand:
    up_md = torch.tensor([[1.0, 0.5, 0.0], [1.0, 0.75, 0.5], [1.0, 1.0, 1.0]])
    up_mi = torch.tensor([[1.0, 1.0, 1.0], [0.5, 0.75, 1.0], [0.0, 0.5, 1.0]])
    up_product = torch.tensor([[1.0, 0.5, 0.0], [0.5, 0.5, 0.5], [0.0, 0.5, 1.0]])  # up(Md Mi)
    d, i, data, comb = path_masks(masks, (3, 3), product_of_upsampled=True)
    torch.testing.assert_close(d[0, 0], up_md)
    torch.testing.assert_close(i[0, 0], up_mi)
    torch.testing.assert_close(data[0, 0], up_md * up_mi)  # centre 0.5625, not 0.5
    torch.testing.assert_close(comb[0, 0], up_product)  # the regulariser keeps up(Md Mi)
    _, _, data_default, _ = path_masks(masks, (3, 3))
    torch.testing.assert_close(data_default[0, 0], up_product)


def ref_paper_igospp_terms(model, x, b, target, md, mi, steps, l1, l2, sigma):
    """The authors' iGOS++ without noise for one image: (data terms, regulariser)."""
    spatial = x.shape[2:]
    up_d, up_i = ref_up(md, spatial), ref_up(mi, spatial)

    def path(first, second, up):
        return (
            sum(
                ref_fc(model, first * (k / steps) * up + second * (1 - (k / steps) * up), target)
                for k in range(1, steps + 1)
            )
            / steps
        )

    data = path(x, b, up_d) - path(b, x, up_i)
    data = data + path(x, b, up_d * up_i) - path(b, x, up_d * up_i)
    m = md * mi
    up = ref_up(m, spatial)
    z = x / x.flatten(1).std(1, unbiased=False).view(-1, 1, 1, 1)
    bil = 0
    for d in range(2, x.dim()):
        w = torch.exp(-torch.diff(z, dim=d).pow(2).mean(1, keepdim=True) / sigma)  # 1 channel
        bil = bil + (w * torch.diff(up, dim=d).pow(2)).flatten(1).mean(1)
    reg = l1 * (1 - m).abs().flatten(1).mean(1) + l2 * 0.5 * (ref_tv(m) + bil)
    return data, reg


def test_paper_igospp_halves_the_data_gradient_and_never_stops():
    model, x, _ = square_problem(2, n=1, seed=1)
    T = 4
    explainer = IGOSPlusPlus(
        model, size=6, iterations=T, integration_steps=3, noise_std=0.0, variant="paper"
    )
    assert explainer.effective_l2((6, 6)) == 20.0 and explainer.armijo_slack == 0.0
    _, trace = explainer.explain_with_trace(x, 1)
    b = blur_baseline(x)
    masks = trace.masks
    assert int(trace.stopped_at[0]) == T and not torch.isnan(trace.alpha).any()
    for t in range(T):
        leaf = masks[t, 0:1].clone().requires_grad_(True)
        data, reg = ref_paper_igospp_terms(
            model, x, b, 1, leaf[:, 0:1], leaf[:, 1:2], 3, 1.0, 20.0, 0.01
        )
        # The line search checks the full loss; the step follows half the data gradient.
        assert (data + reg).item() == pytest.approx(trace.loss[t, 0].item(), abs=1e-5)
        (g_data,) = torch.autograd.grad(data.sum(), leaf, retain_graph=True)
        (g_reg,) = torch.autograd.grad(reg.sum(), leaf)
        g = 0.5 * g_data + g_reg
        assert g.pow(2).sum().item() == pytest.approx(trace.grad_sq[t, 0].item(), rel=1e-3)
        # Every iteration moves the masks, also when the search failed (a tiny last step).
        alpha = trace.alpha[t, 0].item()
        expected = (leaf.detach() - alpha * g).clamp(0, 1)
        torch.testing.assert_close(masks[t + 1, 0:1], expected, atol=1e-5, rtol=0)
        if not trace.accepted[t, 0]:
            assert alpha < explainer.min_alpha


def test_paper_igos_line_search_checks_the_integrated_objective():
    model, x, _ = square_problem(2, n=1, seed=3)
    explainer = IGOS(
        model, size=8, iterations=3, integration_steps=4, noise_std=0.0, variant="paper"
    )
    _, trace = explainer.explain_with_trace(x, 1)
    b = blur_baseline(x)
    for t in range(3):
        m = trace.masks[t, 0:1]
        zero = torch.zeros(4, *x.shape[1:])
        expected = ref_igos_integrated(model, x, b, 1, m, 4, zero)
        expected = expected + (1 - m).abs().mean() + 20.0 * ref_tv(m)
        assert expected.item() == pytest.approx(trace.loss[t, 0].item(), abs=1e-5)


def test_paper_noise_is_fresh_per_call_and_seeded():
    from medexplain.explain.igos_loss import DELETION, PathScorer

    model, x, _ = square_problem(2, n=2, seed=4)
    b = blur_baseline(x)
    up = torch.full((2, 1, 1, *x.shape[2:]), 0.7)
    coef = torch.tensor([0.5, 1.0])

    def scorer():
        return PathScorer(model, x, b, torch.tensor([1, 1]), fresh_noise=(5, 0.2))

    first = scorer()
    a, _ = first.evaluate(torch.arange(2), up, [DELETION], coef, noisy=True)
    again, _ = first.evaluate(torch.arange(2), up, [DELETION], coef, noisy=True)
    assert (a - again).abs().min() > 0  # a second call draws new noise
    same, _ = scorer().evaluate(torch.arange(2), up, [DELETION], coef, noisy=True)
    torch.testing.assert_close(same, a, atol=0, rtol=0)  # same seed, same draws
    # An image's noise depends on its own calls only, not on its batch neighbours.
    alone, _ = scorer().evaluate(torch.tensor([1]), up[1:], [DELETION], coef, noisy=True)
    torch.testing.assert_close(alone[0], a[1], atol=1e-6, rtol=0)
    # Whole explanations: same seed identical, another seed differs, batch = single calls.
    for name in ("igos", "igos++"):
        params = dict(size=6, iterations=2, integration_steps=2, variant="paper")
        maps = create(name, model, **params)(x, 1)
        torch.testing.assert_close(create(name, model, **params)(x, 1), maps, atol=0, rtol=0)
        singles = torch.cat([create(name, model, **params)(x[i : i + 1], 1) for i in range(2)])
        torch.testing.assert_close(singles, maps, atol=1e-5, rtol=0)
        other = create(name, model, seed=1, **params)(x, 1)
        assert (other - maps).abs().max() > 0
    with pytest.raises(ValueError, match="variant must be one of"):
        IGOS(model, variant="authors")
