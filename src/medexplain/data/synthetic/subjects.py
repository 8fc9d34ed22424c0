"""Every random quantity of the synthetic benchmark's subjects, drawn from one seed.

The module constants are the benchmark's parameters: effect sizes at strength 1 and the
bounds of the subject variation (images are made from the subjects by :mod:`.rendering`).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch

from ..deform import control_displacement, random_rotation_scale, uniform
from ..template import DEFAULT_LAYOUT, TISSUE_INTENSITY, TISSUES, center_of

BENCHMARK_CLASSES = ("healthy", "lesion", "atrophy")
DEFAULT_SIZE = {2: 64, 3: 32}

# Effect sizes at strength 1 (chosen: clearly above the default noise 0.05, and a shrinkage
# within 25-40% of the radius).
LESION_CONTRAST = 0.35  # intensity added on the blob's plateau, before the subject gain
LESION_RADIUS = (0.13, 0.17)  # template units: the blob's support (see lesion_profile)
ATROPHY_SHRINK = 0.35  # fraction of the nucleus radius lost at strength 1
MIN_ATROPHY_FACTOR = 0.1  # the contraction factor never goes below this
MARKER_INTENSITY = 0.95
# Bounds of the subject variation (template units / radians), all uniform draws.
MAX_ANGLE = 0.06  # per skew entry, about 3.4 degrees
MAX_SCALE = 0.04
MAX_SHIFT = 0.04
CONTROL_POINTS = 5  # per axis of the low-resolution displacement
MAX_DISPLACEMENT = 0.04
BIAS_CONTROL_POINTS = 3
MAX_LOG_BIAS = 0.08
TISSUE_JITTER = 0.03
GAIN = (0.9, 1.1)
MAX_OFFSET = 0.02


@dataclass
class Subjects:
    """Every random quantity of N subjects (all small; images are made by :func:`render`).

    Tensor fields have the subject axis first; ``lesion_*`` have one entry per lesion part
    ``P = 2`` (A1, A2; only A1 is used unless ``redundant``).
    """

    dims: int
    size: int
    class_names: tuple[str, ...]
    strength: float
    noise: float
    redundant: bool
    labels: torch.Tensor  # (N,) long
    matrix: torch.Tensor  # (N, d, d) rotation * scale
    shift: torch.Tensor  # (N, d)
    displacement: torch.Tensor  # (N, d, *[CONTROL_POINTS] * d)
    log_bias: torch.Tensor  # (N, 1, *[BIAS_CONTROL_POINTS] * d)
    tissue: torch.Tensor  # (N, len(TISSUES)) intensity per tissue
    gain: torch.Tensor  # (N,)
    offset: torch.Tensor  # (N,)
    lesion_center: torch.Tensor  # (N, P, d) template units
    lesion_radius: torch.Tensor  # (N, P)
    lesion_parts: torch.Tensor  # (N, P) bool: which parts get a blob if the class is lesion
    has_marker: torch.Tensor  # (N,) bool
    noise_seed: torch.Tensor  # (N,) long

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def select(self, indices) -> Subjects:
        """The subjects at ``indices`` (their images render identically to the full set)."""
        index = as_index(indices, len(self))
        changes = {
            f.name: getattr(self, f.name)[index]
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **changes)

    def effect_of(self, name: str) -> torch.Tensor:
        """(N,) bool: subjects whose class is ``name`` (all False if it is not a class)."""
        if name not in self.class_names:
            return torch.zeros(len(self), dtype=torch.bool)
        return self.labels == self.class_names.index(name)


def as_index(indices, n: int) -> torch.Tensor:
    index = torch.as_tensor(indices)
    if index.dtype == torch.bool:
        if index.shape != (n,):
            raise ValueError(f"a boolean index must have shape ({n},), got {tuple(index.shape)}")
        return index.nonzero().flatten()
    index = index.long().flatten()
    if index.numel() and (index.min() < -n or index.max() >= n):
        raise IndexError(
            f"indices must be in [-{n}, {n}), got min {index.min()}, max {index.max()}"
        )
    return index


def _integer(value, name: str, what: str) -> int:
    """``value`` as a Python int (numpy and torch integers too), else a ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be {what}, got {value!r}") from None


def _check_arguments(
    n, dims, size, classes, strength, shortcut, shortcut_class, redundant, noise
) -> tuple[int, int, int, tuple[str, ...], int]:
    n = _integer(n, "n", "a positive int")
    if n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    dims = _integer(dims, "dims", "2 or 3 (spatial dimensions)")
    if dims not in DEFAULT_SIZE:
        raise ValueError(f"dims must be 2 or 3 (spatial dimensions), got {dims!r}")
    size = DEFAULT_SIZE[dims] if size is None else _integer(size, "size", "an int >= 16")
    if size < 16:
        raise ValueError(f"size must be an int >= 16 (pixels per axis), got {size!r}")
    classes = tuple(classes)
    unknown = [c for c in classes if c not in BENCHMARK_CLASSES]
    if unknown or len(set(classes)) != len(classes) or len(classes) < 2:
        raise ValueError(
            f"classes must be at least two distinct names from {BENCHMARK_CLASSES}, got {classes}"
        )
    if not strength >= 0:
        raise ValueError(f"strength must be >= 0, got {strength}")
    if not 0.0 <= shortcut <= 1.0:
        raise ValueError(f"shortcut must be a probability in [0, 1], got {shortcut}")
    what = f"a class index in [0, {len(classes)})"
    shortcut_class = _integer(shortcut_class, "shortcut_class", what)
    if not 0 <= shortcut_class < len(classes):
        raise ValueError(f"shortcut_class must be {what}, got {shortcut_class!r}")
    if redundant and "lesion" not in classes:
        raise ValueError("redundant=True needs the 'lesion' class in classes")
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0 (standard deviation), got {noise}")
    return n, dims, size, classes, shortcut_class


def sample_subjects(
    n: int = 2000,
    dims: int = 2,
    size: int | None = None,
    *,
    classes: Sequence[str] = BENCHMARK_CLASSES,
    strength: float = 1.0,
    shortcut: float = 0.0,
    shortcut_class: int = 1,
    redundant: bool = False,
    noise: float = 0.05,
    seed: int = 0,
) -> Subjects:
    """Draw the random quantities of ``n`` subjects; arguments as in :func:`make_benchmark`.

    Every quantity is drawn for every subject whatever its class and options, so a seed
    fixes the anatomy of subject ``i`` independently of ``strength``, ``shortcut`` and
    ``redundant``. Labels are balanced (counts differ by at most one) and shuffled.
    """
    n, dims, size, classes, shortcut_class = _check_arguments(
        n, dims, size, classes, strength, shortcut, shortcut_class, redundant, noise
    )
    g = torch.Generator().manual_seed(int(seed))
    k = len(classes)
    labels = (torch.arange(n) % k)[torch.randperm(n, generator=g)]
    matrix = random_rotation_scale(g, n, dims, MAX_ANGLE, MAX_SCALE)
    shift = uniform(g, (n, dims), -MAX_SHIFT, MAX_SHIFT)
    displacement = control_displacement(g, n, dims, CONTROL_POINTS, MAX_DISPLACEMENT)
    log_bias = uniform(g, (n, 1, *[BIAS_CONTROL_POINTS] * dims), -MAX_LOG_BIAS, MAX_LOG_BIAS)
    tissue = torch.tensor(TISSUE_INTENSITY) + uniform(
        g, (n, len(TISSUES)), -TISSUE_JITTER, TISSUE_JITTER
    )
    gain = uniform(g, (n,), *GAIN)
    offset = uniform(g, (n,), -MAX_OFFSET, MAX_OFFSET)
    # Lesion blobs: one candidate per part, the blob entirely inside its region (template).
    parts = DEFAULT_LAYOUT.lesion_regions
    radius = uniform(g, (n, len(parts)), *LESION_RADIUS)
    direction = torch.randn((n, len(parts), dims), generator=g)
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    room = torch.tensor([ball.radius for ball in parts]) - radius
    reach = room * torch.rand((n, len(parts)), generator=g) ** (1.0 / dims)
    centers = torch.stack([center_of(ball.center, dims) for ball in parts])
    lesion_center = centers + direction * reach.unsqueeze(-1)
    # Redundant variant: both parts with probability 1/2, otherwise one chosen at random.
    both = torch.rand(n, generator=g) < 0.5
    which = torch.randint(0, 2, (n,), generator=g)
    single = torch.nn.functional.one_hot(which, 2).bool()
    lesion_parts = single | both.unsqueeze(1) if redundant else torch.tensor([True, False])
    lesion_parts = lesion_parts.expand(n, 2).clone()
    marker_draw = torch.rand(n, generator=g) < shortcut
    has_marker = marker_draw & (labels == shortcut_class)
    noise_seed = torch.randint(0, 2**62, (n,), generator=g)
    return Subjects(
        dims=dims,
        size=size,
        class_names=classes,
        strength=float(strength),
        noise=float(noise),
        redundant=bool(redundant),
        labels=labels,
        matrix=matrix,
        shift=shift,
        displacement=displacement,
        log_bias=log_bias,
        tissue=tissue,
        gain=gain,
        offset=offset,
        lesion_center=lesion_center,
        lesion_radius=radius,
        lesion_parts=lesion_parts,
        has_marker=has_marker,
        noise_seed=noise_seed,
    )
