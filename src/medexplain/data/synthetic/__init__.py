"""Aligned synthetic benchmark with ground truth: where each image's class evidence is.

Each image is one "subject": the anatomy-like template of :mod:`medexplain.data.template`
warped by a small random rotation/scale/shift and a smooth random displacement
(:mod:`medexplain.data.deform`), with random tissue intensities, gain, offset, a smooth
multiplicative bias field and Gaussian noise. Images are therefore aligned the way
registered scans are: roughly, not perfectly. The classes differ only by one local effect:

- ``"healthy"``: none; its evidence mask is empty;
- ``"lesion"``: a bright compact blob with a flat top (``+0.35 * strength``; support radius
  0.13-0.17 template units, 4-5.4 pixels at 64 px, the plateau half of that) inside region
  A (A1 and/or A2 when ``redundant``); evidence = the blob's support;
- ``"atrophy"``: the right nucleus shrinks by ``35% * strength`` of its radius through a
  radial contraction, the identity outside region B; evidence = that region as seen in the
  subject (the warped ball where the deformation is not the identity).

The image of a subject with and without its effect (:func:`render` with ``effects=False``)
differs only inside the evidence mask, exactly: the subject's deformation, intensities and
noise are the same. The healthy counterparts of a whole benchmark ``bench`` are
``render(sample_subjects(**bench.config), effects=False).images``. Randomness comes from one
seeded generator and a noise seed per subject, so the same seed gives identical tensors.

No paper prescribes this benchmark; its constants are chosen so that a small CNN separates
the classes clearly at ``strength=1`` while no single pixel does (see the module constants).
"""

from .benchmark import BenchmarkDataset, SyntheticBenchmark, make_benchmark
from .rendering import CHUNK_PIXELS, Rendered, atrophy_factor, lesion_profile, render
from .subjects import (
    ATROPHY_SHRINK,
    BENCHMARK_CLASSES,
    BIAS_CONTROL_POINTS,
    CONTROL_POINTS,
    DEFAULT_SIZE,
    GAIN,
    LESION_CONTRAST,
    LESION_RADIUS,
    MARKER_INTENSITY,
    MAX_ANGLE,
    MAX_DISPLACEMENT,
    MAX_LOG_BIAS,
    MAX_OFFSET,
    MAX_SCALE,
    MAX_SHIFT,
    MIN_ATROPHY_FACTOR,
    TISSUE_JITTER,
    Subjects,
    sample_subjects,
)

__all__ = [
    "ATROPHY_SHRINK",
    "BENCHMARK_CLASSES",
    "BIAS_CONTROL_POINTS",
    "CHUNK_PIXELS",
    "CONTROL_POINTS",
    "DEFAULT_SIZE",
    "GAIN",
    "LESION_CONTRAST",
    "LESION_RADIUS",
    "MARKER_INTENSITY",
    "MAX_ANGLE",
    "MAX_DISPLACEMENT",
    "MAX_LOG_BIAS",
    "MAX_OFFSET",
    "MAX_SCALE",
    "MAX_SHIFT",
    "MIN_ATROPHY_FACTOR",
    "TISSUE_JITTER",
    "BenchmarkDataset",
    "Rendered",
    "Subjects",
    "SyntheticBenchmark",
    "atrophy_factor",
    "lesion_profile",
    "make_benchmark",
    "render",
    "sample_subjects",
]
