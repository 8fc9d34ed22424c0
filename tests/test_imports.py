"""What importing a module drags in: metrics stay below explain, only report draws.

Each check runs in a fresh interpreter, since this test session has long imported
everything; ``sys.modules`` there is the ground truth of what an import loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap


def _run(code: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_metrics_import_neither_explainers_nor_captum_nor_matplotlib():
    loaded = _run(
        """
        import json, sys
        import medexplain.metrics
        from medexplain.metrics import deletion_insertion, peppr  # the public API
        prefixes = ("medexplain.explain", "captum", "matplotlib", "medexplain.report")
        print(json.dumps(sorted(m for m in sys.modules if m.startswith(prefixes))))
        """
    )
    assert loaded == []


def test_no_module_imports_matplotlib_at_import_time():
    """No module of the package, report included (it imports matplotlib inside its
    functions), has an import of matplotlib that runs when the module is imported.

    The check records which module executes each ``import matplotlib...`` statement:
    ``captum.attr`` itself imports ``matplotlib.colors``, so the explainers built on Captum
    load matplotlib through it; that is Captum's import, not one of ours.
    """
    result = _run(
        """
        import builtins, importlib, json, pkgutil
        import medexplain
        culprits, names = set(), []
        original = builtins.__import__

        def spy(name, globals=None, *args, **kwargs):
            importer = (globals or {}).get("__name__", "")
            if name.startswith("matplotlib") and importer.startswith("medexplain"):
                culprits.add(importer)
            return original(name, globals, *args, **kwargs)

        builtins.__import__ = spy
        for info in pkgutil.walk_packages(medexplain.__path__, "medexplain."):
            if info.name.endswith("__main__"):  # runs the command line
                continue
            names.append(info.name)
            importlib.import_module(info.name)
        found = sorted(culprits)
        exec("import matplotlib.figure", {"__name__": "medexplain.probe"})  # the spy works
        print(json.dumps({"culprits": found, "names": names, "probe": sorted(culprits)}))
        """
    )
    assert result["culprits"] == []
    assert result["probe"] == ["medexplain.probe"]
    assert "medexplain.metrics.warp" in result["names"]
    assert "medexplain.report.peppr_plot" in result["names"]


def test_report_figures_keep_the_callers_backend(tmp_path):
    """Drawing chooses no backend: a notebook's (here: pdf) is still active afterwards."""
    backend = _run(
        f"""
        import json
        import matplotlib
        matplotlib.use("pdf")
        import torch
        from medexplain.report.figures import plot_global_maps
        from medexplain.report.warp_plot import plot_warp
        plot_global_maps(torch.rand(1, 8, 8), {{"a": torch.rand(1, 8, 8)}}, r"{tmp_path}/g.png")
        x = torch.rand(1, 1, 8, 8)
        plot_warp(x, x, torch.zeros(1, 2, 8, 8), path=r"{tmp_path}/w.png")
        print(json.dumps(matplotlib.get_backend()))
        """
    )
    assert backend == "pdf"
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
