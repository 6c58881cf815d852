"""One rank of a distributed test run: train with our Python API, then report this rank's
adapter tensors into a file of the test's own (outside the run folder)."""

import json
import sys

import mlx.core as mx
from mlx.utils import tree_flatten


def low_id_reward(ro, parsed, mos):
    import numpy as np

    r = np.array([np.mean([t < 280 for t in c.token_ids]) for g in ro.completions for c in g])
    return r, {"low_ids": r}


def main() -> None:
    stage, cfg_path, report = sys.argv[1], sys.argv[2], sys.argv[3]
    with open(cfg_path) as f:
        values = json.load(f)
    if stage == "sft":
        from qponder_mlx.train.config import SFTConfig, load_config
        from qponder_mlx.train.sft import run_sft as run
        cfg = load_config(SFTConfig, None, values)
    else:
        from qponder_mlx.grpo.config import GRPOConfig
        from qponder_mlx.grpo.trainer import run_grpo as run
        from qponder_mlx.train.config import load_config
        cfg = load_config(GRPOConfig, None, values)

    from qponder_mlx.model import load_model
    loaded = load_model(cfg.model)
    if stage == "sft":
        run(cfg, loaded=loaded)
    else:  # a reward with signal even for a random model, so updates really happen
        run(cfg, loaded=loaded, reward_fn=low_id_reward)
    weights = dict(tree_flatten(loaded.model.trainable_parameters()))
    mx.save_safetensors(report, weights)
    print(f"rank done: {len(weights)} tensors", flush=True)


if __name__ == "__main__":
    main()
