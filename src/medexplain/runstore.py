"""The on-disk store of a resumable run: per-image maps in atomic chunks plus a manifest.

Layout of a run folder ``RUN``::

    RUN/run.json             settings of the command, model and dataset description
    RUN/chunks/000012.npz    one file per chunk of ``chunk_size`` consecutive dataset indices
    RUN/errors.csv           index, path, reason of every image that could not be explained
    RUN/items.csv            index, path, label, prediction, target, logits of done images
    RUN/.lock                held (flock) while a process writes the run

Chunk ``k`` covers dataset indices ``[k * chunk_size, (k + 1) * chunk_size)``. Its ``.npz``
holds, for the images of that range that were explained: ``index (n,)``, ``maps
(n, 1, *S) float32``, ``label (n,)`` or ``(n, K)``, ``pred`` (same), ``target (n,)``,
``logits (n, K)``, ``affine (n, 4, 4)`` (NaN when the file has none), the images' running
``image_sum (C, *S) float64`` and ``image_count`` (for the dataset mean image without
re-reading the data), and the images that failed: ``err_index``, ``err_path``,
``err_reason``. A chunk is written to a temporary name, flushed, fsynced and moved into
place with :func:`os.replace`, so at any instant a chunk is either absent or complete: a
run killed at any point and started again recomputes only the chunks that are missing and
never counts an image twice. ``errors.csv`` and ``items.csv`` are views rebuilt from the
chunks (also written atomically); the chunks are the only truth.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Chunk", "RunError", "RunStore", "atomic_write_bytes", "atomic_write_text"]

FORMAT = "medexplain.run"
VERSION = 1
_CHUNK_NAME = re.compile(r"^(\d{6,})\.npz$")


class RunError(ValueError):
    """A run folder that cannot be used as asked (different settings, busy, unreadable)."""


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic(path: Path, write) -> Path:
    """Write through ``write(handle)`` to a temporary file beside ``path``, then replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file + fsync + ``os.replace``)."""
    return _atomic(Path(path), lambda handle: handle.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


@dataclass
class Chunk:
    """The explained images of one chunk (see the module docstring for the fields)."""

    number: int
    index: np.ndarray
    maps: np.ndarray
    label: np.ndarray
    pred: np.ndarray
    target: np.ndarray
    logits: np.ndarray
    affine: np.ndarray
    path: np.ndarray
    image_sum: np.ndarray | None = None
    image_count: int = 0
    errors: list[tuple[int, str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.index.shape[0])

    @property
    def finished(self) -> set[int]:
        """Dataset indices this chunk settled: explained or recorded as an error."""
        return {int(i) for i in self.index} | {int(e[0]) for e in self.errors}

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {
            "index": np.asarray(self.index, dtype=np.int64),
            "maps": np.asarray(self.maps, dtype=np.float32),
            "label": np.asarray(self.label),
            "pred": np.asarray(self.pred),
            "target": np.asarray(self.target, dtype=np.int64),
            "logits": np.asarray(self.logits, dtype=np.float32),
            "affine": np.asarray(self.affine, dtype=np.float64),
            "path": np.asarray(self.path, dtype=np.str_),
            "image_count": np.asarray(self.image_count, dtype=np.int64),
            "err_index": np.asarray([e[0] for e in self.errors], dtype=np.int64),
            "err_path": np.asarray([e[1] for e in self.errors], dtype=np.str_),
            "err_reason": np.asarray([e[2] for e in self.errors], dtype=np.str_),
        }
        if self.image_sum is not None:
            arrays["image_sum"] = np.asarray(self.image_sum, dtype=np.float64)
        return arrays

    @classmethod
    def from_arrays(cls, number: int, data: Mapping[str, np.ndarray]) -> Chunk:
        errors = [
            (int(i), str(p), str(r))
            for i, p, r in zip(data["err_index"], data["err_path"], data["err_reason"])
        ]
        return cls(
            number=number,
            index=data["index"],
            maps=data["maps"],
            label=data["label"],
            pred=data["pred"],
            target=data["target"],
            logits=data["logits"],
            affine=data["affine"],
            path=data["path"],
            image_sum=data.get("image_sum"),
            image_count=int(data["image_count"]),
            errors=errors,
        )


def _plain(value: Any) -> Any:
    """JSON round trip, so a record compares equal to what run.json holds."""
    return json.loads(json.dumps(value, default=str))


class RunStore:
    """A run folder (module docstring). ``RunStore(root)`` opens or prepares ``root``;
    :meth:`initialise` writes or checks ``run.json``."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.chunk_dir = self.root / "chunks"
        self._lock_handle = None

    # ------------------------------------------------------------------ manifest

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def exists(self) -> bool:
        return self.run_json.is_file()

    def record(self) -> dict[str, Any]:
        """The contents of ``run.json`` (RunError if the folder holds no run)."""
        if not self.exists:
            raise RunError(f"{self.root} is not a medexplain run (no run.json); run explain first")
        try:
            record = json.loads(self.run_json.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise RunError(f"cannot read {self.run_json}: {error}") from error
        if record.get("format") != FORMAT:
            raise RunError(f"{self.run_json} is not a medexplain run manifest")
        return record

    def initialise(
        self, record: Mapping[str, Any], identity: Mapping[str, Any], overwrite: bool = False
    ) -> dict[str, Any]:
        """Start a new run or check that ``identity`` matches the existing one.

        ``identity``: the settings that decide the maps (model hash, data, method, params,
        target, chunk size...). On an existing run any difference raises :class:`RunError`
        naming the differing keys, unless ``overwrite`` (then the old run is deleted).
        Returns the run record in force.
        """
        identity = _plain(dict(identity))
        if self.exists:
            old = self.record()
            differences = sorted(
                key
                for key in set(identity) | set(old.get("identity", {}))
                if identity.get(key) != old.get("identity", {}).get(key)
            )
            if not differences:
                return old
            if not overwrite:
                detail = "; ".join(
                    f"{k}: run has {old.get('identity', {}).get(k)!r}, now {identity.get(k)!r}"
                    for k in differences[:4]
                )
                raise RunError(
                    f"{self.root} holds a run with different settings ({detail}); use the same "
                    "settings to resume, another --out, or --overwrite to start again"
                )
            self.clear()
        elif self.root.exists() and any(self.root.iterdir()) and not overwrite:
            names = [p.name for p in self.root.iterdir() if p.name != ".lock"]
            if names:
                raise RunError(
                    f"{self.root} exists and is not a medexplain run (holds {names[:3]}); "
                    "choose an empty or new --out, or --overwrite"
                )
        elif overwrite and self.root.exists():
            self.clear()
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
        """Delete everything medexplain wrote in the run folder (not the folder itself)."""
        for child in self.root.iterdir():
            if child.name == ".lock":
                continue
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()

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

    # ------------------------------------------------------------------ chunks

    def chunk_path(self, number: int) -> Path:
        return self.chunk_dir / f"{number:06d}.npz"

    def chunk_numbers(self) -> list[int]:
        """Numbers of the complete chunks on disk, ascending (temporary files ignored)."""
        if not self.chunk_dir.is_dir():
            return []
        found = (_CHUNK_NAME.match(p.name) for p in self.chunk_dir.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def remove_partial(self) -> int:
        """Delete temporary files a killed writer left behind; returns how many."""
        if not self.chunk_dir.is_dir():
            return 0
        stale = [p for p in self.chunk_dir.iterdir() if p.name.endswith(".tmp")]
        for p in stale:
            p.unlink(missing_ok=True)
        return len(stale)

    def read_chunk(self, number: int, maps: bool = True) -> Chunk:
        """Load chunk ``number`` (``maps=False`` skips the maps: an empty array instead)."""
        path = self.chunk_path(number)
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files if maps or k != "maps"}
        except (OSError, ValueError, KeyError) as error:
            raise RunError(f"cannot read chunk {path}: {error}") from error
        if not maps:
            arrays["maps"] = np.empty((0,), dtype=np.float32)
        return Chunk.from_arrays(number, arrays)

    def write_chunk(self, chunk: Chunk) -> Path:
        """Write ``chunk`` atomically (replaces an older version of the same chunk)."""
        arrays = chunk.to_arrays()
        return _atomic(self.chunk_path(chunk.number), lambda handle: np.savez(handle, **arrays))

    def iter_chunks(self, maps: bool = True) -> Iterator[Chunk]:
        """Complete chunks in index order."""
        for number in self.chunk_numbers():
            yield self.read_chunk(number, maps=maps)

    # ------------------------------------------------------------------ summaries

    def errors(self) -> list[tuple[int, str, str]]:
        """``(index, path, reason)`` of every image that failed, in index order."""
        out = [e for chunk in self.iter_chunks(maps=False) for e in chunk.errors]
        return sorted(out)

    def write_errors_csv(self, errors: list[tuple[int, str, str]] | None = None) -> Path:
        """Rebuild ``errors.csv`` (atomically) from the chunks or the given list."""
        errors = self.errors() if errors is None else sorted(errors)
        lines = [["index", "path", "reason"], *[[str(i), p, r] for i, p, r in errors]]
        return atomic_write_text(self.root / "errors.csv", _csv_text(lines))

    def write_items_csv(self) -> Path:
        """``items.csv``: one row per explained image (index, path, label, prediction,
        target, logits separated by spaces), streamed chunk by chunk (atomic)."""
        import io

        def write(handle) -> None:
            text = io.TextIOWrapper(handle, encoding="utf-8", newline="")
            writer = csv.writer(text, lineterminator="\n")
            writer.writerow(["index", "path", "label", "prediction", "target", "logits", "chunk"])
            for chunk in self.iter_chunks(maps=False):
                for j in range(len(chunk)):
                    writer.writerow(
                        [
                            str(int(chunk.index[j])),
                            str(chunk.path[j]),
                            _cell(chunk.label[j]),
                            _cell(chunk.pred[j]),
                            str(int(chunk.target[j])),
                            _cell(chunk.logits[j]),
                            str(chunk.number),
                        ]
                    )
            text.flush()
            text.detach()

        return _atomic(self.root / "items.csv", write)

    def mean_image(self) -> np.ndarray | None:
        """Mean ``(C, *S)`` float64 of every explained image (from the chunks' sums)."""
        total, count = None, 0
        for chunk in self.iter_chunks(maps=False):
            if chunk.image_sum is None or chunk.image_count == 0:
                continue
            total = chunk.image_sum.copy() if total is None else total + chunk.image_sum
            count += chunk.image_count
        return None if total is None else total / count

    def first_affine(self) -> np.ndarray | None:
        """The affine of the first explained image (None when it has none)."""
        for chunk in self.iter_chunks(maps=False):
            if len(chunk):
                affine = chunk.affine[0]
                return None if not np.isfinite(affine).all() else affine
        return None

    def count(self) -> int:
        return sum(len(c) for c in self.iter_chunks(maps=False))


def _cell(value: np.ndarray) -> str:
    array = np.asarray(value)
    if array.ndim == 0:
        return str(array.item())
    return " ".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in array.tolist())


def _csv_text(rows: list[list[str]]) -> str:
    import io

    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()
