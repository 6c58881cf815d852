"""`get_set`: download, unpack and check one catalogue set, laid out the way pyiqa lays it out.

<out>/meta_info/meta_info_<Name>Dataset.csv beside <out>/koniq10k/512x384/ … is pyiqa's own
data-root layout (pyiqa/default_dataset_configs.yml), so a folder pyiqa filled works here and
the reverse. Per split, a copy of the label file restricted to that split is written beside it
(`meta_info_KonIQ10kDataset.test.csv`): `qponder eval` and `qponder distill` take a label file,
and the split files make the exact commands printed at the end pick the right rows.

A finished run leaves <out>/.qponder-data/<name>.json; the next run finds it, checks the files
it names still exist, and does nothing. Downloads resume from <out>/.qponder-data/*.part.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shlex
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from qponder_mlx.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from qponder_mlx.iqa_sets.catalog import SETS, IQASet, find_set, human_bytes
from qponder_mlx.iqa_sets.extract import Limits, UnsafeArchive, is_disk_full, safe_extract
from qponder_mlx.iqa_sets.fetch import (
    DataError,
    cached_archive,
    download_archive,
    fetch_small,
    remote_size,
)

STATE = ".qponder-data"
# Photo archives barely compress (JPEG/PNG) or compress ~3x (BMP: LIVE-C's 0.33 GB .tgz holds
# 1,169 x 500x500x3 bytes = 0.88 GB). 3x the archive plus 64 MB fits every catalogue set and
# stops a bomb early (a .tgz of zeros compresses ~1000x).
BOMB_RATIO, BOMB_FLOOR = 3, 64 * 2**20


@dataclass
class Prepared:
    name: str
    out: str
    eval_labels: str
    train_labels: str | None
    images_root: str
    other_roots: list[str]
    mos_range: list[float] | None
    n_eval: int
    n_train: int | None
    problems: list[str]
    finished: str
    already: bool = False

    def commands(self, s: IQASet) -> list[str]:
        """The exact next commands (paths shell-quoted)."""
        q = shlex.quote
        extra = f" --images-root {q(self.images_root)}"
        if self.mos_range:
            extra += f" --mos-range {self.mos_range[0]:g},{self.mos_range[1]:g}"
        lines = [f"qponder eval --data {q(self.eval_labels)}{extra} --out {s.name}-eval.json"]
        if self.train_labels:
            lines.append(f"qponder distill --data {q(self.train_labels)}{extra} "
                         f"--out {s.name}-sft.jsonl")
        else:
            lines.append(f"qponder distill --data {q(self.eval_labels)}{extra} "
                         f"--out {s.name}-sft.jsonl   # no train split published: this "
                         "trains on the evaluation images")
        return lines


def _marker(out: Path, name: str) -> Path:
    return out / STATE / f"{name}.json"


def load_done(out: Path, name: str) -> Prepared | None:
    """The record of a finished `get` whose files are all still there, else None."""
    path = _marker(out, name)
    try:
        p = Prepared(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    paths = [p.eval_labels, p.images_root] + ([p.train_labels] if p.train_labels else [])
    if not all(Path(x).exists() for x in paths):
        return None
    p.already = True
    return p


def get_set(name: str, out: Path, *, endpoint: str | None = None,
            cache_dir: Path | None = None, keep_archive: bool = False,
            say: Callable[[str], None] = print, progress: bool = True,
            free_bytes: Callable[[Path], int] | None = None) -> Prepared:
    """Fetch set `name` into `out`; raises DataError / UnsafeArchive with one-line messages."""
    s = find_set(name)
    if s is None:
        raise DataError(f"unknown data set {name!r} — one of: "
                        f"{', '.join(x.name for x in SETS)} (`qponder data list`)")
    out = Path(os.path.abspath(out))
    done = load_done(out, s.name)
    if done is not None:
        return done
    state = out / STATE
    state.mkdir(parents=True, exist_ok=True)

    labels = _fetch_labels(s, out, endpoint, cache_dir)
    roots = [out / r.images_dir for r in s.resolutions]
    top = {s.unpack_into} if s.unpack_into else {Path(r.images_dir).parts[0]
                                                  for r in s.resolutions}
    if any((out / t).exists() for t in top):
        say(f"{s.name}: {', '.join(sorted(top))} already in {out} — using it, not downloading")
    else:
        _download_and_unpack(s, out, endpoint, cache_dir, keep_archive, say, progress,
                             free_bytes)
    root = _images_root(s, labels, roots, out)
    eval_labels, train_labels = _split_views(s, labels, say)
    return _verify_and_record(s, out, eval_labels, train_labels, root, roots)


def _fetch_labels(s: IQASet, out: Path, endpoint, cache_dir) -> Path:
    cached = fetch_small(s.label_repo, s.label_file, endpoint=endpoint, cache_dir=cache_dir)
    dest = out / s.label_dir / Path(s.label_file).name
    data = cached.read_bytes()
    if not dest.exists() or dest.read_bytes() != data:
        atomic_write_bytes(dest, data)
    return dest


def _download_and_unpack(s: IQASet, out: Path, endpoint, cache_dir, keep_archive, say,
                         progress, free_bytes) -> None:
    from qponder_mlx.progress import progress_bar

    state = out / STATE
    archive = cached_archive(s.archive_repo, s.archive_file, cache_dir)
    owned = archive is None
    if archive is not None:
        say(f"{s.name}: using {s.archive_file} from the Hugging Face cache ({archive})")
    else:
        archive = state / s.archive_file
        if not archive.exists():
            part = archive.with_name(archive.name + ".part")
            have = part.stat().st_size if part.exists() else 0
            if have:
                say(f"{s.name}: resuming {s.archive_file} from {human_bytes(have)}")
            mb = 1e6
            total = remote_size(s.archive_repo, s.archive_file, endpoint=endpoint) \
                or s.download_bytes
            with progress_bar(max(1, round(total / mb)), f"download {s.archive_file}",
                              unit="MB", enabled=progress, completed=round(have / mb)) as adv:
                last = [round(have / mb)]

                def tick(got: int, total: int) -> None:
                    now = round(got / mb)
                    if now > last[0]:
                        adv(now - last[0])
                        last[0] = now

                download_archive(s.archive_repo, s.archive_file, archive, endpoint=endpoint,
                                 progress=tick, free_bytes=free_bytes,
                                 need_after=s.download_bytes)
    staging = state / f"unpack-{s.name}"
    shutil.rmtree(staging, ignore_errors=True)  # a crash in an earlier run left it
    size = archive.stat().st_size
    limits = Limits(max_bytes=BOMB_RATIO * size + BOMB_FLOOR, max_files=s.member_ceiling)
    try:
        with progress_bar(max(1, round(size / 1e6)), f"unpack {s.archive_file}", unit="MB",
                          enabled=progress) as adv:
            acc = [0.0]

            def eaten(n: int) -> None:
                acc[0] += n / 1e6
                if acc[0] >= 1:
                    adv(int(acc[0]))
                    acc[0] -= int(acc[0])

            got = safe_extract(archive, staging, limits, eaten)
    except UnsafeArchive:
        if owned:
            archive.unlink(missing_ok=True)  # never keep what we refused
        raise
    except OSError as e:
        if is_disk_full(e):
            raise DataError(f"disk full while unpacking {s.archive_file} into {out} — free "
                            "space or pass --out on a bigger disk, then rerun") from e
        raise
    # Folders at the top (koniq10k/, LIVEC/) move into <out> as they are; loose files at the
    # top would scatter over <out>, so then the whole tree goes into the set's own folder.
    own = s.unpack_into or Path(s.resolutions[0].images_dir).parts[0]
    if s.unpack_into is None and all((staging / n).is_dir() and not (staging / n).is_symlink()
                                     for n in got.top_level):
        moves = [(staging / n, out / n) for n in got.top_level]
    else:
        moves = [(staging, out / own)]
    for _, dest in moves:
        if dest.exists():
            shutil.rmtree(staging, ignore_errors=True)
            raise DataError(f"{dest} already exists and was not written by `qponder data get` "
                            "— move it away and rerun")
    for src, dest in moves:
        os.replace(src, dest)
    if staging.exists():
        staging.rmdir()
    say(f"{s.name}: unpacked {got.files:,} files ({human_bytes(got.bytes)}) into {out}")
    if owned and not keep_archive:
        archive.unlink()


def _label_names(s: IQASet, labels: Path, k: int = 5) -> list[str]:
    from qponder_mlx.labels import read_labels

    # Only the names are wanted here: no image checks, and a range wide enough that no score is
    # rejected (the real range is applied when the labels are verified).
    samples, _ = read_labels(labels, format=s.label_format, images_root=labels.parent,
                             check_images=False, mos_range=(-1e300, 1e300))
    rels = [x.image.relative_to(labels.parent).as_posix() for x in samples
            if labels.parent in x.image.parents]
    # The last rows: LIVE-C's first 7 are its practice photos in a subfolder.
    return rels[-k:]


def _images_root(s: IQASet, labels: Path, roots: list[Path], out: Path) -> Path:
    """The catalogue's folder if the labels' images are there, else the folder that holds
    them (archives move: AGIQA-3K.zip's layout is not documented anywhere we could read)."""
    names = _label_names(s, labels)
    if not names:
        return roots[0]

    def holds(d: Path) -> bool:
        return all((d / n).is_file() for n in names)

    for r in roots:
        if holds(r):
            return r
    first = Path(names[0]).name
    own = out / (s.unpack_into or Path(s.resolutions[0].images_dir).parts[0])
    for base in (own, out):  # the set's own folder first: <out> may hold other large sets
        for dirpath, _dirs, files in os.walk(base):
            if STATE in Path(dirpath).parts or first not in files:
                continue
            d = Path(dirpath)
            # names may carry subfolders (a/b.jpg): climb until every name resolves
            for cand in (d, *d.parents):
                if holds(cand):
                    return cand
                if cand == out:
                    break
    raise DataError(f"{s.name}: none of the labelled images (e.g. {names[0]}) is under {out} — "
                    "the archive layout changed; pass --images-root to qponder eval yourself")


def _split_views(s: IQASet, labels: Path, say) -> tuple[Path, Path | None]:
    """(eval file, train file): per-split copies of a pyiqa meta CSV; the file itself else."""
    from qponder_mlx.labels import list_splits

    splits = list_splits(labels) if s.label_format == "pyiqa" else {}
    if not splits:
        if s.label_format == "pyiqa":
            say(f"{s.name}: {labels.name} has no split column — evaluating on all of it")
        return labels, None
    col, values = next(iter(splits.items()))
    want_eval = s.eval_split if s.eval_split in values else ("test" if "test" in values
                                                             else "val")
    views = {}
    for split in (want_eval, "train"):
        if split in values:
            views[split] = _write_split(labels, col, split)
    return views[want_eval], views.get("train")


def _write_split(labels: Path, column: str, split: str) -> Path:
    from qponder_mlx.labels import _split_value  # the same normalisation the reader applies

    text = labels.read_text(encoding="utf-8-sig")
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader)
    at = [h.strip().lower() for h in header].index(column.strip().lower())
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in reader:
        if len(row) > at and _split_value(row[at]) == split:
            w.writerow(row)
    dest = labels.with_name(f"{labels.name.split('.')[0]}.{split}.csv")
    if not dest.exists() or dest.read_text(encoding="utf-8") != buf.getvalue():
        atomic_write_text(dest, buf.getvalue())
    return dest


def _verify_and_record(s: IQASet, out: Path, eval_labels: Path, train_labels: Path | None,
                       root: Path, roots: list[Path]) -> Prepared:
    from qponder_mlx.labels import LabelError, read_labels

    counts, problems = [], []
    for f in (eval_labels, train_labels):
        if f is None:
            counts.append(None)
            continue
        try:
            samples, probs = read_labels(f, format=s.label_format, images_root=root,
                                         mos_range=s.mos_range)
        except LabelError as e:
            raise DataError(f"{s.name}: {e.problems[0]}") from e
        counts.append(len(samples))
        problems += [str(p) for p in probs]
    if not counts[0]:
        raise DataError(f"{s.name}: no usable labelled image in {eval_labels}"
                        + (f" ({problems[0]})" if problems else ""))
    p = Prepared(name=s.name, out=str(out), eval_labels=str(eval_labels),
                 train_labels=str(train_labels) if train_labels else None,
                 images_root=str(root),
                 other_roots=[str(r) for r in roots if r != root and r.is_dir()],
                 mos_range=list(s.mos_range) if s.mos_range else None,
                 n_eval=counts[0], n_train=counts[1], problems=problems[:20],
                 finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    record = asdict(p)
    record.pop("already")
    atomic_write_json(_marker(out, s.name), record)
    return p
