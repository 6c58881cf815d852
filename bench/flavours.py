"""Which models a bench runs: its float32 random models, and the real-layout fixtures users' models
stand for (`qponder_mlx/testing/real_layouts.py`: the real config, tokenizer and file set, depth
and widths cut for CI) in bf16 and in mlx-community's 4-bit layout.

    ap = argparse.ArgumentParser(); add_model_args(ap); args = ap.parse_args()
    with fixture_root(args) as root:
        for run in model_runs(ap, args):      # float32 first, then 3B bf16, then 3B 4-bit
            model_dir = run.model_dir(root)    # None for float32: the bench builds its own
            result(f"score_fast_speedup{run.suffix}", ...)   # "", "_3b_bf16", "_3b_4bit"

No option: float32 and the 3B in bf16 and 4-bit. `--flavour qwen2.5-vl-3b --dtype 4bit`: that one
model. The fixtures are built into a temporary folder each run, or kept in `--cache-dir` (the
folder names match `tests/conftest.py`'s, so a test session's fixture folder serves as a cache).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

FLOAT32 = "float32"
DTYPES = (FLOAT32, "bf16", "4bit")
RANDOM = "random"  # the benches' own float32 random Qwen2.5-VL models
DEFAULT_FLAVOUR = "qwen2.5-vl-3b"
# What the RESULT names carry: score_fast_speedup_3b_4bit.
SHORT = {"qwen2.5-vl-3b": "3b", "qwen2.5-vl-7b": "7b", "qwen2-vl-2b": "2b"}


@dataclass(frozen=True)
class ModelRun:
    flavour: str  # RANDOM or a real_layouts flavour
    dtype: str

    @property
    def real(self) -> bool:
        return self.flavour != RANDOM

    @property
    def suffix(self) -> str:
        """'' for float32 (today's RESULT names), '_3b_4bit' for the 3B 4-bit fixture."""
        return f"_{SHORT[self.flavour]}_{self.dtype}" if self.real else ""

    @property
    def label(self) -> str:
        return f"{self.flavour} {self.dtype}" if self.real else "random float32"

    def model_dir(self, root: Path) -> Path | None:
        """The fixture's folder under root, built unless already complete there (None for the
        float32 random models, which each bench builds at its own sizes)."""
        if not self.real:
            return None
        from qponder_mlx.testing.real_layouts import build_real_layout, quantize_real_layout

        bf16 = root / self.flavour
        # The last file each builder writes: its presence means an earlier build finished.
        if not (bf16 / "generation_config.json").exists():
            t0 = time.perf_counter()
            build_real_layout(bf16, self.flavour)
            print(f"built {bf16} ({time.perf_counter() - t0:.1f} s)", flush=True)
        if self.dtype == "bf16":
            return bf16
        q4 = root / f"{self.flavour}-4bit-hub"
        if not (q4 / "preprocessor_config.json").exists():
            t0 = time.perf_counter()
            quantize_real_layout(bf16, q4, layout="hub")
            print(f"built {q4} ({time.perf_counter() - t0:.1f} s)", flush=True)
        return q4


def add_model_args(ap: argparse.ArgumentParser) -> None:
    from qponder_mlx.testing.real_layouts import FLAVOURS

    ap.add_argument("--flavour", choices=(RANDOM, *FLAVOURS), default=None,
                    help=f"only this model ({RANDOM}: the float32 random models; a real-layout "
                         f"flavour runs in --dtype). Default: {RANDOM} float32 and "
                         f"{DEFAULT_FLAVOUR} in bf16 and 4bit")
    ap.add_argument("--dtype", choices=DTYPES, default=None,
                    help=f"only this dtype (bf16 or 4bit: the real-layout fixture, "
                         f"{DEFAULT_FLAVOUR} unless --flavour says; 4bit is mlx-community's "
                         f"layout)")
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="build the real-layout fixtures here and reuse them on later runs "
                         "(default: a temporary folder, removed at the end)")


def model_runs(ap: argparse.ArgumentParser, args) -> list[ModelRun]:
    """The models to run, float32 first, from --flavour and --dtype."""
    flavour, dtype = args.flavour, args.dtype
    if flavour is None and dtype is None:
        return [ModelRun(RANDOM, FLOAT32), ModelRun(DEFAULT_FLAVOUR, "bf16"),
                ModelRun(DEFAULT_FLAVOUR, "4bit")]
    if flavour == RANDOM or dtype == FLOAT32:
        if flavour not in (None, RANDOM) or dtype not in (None, FLOAT32):
            ap.error(f"--flavour {flavour} --dtype {dtype}: the random models are float32 and "
                     "the real-layout fixtures are bf16 or 4bit")
        return [ModelRun(RANDOM, FLOAT32)]
    return [ModelRun(flavour or DEFAULT_FLAVOUR, d) for d in ([dtype] if dtype else
                                                              ["bf16", "4bit"])]


@contextlib.contextmanager
def fixture_root(args):
    """--cache-dir, or a temporary folder removed on the way out."""
    if args.cache_dir is not None:
        args.cache_dir.mkdir(parents=True, exist_ok=True)
        yield args.cache_dir
        return
    with tempfile.TemporaryDirectory(prefix="qponder-bench-models-") as tmp:
        yield Path(tmp)
