"""Label files of public IQA datasets, read into one shape: `Sample`s with MOS on 1–5.

Every dataset publishes its scores differently (CSV, Excel, MATLAB, JSON) and on its own scale.
Readers here turn each into raw records; one shared pass (`_finish`) then validates numbers,
ranges, paths and images and rescales, so every format gets the same checks and the same
messages. Bad rows never stop the pass: `read_labels` returns the good samples plus every
problem, `load_labels` raises one `LabelError` listing all of them.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCALE_LO, SCALE_HI = 1.0, 5.0

# name -> the scale its MOS is published on (None: the caller must say, see `read_labels`).
KNOWN_FORMATS: dict[str, tuple[float, float] | None] = {
    "koniq": (1.0, 5.0),  # koniq10k_scores_and_distributions.csv, column MOS (MOS_zscore is 0-100)
    "kadid": (1.0, 5.0),  # KADID-10k dmos.csv
    "livec": (0.0, 100.0),  # LIVE In the Wild Challenge, Data/AllMOS_release.mat
    # AGIQA-3K data.csv mos_quality: the published file holds values below 1 (e.g. 0.195) and
    # up to ~4.3, so the scale is 0-5, not 1-5; the paper's own statement was not checked.
    "agiqa3k": (0.0, 5.0),
    "spaq": (0.0, 100.0),  # SPAQ "MOS and Image attribute scores.xlsx"
    "qalign_json": (1.0, 5.0),  # Q-Align meta JSON (gt_score)
    # DeQA-Score metas (zhiyuanyou/Data-DeQA-Score, <SET>/metas/*.json): gt_score is each set's
    # raw MOS (DeQA-Score build_soft_labels/gen_soft_label.py writes "gt_score": mos), so the
    # scale varies by set: 1-5 is assumed only when every value lies in 1-5, as for "csv".
    "deqa": None,
    # pyiqa meta-info CSVs (chaofengc/IQA-PyTorch-Datasets-metainfo, meta_info_<Name>Dataset.csv):
    # the range comes from the file's name (PYIQA_SETS); unknown names behave like "csv".
    "pyiqa": None,
    "jsonl": (1.0, 5.0),  # ours: {"image", "mos", "id"?, "mos_std"?} per line
    "csv": None,  # generic: 1-5 assumed only when every value lies in 1-5
}
FORMAT_ALIASES = {"deqa_json": "deqa", "qalign": "qalign_json", "live_c": "livec",
                  "iqa_pytorch": "pyiqa"}

# Formats that are plain lists of paths: without an explicit images_root they may point anywhere.
FREE_FORM = frozenset({"qalign_json", "jsonl", "csv"})

IMAGE_NAMES = ("image", "image_name", "filename", "file", "path", "name")
MOS_NAMES = ("mos", "score", "gt_score", "dmos")
STD_NAMES = ("mos_std", "std", "sd")

RANGE_HINT = "pass mos_range=(lo, hi) / --mos-range LO,HI"


@dataclass(frozen=True)
class Sample:
    id: str
    image: Path  # absolute, resolved
    mos: float  # always on 1-5: 1 + 4*(raw-lo)/(hi-lo)
    mos_std: float | None = None  # rescaled by the same factor 4/(hi-lo)
    raw_mos: float | None = None  # the value as published


# Characters that end a line for str.splitlines(): a file name, key or header echoed into a
# message may hold them, and a problem must stay one line.
_LINE_BREAKS = {c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"
                for c in (0x0A, 0x0B, 0x0C, 0x0D, 0x1C, 0x1D, 0x1E, 0x85, 0x2028, 0x2029)}


@dataclass(frozen=True)
class LabelProblem:
    file: str
    row: int | None
    message: str
    unit: str = "row"  # what `row` counts: row (CSV/Excel), line (JSONL), item (JSON), entry (.mat)

    def __post_init__(self) -> None:
        for name in ("file", "message"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, value.translate(_LINE_BREAKS))

    def __str__(self) -> str:
        where = self.file if self.row is None else f"{self.file} {self.unit} {self.row}"
        return f"{where}: {self.message}"


class LabelError(ValueError):
    """Label problems. One problem reads as its own line; several get a count line first."""

    def __init__(self, problems: Sequence[LabelProblem]):
        self.problems = list(problems)
        super().__init__(_render(self.problems))


def _render(problems: Sequence[LabelProblem]) -> str:
    if len(problems) == 1:
        return str(problems[0])
    files = sorted({p.file for p in problems})
    where = files[0] if len(files) == 1 else f"{len(files)} files"
    return "\n".join([f"{len(problems)} problems in {where}:", *(str(p) for p in problems)])


# --------------------------------------------------------------------------------------------
# Public entry points


def load_labels(
    path: str | os.PathLike,
    *,
    format: str = "auto",
    images_root: str | os.PathLike | None = None,
    mos_range: tuple[float, float] | None = None,
    check_images: bool = True,
    image_column: str | None = None,
    mos_column: str | None = None,
    split: str | None = None,
    split_column: str | None = None,
) -> list[Sample]:
    """Strict `read_labels`: raises one LabelError listing every problem, if there is any."""
    samples, problems = read_labels(
        path,
        format=format,
        images_root=images_root,
        mos_range=mos_range,
        check_images=check_images,
        image_column=image_column,
        mos_column=mos_column,
        split=split,
        split_column=split_column,
    )
    if problems:
        raise LabelError(problems)
    return samples


def read_labels(
    path: str | os.PathLike,
    *,
    format: str = "auto",
    images_root: str | os.PathLike | None = None,
    mos_range: tuple[float, float] | None = None,
    check_images: bool = True,
    image_column: str | None = None,
    mos_column: str | None = None,
    split: str | None = None,
    split_column: str | None = None,
    limit: int | None = None,
) -> tuple[list[Sample], list[LabelProblem]]:
    """Read a label file leniently: the usable samples, and one problem per rejected row.

    format: "auto" (from the file name and its columns) or one of KNOWN_FORMATS. LIVE-C takes
    the folder holding Data/, the Data folder, or either .mat file.

    MOS is rescaled from the format's native range (KNOWN_FORMATS) to 1-5; `mos_range=(lo, hi)`
    overrides it. The generic "csv" format has no native range: without `mos_range` it assumes
    1-5 when every value lies in 1-5, and otherwise reports one problem asking for it.

    Images: relative paths resolve against `images_root`, else the format's default root (the
    label file's folder, or the dataset's image folder next to it, e.g. KADID's images/).
    A path may not leave the root (`../x.jpg`, or an absolute path elsewhere) — except for the
    free-form formats (jsonl, csv, qalign_json) when no `images_root` was passed: those lists
    are the user's own, so absolute paths and `..` are taken as written. With `check_images`
    each image must exist and Pillow must read its header (the pixels are not decoded);
    `check_images=False` skips every file-system check on images, to read labels without them.

    Ids are the image path relative to the root (JSON/JSONL may give their own `id`); the second
    occurrence of an id is a problem. Each rejected row yields exactly one problem, so
    `len(problems)` counts skipped rows plus any file-level problems (e.g. a missing column).
    Splits: `split="train"|"val"|"test"` keeps the rows of that split, read from the file's
    split column (pyiqa meta-info CSVs: `split_column`, default `official_split` where the set
    has one, else pyiqa's first random split `ratio802_seed123_split_01`; `list_splits` shows
    them). Other formats carry no split column: their train and test sets are separate files.

    `limit`: stop after that many usable samples; the rows after them are not checked (their
    images' headers are not read), so `--limit 3` on a 100,000-row file costs the parse only.

    Raises LabelError at once when the label file itself is missing or of unknown format.
    """
    src = Path(path)
    label = str(path)
    if mos_range is not None:
        mos_range = _check_range(mos_range)
    if not src.exists():
        raise LabelError([LabelProblem(label, None, f"no such file ({_accepted()})")])
    fmt = _resolve_format(src, label, format)
    if fmt == "jsonl" and limit is not None and split is None and split_column is None:
        return _first_jsonl_samples(src, label, image_column, mos_column, images_root,
                                    mos_range, check_images, limit)
    if fmt == "livec":
        table = _read_livec(src, label)
    elif fmt == "qalign_json":
        table = _read_qalign_json(src, label, image_column, mos_column)
    elif fmt == "deqa":
        table = _read_deqa_json(src, label, image_column, mos_column)
    elif fmt == "pyiqa":
        table = _read_pyiqa(src, label, image_column, mos_column, split, split_column)
    elif fmt == "jsonl":
        table = _read_jsonl(src, label, image_column, mos_column)
    else:
        table = _read_table(src, label, fmt, image_column, mos_column)
    if (split is not None or split_column is not None) and fmt != "pyiqa":
        raise LabelError([LabelProblem(label, None, f"a {fmt} file has no split column — pass "
                                       "the split's own label file instead of split=...")])

    if images_root is not None:
        root, enforce = _abs(Path(images_root)), True
    else:
        root, enforce = table.default_root, fmt not in FREE_FORM
    native = table.native_range if table.native_known else KNOWN_FORMATS[fmt]
    return _finish(table, root, enforce, mos_range or native, check_images, limit)


def detect_format(path: str | os.PathLike) -> str:
    """The format "auto" would pick for `path` (raises LabelError if none fits)."""
    return _resolve_format(Path(path), str(path), "auto")


# --------------------------------------------------------------------------------------------
# Format detection


def _accepted() -> str:
    return "accepted formats: " + ", ".join(KNOWN_FORMATS)


def _resolve_format(src: Path, label: str, format: str) -> str:
    name = FORMAT_ALIASES.get(format.lower(), format.lower())
    if name != "auto":
        if name not in KNOWN_FORMATS:
            raise LabelError(
                [LabelProblem(label, None, f"unknown format {format!r} ({_accepted()})")]
            )
        return name
    if src.is_dir():
        if _livec_data_dir(src) is not None:
            return "livec"
        raise LabelError([LabelProblem(label, None, f"is a folder without labels ({_accepted()})")])
    lower = src.name.lower()
    if lower in {n.lower() for n in _LIVEC_FILES}:
        return "livec"
    suffix = src.suffix.lower()
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".json":
        # DeQA-Score keeps its metas in <SET>/metas/ (Data-DeQA-Score layout, README.md).
        return "deqa" if src.parent.name.lower() == "metas" else "qalign_json"
    if suffix == ".csv" and lower.startswith("meta_info_"):
        return "pyiqa"  # pyiqa names every meta-info file meta_info_<Name>Dataset.csv
    if suffix in (".csv", ".tsv", ".txt", ".xlsx"):
        try:
            header = [h.strip().lower() for h in _read_header(src)]
        except Exception:  # unreadable (bad zip, bad encoding...): the reader will report it
            header = []
        return _format_from_columns(set(header), lower, suffix)
    raise LabelError([LabelProblem(label, None, f"unknown label format ({_accepted()})")])


def _format_from_columns(cols: set[str], name: str, suffix: str) -> str:
    if {"dist_img", "dmos"} <= cols:
        return "kadid"
    if {"name", "mos_quality"} <= cols:
        return "agiqa3k"
    if {"image name", "mos"} <= cols or (suffix == ".xlsx" and "spaq" in name):
        return "spaq"
    koniq_marks = {"c1", "c_total", "mos_zscore", "sd"}
    if {"image_name", "mos"} <= cols and (cols & koniq_marks or "koniq" in name):
        return "koniq"
    if suffix == ".xlsx" and not cols & set(IMAGE_NAMES):
        return "spaq"  # the only spreadsheet we know; its reader names the missing columns
    return "csv"


# --------------------------------------------------------------------------------------------
# Readers: each turns one file layout into raw records (validated later, all alike)


@dataclass
class _Record:
    row: int | None
    image: Any
    mos: Any
    std: Any = None
    id: Any = None


@dataclass
class _Table:
    label: str  # file name used in messages
    unit: str
    default_root: Path
    records: list[_Record] = field(default_factory=list)
    problems: list[LabelProblem] = field(default_factory=list)
    std_is_var: bool = False  # KADID publishes the variance
    fallback_dirs: tuple[str, ...] = ()  # extra subfolders of the root to look in (LIVE-C)
    native_range: tuple[float, float] | None = None  # the file's own scale, when the reader
    native_known: bool = False  # knows it better than KNOWN_FORMATS (pyiqa: per data set)

    def problem(self, row: int | None, message: str) -> None:
        self.problems.append(LabelProblem(self.label, row, message, self.unit))


@dataclass(frozen=True)
class _Columns:
    image: tuple[str, ...]
    mos: tuple[str, ...]
    std: tuple[str, ...] = ()
    std_is_var: bool = False
    roots: tuple[str, ...] = ()  # default image folders, relative to the label file's folder


_COLUMNS = {
    "koniq": _Columns(("image_name",), ("MOS",), ("SD",), roots=("1024x768", "512x384")),
    "kadid": _Columns(("dist_img",), ("dmos",), ("var",), std_is_var=True, roots=("images",)),
    "agiqa3k": _Columns(("name",), ("mos_quality",), ("std_quality",), roots=("images",)),
    # SPAQ ships Annotations/<xlsx> next to TestImage/.
    "spaq": _Columns(("Image name",), ("MOS",), roots=("TestImage", "../TestImage")),
    "csv": _Columns(IMAGE_NAMES, MOS_NAMES, STD_NAMES),
}


def _read_table(
    src: Path, label: str, fmt: str, image_column: str | None, mos_column: str | None
) -> _Table:
    spec = _COLUMNS[fmt]
    table = _Table(label, "row", _default_root(src.parent, spec.roots), std_is_var=spec.std_is_var)
    try:
        header, rows = _read_xlsx(src) if src.suffix.lower() == ".xlsx" else _read_csv(src)
    except UnicodeDecodeError as e:
        table.problem(None, f"not UTF-8 text ({e.reason} at byte {e.start}) — re-save as UTF-8")
        return table
    except Exception as e:  # csv.Error, OSError, and openpyxl's BadZipFile/InvalidFileException
        table.problem(None, f"cannot read the table ({_one_line(e)}) — check the file")
        return table

    image_col = _pick_column(
        table, header, (image_column,) if image_column else spec.image, "image", "image_column"
    )
    mos_col = _pick_column(
        table, header, (mos_column,) if mos_column else spec.mos, "MOS", "mos_column"
    )
    std_col = _find_column(header, spec.std)
    if image_col is None or mos_col is None:
        return table
    for row_no, row in rows:
        table.records.append(
            _Record(
                row_no, row.get(image_col), row.get(mos_col), row.get(std_col) if std_col else None
            )
        )
    return table


def _pick_column(
    table: _Table, header: list[str], wanted: tuple[str, ...], what: str, kwarg: str
) -> str | None:
    col = _find_column(header, wanted)
    if col is None:
        looked = repr(wanted[0]) if len(wanted) == 1 else "(one of " + ", ".join(wanted) + ")"
        found = ", ".join(h for h in header if h) or "none"
        table.problem(
            None,
            f"missing {what} column {looked} (found: {found}) — fix the header or pass {kwarg}=...",
        )
    return col


def _find_column(header: list[str], wanted: Iterable[str]) -> str | None:
    # Case- and space-insensitive: exports from Excel/pandas vary in both.
    by_key = {h.strip().lower(): h for h in header if h}
    for w in wanted:
        if w.strip().lower() in by_key:
            return by_key[w.strip().lower()]
    return None


def _read_header(src: Path) -> list[str]:
    if src.suffix.lower() == ".xlsx":
        return _read_xlsx(src)[0]
    with open(src, encoding="utf-8-sig", newline="") as f:
        first = f.readline()
    return next(csv.reader([first], delimiter=_delimiter(first)), [])


def _delimiter(header_line: str) -> str:
    # Some exports use tabs or semicolons; the header tells which.
    for d in (",", "\t", ";"):
        if d in header_line:
            return d
    return ","


def _read_csv(src: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    # utf-8-sig drops an Excel BOM; newline="" lets csv handle CRLF and quoted newlines.
    with open(src, encoding="utf-8-sig", newline="") as f:
        first = f.readline()
        f.seek(0)
        reader = csv.DictReader(f, delimiter=_delimiter(first))
        header = list(reader.fieldnames or [])
        rows = [(reader.line_num, row) for row in reader]
    return header, rows


def _read_xlsx(src: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    import openpyxl

    wb = openpyxl.load_workbook(src, read_only=True, data_only=True)
    try:
        ws = wb.worksheets[0]
        header: list[str] = []
        rows: list[tuple[int, dict[str, Any]]] = []
        for excel_row, values in enumerate(ws.iter_rows(values_only=True), start=1):
            if all(v is None or str(v).strip() == "" for v in values):
                continue
            if not header:
                header = ["" if v is None else str(v).strip() for v in values]
                continue
            rows.append((excel_row, dict(zip(header, values, strict=False))))
    finally:
        wb.close()  # read-only workbooks keep the file open until closed
    return header, rows


_LIVEC_FILES = ("AllImages_release.mat", "AllMOS_release.mat", "AllStdDev_release.mat")


def _livec_data_dir(src: Path) -> Path | None:
    for d in (src / "Data", src):
        if (d / "AllMOS_release.mat").is_file() or (d / "AllImages_release.mat").is_file():
            return d
    return None


def _read_livec(src: Path, label: str) -> _Table:
    data = src.parent if src.is_file() else (_livec_data_dir(src) or src)
    names_mat, mos_mat, std_mat = (data / n for n in _LIVEC_FILES)
    # The photos live in Images/, a sibling of Data/; the 7 "training" photos that open the list
    # sit in Images/trainingImages/.
    base = data.parent if data.name.lower() == "data" else data
    table = _Table(
        str(mos_mat), "entry", _default_root(base, ("Images",)), fallback_dirs=("trainingImages",)
    )
    for needed in (names_mat, mos_mat):
        if not needed.is_file():
            raise LabelError(
                [
                    LabelProblem(
                        str(needed),
                        None,
                        "no such file (LIVE-C needs "
                        "Data/AllImages_release.mat and AllMOS_release.mat)",
                    )
                ]
            )
    names = _mat_values(table, names_mat, "AllImages_release")
    mos = _mat_values(table, mos_mat, "AllMOS_release")
    std = _mat_values(table, std_mat, "AllStdDev_release") if std_mat.is_file() else None
    if names is None or mos is None:
        return table
    if len(names) != len(mos) or (std is not None and len(std) != len(mos)):
        sizes = f"{len(names)} names, {len(mos)} MOS" + (f", {len(std)} std" if std else "")
        table.problem(None, f"the .mat files disagree in length ({sizes}) — re-download them")
        return table
    for i, (name, m) in enumerate(zip(names, mos, strict=True)):
        s = std[i] if std is not None else None
        table.records.append(_Record(i + 1, _mat_str(name), m, s))
    return table


def _mat_values(table: _Table, path: Path, var: str) -> list[Any] | None:
    import numpy as np
    import scipy.io

    try:
        m = scipy.io.loadmat(path)
    except Exception as e:  # scipy raises a zoo of types (ValueError, TypeError, MatReadError)
        table.problems.append(
            LabelProblem(str(path), None, f"cannot read .mat ({_one_line(e)}) — re-download it")
        )
        return None
    if var not in m:
        found = ", ".join(k for k in m if not k.startswith("__")) or "none"
        table.problems.append(
            LabelProblem(
                str(path), None, f"missing variable {var!r} (found: {found}) — re-download it"
            )
        )
        return None
    # Names come as an N x 1 cell array, numbers as a 1 x N vector: flatten both.
    return list(np.asarray(m[var], dtype=object).ravel())


def _mat_str(x: Any) -> str:
    import numpy as np

    while isinstance(x, np.ndarray):  # cell -> 1-element char array -> str
        if x.size == 0:
            return ""
        x = x.ravel()[0]
    return str(x)


def _read_qalign_json(
    src: Path, label: str, image_column: str | None, mos_column: str | None
) -> _Table:
    table = _Table(label, "item", src.parent)
    try:
        with open(src, encoding="utf-8-sig") as f:
            items = json.load(f)
    except json.JSONDecodeError as e:
        table.problem(
            None, f"not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}) — fix the file"
        )
        return table
    except (OSError, UnicodeDecodeError) as e:
        table.problem(None, f"cannot read the file ({_one_line(e)}) — check the file")
        return table
    if not isinstance(items, list):
        table.problem(
            None,
            f"top level is a JSON {_json_type(items)}, expected a list of "
            "objects with 'image' and 'gt_score' — fix the file",
        )
        return table
    image_key, mos_key = image_column or "image", mos_column or "gt_score"
    for i, item in enumerate(items, start=1):
        _json_record(table, i, item, image_key, mos_key, "std")
    return table


def _read_deqa_json(
    src: Path, label: str, image_column: str | None, mos_column: str | None
) -> _Table:
    """DeQA-Score metas: Q-Align's JSON shape, laid out as <root>/<SET>/metas/<file>.json with
    images named "<SET>/images/<file>" relative to <root> (Data-DeQA-Score README.md; the name is
    os.path.join(img_dir, img) in build_soft_labels/gen_soft_label.py). The "<SET>/images/"
    prefix is dropped, so the images root is the folder holding the images themselves: by
    default <SET>/images next to metas/, or any folder passed as images_root (e.g. where an
    archive unpacked them)."""
    table = _read_qalign_json(src, label, image_column, mos_column)
    if src.parent.name.lower() == "metas":
        table.default_root = src.parent.parent / "images"
    for rec in table.records:
        if isinstance(rec.image, str):
            parts = rec.image.replace("\\", "/").split("/")
            if len(parts) >= 3 and parts[1] == "images" and parts[0] not in ("", ".", ".."):
                rec.image = "/".join(parts[2:])
    return table


@dataclass(frozen=True)
class _PyiqaSet:
    native: tuple[float, float]
    roots: tuple[str, ...]  # image folders relative to the data root (meta_info/'s parent)
    std_on_mos_scale: bool = True
    fallback_dirs: tuple[str, ...] = ()


# pyiqa meta-info files we know, by name. Ranges: KADID's MOS is 1-5; LIVE-C's and SPAQ's are
# 0-100 sliders; KonIQ's `mos` is the 0-100 MOS_zscore column (row 10004473376.jpg: mos 77.38
# while its c1..c5 histogram gives 3.83 on 1-5), and its `std` is the SD on the 1-5 scale
# (0.527 for that row), so it is dropped rather than rescaled by the wrong factor. Folders are
# pyiqa's `dataroot_target`s (pyiqa/default_dataset_configs.yml); KonIQ's archive also holds
# 1024x768/, used when 512x384/ is absent.
PYIQA_SETS = {
    "meta_info_koniq10kdataset": _PyiqaSet(
        (0.0, 100.0), ("koniq10k/512x384", "koniq10k/1024x768"), std_on_mos_scale=False),
    "meta_info_kadid10kdataset": _PyiqaSet((1.0, 5.0), ("kadid10k/images",)),
    "meta_info_spaqdataset": _PyiqaSet((0.0, 100.0), ("SPAQ/TestImage",)),
    "meta_info_livechallengedataset": _PyiqaSet(
        (0.0, 100.0), ("LIVEC/Images",), fallback_dirs=("trainingImages",)),
}
# NR files name the image first (img_name; older SPAQ files "Image name"); FR files hold
# ref_name, dist_name: the distorted image is the one scored.
_PYIQA_IMAGE = ("dist_name", "img_name", "Image name", "image_name", "name")
_PYIQA_MOS = ("mos", "dmos")
_SPLIT_VALUES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test", "testing": "test"}


def _pyiqa_key(src: Path) -> str:
    return src.name.split(".")[0].lower()


def _split_value(v: Any) -> str:
    text = "" if v is None else str(v).strip().lower()
    return _SPLIT_VALUES.get(text, text)


def _split_columns(header: list[str]) -> list[str]:
    cols = [h for h in header if h and "split" in h.lower()]
    # pyiqa's choice when the set has an official split, then its first random split (_01).
    return sorted(cols, key=lambda c: (c.lower() != "official_split", c.lower() != "split", c))


def _read_pyiqa(
    src: Path,
    label: str,
    image_column: str | None,
    mos_column: str | None,
    split: str | None,
    split_column: str | None,
) -> _Table:
    known = PYIQA_SETS.get(_pyiqa_key(src))
    data_root = src.parent.parent if src.parent.name.lower() == "meta_info" else src.parent
    roots = known.roots if known else ()
    table = _Table(label, "row", _default_root(data_root, roots),
                   fallback_dirs=known.fallback_dirs if known else ())
    if known:
        table.native_range, table.native_known = known.native, True
    try:
        header, rows = _read_csv(src)
    except UnicodeDecodeError as e:
        table.problem(None, f"not UTF-8 text ({e.reason} at byte {e.start}) — re-save as UTF-8")
        return table
    except Exception as e:  # csv.Error, OSError
        table.problem(None, f"cannot read the table ({_one_line(e)}) — check the file")
        return table
    image_col = _pick_column(table, header, (image_column,) if image_column else _PYIQA_IMAGE,
                             "image", "image_column")
    mos_col = _pick_column(table, header, (mos_column,) if mos_column else _PYIQA_MOS, "MOS",
                           "mos_column")
    std_col = _find_column(header, ("std",)) if (known is None or known.std_on_mos_scale) \
        else None
    if image_col is None or mos_col is None:
        return table
    keep = None
    if split is not None or split_column is not None:
        col = _pick_split_column(table, header, split_column)
        if col is None:
            return table
        if split is None:
            table.problem(None, f"split_column={split_column!r} needs split=train|val|test")
            return table
        want = _split_value(split)
        present = sorted({_split_value(r.get(col)) for _, r in rows} - {""})
        if want not in present:
            table.problem(None, f"no rows with split {split!r} in column {col!r} (values: "
                                f"{', '.join(present) or 'none'})")
            return table
        keep = (col, want)
    for row_no, row in rows:
        if keep is not None and _split_value(row.get(keep[0])) != keep[1]:
            continue
        table.records.append(
            _Record(row_no, row.get(image_col), row.get(mos_col),
                    row.get(std_col) if std_col else None)
        )
    return table


def _pick_split_column(table: _Table, header: list[str], wanted: str | None) -> str | None:
    cols = _split_columns(header)
    if wanted is not None:
        col = _find_column(header, (wanted,))
        if col is None:
            table.problem(None, f"no split column {wanted!r} (split columns: "
                                f"{', '.join(cols) or 'none'})")
        return col
    if not cols:
        table.problem(None, "has no split column — pass the whole file (no split=...) or a "
                            "file that carries one")
        return None
    return cols[0]


def list_splits(path: str | os.PathLike) -> dict[str, dict[str, int]]:
    """Split columns of a pyiqa meta-info CSV -> {split value: rows}; {} for other files.

    Values are normalised (training -> train, validation -> val). The first column is the one
    `read_labels(split=...)` uses by default.
    """
    src = Path(path)
    try:
        if _resolve_format(src, str(path), "auto") != "pyiqa":
            return {}
    except LabelError:
        return {}
    header, rows = _read_csv(src)
    out: dict[str, dict[str, int]] = {}
    for col in _split_columns(header):
        counts: dict[str, int] = {}
        for _, row in rows:
            v = _split_value(row.get(col))
            if v:
                counts[v] = counts.get(v, 0) + 1
        out[col] = dict(sorted(counts.items()))
    return out


def _first_jsonl_samples(src: Path, label: str, image_column: str | None,
                         mos_column: str | None, images_root: str | os.PathLike | None,
                         mos_range: tuple[float, float] | None, check_images: bool,
                         limit: int) -> tuple[list[Sample], list[LabelProblem]]:
    """The first `limit` usable samples of a JSONL file, reading only as far as needed: parse a
    few more lines than `limit`, and four times as many again while rejected rows leave too few
    (the re-reads add at most a third to the lines a single exact pass would parse)."""
    want = max(2 * limit, 64)
    while True:
        table = _read_jsonl(src, label, image_column, mos_column, max_records=want)
        root, enforce = ((_abs(Path(images_root)), True) if images_root is not None
                         else (table.default_root, False))  # jsonl is free-form
        samples, problems = _finish(table, root, enforce, mos_range or KNOWN_FORMATS["jsonl"],
                                    check_images, limit)
        if len(samples) >= limit or len(table.records) < want:
            return samples, problems
        want *= 4


def _read_jsonl(src: Path, label: str, image_column: str | None, mos_column: str | None,
                max_records: int | None = None) -> _Table:
    table = _Table(label, "line", src.parent)
    image_key, mos_key = image_column or "image", mos_column or "mos"
    n = 0
    try:
        with open(src, encoding="utf-8-sig") as f:
            for n, line, size in _bounded_lines(f):
                if line is None:
                    table.problem(n, f"is longer than {MAX_LINE_CHARS:,} characters ({size:,}) "
                                  "— a label line holds an image path and a score; fix or drop "
                                  "the line")
                    continue
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    table.problem(n, f"not valid JSON ({e.msg}) — fix or drop the line")
                    continue
                _json_record(table, n, item, image_key, mos_key, "mos_std")
                if max_records is not None and len(table.records) >= max_records:
                    break  # `_first_jsonl_samples` asks for more if these are not enough
    except UnicodeDecodeError as e:
        # Rows before the bad bytes are kept; the rest of the file cannot be trusted.
        table.problem(n + 1, f"not UTF-8 text ({e.reason}) — re-save the file as UTF-8")
    except OSError as e:
        table.problem(None, f"cannot read the file ({_one_line(e)}) — check the file")
    return table


# A label line is an image path, a score and a few fields (~100 characters); 1 Mi characters
# leaves room for any metadata while a runaway line (a 200 MB blob, a binary file renamed
# .jsonl) is skipped in bounded pieces instead of being held in memory.
MAX_LINE_CHARS = 1 << 20


def _bounded_lines(f) -> Iterable[tuple[int, str | None, int]]:
    """(line number, text, length) per line of `f`; text is None for a line over the limit."""
    n = 0
    while line := f.readline(MAX_LINE_CHARS + 1):
        n += 1
        if len(line) <= MAX_LINE_CHARS or line.endswith("\n"):
            yield n, line, len(line)
            continue
        size = len(line)
        while piece := f.readline(MAX_LINE_CHARS):  # skip to the end of the line
            size += len(piece)
            if piece.endswith("\n"):
                break
        yield n, None, size


def _json_record(
    table: _Table, row: int, item: Any, image_key: str, mos_key: str, std_key: str
) -> None:
    if not isinstance(item, dict):
        table.problem(
            row, f"is a JSON {_json_type(item)}, expected an object — fix or drop the {table.unit}"
        )
        return
    for key in (image_key, mos_key):
        if key not in item:
            keys = ", ".join(map(str, item)) or "none"
            table.problem(row, f"no {key!r} key (keys: {keys}) — fix or drop the {table.unit}")
            return
    table.records.append(
        _Record(row, item.get(image_key), item[mos_key], item.get(std_key), item.get("id"))
    )


def _json_type(x: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean"}.get(
        type(x), "number" if isinstance(x, (int, float)) else "null"
    )


# --------------------------------------------------------------------------------------------
# The shared pass: numbers, range, paths, images, duplicates -> Samples


def _finish(
    table: _Table,
    root: Path,
    enforce_root: bool,
    mos_range: tuple[float, float] | None,
    check_images: bool,
    limit: int | None = None,
) -> tuple[list[Sample], list[LabelProblem]]:
    unit = table.unit
    fix = f"fix or drop the {unit}"
    parsed: list[tuple[_Record, float]] = []
    for rec in table.records:
        value, err = _number(rec.mos)
        if err:
            table.problem(rec.row, f"MOS {err} — {fix}")
        else:
            parsed.append((rec, value))

    if mos_range is None:
        # Generic CSV: only 1-5 is safe to assume; any other scale must be stated.
        values = [v for _, v in parsed]
        if values and not all(SCALE_LO <= v <= SCALE_HI for v in values):
            table.problem(
                None,
                f"MOS values span {min(values):g}..{max(values):g}, not 1–5, "
                f"and the scale is unknown — {RANGE_HINT}",
            )
            return [], table.problems
        mos_range = (SCALE_LO, SCALE_HI)
    lo, hi = mos_range
    factor = (SCALE_HI - SCALE_LO) / (hi - lo)
    tol = 1e-9 * (hi - lo)  # published values sit exactly on the bounds; allow float noise

    samples: list[Sample] = []
    seen: dict[str, int | None] = {}
    root_norm = _abs(root)
    if check_images and parsed and not root_norm.is_dir():
        # One line instead of one "image not found" per row.
        table.problem(
            None,
            f"images folder {root_norm} does not exist — pass images_root=... / --images-root",
        )
        return [], table.problems
    for rec, raw in parsed:
        if limit is not None and len(samples) >= limit:
            break
        if not lo - tol <= raw <= hi + tol:
            table.problem(
                rec.row,
                f"MOS {raw:g} is outside the declared range {lo:g}–{hi:g} — "
                f"{RANGE_HINT} if the file uses another scale, else {fix}",
            )
            continue
        std, err = _std(rec.std, table.std_is_var)
        if err:
            table.problem(rec.row, f"MOS std {err} — {fix}")
            continue
        name = "" if rec.image is None else str(rec.image).strip()
        if not name:
            table.problem(rec.row, f"image name is empty — {fix}")
            continue
        image = _abs(Path(name) if Path(name).is_absolute() else root_norm / name)
        if enforce_root and not _inside(image, root_norm):
            table.problem(
                rec.row,
                f"image path {name!r} leaves the images root {root_norm} — "
                f"move the image under the root or drop the {unit}",
            )
            continue
        if table.fallback_dirs and not image.exists():
            for sub in table.fallback_dirs:
                alt = root_norm / sub / name
                if alt.exists():
                    image = alt
                    break
        sample_id = _sample_id(rec.id, image, root_norm)
        if sample_id in seen:
            first = seen[sample_id]
            at = f" (first at {unit} {first})" if first is not None else ""
            table.problem(rec.row, f"duplicate id {sample_id!r}{at} — drop one of them")
            continue
        seen[sample_id] = rec.row
        if check_images:
            err = _image_problem(image)
            if err:
                table.problem(rec.row, f"{err} — {fix}")
                continue
        samples.append(
            Sample(
                id=sample_id,
                image=image.resolve(),
                mos=SCALE_LO + (raw - lo) * factor,
                mos_std=None if std is None else std * factor,
                raw_mos=raw,
            )
        )
    return samples, table.problems


def _number(value: Any) -> tuple[float, str | None]:
    """(value, None) or (nan, what is wrong with it)."""
    if value is None or isinstance(value, str) and not value.strip():
        return math.nan, "is empty"
    if isinstance(value, bool):  # JSON true/false are ints to Python, never a score
        return math.nan, f"{value!r} is not a number"
    try:
        x = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        return math.nan, f"{_short(value)!r} is not a number"
    if not math.isfinite(x):
        return math.nan, f"{_short(value)!r} is not a finite number"
    return x, None


def _std(value: Any, is_var: bool) -> tuple[float | None, str | None]:
    if value is None or isinstance(value, str) and not value.strip():
        return None, None  # std is optional everywhere
    x, err = _number(value)
    if err:
        return None, err
    if x < 0:
        return None, f"{x:g} is negative"
    return (math.sqrt(x) if is_var else x), None


def _sample_id(given: Any, image: Path, root: Path) -> str:
    if given is not None and str(given).strip():
        return str(given).strip()
    if _inside(image, root):
        return image.relative_to(root).as_posix()
    return image.as_posix()


def _image_problem(image: Path) -> str | None:
    from PIL import Image

    from qponder_mlx.images import ensure_heif_support

    if not image.is_file():
        return f"image not found: {image}"
    ensure_heif_support()
    try:
        # Header only: Image.open reads the size lazily without decoding pixels.
        with Image.open(image) as im:
            w, h = im.size
    except Exception as e:  # any reason Pillow refuses the header means we cannot use it
        return f"image {image} is unreadable ({_one_line(e) or type(e).__name__})"
    if w <= 0 or h <= 0:
        return f"image {image} has zero size"
    return None


# --------------------------------------------------------------------------------------------
# Small helpers


def _check_range(mos_range: Sequence[float]) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in mos_range)
    except (TypeError, ValueError):
        raise ValueError(f"mos_range must be (lo, hi), got {mos_range!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"mos_range must be finite with lo < hi, got {mos_range!r}")
    return lo, hi


def _default_root(base: Path, candidates: Iterable[str]) -> Path:
    for sub in candidates:
        d = base / sub
        if d.is_dir():
            return _abs(d)
    return _abs(base)


def _abs(p: Path) -> Path:
    # Lexical normalisation, not resolve(): image folders are often symlinks to another disk,
    # and following them would make every image look as if it left the root.
    return Path(os.path.normpath(Path(p).absolute()))


def _inside(p: Path, root: Path) -> bool:
    return p == root or root in p.parents


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _short(value: Any, limit: int = 40) -> str:
    s = str(value)
    return s if len(s) <= limit else s[: limit - 1] + "…"
