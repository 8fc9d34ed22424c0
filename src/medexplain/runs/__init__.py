"""Runs on the user's own data: explain a dataset into a resumable store, then global maps,
evaluation and a report from that store (what ``medexplain explain/global/evaluate/report``
call).

    settings = ExplainSettings(model="cnn.pt", data="t1.csv", method="saliency")
    explain_run(settings, "runs/ad")                 # killed? call again: it resumes
    result = global_run("runs/ad", by="label", contrast=("AD", "CN"))
    evaluate_run("runs/ad", peppr=True)
    report_run("runs/ad")

Memory never grows with the number of images: images are read, explained and written one
chunk at a time (:mod:`medexplain.runs.store`), global maps and metrics stream the chunks back.


Modules: :mod:`.settings` (what was asked; opening model, data, explainer), :mod:`.store`
(the run folder), :mod:`.chunk`, :mod:`.atomic`, :mod:`.errors`, :mod:`.explain`,
:mod:`.aggregate` (global maps), :mod:`.evaluate`, :mod:`.report`, :mod:`.ray_engine`
(``explain --engine ray``: Ray actors fill the chunks; Ray is imported only when it runs),
:mod:`.xnn_run` and :mod:`.xnn_summary` (what an ``xnn`` run stores per x-feature, and its
global view).
"""

from .aggregate import BY, accumulate, global_run
from .chunk import Chunk
from .errors import DamagedChunkError, RunError
from .evaluate import evaluate_run
from .explain import explain_run
from .report import report_run
from .settings import ExplainSettings, open_data, open_model, open_run
from .store import RUN_FILES, RunStore
from .xnn_run import xnn_image, xnn_table

__all__ = [
    "BY",
    "RUN_FILES",
    "Chunk",
    "DamagedChunkError",
    "ExplainSettings",
    "RunError",
    "RunStore",
    "accumulate",
    "evaluate_run",
    "explain_run",
    "global_run",
    "open_data",
    "open_model",
    "open_run",
    "report_run",
    "xnn_image",
    "xnn_table",
]
