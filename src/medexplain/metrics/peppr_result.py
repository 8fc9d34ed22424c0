"""PEPPR results: curves per metric, their areas, and how the model's scores become them.

:class:`PepprCurves` holds one metric's erase/restore curves along the fraction grid with the
random-order control; :class:`PepprResult` the headline (macro AUC), accuracy and per-label
curves. :func:`curve_metrics` turns the scores of one curve into AUC and accuracy per step;
:func:`assemble` builds a result from the scores of a ranking's runs and the random runs.
Used by :mod:`medexplain.metrics.peppr`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..core.ranks import rank_auroc
from ..core.serialise import json_safe

# --------------------------------------------------------------------------- results


def _area(fractions: np.ndarray, curve: np.ndarray) -> float:
    return float(np.trapezoid(curve, fractions))


@dataclass
class PepprCurves:
    """Erase/restore curves of one metric along ``fractions`` ``(F,)``.

    ``erase``/``restore``: ``(F,)`` with the ranking map; ``random_erase``/``random_restore``:
    ``(R, F)``, one row per random seed. NaN where the metric is undefined (an AUC with
    one class only).
    """

    fractions: np.ndarray
    erase: np.ndarray
    restore: np.ndarray
    random_erase: np.ndarray
    random_restore: np.ndarray

    @staticmethod
    def _std(rows: np.ndarray) -> np.ndarray:
        if rows.shape[0] < 2:
            return np.zeros(rows.shape[1:])
        return rows.std(axis=0, ddof=1)

    @property
    def random_erase_mean(self) -> np.ndarray:
        return self.random_erase.mean(axis=0)

    @property
    def random_erase_std(self) -> np.ndarray:
        return self._std(self.random_erase)

    @property
    def random_restore_mean(self) -> np.ndarray:
        return self.random_restore.mean(axis=0)

    @property
    def random_restore_std(self) -> np.ndarray:
        return self._std(self.random_restore)

    def areas(self) -> dict[str, float]:
        """Trapezoid areas over the fraction axis and their differences to random.

        Random areas are the mean (and sample std) over seeds of each seed's area.
        """
        f = self.fractions
        rand_erase = np.array([_area(f, row) for row in self.random_erase])
        rand_restore = np.array([_area(f, row) for row in self.random_restore])
        erase, restore = _area(f, self.erase), _area(f, self.restore)
        out = {
            "erase_area": erase,
            "restore_area": restore,
            "random_erase_area": float(rand_erase.mean()),
            "random_erase_area_std": float(self._std(rand_erase[:, None])[0]),
            "random_restore_area": float(rand_restore.mean()),
            "random_restore_area_std": float(self._std(rand_restore[:, None])[0]),
        }
        out["erase_minus_random"] = erase - out["random_erase_area"]
        out["restore_minus_random"] = restore - out["random_restore_area"]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "erase": self.erase,
            "restore": self.restore,
            "random_erase_mean": self.random_erase_mean,
            "random_erase_std": self.random_erase_std,
            "random_restore_mean": self.random_restore_mean,
            "random_restore_std": self.random_restore_std,
            "random_erase": self.random_erase,
            "random_restore": self.random_restore,
            **self.areas(),
        }


@dataclass
class PepprResult:
    """PEPPR curves and summary.

    ``auc``: macro mean over labels of the one-vs-rest AUC-ROC (the headline);
    ``accuracy``: dataset accuracy (label-wise ranking: mean over labels of the one-vs-rest
    accuracy under each label's own map); ``auc_per_label``: one :class:`PepprCurves` per
    label. The ``*_area`` properties refer to the headline AUC curves.
    """

    fractions: np.ndarray
    class_names: tuple[str, ...]
    auc: PepprCurves
    accuracy: PepprCurves
    auc_per_label: dict[str, PepprCurves]
    n_images: int
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def erase_area(self) -> float:
        return self.auc.areas()["erase_area"]

    @property
    def restore_area(self) -> float:
        return self.auc.areas()["restore_area"]

    @property
    def random_erase_area(self) -> float:
        return self.auc.areas()["random_erase_area"]

    @property
    def random_restore_area(self) -> float:
        return self.auc.areas()["random_restore_area"]

    @property
    def erase_minus_random(self) -> float:
        """``erase_area - random_erase_area`` (negative for a faithful map)."""
        return self.auc.areas()["erase_minus_random"]

    @property
    def restore_minus_random(self) -> float:
        """``restore_area - random_restore_area`` (positive for a faithful map)."""
        return self.auc.areas()["restore_minus_random"]

    def summary(self) -> dict[str, Any]:
        """Areas only, JSON-safe: the headline (macro AUC) areas at the top level
        (``erase_area``, ``random_erase_area``, ``erase_minus_random``, ...), then the same
        per metric: ``{"auc": {...}, "accuracy": {...}, "auc_per_label": {name: {...}}}``."""
        return json_safe(
            {
                **self.auc.areas(),
                "auc": self.auc.areas(),
                "accuracy": self.accuracy.areas(),
                "auc_per_label": {k: v.areas() for k, v in self.auc_per_label.items()},
            }
        )

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-safe plain types (NaN and inf become None)."""
        return json_safe(
            {
                "fractions": self.fractions,
                "class_names": list(self.class_names),
                "n_images": self.n_images,
                "settings": self.settings,
                "auc": self.auc.to_dict(),
                "accuracy": self.accuracy.to_dict(),
                "auc_per_label": {k: v.to_dict() for k, v in self.auc_per_label.items()},
            }
        )


# --------------------------------------------------------------------------- metrics


def _truth_matrix(labels: torch.Tensor, mode: str, k: int) -> torch.Tensor:
    if mode == "multiclass":
        return torch.nn.functional.one_hot(labels.long(), k).bool()
    if mode == "binary":
        return labels.view(-1, 1).bool()
    return labels.bool()


def curve_metrics(
    probs: torch.Tensor, labels: torch.Tensor, mode: str, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From probs ``(F, N, K)``: AUC per label ``(F, K)``, accuracy ``(F,)`` and one-vs-rest
    accuracy per label ``(F, K)``."""
    n_steps, n, k = probs.shape
    truth = _truth_matrix(labels, mode, k)  # (N, K)
    aucs = torch.stack(
        [rank_auroc(probs[:, :, j], truth[:, j].expand(n_steps, n)) for j in range(k)], dim=1
    )
    if mode == "multiclass":
        predicted = probs.argmax(dim=2)  # (F, N)
        accuracy = (predicted == labels.view(1, -1)).double().mean(dim=1)
        said = torch.nn.functional.one_hot(predicted, k).bool()
    else:
        said = probs > threshold
        accuracy = (said == truth.unsqueeze(0)).double().mean(dim=(1, 2))
    per_label = (said == truth.unsqueeze(0)).double().mean(dim=1)
    return aucs, accuracy, per_label


def assemble(runs, results, fractions, names, n_images, labelwise, settings) -> PepprResult:
    map_runs = [i for i, r in enumerate(runs) if r[0] == "map"]
    random_runs = [i for i, r in enumerate(runs) if r[0] == "random"]

    def rows(selector, erase) -> np.ndarray:
        return np.stack([selector(results[(i, erase)]) for i in random_runs])

    per_label: dict[str, PepprCurves] = {}
    if labelwise:
        mapped = [(i, runs[i][1]) for i in map_runs]
        label_list = [j for _, j in mapped]
    else:
        mapped = [(map_runs[0], j) for j in range(len(names))]
        label_list = list(range(len(names)))
    for i, j in mapped:
        per_label[names[j]] = PepprCurves(
            fractions,
            results[(i, True)][0][:, j].numpy(),
            results[(i, False)][0][:, j].numpy(),
            rows(lambda r, j=j: r[0][:, j].numpy(), True),
            rows(lambda r, j=j: r[0][:, j].numpy(), False),
        )

    def macro(curves: list[np.ndarray]) -> np.ndarray:
        stacked = np.stack(curves)
        finite = np.isfinite(stacked)
        total = np.where(finite, stacked, 0.0).sum(axis=0)
        count = finite.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count > 0, total / np.maximum(count, 1), np.nan)

    def macro_rows(attr: str) -> np.ndarray:
        return macro([getattr(per_label[names[j]], attr) for j in label_list])

    auc = PepprCurves(
        fractions,
        macro_rows("erase"),
        macro_rows("restore"),
        macro_rows("random_erase"),
        macro_rows("random_restore"),
    )
    if labelwise:
        accuracy = PepprCurves(
            fractions,
            np.mean([results[(i, True)][2][:, j].numpy() for i, j in mapped], axis=0),
            np.mean([results[(i, False)][2][:, j].numpy() for i, j in mapped], axis=0),
            np.mean([rows(lambda r, j=j: r[2][:, j].numpy(), True) for j in label_list], axis=0),
            np.mean([rows(lambda r, j=j: r[2][:, j].numpy(), False) for j in label_list], axis=0),
        )
    else:
        i = map_runs[0]
        accuracy = PepprCurves(
            fractions,
            results[(i, True)][1].numpy(),
            results[(i, False)][1].numpy(),
            rows(lambda r: r[1].numpy(), True),
            rows(lambda r: r[1].numpy(), False),
        )
    return PepprResult(fractions, tuple(names), auc, accuracy, per_label, n_images, settings)
