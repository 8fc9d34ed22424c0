"""Maps as NIfTI: :func:`save_nifti` (plain, from :mod:`medexplain.data.writers`) and
:func:`nifti_bytes`, a ``.nii.gz`` with the header codes of the scan the map belongs to."""

from __future__ import annotations

import gzip

import numpy as np

from ..data.orientation import UNKNOWN, HeaderCodes
from ..data.writers import save_nifti

__all__ = ["nifti_bytes", "save_nifti"]


def nifti_bytes(
    volume: np.ndarray, affine: np.ndarray | None, codes: HeaderCodes = UNKNOWN
) -> bytes:
    """A gzipped NIfTI-1 file holding ``volume`` as float32.

    ``volume`` is ``(X, Y, Z)`` or a 2D map ``(H, W)`` (written as ``(H, W, 1)``);
    ``affine`` its voxel -> world matrix (identity when None). The sform and qform both hold
    ``affine``, with ``codes``' sform/qform codes (so a map keeps "scanner", "aligned",
    "MNI"... of its source, and a code 0 stays unknown) and its spatial / time units.
    """
    import nibabel as nib

    array = np.asarray(volume, dtype=np.float32)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise ValueError(f"a NIfTI map must be 2D or 3D, got shape {array.shape}")
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    image = nib.Nifti1Image(array, affine)
    image.set_sform(affine, code=int(codes.sform_code))
    image.set_qform(affine, code=int(codes.qform_code))
    image.header.set_xyzt_units(codes.xyz_units, codes.t_units)
    return gzip.compress(image.to_bytes(), compresslevel=1, mtime=0)
