"""Writing 3D maps as NIfTI with the source scan's affine, so they overlay in ITK-SNAP/FSLeyes.

Lives in the data layer so explainers (warp figures) and the report share one writer."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch


def save_nifti(
    volume: torch.Tensor | np.ndarray,
    path: str | Path,
    affine: np.ndarray | None = None,
    space: str | None = None,
) -> Path:
    """Write ``volume`` ``(D, H, W)`` (leading singleton axes allowed) as float32 NIfTI.

    ``affine`` is the 4x4 voxel-to-world matrix of the scan the map belongs to (identity when
    unknown). medexplain holds volumes as ``(D, H, W)``; they are written in that axis order,
    the order in which they were read, so the affine applies unchanged. ``space`` (a nibabel
    xform code such as ``"mni"`` or ``"scanner"``) is written as the sform and qform code.
    """
    array = volume.detach().cpu().numpy() if isinstance(volume, torch.Tensor) else volume
    array = np.asarray(array, dtype=np.float32)
    while array.ndim > 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"save_nifti needs a 3D volume, got shape {array.shape}")
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got {affine.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(array, affine)
    if space is not None:
        image.set_sform(affine, code=space)
        image.set_qform(affine, code=space)
    nib.save(image, str(path))
    return path
