"""A folder of 12-MP JPEGs scored end to end in fast mode, against the model's own limit.

For each model (the tiny random model, and the 3B-layout 4-bit fixture of
qponder_mlx/testing/real_layouts.py: the real Qwen2.5-VL-3B config fields, tokenizer and
mlx-community 4-bit file layout, at CI widths), default pixel policy (a 4032x3024 photo -> 728x532,
494 image tokens), batch 8, all in one process after one untimed warm-up:

* limit: `Scorer.score` on the photos already decoded and resized (processor patching and the
  model forward only): the physical limit of this pipeline;
* ours: what `qponder score PATH --mode fast` runs after loading the model: discover, then
  `score_library` into a new store (hash, plan by header, read, decode, score, commit), with
  reduced JPEG decoding and reads in threads ahead of the model;
* today: the same with each photo decoded in full and read when its batch comes (the code path
  before reduced decoding and reading ahead).

    . scripts/blas_env.sh; .venv/bin/python bench/library_speed.py          # ~5 min, 2 cores
    .venv/bin/python bench/library_speed.py --min-pixels 3136 --max-pixels 12544  # 112 px
    .venv/bin/python bench/library_speed.py --quick                       # smoke run

Ends with `RESULT library_fast_efficiency_<model> <ours img/s / limit img/s> goal 0.8` and
`RESULT library_fast_speedup_<model> <ours / today> goal n/a`, plus the decode times per photo
(full vs reduced) and a pool of threads against one of processes over the same folder.
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import mlx.core as mx  # noqa: E402
from flavours import DEFAULT_FLAVOUR, ModelRun  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402
from timing import Box, interleaved, median  # noqa: E402

from qponder_mlx.images import PixelPolicy, load_for_model, load_image_bytes  # noqa: E402
from qponder_mlx.library import ResultStore, discover, score_job, score_library  # noqa: E402
from qponder_mlx.model import load_model  # noqa: E402
from qponder_mlx.scoring import ScoreConfig, Scorer  # noqa: E402
from qponder_mlx.testing import build_tiny_model  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "qponder_mlx" / "assets" / "cc0_mini" / "images"
SIZE = (4032, 3024)  # 12.2 MP, a phone's 4:3 photo
POLICY = PixelPolicy()  # main() replaces it with --min-pixels/--max-pixels


def make_photos(folder: Path, n: int) -> list[Path]:
    """n distinct 12-MP JPEGs (q90): the CC0 photos upscaled (bicubic), then mirrored."""
    folder.mkdir(parents=True, exist_ok=True)
    src = sorted(ASSETS.iterdir())
    out = []
    for i in range(n):
        img = Image.open(src[i % len(src)]).convert("RGB").resize(SIZE, Image.Resampling.BICUBIC)
        if (i // len(src)) % 2:
            img = ImageOps.mirror(img)
        p = folder / f"IMG_{i:04d}.jpg"
        img.save(p, "JPEG", quality=90)
        out.append(p)
    return out


def _full(data: bytes, name, policy: PixelPolicy) -> Image.Image:
    """Today's decode: every pixel, then the resize."""
    return policy.resize(load_image_bytes(data, name), name=str(name))


def _decode_file(path: str, policy: PixelPolicy) -> Image.Image:
    return load_for_model(Path(path).read_bytes(), path, policy)


def decode_bench(photos: list[Path], box: Box, repeats: int) -> None:
    """Seconds per photo: full vs reduced decode (serial), and 2 threads vs 2 processes."""
    first = photos[0].read_bytes()
    times = interleaved({
        "full decode + resize": lambda: _full(first, "x.jpg", POLICY),
        "reduced decode + resize": lambda: load_for_model(first, "x.jpg", POLICY),
    }, repeats=max(repeats, 5), box=box)
    for k, v in times.items():
        print(f"{k:28}{median(v):8.3f} s/photo", flush=True)
    names = [str(p) for p in photos]
    decode = functools.partial(_decode_file, policy=POLICY)  # picklable for the processes
    with ThreadPoolExecutor(2) as threads, ProcessPoolExecutor(2) as procs:
        list(procs.map(decode, names[:2]))  # start the workers before timing
        pools = interleaved({
            "serial": lambda: [decode(p) for p in names],
            "2 threads": lambda: list(threads.map(decode, names)),
            "2 processes": lambda: list(procs.map(decode, names)),
        }, repeats=repeats, box=box)
    for k, v in pools.items():
        print(f"{k:28}{len(names) / median(v):8.2f} photos/s (reduced decode, {len(names)} "
              "photos)", flush=True)


def build_models(tmp: Path, wanted: list[str]) -> dict[str, Path]:
    out = {}
    if "tiny" in wanted:
        out["tiny"] = build_tiny_model(tmp / "tiny", seed=0)
    if "3b_layout_4bit" in wanted:
        out["3b_layout_4bit"] = ModelRun(DEFAULT_FLAVOUR, "4bit").model_dir(tmp)
    unknown = set(wanted) - set(out)
    if unknown:
        raise SystemExit(f"--models: unknown {sorted(unknown)} — choose tiny, 3b_layout_4bit")
    return out


def bench_model(name: str, model_dir: Path, folder: Path, args, box: Box) -> tuple[float, float]:
    loaded = load_model(str(model_dir))
    scorer = Scorer(loaded, ScoreConfig(mode="fast", batch_size=args.batch_size, pixels=POLICY))
    files = discover([folder]).files
    resized = [_full(Path(p).read_bytes(), p, POLICY) for p in files]  # the limit's inputs
    tmp = Path(tempfile.mkdtemp(prefix="qponder-lib-"))
    real_loader = score_job.load_for_model

    def limit() -> None:
        scorer.score(resized)

    def run(workers: int, loader) -> float:
        db = tmp / f"run{time.monotonic_ns()}.sqlite"
        score_job.load_for_model = loader
        try:
            with ResultStore(db) as store:
                t0 = time.perf_counter()
                found = discover([folder])
                s = score_library(scorer, found.files, store, progress=False,
                                  decode_workers=workers)
                dt = time.perf_counter() - t0
        finally:
            score_job.load_for_model = real_loader
        if s.scored != len(files):
            raise SystemExit(f"{name}: scored {s.scored} of {len(files)} ({dict(s.errors)})")
        return dt

    try:
        limit()  # warm-up: kernels, lazy imports, the prompt prefix's cache
        run(score_job.DECODE_WORKERS, real_loader)
        mx.clear_cache()
        times = interleaved({
            "limit": limit,
            "ours": lambda: run(score_job.DECODE_WORKERS, real_loader),
            "today": lambda: run(0, _full),
        }, repeats=args.repeats, box=box)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n = len(files)
    ips = {k: n / median(v) for k, v in times.items()}
    print(f"\n[{name}] {n} photos {SIZE[0]}x{SIZE[1]} -> {POLICY.target_size(SIZE)}, "
          f"{POLICY.token_count(SIZE)} image tokens, batch {args.batch_size}, "
          f"{score_job.DECODE_WORKERS} read threads, median of {args.repeats}")
    for k, v in ips.items():
        runs = " ".join(f"{t:.2f}" for t in times[k])
        print(f"  {k:8}{v:8.2f} img/s   runs (s): {runs}", flush=True)
    return ips["ours"] / ips["limit"], ips["ours"] / ips["today"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--min-pixels", type=int, default=PixelPolicy().min_pixels)
    ap.add_argument("--max-pixels", type=int, default=PixelPolicy().max_pixels)
    ap.add_argument("--models", default="tiny,3b_layout_4bit", help="a subset, comma-separated")
    ap.add_argument("--quick", action="store_true", help="8 photos, 1 repeat, tiny model only")
    args = ap.parse_args()
    global POLICY
    POLICY = PixelPolicy(min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    if args.quick:
        args.images, args.repeats = 8, 1
    tmp = Path(tempfile.mkdtemp(prefix="qponder-bench-"))
    try:
        with Box() as box:
            photos = make_photos(tmp / "photos", args.images)
            decode_bench(photos, box, args.repeats)
            wanted = ["tiny"] if args.quick else args.models.split(",")
            models = {k: v for k, v in build_models(tmp, wanted).items() if k in wanted}
            for name, model_dir in models.items():
                eff, speed = bench_model(name, model_dir, tmp / "photos", args, box)
                box.result(f"library_fast_efficiency_{name}", eff, 0.8)
                box.result(f"library_fast_speedup_{name}", speed, "n/a")
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(f"\npeak RSS {peak:.0f} MiB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
