"""Report pieces: self-contained HTML, tables from nested results, NIfTI with affine,
and the batch pipeline against direct explainer calls."""

from __future__ import annotations

import base64
import re

import nibabel as nib
import numpy as np
import torch
from torch import nn

from medexplain.explain import create
from medexplain.explain.batch import explain_all, predicted_classes
from medexplain.report.figures import plot_global_maps
from medexplain.report.html import embed_png, metrics_table, write_report
from medexplain.report.nifti import save_nifti


def test_report_is_self_contained_and_keeps_the_numbers(tmp_path):
    mean = torch.rand(1, 16, 16)
    figure = plot_global_maps(mean, {"a": torch.rand(1, 16, 16)}, tmp_path / "g.png")
    results = {"methods": {"m": {"auc": 0.25, "nested": {"x": 1}}}}
    table = metrics_table(results["methods"], [("auc", "AUC"), ("nested.x", "X"), ("no", "-")])
    page = write_report(
        tmp_path / "r.html", title="t", sections=[("s", embed_png(figure) + table)], results=results
    ).read_text()
    sources = re.findall(r'src="([^"]+)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    png = base64.b64decode(sources[0].split(",", 1)[1])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png == figure.read_bytes()
    assert "<td>0.250</td><td>1</td><td>–</td>" in page
    assert "&quot;auc&quot;: 0.25" in page  # the machine-readable copy


def test_table_arrows_come_from_the_metrics_directions(monkeypatch):
    from medexplain import metrics

    columns = [
        ("deletion.deletion_auc", "deletion AUC"),
        ("peppr.restore_area", "PEPPR restore"),
        ("peppr.random_erase_area", "random erase"),  # a reference, not a score
        ("localization_auroc", "loc. AUROC", "auroc"),  # named score
    ]
    rows = {"m": {"deletion": {"deletion_auc": 0.5}}}
    table = metrics_table(rows, columns)
    assert metrics.DIRECTIONS["deletion_auc"] == "lower" and "<th>deletion AUC ↓</th>" in table
    assert metrics.DIRECTIONS["restore_area"] == "higher" and "<th>PEPPR restore ↑</th>" in table
    assert "<th>random erase</th>" in table and "<th>loc. AUROC ↑</th>" in table
    # the header follows the declaration, not a string in the caller
    monkeypatch.setitem(metrics.DIRECTIONS, "deletion_auc", "higher")
    assert "<th>deletion AUC ↑</th>" in metrics_table(rows, columns)


def test_nifti_keeps_values_and_affine(tmp_path):
    volume = torch.rand(1, 4, 5, 6)
    affine = np.diag([2.0, 1.5, 1.0, 1.0])
    affine[:3, 3] = [-90, -126, -72]
    path = save_nifti(volume, tmp_path / "m.nii.gz", affine=affine)
    image = nib.load(path)
    np.testing.assert_allclose(image.affine, affine)
    np.testing.assert_allclose(image.get_fdata(), volume[0].numpy(), rtol=1e-6)


class _Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(36, 3)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_explain_all_equals_direct_calls_and_uses_predictions():
    torch.manual_seed(0)
    model = _Linear()
    images = torch.rand(7, 1, 6, 6)
    explainer = create("input_x_gradient", model, batch_size=4)
    result = explain_all(explainer, images, batch_size=3)
    predicted = model(images).argmax(1)
    assert torch.equal(predicted_classes(model, images, batch_size=2), predicted)
    assert torch.equal(result.targets, predicted)
    # input x gradient of a linear model: x * w[target], by hand.
    expected = images * model.fc.weight[predicted].view(7, 1, 6, 6)
    torch.testing.assert_close(result.maps, expected.detach())
    assert result.seconds_per_image > 0


def test_one_logit_model_predicts_by_sign_and_explains_its_only_output():
    torch.manual_seed(0)
    model = _Linear()
    model.fc = nn.Linear(36, 1)
    images = torch.rand(8, 1, 6, 6) - 0.5
    logit = model(images)[:, 0]
    assert bool((logit > 0).any()) and bool((logit <= 0).any())
    assert torch.equal(predicted_classes(model, images), (logit > 0).long())
    result = explain_all(create("input_x_gradient", model), images)
    assert torch.equal(result.targets, torch.zeros(8, dtype=torch.long))
    expected = images * model.fc.weight[0].view(1, 1, 6, 6)
    torch.testing.assert_close(result.maps, expected.detach())
