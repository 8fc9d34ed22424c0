"""Colour fundus cohort on scikit-image's real fundus photograph.

The source is ``skimage.data.retina()`` (a 1411 x 1411 RGB photograph of a left eye: the
optic disc is on the viewer's left), bundled with scikit-image. It is downsampled once per
process and split into a vessel-free background (a grey closing, which fills the thin dark
vessels) and the vessel component (source minus background, <= 0), so that each subject can
carry its own vessel contrast.

Each subject: a small rotation and scale about the image centre, a left or right eye (a
right eye is the photograph mirrored left/right, so its disc is on the viewer's right),
a smooth multiplicative illumination field, a per-channel colour gain and a vessel contrast
factor. Classes: ``0`` healthy; ``1`` macular disease (microaneurysms, small dark-red dots,
and haemorrhage blots, all within one disc diameter of the fovea); ``2`` peripheral disease
(the same lesions farther than two disc diameters from the fovea, inside the fundus circle
and off the optic disc). Lesions darken the subject's healthy image multiplicatively, more
in green and blue than in red, so they look dark red; they are painted after the geometric
transform, so ``evidence`` (the lesion pixels) is exact pixel by pixel and the image equals
its healthy counterfactual outside it.

Alignment: ``regions`` are in the photograph's frame (a left eye). ``extra["flip"]`` marks
the mirrored (right) eyes; mirroring those images and maps back left/right aligns every image
by disc and fovea up to the small rotation and scale (:func:`as_left_eyes` does it).
``extra["disc"]`` and ``extra["fovea"]`` give each image's landmarks in its own pixels. The
photograph's notch (a mark of its camera, top right) mirrors with the eye; it says which eye
an image shows, never its class.
"""

from __future__ import annotations

import functools
import math
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from ...core.spatial import resize
from ..deform import random_rotation_scale, uniform
from .base import Cohort

__all__ = [
    "RETINA_CLASSES",
    "RETINA_LANDMARKS",
    "as_left_eyes",
    "left_eyes",
    "make_retina",
    "retina_regions",
    "retina_source",
]

RETINA_CLASSES = ("healthy", "macular", "peripheral")

# Landmarks of skimage.data.retina() in its own pixels (row, col), 1411 x 1411. The disc
# centre is the maximum and the fovea the minimum of the Gaussian-smoothed brightness
# (tests/test_cohort_retina.py finds both again); the disc diameter was read off the
# photograph and agrees with the usual anatomical disc-fovea distance of about 2.5 disc
# diameters. The field is the circle of the camera's aperture against the black surround.
RETINA_LANDMARKS = {
    "shape": (1411, 1411),
    "disc": (657.0, 249.0),
    "fovea": (705.0, 702.0),
    "disc_diameter": 170.0,
    "fundus_centre": (702.0, 705.0),
    "fundus_radius": 697.0,
}

# Text-like stamp of the shortcut (a fixed 5 x 11 bitmap, the camera's "signature").
_STAMP = np.array(
    [
        [1, 1, 1, 0, 1, 0, 1, 0, 1, 1, 1],
        [1, 0, 1, 0, 1, 1, 1, 0, 1, 0, 0],
        [1, 1, 1, 0, 1, 0, 1, 0, 1, 1, 0],
        [1, 0, 0, 0, 1, 0, 1, 0, 1, 0, 0],
        [1, 0, 0, 0, 1, 0, 1, 0, 1, 1, 1],
    ],
    dtype=bool,
)
_STAMP_COLOUR = (0.95, 0.93, 0.75)
# Lesion darkening per channel (R, G, B) at full opacity: haemorrhages and microaneurysms
# absorb green and blue far more than red, hence dark red.
_DARKEN = {"dot": (0.35, 0.8, 0.75), "blot": (0.45, 0.85, 0.8)}


def _to_pixels(rc: tuple[float, float], size: int) -> tuple[float, float]:
    """Source pixel (row, col) -> pixel of the ``size`` image (pixel-centre convention)."""
    scale = size / RETINA_LANDMARKS["shape"][0]
    return ((rc[0] + 0.5) * scale - 0.5, (rc[1] + 0.5) * scale - 0.5)


def _to_grid(rc: tuple[float, float], size: int) -> torch.Tensor:
    """Source pixel (row, col) -> grid_sample point (x, y) in [-1, 1], align_corners=True."""
    row, col = _to_pixels(rc, size)
    return torch.tensor([2 * col / (size - 1) - 1, 2 * row / (size - 1) - 1])


@functools.lru_cache(maxsize=4)
def retina_source(size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The photograph at ``size`` x ``size``: ``(background (3, S, S), vessels (3, S, S),
    fundus (1, S, S))`` float32, background + vessels = the downsampled photograph in
    [0, 1] (except in a band of a few pixels along the image border, where the vessels are
    set to 0 because the closing is unreliable there); vessels <= 0 (a grey closing with a
    disc of radius ~2 px per 128 px fills them); fundus is 1 inside the camera's circular
    field. Cached per process."""
    from scipy import ndimage
    from skimage import data, transform

    photo = data.retina().astype(np.float32) / 255.0
    small = transform.resize(photo, (size, size), anti_aliasing=True).astype(np.float32)
    small = np.clip(small, 0.0, 1.0)
    radius = max(1, round(2 * size / 128))
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    footprint = yy**2 + xx**2 <= radius**2
    closed = np.stack([ndimage.grey_closing(small[..., c], footprint=footprint) for c in range(3)])
    image = small.transpose(2, 0, 1)
    fundus = _fundus_disc(size)[None].numpy().astype(np.float32)
    vessels = np.minimum(image - closed, 0.0) * fundus
    band = radius + 1
    vessels[:, :band] = vessels[:, -band:] = vessels[:, :, :band] = vessels[:, :, -band:] = 0.0
    background = image - vessels
    return torch.from_numpy(background), torch.from_numpy(vessels), torch.from_numpy(fundus)


def _fundus_disc(size: int) -> torch.Tensor:
    """Boolean ``(S, S)`` disc of the camera's field in the source frame."""
    centre = _to_pixels(RETINA_LANDMARKS["fundus_centre"], size)
    radius = RETINA_LANDMARKS["fundus_radius"] * size / RETINA_LANDMARKS["shape"][0]
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


def retina_regions(size: int) -> dict[str, torch.Tensor]:
    """Class regions ``(1, S, S)`` bool in the source (left-eye) frame: ``macular`` = the disc
    of one disc diameter around the fovea; ``peripheral`` = farther than two disc diameters
    from the fovea, within the fundus circle shrunk by 0.3 disc diameters, off the optic disc
    (0.75 disc diameters around its centre)."""
    scale = size / RETINA_LANDMARKS["shape"][0]
    dd = RETINA_LANDMARKS["disc_diameter"] * scale
    rows, cols = torch.meshgrid(
        torch.arange(size, dtype=torch.float32),
        torch.arange(size, dtype=torch.float32),
        indexing="ij",
    )

    def dist(rc: tuple[float, float]) -> torch.Tensor:
        r, c = _to_pixels(rc, size)
        return torch.sqrt((rows - r) ** 2 + (cols - c) ** 2)

    fundus_r = RETINA_LANDMARKS["fundus_radius"] * scale
    d_fovea = dist(RETINA_LANDMARKS["fovea"])
    periphery = (
        (d_fovea > 2 * dd)
        & (dist(RETINA_LANDMARKS["fundus_centre"]) <= fundus_r - 0.3 * dd)
        & (dist(RETINA_LANDMARKS["disc"]) > 0.75 * dd)
    )
    return {"macular": (d_fovea <= dd)[None], "peripheral": periphery[None]}


def _generators(seed: int) -> list[torch.Generator]:
    """Independent streams (labels, anatomy, lesions, shortcut), so that switching lesions or
    the shortcut on or off never changes the other draws."""
    states = [s.generate_state(1)[0] for s in np.random.SeedSequence(int(seed)).spawn(4)]
    return [torch.Generator().manual_seed(int(s)) for s in states]


def _subject_geometry(
    g: torch.Generator, n: int, size: int, max_angle: float, max_scale: float
) -> dict[str, torch.Tensor]:
    """Per subject: ``matrix`` (n, 2, 2) sending image grid points to source grid points
    (rotation-scale after an optional x-mirror), ``flip`` (n,), ``scale`` (n,), and the
    landmarks in image pixels (row, col): ``disc``, ``fovea``, ``fundus_centre`` (n, 2)."""
    rot_scale = random_rotation_scale(g, n, 2, max_angle, max_scale)
    flip = torch.rand(n, generator=g) < 0.5
    mirror = torch.diag_embed(torch.stack([1.0 - 2.0 * flip.float(), torch.ones(n)], dim=1))
    matrix = rot_scale @ mirror
    inverse = torch.linalg.inv(matrix)
    out = {"matrix": matrix, "flip": flip, "scale": torch.sqrt(torch.linalg.det(rot_scale))}
    for name in ("disc", "fovea", "fundus_centre"):
        xy = inverse @ _to_grid(RETINA_LANDMARKS[name], size)
        pix = (xy + 1) * (size - 1) / 2
        out[name] = pix.flip(-1)  # (x, y) -> (row, col)
    return out


def _healthy_images(
    g: torch.Generator, geometry: dict[str, torch.Tensor], size: int, variation: dict
) -> torch.Tensor:
    """Warped photograph with the subject's vessel contrast, illumination and colour gain,
    before clipping: ``(n, 3, S, S)``."""
    background, vessels, fundus = retina_source(size)
    n = geometry["matrix"].shape[0]
    template = torch.cat([background, vessels, fundus])[None].expand(n, -1, -1, -1)
    theta = torch.cat([geometry["matrix"], torch.zeros(n, 2, 1)], dim=2)
    grid = F.affine_grid(theta, [n, 7, size, size], align_corners=True)
    warped = F.grid_sample(
        template, grid, mode="bilinear", padding_mode="zeros", align_corners=True
    )
    contrast = uniform(g, (n, 1, 1, 1), *variation["vessel_contrast"])
    image = warped[:, :3] + contrast * warped[:, 3:6]
    low, high = variation["illumination"]
    field = resize(uniform(g, (n, 1, 3, 3), low, high), (size, size))
    gain = uniform(g, (n, 3, 1, 1), *variation["colour_gain"])
    return image * field * gain


def _place_lesions(
    g: torch.Generator, geometry: dict[str, torch.Tensor], labels: torch.Tensor, size: int
) -> dict[str, torch.Tensor]:
    """Lesion slots (n, K): ``centre`` (row, col) px, semi-axes ``a``, ``b`` px, ``angle``,
    ``blot`` (bool), ``active``. Dots: radius 0.06-0.1 disc diameters (>= 1 px); blots:
    ellipses of 0.15-0.3 disc diameters. Macular lesions lie wholly within one disc diameter
    of the fovea; peripheral ones wholly farther than two, inside the fundus circle shrunk
    by 0.3 disc diameters and over 0.75 disc diameters from the disc centre."""
    n, dots, blots, cand = labels.shape[0], 6, 3, 32
    k = dots + blots
    dd = RETINA_LANDMARKS["disc_diameter"] * size / RETINA_LANDMARKS["shape"][0]
    dd = dd / geometry["scale"][:, None]  # (n, 1): the subject's disc diameter in px
    blot = torch.arange(k) >= dots
    radius = torch.where(blot, uniform(g, (n, k), 0.15, 0.3), uniform(g, (n, k), 0.06, 0.1))
    a = torch.clamp(radius * dd, min=1.0)
    b = torch.where(blot, a * uniform(g, (n, k), 0.6, 1.0), a)
    angle = uniform(g, (n, k), 0.0, math.pi)
    count_dots = torch.randint(2, dots + 1, (n, 1), generator=g)
    count_blots = torch.randint(1, blots + 1, (n, 1), generator=g)
    index = torch.arange(k)
    wanted = torch.where(blot, index - dots < count_blots, index < count_dots)
    fovea, disc = geometry["fovea"][:, None, None], geometry["disc"][:, None, None]
    # Macular centres: uniform over the disc of radius dd - a around the fovea.
    r_mac = (dd - a) * torch.sqrt(torch.rand(n, k, generator=g))
    phi = 2 * math.pi * torch.rand(n, k, generator=g)
    macular = fovea[:, 0] + r_mac[..., None] * torch.stack([phi.sin(), phi.cos()], -1)
    # Peripheral candidates: uniform over the fundus circle, rejected where invalid.
    fundus_r = RETINA_LANDMARKS["fundus_radius"] * size / RETINA_LANDMARKS["shape"][0]
    fundus_r = fundus_r / geometry["scale"][:, None, None]
    r_per = fundus_r * torch.sqrt(torch.rand(n, k, cand, generator=g))
    phi = 2 * math.pi * torch.rand(n, k, cand, generator=g)
    centre = geometry["fundus_centre"][:, None, None]
    peripheral = centre + r_per[..., None] * torch.stack([phi.sin(), phi.cos()], -1)
    ddc, ac = dd[..., None], a[..., None]
    valid = (
        ((peripheral - fovea).norm(dim=-1) > 2 * ddc + ac)
        & ((peripheral - centre).norm(dim=-1) < fundus_r - 0.3 * ddc - ac)
        & ((peripheral - disc).norm(dim=-1) > 0.75 * ddc + ac)
    )
    first = valid.float().argmax(-1, keepdim=True)  # first valid candidate
    peripheral = peripheral.gather(2, first[..., None].expand(-1, -1, 1, 2))[:, :, 0]
    is_macular = (labels == 1)[:, None, None]
    centre_rc = torch.where(is_macular, macular, peripheral)
    found = torch.where(is_macular[..., 0], True, valid.any(-1))
    active = wanted & found & (labels > 0)[:, None]
    return {"centre": centre_rc, "a": a, "b": b, "angle": angle, "blot": blot, "active": active}


def _paint_lesions(
    image: torch.Tensor, lesions: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Darken ``image`` (n, 3, S, S) under each active lesion; returns the lesioned image and
    the evidence ``(n, 1, S, S)`` bool = pixels with non-zero lesion opacity. With ``t`` the
    elliptical radius (1 on the rim), opacity is ``clip(2 (1 - t^2), 0, 1)``: opaque in the
    inner 70 % of the radius, zero from the rim outwards."""
    n, _, h, w = image.shape
    rows = torch.arange(h, dtype=torch.float32).view(1, h, 1)
    cols = torch.arange(w, dtype=torch.float32).view(1, 1, w)
    alpha = {"dot": torch.zeros(n, h, w), "blot": torch.zeros(n, h, w)}
    for slot in range(lesions["a"].shape[1]):  # a few lesion slots, never pixels
        dr = rows - lesions["centre"][:, slot, 0].view(n, 1, 1)
        dc = cols - lesions["centre"][:, slot, 1].view(n, 1, 1)
        angle = lesions["angle"][:, slot].view(n, 1, 1)
        u = (angle.cos() * dc + angle.sin() * dr) / lesions["a"][:, slot].view(n, 1, 1)
        v = (angle.cos() * dr - angle.sin() * dc) / lesions["b"][:, slot].view(n, 1, 1)
        opacity = torch.clamp(2 * (1 - u * u - v * v), 0.0, 1.0)
        opacity = opacity * lesions["active"][:, slot].view(n, 1, 1)
        kind = "blot" if bool(lesions["blot"][slot]) else "dot"
        alpha[kind] = torch.maximum(alpha[kind], opacity)
    darkening = torch.maximum(
        alpha["dot"][:, None] * torch.tensor(_DARKEN["dot"]).view(1, 3, 1, 1),
        alpha["blot"][:, None] * torch.tensor(_DARKEN["blot"]).view(1, 3, 1, 1),
    )
    evidence = (torch.maximum(alpha["dot"], alpha["blot"]) > 0)[:, None]
    return image * (1 - darkening), evidence


def as_left_eyes(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Mirror left/right the items of ``x`` ``(N, ..., S, S)`` where ``flip`` ``(N,)`` is
    set (the right eyes), so that images, evidence or attribution maps of a cohort align by
    disc and fovea with its ``regions``. A copy; ``x`` is unchanged."""
    out = x.clone()
    out[flip] = out[flip].flip(-1)
    return out


def left_eyes(cohort: Cohort) -> Cohort:
    """The cohort with every right eye mirrored to a left eye (images, evidence, shortcut,
    counterfactual and landmarks), as fundus pipelines do before training, so that images
    and attribution maps align with ``regions`` by disc and fovea. ``extra["flip"]`` keeps
    which images were mirrored; ``config["left_eyes"]`` is set."""
    flip = cohort.extra["flip"]
    extra = dict(cohort.extra)
    for key in ("shortcut", "counterfactual"):
        if key in extra:
            extra[key] = as_left_eyes(extra[key], flip)
    width = cohort.images.shape[-1]
    for key in ("disc", "fovea"):
        points = extra[key].clone()
        points[flip, 1] = width - 1 - points[flip, 1]
        extra[key] = points
    return replace(
        cohort,
        images=as_left_eyes(cohort.images, flip),
        evidence=as_left_eyes(cohort.evidence, flip),
        extra=extra,
        config={**cohort.config, "left_eyes": True},
    )


def _stamp_mask(size: int) -> torch.Tensor:
    """The shortcut stamp's pixels ``(S, S)`` bool: the bitmap scaled by ``round(S / 96)``,
    one pixel from the bottom-left corner. From 96 px up it lies on the black surround,
    outside the fundus circle of every subject; at smaller sizes it may touch the rim."""
    k = max(1, round(size / 96))
    bitmap = np.kron(_STAMP, np.ones((k, k), dtype=bool))
    mask = torch.zeros(size, size, dtype=torch.bool)
    top = size - 1 - bitmap.shape[0]
    mask[top : top + bitmap.shape[0], 1 : 1 + bitmap.shape[1]] = torch.from_numpy(bitmap)
    return mask


def make_retina(
    n: int,
    size: int = 96,
    seed: int = 0,
    shortcut: float = 0.0,
    shortcut_class: int = 1,
    max_angle: float = math.radians(10.0),
    max_scale: float = 0.05,
    illumination: tuple[float, float] = (0.75, 1.1),
    colour_gain: tuple[float, float] = (0.85, 1.1),
    vessel_contrast: tuple[float, float] = (0.5, 1.5),
    counterfactual: bool = False,
) -> Cohort:
    """Colour fundus cohort of ``n`` images ``(n, 3, size, size)`` float32 in [0, 1].

    Labels are balanced over :data:`RETINA_CLASSES` (``n // 3`` each, the remainder to the
    first classes) and shuffled. ``evidence`` ``(n, 1, S, S)``: the lesion pixels (empty for
    healthy images). ``regions``: the macula and the peripheral ring in the source (left-eye)
    frame (see :func:`retina_regions`). ``extra``: ``flip`` (n,) bool (a right eye, mirrored
    source), ``disc``/``fovea`` (n, 2) the landmarks in image pixels (row, col),
    ``disc_diameter`` (n,) px, ``shortcut`` (n, 1, S, S) bool (the pixels of a text-like
    stamp in the bottom-left corner, burnt into a fraction ``shortcut`` of the images of
    ``shortcut_class`` after mirroring, as a camera would; lesion pixels under it leave the
    evidence), and with ``counterfactual`` the same subjects without lesions
    ``(n, 3, S, S)`` (the image equals it outside ``evidence``).

    Defaults: rotation up to 10 degrees and scale within 5 % (fixation and camera distance
    of a routine photograph); illumination a bilinear 3 x 3 field in ``illumination``;
    per-channel gains and the vessel contrast factor uniform in their ranges. Random draws
    come from separate streams of ``seed``, so the shortcut and the lesions never change the
    anatomy of a subject.
    """
    if n < 1 or size < 16:
        raise ValueError(f"need n >= 1 and size >= 16, got n={n}, size={size}")
    if not 0.0 <= shortcut <= 1.0 or shortcut_class not in (0, 1, 2):
        raise ValueError(
            f"need 0 <= shortcut <= 1 and class in 0..2, got {shortcut}, {shortcut_class}"
        )
    g_labels, g_anatomy, g_lesions, g_shortcut = _generators(seed)
    labels = (torch.arange(n) % len(RETINA_CLASSES))[torch.randperm(n, generator=g_labels)]
    geometry = _subject_geometry(g_anatomy, n, size, max_angle, max_scale)
    variation = dict(
        illumination=illumination, colour_gain=colour_gain, vessel_contrast=vessel_contrast
    )
    healthy = _healthy_images(g_anatomy, geometry, size, variation)
    lesions = _place_lesions(g_lesions, geometry, labels, size)
    diseased, evidence = _paint_lesions(healthy, lesions)
    stamped = (labels == shortcut_class) & (torch.rand(n, generator=g_shortcut) < shortcut)
    stamp = _stamp_mask(size)[None, None] & stamped[:, None, None, None]
    colour = torch.tensor(_STAMP_COLOUR).view(1, 3, 1, 1)
    images = torch.where(stamp, colour, diseased.clamp(0.0, 1.0))
    evidence = evidence & ~stamp  # a lesion pixel under the stamp is no longer visible
    dd = RETINA_LANDMARKS["disc_diameter"] * size / RETINA_LANDMARKS["shape"][0]
    extra = {
        "flip": geometry["flip"],
        "disc": geometry["disc"],
        "fovea": geometry["fovea"],
        "disc_diameter": dd / geometry["scale"],
        "shortcut": stamp,
    }
    if counterfactual:
        extra["counterfactual"] = torch.where(stamp, colour, healthy.clamp(0.0, 1.0))
    config = dict(
        cohort="retina", source="skimage.data.retina", n=n, size=size, seed=seed,
        value_range=(0.0, 1.0), shortcut=shortcut, shortcut_class=shortcut_class,
        max_angle=max_angle, max_scale=max_scale, landmarks=dict(RETINA_LANDMARKS), **variation,
    )  # fmt: skip
    return Cohort(
        images=images.float().contiguous(),
        labels=labels.long(),
        evidence=evidence,
        class_names=RETINA_CLASSES,
        regions=retina_regions(size),
        affine=None,
        extra=extra,
        config=config,
    )
