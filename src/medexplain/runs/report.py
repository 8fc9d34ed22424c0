"""``report``: one self-contained HTML page from what a run folder holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..core.serialise import json_safe
from .settings import open_run

__all__ = ["report_run"]


def report_run(run: str | Path) -> Path:
    """A self-contained ``RUN/report.html`` from ``run.json``, the global maps, the
    contrast and the evaluation (what exists)."""
    from ..report.html import embed_png, metrics_table, write_report

    store, record = open_run(run)
    settings = record["settings"]
    summary = record.get("last_explain", {})
    errors = store.errors()
    intro = (
        f"<p>Method <b>{settings['method']}</b> {settings['params'] or ''} on "
        f"{summary.get('n_done', store.count())} image(s) of {settings['data']} "
        f"(shape {record['spatial_shape']}, classes {', '.join(record['class_names'])}); "
        f"model {settings['model'] or settings['model_factory']} "
        f"(sha256 {str(record['model'].get('sha256'))[:12]}), target {settings['target']}. "
        f"{len(errors)} image(s) could not be explained (errors.csv).</p>"
    )
    sections = [("Run", intro)]
    results: dict[str, Any] = {"run": record}
    figures = store.root / "figures"
    global_dir = store.root / "global"
    if (global_dir / "index.json").is_file():
        index = json.loads((global_dir / "index.json").read_text())
        results["global"] = index
        body = "".join(embed_png(p) for p in sorted(figures.glob("global_*.png")))
        rows = {"/".join(g["key"]): {"count": g["count"]} for g in index["groups"]}
        body += metrics_table(rows, [("count", "images")]).replace(">method<", ">group<")
        if len(record["spatial_shape"]) == 3:
            body += "<p class='note'>3D maps are in global/*.nii.gz with the scans' affine.</p>"
        sections.append(("Global maps", body))
        contrasts = sorted(figures.glob("contrast_*.png"))
        if contrasts:
            sections.append(
                ("Group contrast (Welch t, BH-FDR)", "".join(map(embed_png, contrasts)))
            )
    evaluation_path = store.root / "evaluation.json"
    if evaluation_path.is_file():
        evaluation = json.loads(evaluation_path.read_text())
        results["evaluation"] = evaluation
        columns = [
            ("peppr.erase_area", "PEPPR erase"),
            ("peppr.random_erase_area", "random erase"),
            ("peppr.restore_area", "PEPPR restore"),
            ("peppr.random_restore_area", "random restore"),
            ("deletion.deletion_auc", "deletion AUC"),
            ("deletion.insertion_auc", "insertion AUC"),
            ("localization.auroc", "loc. AUROC"),
            ("sanity.rank_correlation_fully_randomized", "sanity ρ"),
        ]
        body = metrics_table({settings["method"]: evaluation}, columns)
        if "peppr" in evaluation and (figures / "peppr.png").is_file():
            body += embed_png(figures / "peppr.png")
        sections.append(("Evaluation", body))
    if errors:
        rows = "".join(f"<li>{i}: {path} — {reason}</li>" for i, path, reason in errors[:50])
        sections.append(("Images not explained", f"<ul>{rows}</ul>"))
    return write_report(
        store.root / "report.html",
        title=f"medexplain run — {settings['method']}",
        sections=sections,
        results=json_safe(results),
    )
