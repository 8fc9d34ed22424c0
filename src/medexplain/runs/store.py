"""The on-disk store of a resumable run: per-image maps in atomic chunks plus a manifest.

Layout of a run folder ``RUN``::

    RUN/run.json             settings of the command, model and dataset description
    RUN/chunks/000012.npz    one file per chunk of explained images
    RUN/selection.npz        keys (and manifest rows) of the images the run covers now
    RUN/mean_image.npz       mean image of the selection (when chunks alone cannot give it)
    RUN/errors.csv           index, path, reason of every image that could not be explained
    RUN/items.csv            index, path, label, prediction, target, scores of done images
    RUN/xnn.csv              per-image x-features and contributions of an XNN run
    RUN/maps/*.nii.gz        per-image maps as NIfTI (3D, or 2D when asked; nifti_maps.py)
    RUN/.lock                held (flock) while a process writes the run

Every image is identified by a **key** (:func:`medexplain.data.manifest.record_key`:
its absolute path, the file's size and modification time, its label, flip and mask), not by
its row in the manifest; a chunk (:mod:`medexplain.runs.chunk`) holds explained images by key.

A chunk is written to a temporary name, flushed, fsynced and moved into place with
:func:`os.replace`, so at any instant a chunk is either absent or complete: a run killed at
any point and started again explains only the keys no chunk holds and never counts an image
twice. A reordered, extended or shortened manifest resumes by key; a changed file gets a new
key and is explained again. The **selection** says which stored keys the run covers now (the
manifest's rows, first occurrence of a duplicate); every view (:meth:`RunStore.iter_chunks`,
``errors.csv``, ``items.csv``, the mean image) shows the selection only, with the current
manifest rows as ``index``. Keys no longer selected stay on disk, so a shortened run loses no
computed map. ``errors.csv`` and ``items.csv`` are views rebuilt from the chunks; the chunks
are the only truth.

Only what medexplain wrote is ever deleted: :meth:`RunStore.clear` removes the names listed in
:data:`RUN_FILES` and nothing else, and a folder without a ``run.json`` of this format is
never cleared.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_write, atomic_write_text
from .chunk import Chunk, array_digest, selected_rows
from .errors import DamagedChunkError, RunError
from .tables import cell, csv_text

__all__ = ["RUN_FILES", "RunStore"]

FORMAT = "medexplain.run"

VERSION = 2


_CHUNK_NAME = re.compile(r"^(\d{6,})\.npz$")


#: Everything medexplain writes in a run folder; :meth:`RunStore.clear` deletes these only.
RUN_FILES = (
    "run.json",
    "chunks",
    "selection.npz",
    "mean_image.npz",
    "errors.csv",
    "items.csv",
    "xnn.csv",
    "maps",
    "global",
    "figures",
    "evaluation.json",
    "peppr.json",
    "report.html",
)


def _plain(value: Any) -> Any:
    """JSON round trip, so a record compares equal to what run.json holds."""
    return json.loads(json.dumps(value, default=str))


def _inside(path: Path, folder: Path) -> bool:
    """True when ``path`` is ``folder`` or lies below it (both resolved)."""
    return path == folder or folder in path.parents


class RunStore:
    """A run folder (module docstring). ``RunStore(root)`` opens or prepares ``root``;
    :meth:`initialise` writes or checks ``run.json``."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.chunk_dir = self.root / "chunks"
        self._selection: dict[str, int] | None = None
        self._selection_loaded = False

    # ------------------------------------------------------------------ manifest

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def exists(self) -> bool:
        """True when the folder holds a medexplain run (its ``run.json`` marker)."""
        if not self.run_json.is_file():
            return False
        try:
            return json.loads(self.run_json.read_text(encoding="utf-8")).get("format") == FORMAT
        except (OSError, ValueError, AttributeError):
            return False

    def record(self) -> dict[str, Any]:
        """The contents of ``run.json`` (RunError if the folder holds no run)."""
        if not self.run_json.is_file():
            raise RunError(f"{self.root} is not a medexplain run (no run.json); run explain first")
        try:
            record = json.loads(self.run_json.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise RunError(f"cannot read {self.run_json}: {error}") from error
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise RunError(f"{self.run_json} is not a medexplain run manifest")
        if record.get("version") != VERSION:
            raise RunError(
                f"{self.root} was written by another medexplain version (run format "
                f"{record.get('version')}, this one reads {VERSION}); explain into a new --out"
            )
        return record

    def check_inputs(self, inputs: Iterable[str | os.PathLike]) -> None:
        """Refuse a run folder that equals or contains an input, or lies inside an input
        folder (the data would be read from, or written into, the run).

        Raises RunError naming the input, before anything is written.
        """
        inputs = [value for value in inputs if value is not None]
        self.check_files(inputs)
        root = self.root.resolve()
        for value in inputs:
            path = Path(value).resolve()
            if path.is_dir() and _inside(root, path):
                raise RunError(
                    f"--out {self.root} lies inside the input folder {value}; choose a run "
                    "folder outside the data"
                )

    def check_files(self, paths: Iterable[str | os.PathLike]) -> None:
        """Refuse a run folder that equals or contains any of ``paths`` (inputs, the images
        and masks of a manifest): a textual check on absolute paths, cheap for many files."""
        root = str(self.root.resolve())
        prefix = root.rstrip(os.sep) + os.sep
        for value in paths:
            path = os.path.realpath(value) if os.path.islink(value) else os.path.abspath(value)
            if path == root or path.startswith(prefix):
                raise RunError(
                    f"--out {self.root} contains the input {value}; a run folder must be a "
                    "folder of its own, outside the data, model and checkpoints"
                )

    def initialise_check(self) -> None:
        """What :meth:`initialise` checks before writing anything: ``root`` is a folder that
        is absent, empty, or a readable run of this version (RunError otherwise)."""
        if self.root.exists() and not self.root.is_dir():
            raise RunError(f"--out {self.root} is a file; expected a run folder")
        if self.run_json.is_file():
            self.record()
        elif self.root.is_dir():
            names = sorted(p.name for p in self.root.iterdir() if p.name != ".lock")
            if names:
                raise RunError(
                    f"{self.root} exists and is not a medexplain run (it holds {names[:3]}); "
                    "medexplain never writes into or deletes such a folder: choose a new or "
                    "empty --out"
                )

    def initialise(
        self,
        record: Mapping[str, Any],
        identity: Mapping[str, Any],
        overwrite: bool = False,
        inputs: Iterable[str | os.PathLike] = (),
    ) -> dict[str, Any]:
        """Start a new run or check that ``identity`` matches the existing one.

        ``identity``: the settings that decide the maps (model hash, data, method, params,
        target, chunk size...). On an existing run any difference raises :class:`RunError`
        naming the differing keys, unless ``overwrite`` (then what medexplain wrote in the
        old run is deleted, :meth:`clear`). A folder that exists, is not empty and holds no
        run is refused with or without ``overwrite``. ``inputs`` (data, manifest, model,
        checkpoints) are checked with :meth:`check_inputs` first. Returns the run record.
        """
        self.check_inputs(inputs)
        identity = _plain(dict(identity))
        if self.run_json.is_file():
            old = self.record()
            old_identity = old.get("identity", {})
            differences = sorted(
                key
                for key in set(identity) | set(old_identity)
                if identity.get(key) != old_identity.get(key)
            )
            if not differences:
                return old
            if not overwrite:
                detail = "; ".join(
                    f"{k}: run has {old_identity.get(k)!r}, now {identity.get(k)!r}"
                    for k in differences[:4]
                )
                raise RunError(
                    f"{self.root} holds a run with different settings ({detail}); use the same "
                    "settings to resume, another --out, or --overwrite to replace this run"
                )
            self.clear()
        else:
            self.initialise_check()
        full = {"format": FORMAT, "version": VERSION, **_plain(dict(record))}
        full["identity"] = identity
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_json, json.dumps(full, indent=2))
        return full

    def update_record(self, **values: Any) -> None:
        """Add or replace top-level entries of ``run.json`` (atomic)."""
        record = self.record()
        record.update(_plain(values))
        atomic_write_text(self.run_json, json.dumps(record, indent=2))

    def clear(self) -> None:
        """Delete what medexplain wrote in the run folder (:data:`RUN_FILES`) and nothing
        else; RunError when the folder holds no run."""
        if not self.exists:
            raise RunError(f"{self.root} is not a medexplain run; nothing was deleted")
        for name in RUN_FILES:
            child = self.root / name
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            elif child.exists() or child.is_symlink():
                child.unlink()
        self._selection_loaded = False

    # ------------------------------------------------------------------ locking

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold an exclusive lock on the run while writing (released even on SIGKILL)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunError(
                    f"{self.root} is being written by another medexplain process; wait for it "
                    "or use another --out"
                ) from None
            yield

    # ------------------------------------------------------------------ selection

    @property
    def selection_path(self) -> Path:
        return self.root / "selection.npz"

    def write_selection(self, keys: Sequence[str], rows: Sequence[int]) -> None:
        """Record the keys the run covers now and their manifest rows (atomic)."""
        arrays = {
            "key": np.asarray(list(keys), dtype=np.str_),
            "index": np.asarray(list(rows), dtype=np.int64),
        }
        atomic_write(self.selection_path, lambda handle: np.savez(handle, **arrays))
        self._selection = {str(k): int(i) for k, i in zip(arrays["key"], arrays["index"])}
        self._selection_loaded = True

    def selection(self) -> dict[str, int] | None:
        """``key -> manifest row`` of the images the run covers (None: every stored image)."""
        if not self._selection_loaded:
            self._selection = None
            if self.selection_path.is_file():
                try:
                    with np.load(self.selection_path, allow_pickle=False) as data:
                        keys, rows = data["key"], data["index"]
                except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
                    raise RunError(f"cannot read {self.selection_path}: {error}") from error
                self._selection = {str(k): int(i) for k, i in zip(keys, rows)}
            self._selection_loaded = True
        return self._selection

    def selection_digest(self) -> str:
        """SHA-256 of the selected keys and rows (identifies one state of the run)."""
        selection = self.selection() or {}
        h = hashlib.sha256()
        for key, row in sorted(selection.items()):
            h.update(f"{key}\t{row}\n".encode())
        return h.hexdigest()

    # ------------------------------------------------------------------ chunks

    def chunk_path(self, number: int) -> Path:
        return self.chunk_dir / f"{number:06d}.npz"

    def chunk_numbers(self) -> list[int]:
        """Numbers of the complete chunks on disk, ascending (temporary files ignored)."""
        if not self.chunk_dir.is_dir():
            return []
        found = (_CHUNK_NAME.match(p.name) for p in self.chunk_dir.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def next_chunk_number(self) -> int:
        numbers = self.chunk_numbers()
        return numbers[-1] + 1 if numbers else 0

    def remove_partial(self) -> int:
        """Delete temporary files a killed writer left behind; returns how many."""
        if not self.chunk_dir.is_dir():
            return 0
        stale = [p for p in self.chunk_dir.iterdir() if p.name.endswith(".tmp")]
        for p in stale:
            p.unlink(missing_ok=True)
        return len(stale)

    def read_chunk(self, number: int, maps: bool = True) -> Chunk:
        """Load chunk ``number`` (``maps=False`` skips the maps: an empty array instead),
        checking each array read against its stored digest (DamagedChunkError)."""
        path = self.chunk_path(number)
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files if maps or not k.endswith("maps")}
        except FileNotFoundError as error:
            raise RunError(f"chunk {path} does not exist") from error
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as error:
            raise DamagedChunkError(path, f"{type(error).__name__}: {error}") from error
        if "digests" in arrays:
            try:
                digests = json.loads(str(arrays.pop("digests")))
            except ValueError as error:
                raise DamagedChunkError(path, "unreadable checksums") from error
            for name, array in arrays.items():
                if digests.get(name) != array_digest(array):
                    raise DamagedChunkError(path, f"checksum of '{name}' does not match")
        if not maps:
            arrays["maps"] = np.empty((0,), dtype=np.float32)
        try:
            return Chunk.from_arrays(number, arrays)
        except KeyError as error:
            raise DamagedChunkError(path, f"missing array {error}") from error

    def write_chunk(self, chunk: Chunk) -> Path:
        """Write ``chunk`` atomically (replaces an older version of the same chunk)."""
        arrays = chunk.to_arrays()
        return atomic_write(
            self.chunk_path(chunk.number), lambda handle: np.savez(handle, **arrays)
        )

    def scan(self, log=print) -> set[str]:
        """Read every chunk once, maps included: move each damaged one to
        ``chunks/damaged/`` (its images are then explained again) and return the keys the
        intact chunks settled (explained or failed), selected or not."""
        keys: set[str] = set()
        for number in self.chunk_numbers():
            try:
                keys |= self.read_chunk(number, maps=True).finished
            except DamagedChunkError as error:
                target = self.chunk_dir / "damaged" / f"{number:06d}.{time.time_ns()}.npz"
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(error.path, target)
                log(f"{error.path} is damaged; moved to {target}, its images are explained again")
        return keys

    def iter_chunks(self, maps: bool = True, selected: bool = True) -> Iterator[Chunk]:
        """Complete chunks in chunk order; with ``selected`` (default) restricted to the
        selection, ``index`` being the current manifest row, each key once."""
        selection = self.selection() if selected else None
        seen: set[str] = set()
        for number in self.chunk_numbers():
            chunk = self.read_chunk(number, maps=maps)
            if selection is None:
                yield chunk
                continue
            rows, index, errors = selected_rows(chunk, selection, seen)
            out = chunk.subset(rows, index)
            out.errors = errors
            yield out

    def chunk_plan(self) -> list[tuple[int, list[int], list[int]]]:
        """``(chunk number, rows of the chunk, their manifest rows)`` of the chunks
        :meth:`iter_chunks` shows (the selection, each key once: its first chunk), for
        callers that read the chunks elsewhere. Reads no maps."""
        selection, seen, plan = self.selection(), set(), []
        for number in self.chunk_numbers():
            chunk = self.read_chunk(number, maps=False)
            if selection is None:
                rows, index = list(range(len(chunk))), [int(i) for i in chunk.index]
            else:
                rows, index, _ = selected_rows(chunk, selection, seen)
            if rows:
                plan.append((number, rows, index))
        return plan

    # ------------------------------------------------------------------ summaries

    def errors(self) -> list[tuple[int, str, str]]:
        """``(index, path, reason)`` of every selected image that failed, in index order."""
        out = [e[:3] for chunk in self.iter_chunks(maps=False) for e in chunk.errors]
        return sorted(out)

    def write_errors_csv(self, errors: list[tuple[int, str, str]] | None = None) -> Path:
        """Rebuild ``errors.csv`` (atomically) from the chunks or the given list."""
        errors = self.errors() if errors is None else sorted(e[:3] for e in errors)
        lines = [["index", "path", "reason"], *[[str(i), p, r] for i, p, r in errors]]
        return atomic_write_text(self.root / "errors.csv", csv_text(lines))

    def write_items_csv(self) -> Path:
        """``items.csv``: one row per selected explained image in manifest order (index,
        path, label, prediction, target, the model's scores separated by spaces in a column
        named by what they are (``logits`` or ``log_probabilities``), chunk), atomic."""
        rows = []
        for chunk in self.iter_chunks(maps=False):
            for j in range(len(chunk)):
                rows.append(
                    (
                        int(chunk.index[j]),
                        [
                            str(int(chunk.index[j])),
                            str(chunk.path[j]),
                            cell(chunk.label[j]),
                            cell(chunk.pred[j]),
                            str(int(chunk.target[j])),
                            cell(chunk.logits[j]),
                            str(chunk.number),
                        ],
                    )
                )
        rows.sort(key=lambda row: row[0])
        score = self.record().get("model", {}).get("score", "logits")
        header = ["index", "path", "label", "prediction", "target", score, "chunk"]
        return atomic_write_text(self.root / "items.csv", csv_text([header, *[r for _, r in rows]]))

    def _image_sums(self, reload=None) -> tuple[np.ndarray | None, int, bool]:
        """``(sum, count, complete)`` of the selected images: each chunk's stored sum when
        it is wholly selected; for a partly selected chunk the images ``reload(index)``
        returns (``complete`` is False when such a chunk had no ``reload``)."""
        total, count, complete = None, 0, True
        for chunk in self.iter_chunks(maps=False):
            if len(chunk) == 0:
                continue
            if chunk.image_sum is not None and chunk.image_count:
                parts = [(chunk.image_sum, chunk.image_count)]
            elif reload is None:
                complete = False
                break
            else:
                images = (reload(int(i)) for i in chunk.index.tolist())
                parts = [(image, 1) for image in images if image is not None]
            for value, n in parts:
                total = np.array(value, np.float64) if total is None else total + value
                count += n
        return total, count, complete

    def update_mean_image(self, reload) -> None:
        """After the selection changed: when some chunk is only partly selected, compute the
        selection's mean image with ``reload(index) -> (C, *S) array or None`` for those
        chunks' images and store it (``mean_image.npz``, tied to the selection)."""
        if self._image_sums()[2]:
            return
        total, count, _ = self._image_sums(reload)
        if total is None:
            return
        arrays = {"mean": total / count, "digest": np.asarray(self.selection_digest())}
        atomic_write(self.root / "mean_image.npz", lambda handle: np.savez(handle, **arrays))

    def mean_image(self) -> np.ndarray | None:
        """Mean ``(C, *S)`` float64 of every selected explained image: from the chunks'
        sums, or from ``mean_image.npz`` when it belongs to the current selection."""
        total, count, complete = self._image_sums()
        if complete:
            return None if total is None else total / count
        stored = self.root / "mean_image.npz"
        if stored.is_file():
            with np.load(stored, allow_pickle=False) as data:
                if str(data["digest"]) == self.selection_digest():
                    return data["mean"]
        return None

    def affines(self) -> Iterator[tuple[int, str, np.ndarray]]:
        """``(index, path, affine (4, 4))`` of every selected explained image, in chunk
        order (the affine is NaN when the image had none)."""
        for chunk in self.iter_chunks(maps=False):
            for j in range(len(chunk)):
                yield int(chunk.index[j]), str(chunk.path[j]), np.asarray(chunk.affine[j])

    def count(self) -> int:
        return sum(len(c) for c in self.iter_chunks(maps=False))
