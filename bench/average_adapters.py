"""Element-wise mean of adapter folders that share one layout (History AL and AO of
docs/reproduction.md): GRPO checkpoints averaged by hand, or the SFT and GRPO adapters' midpoint.

    .venv/bin/python bench/average_adapters.py OUT ADAPTER_DIR [ADAPTER_DIR ...]

OUT gets adapters.safetensors (the mean) and the first folder's adapter_config.json, so
`qponder eval --adapter OUT` loads it like any adapter.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import mlx.core as mx

from qponder_mlx.train.averaging import WeightAverage
from qponder_mlx.train.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, write_adapters


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("adapters", type=Path, nargs="+")
    args = ap.parse_args(argv)
    avg = WeightAverage(every=1)
    for folder in args.adapters:
        if not (folder / ADAPTER_WEIGHTS).exists():
            raise SystemExit(f"error: {folder / ADAPTER_WEIGHTS} is missing — pass adapter "
                             "folders (a run's adapters/ or a checkpoint folder)")
        try:
            avg.add(dict(mx.load(str(folder / ADAPTER_WEIGHTS))))
        except ValueError as e:
            raise SystemExit(f"error: {folder}: {e} — average adapters of one run only") from None
    config = json.loads((args.adapters[0] / ADAPTER_CONFIG).read_text())
    write_adapters(avg.weights(), config, args.out)
    print(f"{args.out}: mean of {avg.count} adapters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
