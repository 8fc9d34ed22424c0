"""Which files make a dataset, with their labels: a CSV manifest or a folder per class.

Both produce a :class:`Manifest`: a list of :class:`Record` (path, label, optional mask path,
flip flag, the row's other columns) plus the class names. No image is opened here, so a
manifest of 20,000 rows is read in milliseconds; file problems surface per item when the
dataset loads them (:meth:`medexplain.data.files.ImageDataset.try_get`). Problems with the
manifest itself (a missing column, an unknown class name, a bad flip value) raise
:class:`~medexplain.data.readers.DataError` at once, naming the row and the column.

CSV manifest (one row per image, header required, ``,`` ``;`` or tab separated)::

    path,label,mask,flip,site
    img/001.png,DR,masks/001.png,0,A
    img/002.png,normal,,1,B

- ``path``: image file (or DICOM series folder), relative to the CSV's folder or absolute.
- single label: the ``label`` column holds class names or integer class indices;
  multi-label: pass ``labels=["DR", "glaucoma", ...]``, columns holding 0/1 each.
- ``mask`` (optional): a ground-truth mask file, same grid as the image; empty = none.
- ``flip`` (optional): 1/true/yes mirrors the image left-right (e.g. right eyes in a
  study that shows every eye as a left eye); 0/false/no/empty keeps it.
- any other column is kept in ``Record.extra`` (group columns for global maps).
"""

from __future__ import annotations

import csv
import hashlib
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .readers import DICOM_SUFFIXES, DataError, is_dicom_file, is_image_path

TRUE_VALUES = ("1", "true", "yes", "y", "t")
FALSE_VALUES = ("0", "false", "no", "n", "f", "")


@dataclass(frozen=True)
class Record:
    """One image of a dataset, before loading.

    ``label`` is a class index (int, -1 when unlabelled) or, for multi-label data, a tuple
    of 0/1 floats, one per class.
    """

    path: Path
    label: int | tuple[float, ...] = -1
    mask: Path | None = None
    flip: bool = False
    extra: dict[str, str] = field(default_factory=dict)


@dataclass
class Manifest:
    """Records plus the class names (empty when unlabelled)."""

    records: list[Record]
    class_names: list[str]
    multilabel: bool = False
    source: Path | None = None

    @property
    def labelled(self) -> bool:
        return bool(self.class_names)

    def targets(self) -> np.ndarray:
        """All labels without loading images: ``(N,)`` int64 or ``(N, K)`` float32."""
        if self.multilabel:
            return np.asarray([r.label for r in self.records], dtype=np.float32).reshape(
                len(self.records), len(self.class_names)
            )
        return np.asarray([r.label for r in self.records], dtype=np.int64)


# --------------------------------------------------------------------------- identity


def _stamp(path: Path) -> str:
    """Size and modification time of a file, or of the visible files of a folder (a DICOM
    series); ``"missing"`` when it does not exist. Cheap: no file is read."""
    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            parts = []
            for p in sorted(path.iterdir()):
                if p.name.startswith("."):
                    continue
                try:
                    entry = p.stat()
                except OSError:  # a broken link: not a file, as Path.is_file says
                    continue
                if stat.S_ISREG(entry.st_mode):
                    parts.append(f"{p.name}:{entry.st_size}:{entry.st_mtime_ns}")
            return "dir[" + ",".join(parts) + "]"
    except OSError:
        return "missing"
    return f"{info.st_size}:{info.st_mtime_ns}"


def record_key(record: Record) -> str:
    """A 32-hex-digit identity of an image as a run explains it: its absolute path, the
    file's size and modification time, its label, flip flag and mask (path and stamp). A
    moved row keeps its key; an edited, replaced or relabelled image gets a new one."""
    path = Path(os.path.abspath(record.path))
    parts = [str(path), _stamp(path), repr(record.label), str(bool(record.flip))]
    if record.mask is not None:
        mask = Path(os.path.abspath(record.mask))
        parts += [str(mask), _stamp(mask)]
    return hashlib.blake2b("\0".join(parts).encode("utf-8"), digest_size=16).hexdigest()


def duplicate_rows(manifest: Manifest) -> tuple[list[tuple[int, int]], list[str]]:
    """Rows naming an image already listed: ``(row, first row)`` pairs of exact repeats
    (same path, label, flip and mask: explained once), and messages for rows that list the
    same image (path and flip) with another label or mask (a contradiction)."""
    first: dict[tuple[str, bool], int] = {}
    repeats, conflicts = [], []
    for i, record in enumerate(manifest.records):
        identity = (os.path.abspath(record.path), bool(record.flip))
        j = first.setdefault(identity, i)
        if j == i:
            continue
        other = manifest.records[j]
        if (other.label, other.mask) == (record.label, record.mask):
            repeats.append((i, j))
        else:
            conflicts.append(
                f"rows {j} and {i} (0-based) list {record.path} with different labels or masks"
            )
    return repeats, conflicts


# --------------------------------------------------------------------------- CSV


def _parse_flag(value: str, where: str) -> bool:
    text = value.strip().lower()
    if text in TRUE_VALUES:
        return True
    if text in FALSE_VALUES:
        return False
    raise DataError(f"{where}: flip value {value!r} is not one of 0/1/true/false/yes/no")


def _parse_int(text: str) -> int | None:
    try:
        number = float(text)
    except ValueError:
        return None
    return int(number) if number.is_integer() else None


def _resolve(base: Path, value: str) -> Path:
    path = Path(os.path.expanduser(value.strip()))
    return path if path.is_absolute() else base / path


def _delimiter(header: str) -> str:
    if "," in header:
        return ","
    for candidate in ("\t", ";"):
        if candidate in header:
            return candidate
    return ","


def read_csv_manifest(
    csv_path: str | os.PathLike,
    *,
    labels: Sequence[str] | None = None,
    label_column: str | None = "label",
    path_column: str = "path",
    mask_column: str = "mask",
    flip_column: str = "flip",
    class_names: Sequence[str] | None = None,
) -> Manifest:
    """Read a CSV manifest (format in the module docstring).

    Args:
        csv_path: the CSV file; relative image/mask paths are relative to its folder.
        labels: multi-label columns (each 0/1); the class names are these column names.
        label_column: single-label column (class names or integer indices); None reads an
            unlabelled dataset (every label -1). Ignored when ``labels`` is given.
        path_column, mask_column, flip_column: column names; mask and flip are optional.
        class_names: fixes the class order for a single-label column (names in the column
            must be among them, integers index into them). Default: integer labels name
            classes ``"0" .. str(max)``; text labels are sorted alphabetically.

    Raises:
        DataError: missing file or column (naming the columns found), empty manifest,
            unknown class name, bad 0/1 or flip value (naming the row).
    """
    csv_path = Path(csv_path)
    reader, columns = _csv_reader(csv_path, path_column)
    if labels is not None:
        labels = [str(name) for name in labels]
    chosen = _Columns(path_column, mask_column, flip_column, label_column, labels)
    chosen.check(csv_path, columns)
    base = csv_path.parent
    raw_labels: list[tuple[int, str]] = []
    records: list[Record] = []
    for number, row in enumerate(reader, start=2):  # row 1 is the header
        row = {k: (v or "").strip() for k, v in row.items() if k is not None}
        if not any(row.values()):
            continue  # blank line
        record, raw = _row_record(row, f"{csv_path} row {number}", base, chosen)
        records.append(record)
        if raw is not None:
            raw_labels.append((number, raw))
    if not records:
        raise DataError(f"manifest {csv_path} has a header but no rows")
    if labels is not None:
        return Manifest(records, list(labels), multilabel=True, source=csv_path)
    if label_column is None:
        return Manifest(records, [], source=csv_path)
    indices, names = _class_indices(raw_labels, class_names, f"manifest {csv_path}", label_column)
    records = [Record(r.path, index, r.mask, r.flip, r.extra) for r, index in zip(records, indices)]
    return Manifest(records, names, source=csv_path)


def manifest_columns(csv_path: str | os.PathLike, path_column: str = "path") -> list[str]:
    """The column names of a CSV manifest's header (DataError for a missing or empty file,
    or a header without ``path_column``); reads the header line only."""
    csv_path = Path(csv_path)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            header = handle.readline()
    except (OSError, UnicodeDecodeError):
        return _csv_reader(csv_path, path_column)[1]  # names the problem
    if not header.strip():
        return _csv_reader(csv_path, path_column)[1]
    columns = [c.strip() for c in next(csv.reader([header], delimiter=_delimiter(header)))]
    if path_column not in columns:
        raise DataError(
            f"manifest {csv_path} has no '{path_column}' column (columns found: {columns})"
        )
    return columns


def _csv_reader(csv_path: Path, path_column: str) -> tuple[csv.DictReader, list[str]]:
    """A reader over the rows of ``csv_path`` (delimiter guessed from the header, column
    names stripped) and the column names; refuses a missing or empty file and a header
    without ``path_column``."""
    if not csv_path.is_file():
        raise DataError(f"manifest {csv_path} does not exist or is not a file")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read manifest {csv_path}: {error}") from error
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise DataError(f"manifest {csv_path} is empty; expected a header row with '{path_column}'")
    reader = csv.DictReader(lines, delimiter=_delimiter(lines[0]))
    columns = [c.strip() for c in (reader.fieldnames or [])]
    reader.fieldnames = columns
    if path_column not in columns:
        raise DataError(
            f"manifest {csv_path} has no '{path_column}' column (columns found: {columns})"
        )
    return reader, columns


@dataclass(frozen=True)
class _Columns:
    """The column names :func:`read_csv_manifest` was asked to read."""

    path: str
    mask: str
    flip: str
    label: str | None
    labels: list[str] | None  # multi-label columns; then ``label`` is ignored

    def check(self, csv_path: Path, columns: list[str]) -> None:
        """Refuse label columns the header lacks."""
        found = f"columns found: {columns}"
        if self.labels is not None:
            if not self.labels:
                raise DataError("labels must name at least one 0/1 label column, got []")
            missing = [name for name in self.labels if name not in columns]
            if missing:
                raise DataError(f"manifest {csv_path} lacks label column(s) {missing} ({found})")
        elif self.label is not None and self.label not in columns:
            raise DataError(
                f"manifest {csv_path} has no '{self.label}' label column ({found}); pass "
                "labels=[...] for multi-label 0/1 columns or label_column=None for unlabelled data"
            )

    @property
    def used(self) -> set[str]:
        """Columns that are not kept in ``Record.extra``."""
        if self.labels is not None:
            return {self.path, self.mask, self.flip, *self.labels}
        label = () if self.label is None else (self.label,)
        return {self.path, self.mask, self.flip, *label}


def _row_record(
    row: dict[str, str], where: str, base: Path, columns: _Columns
) -> tuple[Record, str | None]:
    """The record of one non-blank row, and its raw single-label cell (None for multi-label
    or unlabelled data; the class index is filled in once every row is read)."""
    if not row.get(columns.path):
        raise DataError(f"{where}: empty '{columns.path}'")
    mask = _resolve(base, row[columns.mask]) if row.get(columns.mask) else None
    flip = _parse_flag(row.get(columns.flip, ""), where) if columns.flip in row else False
    label: int | tuple[float, ...] = -1
    raw = None
    if columns.labels is not None:
        label = tuple(_binary(row, name, where) for name in columns.labels)
    elif columns.label is not None:
        raw = row.get(columns.label)
        if not raw:
            raise DataError(f"{where}: empty '{columns.label}'")
    extra = {k: v for k, v in row.items() if k not in columns.used}
    return Record(_resolve(base, row[columns.path]), label, mask, flip, extra), raw


def _binary(row: dict[str, str], name: str, where: str) -> float:
    value = _parse_int(row.get(name, ""))
    if value not in (0, 1):
        raise DataError(f"{where}: label column '{name}' holds {row.get(name)!r}; expected 0 or 1")
    return float(value)


def _class_indices(
    cells: list[tuple[int, str]], class_names: Sequence[str] | None, where: str, column: str
) -> tuple[list[int], list[str]]:
    """Map label cells ``(row number, text)`` (names or ints) to class indices; returns
    (indices, class names)."""
    rows = [number for number, _ in cells]
    values = [value for _, value in cells]
    ints = [_parse_int(v) for v in values]
    if class_names is not None:
        names = [str(c) for c in class_names]
        if len(set(names)) != len(names):
            raise DataError(f"class_names has duplicates: {names}")
        lookup = {name: i for i, name in enumerate(names)}
        indices = []
        for row, value, as_int in zip(rows, values, ints):
            if value in lookup:
                indices.append(lookup[value])
            elif as_int is not None and 0 <= as_int < len(names):
                indices.append(as_int)
            else:
                raise DataError(
                    f"{where} row {row}: unknown class {value!r} in '{column}'; expected one "
                    f"of {names} or an index 0..{len(names) - 1}"
                )
        return indices, names
    if all(i is not None for i in ints):
        if min(ints) < 0:
            raise DataError(f"{where}: negative class index {min(ints)} in '{column}'")
        return [int(i) for i in ints], [str(i) for i in range(max(ints) + 1)]
    names = sorted(set(values))
    _refuse_continuous(names, where, column)
    lookup = {name: i for i, name in enumerate(names)}
    return [lookup[v] for v in values], names


def _refuse_continuous(names: list[str], where: str, column: str) -> None:
    """Refuse a label column of non-integer numbers (a measurement, not a class)."""
    try:
        numbers = [float(name) for name in names]
    except ValueError:
        return
    if any(not number.is_integer() for number in numbers):
        examples = ", ".join(names[:3])
        raise DataError(
            f"{where}: '{column}' holds {len(names)} distinct non-integer numbers ({examples}, "
            "...); expected class names or integer class indices (a continuous target is not "
            "a class the model outputs)"
        )


# --------------------------------------------------------------------------- folders


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _is_series(folder: Path) -> bool:
    """A folder whose first few visible files are DICOM (by extension or DICM magic)."""
    files = [p for p in sorted(folder.iterdir())[:20] if p.is_file() and _visible(p)]
    return bool(files) and any(
        p.suffix.lower() in DICOM_SUFFIXES or is_dicom_file(p) for p in files[:5]
    )


def _images_in(folder: Path) -> list[Path]:
    """Image files and DICOM series subfolders directly inside ``folder``, sorted by name."""
    out = []
    for entry in sorted(folder.iterdir()):
        if not _visible(entry):
            continue
        if entry.is_dir():
            if _is_series(entry):
                out.append(entry)
        elif entry.is_file() and is_image_path(entry):
            out.append(entry)
    return out


def read_folder_manifest(
    root: str | os.PathLike,
    *,
    layout: str = "auto",
    class_names: Sequence[str] | None = None,
) -> Manifest:
    """Scan ``root`` for images.

    Layouts:
        ``"classes"``: ``root/<class>/<image files or DICOM series folders>``; class names
            are the folder names, sorted (or ``class_names``: then every folder must be one
            of them, and the order is theirs).
        ``"flat"``: image files directly in ``root`` (subfolders are DICOM series),
            unlabelled.
        ``"auto"``: ``"flat"`` when ``root`` directly holds image files, else ``"classes"``.

    Files with unknown extensions are skipped (extensionless files are kept when they are
    DICOM), as are hidden files.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a directory")
    if layout not in ("auto", "classes", "flat"):
        raise DataError(f"layout must be 'auto', 'classes' or 'flat', got {layout!r}")
    if layout == "auto":
        has_files = any(e.is_file() and _visible(e) and is_image_path(e) for e in root.iterdir())
        layout = "flat" if has_files else "classes"
    if layout == "flat":
        records = [Record(p) for p in _images_in(root)]
        if not records:
            raise DataError(f"data folder {root} holds no image files")
        return Manifest(records, [], source=root)
    folders = sorted(e for e in root.iterdir() if e.is_dir() and _visible(e))
    if not folders:
        raise DataError(
            f"data folder {root} has no class subfolders and no image files; expected "
            "root/<class>/<images> or image files directly in it"
        )
    names = [f.name for f in folders]
    if class_names is not None:
        order = [str(c) for c in class_names]
        unknown = [n for n in names if n not in order]
        if unknown:
            raise DataError(
                f"data folder {root} has class folder(s) {unknown} that are not in "
                f"class_names {order}"
            )
        names = order
    records = []
    for index, name in enumerate(names):
        folder = root / name
        if not folder.is_dir():
            continue  # a class without images
        records.extend(Record(p, index) for p in _images_in(folder))
    if not records:
        raise DataError(f"the class folders of {root} hold no image files")
    return Manifest(records, names, source=root)


def records_from_paths(
    paths: Sequence[str | os.PathLike],
    labels: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
) -> Manifest:
    """A manifest from explicit paths (and optional integer labels)."""
    if labels is not None and len(labels) != len(paths):
        raise DataError(f"got {len(paths)} paths but {len(labels)} labels")
    if not paths:
        raise DataError("paths is empty; expected at least one image path")
    records = [
        Record(Path(p), -1 if labels is None else int(labels[i])) for i, p in enumerate(paths)
    ]
    names = [str(c) for c in class_names] if class_names is not None else []
    if labels is not None and not names:
        names = [str(i) for i in range(max(int(v) for v in labels) + 1)]
    if labels is not None:
        bad = [int(v) for v in labels if not 0 <= int(v) < len(names)]
        if bad:
            raise DataError(f"label {bad[0]} is not a class index 0..{len(names) - 1} of {names}")
    return Manifest(records, names)
