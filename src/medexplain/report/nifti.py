"""3D maps as NIfTI for the report (the writer lives in :mod:`medexplain.data.writers`)."""

from ..data.writers import save_nifti

__all__ = ["save_nifti"]
