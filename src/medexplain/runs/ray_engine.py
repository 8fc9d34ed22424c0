"""Runs that outgrow one machine: ``explain``, global maps and the forward passes of
``evaluate`` on a Ray cluster.

The run store does the bookkeeping; Ray only runs the work. The driver (the process that
runs ``medexplain explain --engine ray``) opens the run as the local engine does, splits the
images no chunk holds yet into chunks, numbers them (so two workers never write the same
chunk file) and hands ``(number, [(key, row), ...])`` to Ray actors. Each actor opens the
model, dataset and explainer once, explains a chunk with the local engine's own function
(:meth:`medexplain.runs.explain.ChunkWork.explain_chunk`) and writes it atomically into the
run folder, which every node must see (shared storage). The driver keeps a few chunk numbers
in flight per actor and collects only counts and error lines, so its memory does not grow
with the dataset.

Exactly once: a chunk is done when its file exists. A worker killed mid-chunk leaves at most
a temporary file (removed when the run ends, and at the next start); Ray restarts the actor
and retries its tasks (``max_restarts`` / ``max_task_retries``), and a retried chunk whose
file was already written is not explained again. A killed driver re-run with the same
command scans the chunks and explains only the keys none of them holds; it puts a new token
in ``run.json`` first, and a worker writes a chunk only under its own driver's token, so a
worker of the killed driver that is still running cannot add a second copy of an image.
Global maps are accumulated per worker over a share of the chunks and merged exactly
(:meth:`medexplain.globalmaps.GlobalMaps.merge`). :class:`RayForward` splits each forward
pass of PEPPR and deletion/insertion over actors that hold the model.

Ray is an optional extra (``pip install 'medexplain[ray]'``), imported only here and only
when a Ray engine is used.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.errors import one_line
from ..core.model import model_device
from ..core.progress import progress_bar
from ..globalmaps import GlobalMaps
from .aggregate import add_chunk
from .errors import DamagedChunkError, RunError
from .explain import ChunkWork, explain_run, missing_parts
from .settings import ExplainSettings, make_explainer, open_data, open_model
from .store import RunStore

__all__ = [
    "RayEngine",
    "RayForward",
    "RayOptions",
    "explain_run_ray",
    "import_ray",
    "ray_accumulator",
    "ray_forward",
]

INSTALL = "pip install 'medexplain[ray]'"


def import_ray():
    """The ``ray`` module, or a RunError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise RunError(f"--engine ray needs Ray, which is not installed: {INSTALL}") from None
    return ray


@dataclass
class RayOptions:
    """Where and how wide a Ray run is.

    ``address``: None starts a Ray on this machine (stopped at the end); ``"auto"`` joins the
    cluster this node belongs to (``ray start``); ``"ray://host:10001"`` connects a client.
    ``workers``: actors (None: as many as the cluster's CPUs, or GPUs with
    ``gpus_per_worker``, allow). ``threads``: torch threads and CPUs each actor reserves.
    ``in_flight``: chunks queued per actor. ``max_restarts``: how often a dead actor is
    restarted (its unfinished chunks are retried as often).
    """

    address: str | None = None
    workers: int | None = None
    gpus_per_worker: float = 0.0
    threads: int = 1
    in_flight: int = 2
    max_restarts: int = 3

    def check(self) -> None:
        """Refuse out-of-range options (RunError naming the option)."""
        if self.workers is not None and (isinstance(self.workers, bool) or self.workers < 1):
            raise RunError(f"--workers must be a whole number >= 1, got {self.workers}")
        if not self.gpus_per_worker >= 0:
            raise RunError(f"--gpus-per-worker must be >= 0, got {self.gpus_per_worker}")
        if self.threads < 1 or self.in_flight < 1 or self.max_restarts < 0:
            raise RunError("Ray threads and in-flight chunks must be >= 1, restarts >= 0")


class _Session:
    """Ray for the duration of a ``with``: joins the Ray this process already runs, else
    starts one (``address`` None) or connects to a cluster. A Ray it starts stays up until
    the process ends (Ray stops it at exit), so the global maps after ``explain`` reuse it."""

    def __init__(self, options: RayOptions) -> None:
        self.options = options
        self.ray = import_ray()

    def __enter__(self) -> _Session:
        ray = self.ray
        if not ray.is_initialized():
            try:
                ray.init(
                    address=self.options.address,
                    include_dashboard=False,
                    log_to_driver=False,
                    logging_level=logging.WARNING,
                )
            except (ConnectionError, RuntimeError, ValueError) as error:
                where = self.options.address or "a local Ray"
                raise RunError(
                    f"--address {where}: cannot start or join Ray: {one_line(error)}"
                ) from None
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def width(self, jobs: int) -> int:
        """How many actors: ``workers``, else what the cluster's resources hold; never more
        than there are jobs."""
        options = self.options
        if options.workers is not None:
            return max(1, min(options.workers, jobs))
        resources = self.ray.cluster_resources()
        fit = int(resources.get("CPU", 1) // options.threads)
        if options.gpus_per_worker > 0:
            fit = min(fit, int(resources.get("GPU", 0) // options.gpus_per_worker))
        return max(1, min(fit, jobs))


#: The ``run.json`` entry naming the driver that numbers the run's chunks now.
DRIVER = "ray_driver"


class _DriverStore(RunStore):
    """The run store as a worker writes it: a chunk is written only while the driver that
    numbered it still owns the run (its token in ``run.json``), so the workers of a killed
    driver cannot add chunks beside those of the driver that resumed the run."""

    def __init__(self, root: str | os.PathLike, token: str) -> None:
        super().__init__(root)
        self.token = token

    def write_chunk(self, chunk) -> Path:
        if self.record().get(DRIVER) != self.token:
            raise RunError(
                f"{self.root} is now written by another driver; chunk {chunk.number} of the "
                "previous one was not written"
            )
        return super().write_chunk(chunk)


class _ChunkActor:
    """A Ray actor: the run's model, dataset and explainer opened once, then chunks."""

    def __init__(
        self,
        settings: ExplainSettings,
        root: str,
        shapes: tuple[tuple[int, ...], int],
        threads: int,
        token: str,
    ) -> None:
        torch.set_num_threads(threads)
        spatial, outputs = shapes
        model = open_model(settings)
        dataset = open_data(settings, model)
        explainer = make_explainer(settings, model)
        self.work = ChunkWork(model, dataset, explainer, settings, spatial, outputs)
        self.store = _DriverStore(root, token)

    def pid(self) -> int:
        return os.getpid()

    def explain_chunk(
        self, number: int, part: list[tuple[str, int]]
    ) -> tuple[int, int, list[tuple[int, str, str, str]]]:
        """``(number, images explained, errors)``; a chunk already on disk with these keys
        (a retried task whose first attempt wrote it) is not explained again."""
        if self.store.chunk_path(number).is_file():
            try:
                chunk = self.store.read_chunk(number, maps=False)
            except DamagedChunkError:
                chunk = None
            if chunk is not None and chunk.finished == {key for key, _ in part}:
                return number, len(chunk), chunk.errors
        n_done, errors = self.work.explain_chunk(self.store, number, part)
        return number, n_done, errors


def _check_device(settings: ExplainSettings, options: RayOptions) -> None:
    """A GPU device needs GPUs reserved: Ray hides the GPUs from an actor that reserves none."""
    if str(settings.device).startswith("cuda") and options.gpus_per_worker <= 0:
        raise RunError(
            f"--device {settings.device} with --engine ray needs --gpus-per-worker (e.g. 1): "
            "Ray shows no GPU to a worker that reserves none"
        )


def _worker_error(error: BaseException, what: str) -> RunError:
    """A Ray failure as one line: the worker's own error when it raised one."""
    cause = getattr(error, "cause", None)
    detail = one_line(cause) if isinstance(cause, BaseException) else one_line(error)
    return RunError(f"a Ray worker failed on {what}: {detail}")


class RayEngine:
    """Fills a run's missing chunks on Ray actors (``explain_run(..., engine=RayEngine())``)."""

    def __init__(self, options: RayOptions | None = None) -> None:
        self.options = options or RayOptions()
        self.options.check()
        #: The actors of the current run and their process ids (Ray restarts an actor in
        #: a new process: these are the first ones).
        self.actors: list[Any] = []
        self.pids: list[int] = []

    def _start_actors(self, session: _Session, n: int, settings, root: str, run) -> list[Any]:
        options = self.options
        actor_class = session.ray.remote(_ChunkActor).options(
            num_cpus=options.threads,
            num_gpus=options.gpus_per_worker,
            max_restarts=options.max_restarts,
            max_task_retries=options.max_restarts,
        )
        shapes, threads = (run.spatial, run.outputs), options.threads
        token = uuid.uuid4().hex
        RunStore(root).update_record(**{DRIVER: token})  # the old driver's workers stop
        actors = [actor_class.remote(settings, root, shapes, threads, token) for _ in range(n)]
        try:  # waits until each actor has opened the model: a worker that cannot is named
            self.pids = session.ray.get([actor.pid.remote() for actor in actors])
        except session.ray.exceptions.RayError as error:
            for actor in actors:
                session.ray.kill(actor, no_restart=True)
            raise _worker_error(error, "opening the model, data and explainer") from None
        return actors

    def explain_missing(
        self, store: RunStore, run, settings: ExplainSettings, done_keys: set[str], progress, log
    ) -> int:
        """Explain the keys no chunk holds, chunk by chunk on Ray actors; returns how many
        images were explained (the engine interface of :func:`explain_run`)."""
        _check_device(settings, self.options)
        settled, parts = missing_parts(run, done_keys)
        if not parts:
            return 0
        first = store.next_chunk_number()
        jobs = [(first + i, part) for i, part in enumerate(parts)]
        root = str(Path(store.root).resolve())
        computed = 0
        with _Session(self.options) as session, progress_bar(progress) as bar:
            ray = session.ray
            task = bar.add_task(f"{settings.method:>16}", total=len(run.keys))
            bar.advance(task, settled)
            self.actors = self._start_actors(session, session.width(len(jobs)), settings, root, run)
            pending: dict[Any, tuple[Any, int]] = {}
            queue = iter(jobs)

            def submit(actor) -> None:
                job = next(queue, None)
                if job is not None:
                    pending[actor.explain_chunk.remote(*job)] = (actor, job[0])

            for actor in self.actors:
                for _ in range(self.options.in_flight):
                    submit(actor)
            try:
                while pending:
                    [ref], _ = ray.wait(list(pending), num_returns=1)
                    actor, number = pending.pop(ref)
                    try:
                        _, n_done, errors = ray.get(ref)
                    except ray.exceptions.RayError as error:
                        raise _worker_error(error, f"chunk {number}") from None
                    computed += n_done
                    for row, path, reason, _ in errors:
                        log(f"skipped image {row} ({path}): {reason}")
                    bar.advance(task, n_done + len(errors))
                    submit(actor)
            finally:
                for actor in self.actors:
                    ray.kill(actor, no_restart=True)
                self.actors = []
                store.remove_partial()  # what a worker killed mid-write left
        return computed


def explain_run_ray(
    settings: ExplainSettings,
    out: str | Path,
    options: RayOptions | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """:func:`medexplain.runs.explain_run` with the chunks explained on Ray actors (same
    arguments, same summary, same run folder)."""
    return explain_run(settings, out, engine=RayEngine(options), **kwargs)


# ---------------------------------------------------------------------------- global maps


def _accumulate_share(
    root: str, settings: dict[str, Any], share: Sequence[tuple[int, list[int], list[int]]]
) -> dict[str, Any]:
    """One worker's chunks streamed into a :class:`GlobalMaps`; its state dict."""
    torch.set_num_threads(1)
    store = RunStore(root)
    acc = GlobalMaps(**settings)
    for number, rows, index in share:
        chunk = store.read_chunk(number).subset(rows, index)
        add_chunk(acc, chunk, settings["multilabel"])
    return acc.state_dict()


def ray_accumulator(options: RayOptions | None = None):
    """An ``accumulator`` for :func:`medexplain.runs.global_run`: the run's chunks dealt out
    to Ray tasks in contiguous shares, each streamed into its own accumulator, the states
    merged on the driver (exact: per-group count, mean and M2 combine without loss)."""
    options = options or RayOptions()
    options.check()

    def accumulate_on_ray(
        store: RunStore, record: dict[str, Any], kinds, normalise: str, transform: str
    ) -> GlobalMaps:
        settings = dict(
            spatial_shape=record["spatial_shape"],
            class_names=record["class_names"],
            normalise=normalise,
            transform=transform,
            multilabel=record["multilabel"],
            kinds=tuple(kinds),
        )
        plan = store.chunk_plan()
        acc = GlobalMaps(**settings)
        if not plan:
            raise RunError(f"{store.root} holds no explained image yet; run explain first")
        root = str(Path(store.root).resolve())
        with _Session(options) as session:
            ray = session.ray
            n = session.width(len(plan))
            step = -(-len(plan) // n)
            task = ray.remote(_accumulate_share).options(num_cpus=options.threads, max_retries=3)
            refs = [
                task.remote(root, settings, plan[i : i + step]) for i in range(0, len(plan), step)
            ]
            for ref in refs:
                try:
                    state = ray.get(ref)
                except ray.exceptions.RayError as error:
                    raise _worker_error(error, "global maps") from None
                acc = acc.merge(GlobalMaps.from_state_dict(state))
        if acc.count == 0:
            raise RunError(f"{store.root} holds no explained image yet; run explain first")
        return acc

    return accumulate_on_ray


# ---------------------------------------------------------------------------- evaluation


class _ForwardActor:
    """A Ray actor holding the run's classifier: forward passes of the images it is sent."""

    def __init__(self, settings: ExplainSettings, threads: int) -> None:
        torch.set_num_threads(threads)
        self.model = open_model(settings).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x.to(model_device(self.model))).cpu()


class RayForward(torch.nn.Module):
    """The run's classifier with each forward pass split over Ray actors (each holding its
    own copy of the model): ``(B, C, *S) -> (B, K)``, the rows of ``B`` dealt out in
    contiguous parts and put back in order. For the forward-only metrics (PEPPR,
    deletion/insertion), whose cost is the model's passes. An input that needs gradients is
    run by the local ``model`` (a remote output carries no graph). ``calls``: remote passes."""

    def __init__(self, model: torch.nn.Module, actors: list[Any], ray: Any) -> None:
        super().__init__()
        self.model = model  # the local copy: device, parameters, attributes, gradients
        self._actors, self._ray = actors, ray
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            return self.model(x)
        parts = [p for p in torch.tensor_split(x.detach().cpu(), len(self._actors)) if len(p)]
        refs = [a.forward.remote(p) for a, p in zip(self._actors, parts)]
        try:
            outputs = self._ray.get(refs)
        except self._ray.exceptions.RayError as error:
            raise _worker_error(error, "a forward pass") from None
        self.calls += len(refs)
        return torch.cat(outputs).to(x.device)


def ray_forward(options: RayOptions | None = None):
    """A ``forward`` for :func:`medexplain.runs.evaluate_run`: ``(model, settings) ->``
    :class:`RayForward` over ``options.workers`` actors (Ray started or joined as for
    ``explain``). The actors end when the returned model is no longer referenced."""
    options = options or RayOptions()
    options.check()

    def make(model: torch.nn.Module, settings: ExplainSettings) -> RayForward:
        _check_device(settings, options)
        with _Session(options) as session:
            ray = session.ray
            actor_class = ray.remote(_ForwardActor).options(
                num_cpus=options.threads,
                num_gpus=options.gpus_per_worker,
                max_restarts=options.max_restarts,
                max_task_retries=options.max_restarts,
            )
            n = session.width(10**9)
            actors = [actor_class.remote(settings, options.threads) for _ in range(n)]
        return RayForward(model, actors, ray)

    return make
