"""Chest radiograph cohort: radiograph-like images on real lung masks, with known evidence.

Each subject gets one real lung mask (V7 Labs lung segmentations, read from the
torchxrayvision wheel, see :mod:`.chest_sources`) placed in a canonical PA frame. On it an
image in [0, 1] is rendered: dark lung fields with vascular markings, the bright
mediastinum, spine and heart shadow between them (the heart bulging to the image right,
the patient's left), ribs as smooth curved bands, the diaphragm with the bright abdomen
below, the soft tissue of the trunk, a small global rotation/scale/shift and noise.

Classes (labels): 0 ``healthy``; 1 ``pneumonia``: a soft bright opacity placed and sized by
the boxes of one real RSNA Pneumonia Challenge patient (rescaled from 1024x1024), clipped to
the lung field; 2 ``pneumothorax``: a dark region without vascular markings, with a thin
visceral pleural line on its inner edge, shaped by a real SIIM-ACR pneumothorax mask
(decoded from its run-length code, rescaled) intersected with the lung field.

Ground truth: ``evidence`` is exactly where the class effect changed the image (outside it
the image equals the subject's healthy counterfactual, which ``counterfactual=True``
returns in ``extra["counterfactual"]``); ``regions[name]`` are the pixels where the class's
evidence frequency is at least half its maximum; ``extra["lungs"]`` the subject's lung field.
With ``shortcut=p`` a printed laterality marker (a bright "L" in the top right corner) is put
on a fraction ``p`` of ``shortcut_class``'s images; its pixels are ``extra["shortcut"]``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ...core.spatial import gaussian_blur
from ..deform import random_rotation_scale, uniform
from . import chest_sources as sources
from .base import Cohort

__all__ = ["CLASS_NAMES", "make_chest"]

CLASS_NAMES = ("healthy", "pneumonia", "pneumothorax")


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical coordinates ``(y, x)`` in [-1, 1] (align_corners=True), y down, x right."""
    t = torch.linspace(-1.0, 1.0, size)
    return torch.meshgrid(t, t, indexing="ij")


def _soft(distance: torch.Tensor, width: float) -> torch.Tensor:
    """Smooth step: 1 well inside (distance < 0), 0 well outside."""
    return torch.sigmoid(-distance / width)


def _erode(mask: torch.Tensor, width: int) -> torch.Tensor:
    """Grey erosion of ``(n, S, S)`` by a ``width`` x ``width`` square (odd ``width``)."""
    return -F.max_pool2d(-mask[:, None], width, stride=1, padding=width // 2)[:, 0]


def _anatomy(lungs: torch.Tensor, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Canonical-frame maps ``(n, size, size)`` of one subject's anatomy (before jitter)."""
    n, size, _ = lungs.shape
    y, x = _grid(size)
    px = 2.0 / (size - 1)  # one pixel in canonical units

    def draw(low: float, high: float) -> torch.Tensor:
        return uniform(g, (n, 1, 1), low, high)

    body_w = draw(0.9, 1.0)
    body = _soft((x / body_w).abs() ** 4 + ((y - 0.25) / 1.35) ** 4 - 1, 0.05)
    spine = _soft(x.abs() - draw(0.07, 0.1), px)
    mediastinum = _soft(x.abs() - draw(0.16, 0.22), 2 * px) * _soft(y - 0.75, 0.05)
    hx, hy, hw, hh = draw(0.08, 0.16), draw(0.3, 0.42), draw(0.3, 0.38), draw(0.22, 0.28)
    heart = _soft(((x - hx) / hw) ** 2 + ((y - hy) / hh) ** 2 - 1, 0.08)
    # Below the lowest lung pixel of each column: the diaphragm dome and the abdomen.
    seen_from_below = torch.flip(torch.cummax(torch.flip(lungs, [1]), dim=1).values, [1])
    abdomen = (1 - seen_from_below) * (torch.cummax(lungs, dim=1).values > 0)
    abdomen = abdomen + (y > 0.6).float() * (1 - seen_from_below) * (x.abs() < 0.9)
    abdomen = gaussian_blur(abdomen.clamp(0, 1)[:, None], 1.0)[:, 0]
    # Posterior ribs: bands along curves that rise from the spine and fall laterally.
    spacing, phase, bend = draw(0.15, 0.19), draw(0.0, 1.0), draw(0.35, 0.55)
    curve = y + bend * (x.abs() - 0.35) ** 2 - 0.25 * x.abs()
    ribs = torch.cos(2 * torch.pi * (curve / spacing + phase)).clamp_min(0) ** 4
    ribs = ribs * _soft(x.abs() - 0.95, 0.05) * _soft(0.12 - x.abs(), 0.03)
    # Vascular markings: ridges of smooth noise, denser towards the hila.
    noise = gaussian_blur(torch.randn((n, 1, size, size), generator=g), size / 48)[:, 0]
    noise = noise / noise.flatten(1).std(1).clamp_min(1e-6)[:, None, None]
    hilum = torch.exp(-(((x.abs() - 0.3) / 0.5) ** 2) - ((y + 0.05) / 0.6) ** 2)
    vessels = torch.exp(-((noise / 0.35) ** 2)) * (0.4 + 0.6 * hilum)
    return {
        "body": body,
        "spine": spine,
        "mediastinum": mediastinum,
        "heart": heart,
        "abdomen": abdomen,
        "ribs": ribs,
        "vessels": vessels,
    }


def _opacity_profiles(
    boxes: np.ndarray, owners: np.ndarray, n: int, size: int, rng: np.random.Generator
) -> torch.Tensor:
    """``(n, size, size)`` opacity strength in [0, 1]: for one random RSNA patient per
    subject, a bump ``(1 - r^2)^2`` on the ellipse inscribed in each of its boxes (box
    coordinates rescaled from 1024 pixels to the canonical frame), the maximum over boxes."""
    patients = rng.integers(0, int(owners.max()) + 1, size=n)
    y, x = _grid(size)
    out = torch.zeros((n, size, size))
    scale = 2.0 / sources.SOURCE_SIZE
    for i, patient in enumerate(patients):  # one small loop over subjects' 1-4 boxes
        for bx, by, bw, bh in boxes[owners == patient]:
            cx, cy = (bx + bw / 2) * scale - 1, (by + bh / 2) * scale - 1
            r2 = ((x - cx) / (bw * scale / 2)) ** 2 + ((y - cy) / (bh * scale / 2)) ** 2
            out[i] = torch.maximum(out[i], (1 - r2).clamp_min(0) ** 2)
    return out


def _pneumothorax_masks(
    pool: torch.Tensor, lungs: torch.Tensor, rng: np.random.Generator
) -> torch.Tensor:
    """``(n, size, size)`` bool: per subject a random SIIM mask of ``pool`` (binarised at half
    coverage) whose overlap with the subject's lungs touches the lung edge and covers at least
    1% of the image (the best-overlapping one if none does), intersected with the lungs."""
    n, size, _ = lungs.shape
    masks = (pool >= 0.5).float()
    edge = lungs - _erode(lungs, 5)
    overlap = torch.einsum("nij,pij->np", lungs, masks)
    on_edge = torch.einsum("nij,pij->np", edge, masks)
    ok = (overlap >= 0.01 * size * size) & (on_edge > 0)
    choice = torch.empty(n, dtype=torch.long)
    for i in range(n):
        candidates = torch.nonzero(ok[i]).flatten()
        if len(candidates) == 0:
            choice[i] = int(torch.argmax(overlap[i]))
        else:
            choice[i] = candidates[int(rng.integers(0, len(candidates)))]
    return (masks[choice] * lungs) > 0


def _marker(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """``(n, size, size)`` bool: an "L" glyph in the top right corner, a few pixels of jitter."""
    height = max(5, round(size * 0.12))
    stroke = max(1, round(size / 40))
    row0 = round(size * 0.03) + torch.randint(0, 3, (n, 1, 1), generator=g)
    col0 = (
        size
        - round(size * 0.05)
        - round(0.7 * height)
        - torch.randint(0, 3, (n, 1, 1), generator=g)
    )
    r = torch.arange(size).view(1, size, 1) - row0
    c = torch.arange(size).view(1, 1, size) - col0
    inside = (r >= 0) & (r < height) & (c >= 0) & (c < round(0.7 * height))
    return inside & ((c < stroke) | (r >= height - stroke))


def _jitter(maps: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Resample ``(n, K, S, S)`` maps with one small random rotation (±3°), scale (±4%) and
    shift (±3% of the field) per subject, zero outside."""
    n = maps.shape[0]
    theta = torch.cat(
        [random_rotation_scale(g, n, 2, 0.05, 0.04), uniform(g, (n, 2, 1), -0.06, 0.06)], dim=2
    )
    grid = F.affine_grid(theta, list(maps.shape), align_corners=True)
    return F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def make_chest(
    n: int = 200,
    size: int = 64,
    seed: int = 0,
    *,
    masks: int = 96,
    shortcut: float = 0.0,
    shortcut_class: int = 1,
    noise: float = 0.02,
    counterfactual: bool = False,
    wheel: str | os.PathLike | None = None,
) -> Cohort:
    """``n`` radiograph-like images ``(n, 1, size, size)`` in [0, 1], classes balanced
    (labels ``i % 3`` shuffled by ``seed``; names in :data:`CLASS_NAMES`).

    ``masks``: how many real lung masks are decoded (the first usable ones of a fixed order,
    at most ``n``); subjects draw their lungs from them. ``shortcut``: fraction of
    ``shortcut_class``'s images carrying the laterality marker. ``noise``: std of the
    additive Gaussian noise. ``counterfactual``: also return each subject's healthy image
    (same anatomy, jitter and noise, no class effect) in ``extra["counterfactual"]``.
    ``wheel``: the torchxrayvision wheel (default: see :func:`.chest_sources.find_wheel`).
    Effect sizes (opacity +0.25..0.4, pneumothorax -0.06..0.12 with its markings removed)
    are chosen so that a small CNN separates the classes at 64x64; they are not measured
    radiodensities.
    """
    if not 0.0 <= shortcut <= 1.0:
        raise ValueError(f"shortcut must be a fraction in [0, 1], got {shortcut}")
    path = sources.find_wheel(wheel)
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    labels = torch.arange(n)[torch.randperm(n, generator=g)] % 3
    pool = torch.from_numpy(sources.lung_masks(path, max(1, min(masks, n)), size)).float()
    lungs = pool[torch.randint(0, len(pool), (n,), generator=g)]
    anatomy = _anatomy(lungs, g)
    boxes, owners = sources.rsna_boxes(path)
    opacity = _opacity_profiles(boxes, owners, n, size, rng)
    patch = gaussian_blur(torch.rand((n, 1, size, size), generator=g), size / 32)[:, 0]
    opacity = opacity * (0.5 + (patch - 0.5) * 4).clamp(0.3, 1.0)
    ptx_pool = torch.from_numpy(sources.siim_masks(path, max(64, n), size))
    ptx = _pneumothorax_masks(ptx_pool, lungs, rng).float()
    stack = torch.stack([lungs, *anatomy.values(), opacity, ptx], dim=1)
    warped = dict(zip(["lungs", *anatomy, "opacity", "ptx"], _jitter(stack, g).unbind(1)))
    effects = _render_effects(warped, labels, g)
    lungs_bin = warped["lungs"] > 0.5
    healthy = _render_healthy(warped, lungs_bin)
    noise_map = noise * torch.randn((n, size, size), generator=g)
    image = (healthy + effects["delta"] + noise_map).clamp(0, 1)
    marker = _marker(n, size, g) & (labels == shortcut_class).view(n, 1, 1)
    marker &= torch.rand((n, 1, 1), generator=g) < shortcut
    evidence = effects["evidence"] & ~marker  # the printed marker hides what lies under it
    image = torch.where(marker, torch.full_like(image, 0.95), image)
    extra: dict[str, torch.Tensor] = {"lungs": lungs_bin[:, None], "shortcut": marker[:, None]}
    if counterfactual:
        clean = (healthy + noise_map).clamp(0, 1)
        extra["counterfactual"] = torch.where(marker, torch.full_like(clean, 0.95), clean)[:, None]
    return Cohort(
        images=image[:, None].float(),
        labels=labels.long(),
        evidence=evidence[:, None],
        class_names=CLASS_NAMES,
        regions=_regions(evidence, labels),
        affine=None,
        extra=extra,
        config=_config(n, size, seed, masks, shortcut, shortcut_class, noise, path),
    )


def _render_healthy(m: dict[str, torch.Tensor], lungs_bin: torch.Tensor) -> torch.Tensor:
    """Grey levels of the healthy radiograph from the jittered anatomy maps (before noise)."""
    lung_soft = gaussian_blur(m["lungs"][:, None], 0.7)[:, 0]
    image = (
        0.04
        + 0.42 * m["body"]
        + 0.10 * m["mediastinum"]
        + 0.10 * m["spine"]
        + 0.20 * m["heart"]
        + 0.12 * m["abdomen"] * m["body"]
        + 0.06 * m["ribs"] * m["body"]
        - 0.30 * lung_soft * (1 - 0.5 * m["heart"])
    )
    return image + 0.08 * m["vessels"] * lungs_bin


def _render_effects(
    m: dict[str, torch.Tensor], labels: torch.Tensor, g: torch.Generator
) -> dict[str, torch.Tensor]:
    """The class effect ``delta`` added to the healthy image and its support ``evidence``."""
    n = labels.shape[0]
    lungs_bin = m["lungs"] > 0.5
    strength = uniform(g, (n, 1, 1), 0.25, 0.4)
    darkness = uniform(g, (n, 1, 1), 0.06, 0.12)
    is_opacity = (labels == 1).view(n, 1, 1)
    is_ptx = (labels == 2).view(n, 1, 1)
    opacity = m["opacity"] * lungs_bin * is_opacity
    region = (m["ptx"] > 0.5) & lungs_bin & is_ptx
    eroded, inner_lung = _erode(region.float(), 3), _erode(lungs_bin.float(), 3)
    pleural_line = region & (eroded < 0.5) & (inner_lung > 0.5)
    delta = strength * opacity
    delta = delta - region * (0.08 * m["vessels"] + darkness) + 0.12 * pleural_line
    return {"delta": delta, "evidence": (opacity > 0) | region}


def _regions(evidence: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per disease class: pixels where its evidence frequency is >= half the maximum."""
    regions = {}
    for k, name in enumerate(CLASS_NAMES[1:], start=1):
        members = evidence[labels == k].float()
        if len(members) == 0:
            continue
        frequency = members.mean(0)
        regions[name] = (frequency >= 0.5 * frequency.max().clamp_min(1e-6))[None]
    return regions


def _config(
    n: int,
    size: int,
    seed: int,
    masks: int,
    shortcut: float,
    shortcut_class: int,
    noise: float,
    path: os.PathLike,
) -> dict[str, Any]:
    return {
        "cohort": "chest",
        "n": n,
        "size": size,
        "seed": seed,
        "masks": masks,
        "shortcut": shortcut,
        "shortcut_class": shortcut_class,
        "noise": noise,
        "value_range": (0.0, 1.0),
        "source": f"{os.path.basename(path)} (V7 Labs lungs, RSNA boxes, SIIM masks)",
    }
