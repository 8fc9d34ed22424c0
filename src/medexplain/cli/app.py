"""The Typer app, its shared options and the one-line error handling every command uses."""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from ..core.errors import one_line

app = typer.Typer(
    name="medexplain",
    help="Explain image classifiers, medical images first.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
console = Console(stderr=True)


def _print_version(value: bool) -> None:
    if value:
        from medexplain import __version__

        typer.echo(f"medexplain {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Explain image classifiers, medical images first."""


def fail(message: str) -> typer.Exit:
    # escaped: a message may hold brackets Rich would read as markup ("medexplain[ray]")
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


def _show_warning(message, category, *_args, **_kwargs) -> None:
    """A warning as one line on stderr, without the source line that raised it."""
    console.print(f"[yellow]warning:[/yellow] {message}")


def guard(fn):
    """Turn the errors a user causes (bad files, arguments, run folders) into one line on
    stderr and exit code 2, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from ..data.readers import DataError
        from ..models.checkpoint import CheckpointError
        from ..models.external import ModelError
        from ..runs.errors import RunError

        try:
            with warnings.catch_warnings():
                warnings.showwarning = _show_warning
                return fn(*args, **kwargs)
        except (DataError, ModelError, CheckpointError, RunError) as error:
            raise fail(one_line(error)) from None
        except OSError as error:  # a file that cannot be read or written: name it
            raise fail(os_line(error)) from None

    return wrapper


def os_line(error: OSError) -> str:
    """``"cannot write PATH: Permission denied"``-style line for a failed file operation."""
    if error.filename is None:
        return one_line(error)
    target = f"{error.filename} -> {error.filename2}" if error.filename2 else error.filename
    reason = error.strerror or type(error).__name__
    return f"{target}: {reason}"


@contextlib.contextmanager
def holding(run: Path, command: str) -> Iterator[None]:
    """Hold the lock of the run folder ``run`` while ``command`` writes into it; another
    medexplain process writing there (explain, global, evaluate) makes this one refuse."""
    from ..runs.errors import RunError
    from ..runs.settings import open_run

    store, _ = open_run(run)  # RunError when ``run`` holds no run: nothing is created
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(store.lock())
        except RunError:
            raise fail(
                f"{run} is being written by another medexplain process (explain, global or "
                f"evaluate); wait for it to finish, then run `medexplain {command}` again"
            ) from None
        yield


def check_param_names(
    params: dict, known: set[str], what: str, options: dict[str, str] | None = None
) -> None:
    """Refuse a ``--param`` name that ``what`` (``--method saliency``, ``fit ...``) does not
    take, or that one of its own ``options`` (name -> option) sets, before any work."""
    options = options or {}
    for name in params:
        if name in options:
            raise fail(f"--param {name}: use the option {options[name]} of {what}")
        if name not in known:
            choices = ", ".join(sorted(known - set(options))) or "none"
            raise fail(f"--param {name} is not a parameter of {what}; expected one of {choices}")


def explainer_params(cls: type) -> set[str] | None:
    """The keyword parameters of explainer class ``cls`` (its model excluded), or None when
    it takes any keyword (``**params``)."""
    import inspect

    parameters = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return None
    return set(parameters) - {"model"}


def parse_params(values: list[str] | None) -> dict:
    """``key=value`` pairs; values are read as YAML scalars/lists (``n_steps=32``,
    ``baseline=blur``, ``widths=[8,16]``)."""
    import yaml

    params = {}
    for text in values or []:
        if "=" not in text:
            raise typer.BadParameter(f"--param expects key=value, got {text!r}")
        key, value = text.split("=", 1)
        try:
            params[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            params[key.strip()] = value
    return params


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        shape = tuple(int(s) for s in text.lower().replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise typer.BadParameter(
            f"--shape must look like 64,64 or 32x32x32, got {text!r}"
        ) from None
    if len(shape) not in (2, 3):
        raise typer.BadParameter(f"--shape needs 2 or 3 sizes, got {text!r}")
    return shape


ModelOpt = Annotated[
    Path | None,
    typer.Option(help="Model file: TorchScript, state dict (+ --model-factory) or checkpoint."),
]
FactoryOpt = Annotated[
    str | None, typer.Option(help="'module:function' building the network of a state dict.")
]
ConfigOpt = Annotated[
    Path | None, typer.Option(help="Model YAML: labels, activation, input shape/mean/std.")
]
DataOpt = Annotated[Path, typer.Option(help="CSV manifest or folder of images.")]
ShapeOpt = Annotated[
    str | None, typer.Option(help="Resample every image to this shape, e.g. 224,224.")
]


def check_normalise(value: str) -> str:
    """``--normalise``: one of the intensity normalisations of :mod:`medexplain.data`."""
    from ..data.intensity import NORMALISATIONS

    if value not in NORMALISATIONS:
        raise typer.BadParameter(f"expected one of {', '.join(NORMALISATIONS)}, got {value!r}")
    return value


NormaliseOpt = Annotated[
    str,
    typer.Option(
        help="Intensity normalisation: none, minmax, zscore, percentile, range.",
        callback=check_normalise,
    ),
]


def check_device(text: str | None) -> str | None:
    """``--device``: a torch device this machine has (``cpu``, ``cuda``, ``cuda:N``, ``mps``);
    None (an optional ``--device`` not given) passes."""
    import torch

    if text is None:
        return None

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise typer.BadParameter(
            f"{text!r} is not a torch device; expected cpu, cuda or cuda:N (e.g. cuda:0)"
        ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise typer.BadParameter(f"{text}: no CUDA device is available here; use cpu")
        if device.index is not None and device.index >= count:
            raise typer.BadParameter(f"{text}: this machine has {count} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise typer.BadParameter(f"{text}: MPS is not available here; use cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise typer.BadParameter(f"{text}: expected cpu, cuda, cuda:N or mps")
    return text


def check_out_folder(out: Path, option: str = "--out") -> None:
    """Refuse an output folder that is a file, that lies below a file, or whose nearest
    existing folder cannot be written in."""
    for folder in (out, *out.parents):
        if folder.exists():
            if not folder.is_dir():
                where = "is" if folder == out else f"lies below {folder}, which is"
                raise fail(f"{option} {out} {where} a file; expected a folder")
            _check_writable(folder, out, option)
            return


def check_out_file(out: Path, option: str = "--out") -> None:
    """Refuse an output file that is a folder, lies below a file, or cannot be written."""
    if out.is_dir():
        raise fail(f"{option} {out} is a folder; expected a file name")
    for folder in out.parents:
        if folder.exists():
            if not folder.is_dir():
                raise fail(f"{option} {out} lies below {folder}, which is a file")
            _check_writable(folder, out, option)
            return


def _check_writable(folder: Path, out: Path, option: str) -> None:
    """Create and remove a scratch folder in ``folder`` (the nearest existing folder of
    ``out``): permissions, read-only file systems and root's rights all answer honestly."""
    import shutil
    import tempfile

    try:
        shutil.rmtree(tempfile.mkdtemp(prefix=".medexplain-probe-", dir=folder))
    except OSError as error:
        where = "" if folder == out else f" in {folder}"
        reason = error.strerror or type(error).__name__
        raise fail(f"{option} {out}: cannot write{where} ({reason})") from None


def check_channels(value: int | None) -> int | None:
    """``--channels``: 1 (grey) or 3 (RGB), or not given."""
    if value is not None and value not in (1, 3):
        raise typer.BadParameter(f"expected 1 (grey) or 3 (RGB), got {value}")
    return value


ChannelsOpt = Annotated[int | None, typer.Option(help="1: grey, 3: RGB.", callback=check_channels)]
DeviceOpt = Annotated[
    str, typer.Option(help="torch device, e.g. cpu or cuda:0.", callback=check_device)
]
ProgressOpt = Annotated[bool, typer.Option(help="Show progress bars with ETA.")]


def main() -> None:
    """The ``medexplain`` console script."""
    app()
