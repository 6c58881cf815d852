"""Distillation throughput: samples/s at 1, 4 and 16 requests in flight.

A local OpenAI-compatible server (tests/distill_server.py) answers every request after a fixed
delay, standing in for a teacher whose latency dominates. Each concurrency N runs the same number
of waves (N samples per wave), through the real path: label samples, image -> data URL, httpx,
retries, parsing, filtering, one fsynced append per sample. Speed-up = rate(N) / rate(1),
measured side by side in this process; the goal is >= 0.8 N.

    .venv/bin/python bench/distill_throughput.py [--delay 0.2] [--waves 20]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from distill_server import Reply, ScriptedServer, answer, write_index_image  # noqa: E402
from timing import median, result, run_main, sample  # noqa: E402

from qponder_mlx.distill import DistillConfig, build_teacher, run_distill  # noqa: E402
from qponder_mlx.labels import Sample  # noqa: E402

LEVELS = (1, 4, 16)


def rate(url: str, images: list[Path], concurrency: int, n: int, out: Path) -> float:
    samples = [Sample(f"s{i:04d}", images[i % len(images)], 3.0) for i in range(n)]
    cfg = DistillConfig(teacher_url=url, teacher_model="bench", concurrency=concurrency)
    teacher = build_teacher(cfg)
    try:
        t0 = time.perf_counter()
        result = run_distill(samples, teacher, cfg, out, progress=False)
        seconds = time.perf_counter() - t0
    finally:
        teacher.close()
    assert result.new["kept"] == n, result.new  # every sample went the whole way
    return n / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--delay", type=float, default=0.2, help="server latency per request (s)")
    ap.add_argument("--waves", type=int, default=20, help="samples per run = waves x N")
    ap.add_argument("--repeats", type=int, default=3, help="runs per level; the median counts")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp, \
            ScriptedServer(default=Reply(answer(3.0)), delay=args.delay) as srv:
        tmp = Path(tmp)
        images = [write_index_image(tmp / f"{i}.png", i, (64, 64)) for i in range(64)]
        rate(srv.url, images, 4, 8, tmp / "warmup.jsonl")  # imports, first connections
        rates = {}
        for n in LEVELS:
            count = args.waves * n
            runs = []
            for r in range(args.repeats):
                runs.append(rate(srv.url, images, n, count, tmp / f"c{n}-{r}.jsonl"))
                sample()
            rates[n] = median(runs)
            ideal = n / args.delay if args.delay else float("inf")
            print(f"concurrency {n:2d}: {count:4d} samples, {rates[n]:7.2f} samples/s "
                  f"(ideal {ideal:.1f}, {rates[n] / ideal:.0%})")
    for n in LEVELS[1:]:
        result(f"distill_speedup_at_{n}", rates[n] / rates[1], f"{0.8 * n:.1f}")


if __name__ == "__main__":
    run_main(main)
