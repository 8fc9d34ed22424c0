"""Label-wise global maps for aligned images (Engelmann et al.; docs: methods, global maps).

For an aligned modality every pixel position means the same place on the imaged object, so
the mean of image-wise maps over a group of images is a *global map*: where the model looks
for that group. :class:`GlobalMaps` is a streaming, mergeable accumulator (a monoid:
``update``, ``merge``, ``result``) of per-group running moments:

- each image-wise map ``E_i`` ``(1, *S)`` is first moved to the CPU in float64, then
  transformed (``signed`` keeps it, ``abs`` takes ``|E|``, ``positive`` keeps ``max(E, 0)``)
  and *then* normalised per image (``none``; ``max``: divide by ``max |E|``, the authors'
  "max1"; ``mass``: divide by ``sum |E|``, "mass1"). An all-zero map stays zero
  (:mod:`.normalise`).
- groups: the true label (``("label", name)``), the predicted label
  (``("prediction", name)``), the outcome per label (``("outcome", name, "TP"|"FP"|"FN"|"TN")``,
  one-vs-rest for multi-class) and all images (``("overall",)``). The paper does not fix
  the grouping, so all are offered. Multi-label data has ``(B, K)`` 0/1 labels and
  predictions; an image then belongs to every label group it is positive for (:mod:`.groups`).
- per group only ``count``, ``mean`` and ``M2`` (sum of squared deviations) are kept, in
  float64 on the CPU, updated and merged with the parallel algorithm of Chan, Golub and
  LeVeque (1979). Memory is bounded by the number of groups times the map size, never by
  the number of images, and sharded runs merged in any order equal one pass up to rounding
  (~1e-15 relative) (:mod:`.moments`, :mod:`.accumulator`).

A per-pixel Welch t contrast between two groups (with two-sided p-values and
Benjamini-Hochberg q-values) gives the voxel-wise group comparison that voxel-based
morphometry users expect (:mod:`.contrast`). :class:`GlobalResult` holds the maps of every
group and saves them as ``.npy`` files with a JSON index (:mod:`.result`).
"""

from .accumulator import GlobalMaps
from .contrast import ContrastResult, benjamini_hochberg, welch_contrast
from .groups import KINDS, OUTCOMES, OVERALL, GroupKey
from .moments import GroupMap
from .normalise import NORMALISATIONS, TRANSFORMS, normalise_maps
from .result import GlobalResult

__all__ = [
    "KINDS",
    "NORMALISATIONS",
    "OUTCOMES",
    "OVERALL",
    "TRANSFORMS",
    "ContrastResult",
    "GlobalMaps",
    "GlobalResult",
    "GroupKey",
    "GroupMap",
    "benjamini_hochberg",
    "normalise_maps",
    "welch_contrast",
]
