"""Reports in a real browser: headless Chromium (the system's executable, driven by
Playwright) opens a 2D run report, a 3D run report and a demo report from file:// URLs.

Checked: every <img> decodes, the page requests nothing but itself and data: URLs, the
group switch changes the map drawn, each 3D slice slider reaches every slice and the views
show the volume in the orientation their letters state (a bright block placed left,
anterior and superior appears at the left, top of the axial view, ...). Screenshots go into
the test's temporary folder.
"""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medexplain.models.checkpoint import save_checkpoint
from medexplain.models.cnn import CNNConfig, build_classifier
from medexplain.runs import ExplainSettings, explain_run, report_run
from report_data import write_two_class_images


def _chromium() -> str | None:
    for candidate in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None


CHROMIUM = _chromium()
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium executable (install the system package 'chromium')"
)

#: The 3D runs' volumes: (X, Y, Z) in RAS voxel order, and the bright block of class b.
SHAPE3D = (16, 20, 12)
BLOCK = (slice(2, 6), slice(13, 18), slice(7, 11))  # left, anterior, superior


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


def _model(path: Path, dims: int) -> Path:
    net = build_classifier(CNNConfig(spatial_dims=dims, num_classes=2, widths=(4,), norm="none"))
    save_checkpoint(path, net, extra={"class_names": ["a", "b"]})
    return path


@pytest.fixture(scope="module")
def run2d(tmp_path_factory) -> Path:
    """16 images 16x16 (class b brighter on the left), a tiny CNN, saliency, report."""
    root = tmp_path_factory.mktemp("browser2d")
    write_two_class_images(root)
    settings = ExplainSettings(
        data=str(root / "data.csv"), method="saliency", model=str(_model(root / "m.pt", 2))
    )
    explain_run(settings, root / "run", progress=False, log=lambda *_: None)
    return report_run(root / "run", log=lambda *_: None)


@pytest.fixture(scope="module")
def run3d(tmp_path_factory) -> Path:
    """12 RAS volumes 16x20x12 (2 mm), class b with a bright block left-anterior-superior."""
    root = tmp_path_factory.mktemp("browser3d")
    rng = np.random.default_rng(1)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    rows = ["path,label"]
    for i in range(12):
        label = "ab"[i % 2]
        volume = rng.normal(0, 0.1, SHAPE3D).astype(np.float32)
        if label == "b":
            volume[BLOCK] += 3.0
        nib.save(nib.Nifti1Image(volume, affine), str(root / f"v{i}.nii.gz"))
        rows.append(f"v{i}.nii.gz,{label}")
    (root / "data.csv").write_text("\n".join(rows) + "\n")
    settings = ExplainSettings(
        data=str(root / "data.csv"), method="saliency", model=str(_model(root / "m.pt", 3))
    )
    explain_run(settings, root / "run", progress=False, log=lambda *_: None)
    return report_run(root / "run", log=lambda *_: None)


def _open(browser, path: Path, shots: Path, name: str):
    """The page at ``file://path`` and every URL it requested."""
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    requests: list[str] = []
    problems: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.goto(path.resolve().as_uri(), wait_until="load")
    page.screenshot(path=str(shots / f"{name}.png"), full_page=True)
    assert not problems, problems
    return page, requests


def _check_images_and_requests(page, requests: list[str], path: Path) -> None:
    images = page.evaluate(
        "Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt])"
    )
    assert len(images) >= 5
    broken = [alt for complete, width, alt in images if not (complete and width > 0)]
    assert not broken, f"images that did not load: {broken}"
    others = [u for u in requests if not u.startswith("data:") and u != path.resolve().as_uri()]
    assert not others, f"the page requested {others}"


def _canvas(page, view: str) -> np.ndarray:
    """The pixels ``(H, W, 4)`` of a viewer canvas, read back from the browser."""
    width, height, text = page.evaluate(
        """view => { const c = document.querySelector(`canvas[data-view='${view}']`);
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let s = ''; for (let i = 0; i < d.length; i += 8192)
          s += String.fromCharCode.apply(null, d.subarray(i, i + 8192));
        return [c.width, c.height, btoa(s)]; }""",
        view,
    )
    flat = np.frombuffer(base64.b64decode(text), dtype=np.uint8)
    return flat.reshape(height, width, 4)


def _set(page, role: str, value) -> None:
    page.evaluate(
        """([role, value]) => { const e = document.querySelector(`[data-role='${role}']`);
        e.value = value; e.dispatchEvent(new Event(e.tagName === 'SELECT' ? 'change' : 'input'));
        }""",
        [role, str(value)],
    )


def _groups(page) -> list[str]:
    return page.evaluate(
        "Array.from(document.querySelector(\"[data-role='group']\").options).map(o => o.value)"
    )


def _switch_changes_map(page, view: str) -> None:
    groups = _groups(page)
    label_a = next(g for g in groups if g.startswith("label: a"))
    label_b = next(g for g in groups if g.startswith("label: b"))
    _set(page, "group", label_a)
    before = _canvas(page, view)
    _set(page, "group", label_b)
    after = _canvas(page, view)
    assert before.shape == after.shape and (before != after).any()


def test_2d_run_report_in_chromium(browser, run2d, tmp_path):
    page, requests = _open(browser, run2d, tmp_path, "run2d")
    _check_images_and_requests(page, requests, run2d)
    _switch_changes_map(page, "image")
    # Opacity 0 shows the mean image alone: the class-b block (rows 4-11, columns 2-7 of
    # the 16x16 images, in half the images) is brighter than the rest, where it lies.
    _set(page, "opacity", 0)
    pixels = _canvas(page, "image")[..., 0].astype(float)
    scale = pixels.shape[0] // 16
    cell = pixels.reshape(16, scale, 16, scale).mean(axis=(1, 3))
    inside = np.zeros((16, 16), bool)
    inside[4:12, 2:8] = True
    assert cell[inside].min() > cell[~inside].max()
    # an example image is drawn over itself, not over the mean image
    example = next(g for g in _groups(page) if g.startswith("image #"))
    _set(page, "group", example)
    assert (_canvas(page, "image") != pixels[..., None]).any()
    own = _canvas(page, "image")[..., 0].astype(float).reshape(16, scale, 16, scale).mean((1, 3))
    row = int(example.split("#")[1].split()[0])
    image = np.load(run2d.parent.parent / f"i{row:02d}.npy")
    assert np.corrcoef(own.ravel(), image.ravel())[0, 1] > 0.9
    page.close()


def _view_cell(pixels: np.ndarray, n_cols: int, n_rows: int) -> np.ndarray:
    """Canvas pixels ``(H, W)`` averaged per voxel cell ``(n_rows, n_cols)``."""
    scale = pixels.shape[1] // n_cols
    return pixels.reshape(n_rows, scale, n_cols, scale).mean(axis=(1, 3))


def test_3d_run_report_in_chromium(browser, run3d, tmp_path):
    page, requests = _open(browser, run3d, tmp_path, "run3d")
    _check_images_and_requests(page, requests, run3d)
    text = page.inner_text("body")
    for view in ("axial", "coronal", "sagittal"):
        assert view in text
    _switch_changes_map(page, "axial")
    # Each slider reaches every slice: the view says which, and every step redraws it.
    sizes = {"sagittal": SHAPE3D[0], "coronal": SHAPE3D[1], "axial": SHAPE3D[2]}
    for view, size in sizes.items():
        bounds = page.evaluate(
            f"(() => {{ const s = document.querySelector(\"[data-slider='{view}']\");"
            " return [Number(s.min), Number(s.max)]; })()"
        )
        assert bounds == [0, size - 1]
        previous = None
        for index in range(size):
            page.evaluate(
                f"(() => {{ const s = document.querySelector(\"[data-slider='{view}']\");"
                f" s.value = {index}; s.dispatchEvent(new Event('input')); }})()"
            )
            shown = page.get_attribute(f"canvas[data-view='{view}']", "data-slice")
            assert shown == str(index)
            pixels = _canvas(page, view)
            assert previous is None or (pixels != previous).any()
            previous = pixels
    # Orientation: the block (x 2-5 left, y 13-17 anterior, z 7-10 superior) of the mean
    # image, shown alone (opacity 0), through slices that cut it.
    _set(page, "opacity", 0)
    x, y, z = 3, 15, 8
    for view, index in (("sagittal", x), ("coronal", y), ("axial", z)):
        page.evaluate(
            f"(() => {{ const s = document.querySelector(\"[data-slider='{view}']\");"
            f" s.value = {index}; s.dispatchEvent(new Event('input')); }})()"
        )
    axial = _view_cell(_canvas(page, "axial")[..., 0].astype(float), 16, 20)  # cols x, rows y
    coronal = _view_cell(_canvas(page, "coronal")[..., 0].astype(float), 16, 12)  # x, z
    sagittal = _view_cell(_canvas(page, "sagittal")[..., 0].astype(float), 20, 12)  # y, z
    # row r shows the voxel n_rows - 1 - r (the positive end, A or S, at the top)
    assert axial[20 - 1 - y, x] > 2 * axial[20 - 1 - (19 - y), 15 - x]
    assert coronal[12 - 1 - z, x] > 2 * coronal[12 - 1 - (11 - z), 15 - x]
    assert sagittal[12 - 1 - z, y] > 2 * sagittal[12 - 1 - (11 - z), 19 - y]
    page.locator("[data-mx-viewer]").screenshot(path=str(tmp_path / "run3d_viewer.png"))
    page.close()


@pytest.mark.slow
def test_demo_report_in_chromium(browser, tmp_path):
    from medexplain.demo import DemoSettings, run_demo

    settings = DemoSettings.for_run(
        dims=2,
        quick=True,
        n_images=150,
        train_epochs=1,
        n_explain=12,
        n_peppr=8,
        n_deletion=2,
        n_sanity=1,
        peppr_steps=3,
        peppr_seeds=1,
        sag_images=0,
        methods=("saliency", "gradcam"),
    )
    run_demo(tmp_path / "demo", settings, progress=False)
    path = tmp_path / "demo" / "report.html"
    page, requests = _open(browser, path, tmp_path, "demo")
    _check_images_and_requests(page, requests, path)
    methods = page.evaluate(
        "Array.from(document.querySelector(\"[data-role='method']\").options).map(o => o.value)"
    )
    assert methods == ["saliency", "gradcam"]
    groups = _groups(page)
    first, second = groups[0], groups[1]
    _set(page, "group", first)
    before = _canvas(page, "image")
    _set(page, "group", second)
    assert (_canvas(page, "image") != before).any()
    page.close()
