"""Stage 1, cold-start SFT: LoRA on `qponder distill` answers -> Q-Ponder-CI.

    loss = Σ_{assistant tokens} −log p(token | everything before) / (number of assistant tokens)

summed over every row of the optimizer step (all micro-batches), so gradient accumulation of k
batches of b rows equals one batch of k·b rows. The LM head runs only on the supervised
positions: the answer is a few hundred of the sequence's tokens, and full logits over a 150k
vocabulary would cost more memory than the rest of the step.

`run_sft(cfg)` is this step inside the shared run loop (`runner.py`: run folder, resume, stop
signals, metrics, progress), plus validation: the loss on `val_data` and, for its rows with a
MOS, SRCC/PLCC of generated answers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_vlm.models.cache import ConcatenateKVCache

from qponder_mlx import generate as gen
from qponder_mlx.images import ImageError, PixelPolicy
from qponder_mlx.model import LoadedModel, load_model
from qponder_mlx.progress import say
from qponder_mlx.train import checkpoint as ckpt_mod
from qponder_mlx.train.config import SFTConfig
from qponder_mlx.train.data_order import DataOrder
from qponder_mlx.train.distributed import World, init_world
from qponder_mlx.train.fast_answers import with_fast_answers
from qponder_mlx.train.image_features import TowerFeatures, tower_features
from qponder_mlx.train.loop import (
    Window,
    add_trees,
    enable_grad_checkpoint,
    guarded_update,
    make_optimizer,
    peak_memory_gb,
    scale_tree,
    zeros_like_tree,
)
from qponder_mlx.train.lora import attach_lora
from qponder_mlx.train.runner import LoopSettings, Run, StepOutcome, problem_row, train_loop
from qponder_mlx.train.sft_rows import (
    Batch,
    EncodedRow,
    SFTDataError,
    SFTRow,
    collate,
    encode_row,
    problem_summary,
    read_sft_rows,
)

# Settings a resumed run must share with its checkpoint: anything else would silently train a
# different model or read different rows.
RESUME_MUST_MATCH = ("model", "data", "lora", "quantize_base", "quantize_group_size",
                     "batch_size", "grad_accum", "seed", "max_seq_len", "min_pixels",
                     "max_pixels", "fast_share")


# ---------------------------------------------------------------- the loss


def sft_loss_sum(model: nn.Module, batch: Batch) -> mx.array:
    """Summed cross-entropy of the supervised tokens of a batch (divide by n_supervised).

    With a shared prefix (`Batch.shared_prefix`: the system prompt and instruction, about half of a
    short cold-start row, bench/sft_step_speed.py) the prefix runs once and its keys/values are
    repeated for every row; the gradient through the repeat sums the rows' contributions, so loss
    and gradient are those of the full rows (tested), for fewer FLOPs."""
    feats = model.get_input_embeddings(batch.input_ids, batch.pixel_values,
                                       image_grid_thw=batch.image_grid_thw,
                                       mask=batch.attention_mask,
                                       cached_image_features=batch.image_features)
    lm = model.language_model
    ids, emb, pos, p = batch.input_ids, feats.inputs_embeds, feats.position_ids, \
        batch.shared_prefix
    cache = None
    if p:
        head = [ConcatenateKVCache() for _ in lm.layers]
        lm.model(ids[:1, :p], inputs_embeds=emb[:1, :p], cache=head, position_ids=pos[:, :1, :p])
        cache = gen.repeated_cache([c.keys for c in head], [c.values for c in head],
                                   ids.shape[0])
    h = lm.model(ids[:, p:], inputs_embeds=emb[:, p:], cache=cache, position_ids=pos[:, :, p:])
    B, L, D = h.shape
    # positions index the full rows (b * (L + p) + t); supervised positions all lie after the
    # image, so past the prefix: the same position in the suffix is b * L + t - p
    flat = batch.positions
    if p:
        flat = flat - p * (flat // (L + p) + 1)
    h = h.reshape(B * L, D)[flat]
    logits = gen.lm_head(lm, h).astype(mx.float32)
    return nn.losses.cross_entropy(logits, batch.targets, reduction="sum")


def sft_loss(model: nn.Module, batch: Batch) -> mx.array:
    """Mean cross-entropy over the batch's supervised (assistant) tokens."""
    return sft_loss_sum(model, batch) / batch.n_supervised


# ---------------------------------------------------------------- batches from rows


@dataclass
class Encoder:
    """Turns row indices into a Batch; rows whose image fails to decode are dropped and logged."""

    processor: object
    rows: list[SFTRow]
    pixels: PixelPolicy
    pad_id: int
    on_problem: Callable[[dict], None] | None = None  # an image that fails at run time
    image_token_id: int | None = None  # set: batches share their common prefix (collate)
    features: TowerFeatures | None = None  # set: the frozen tower runs once per image

    def __call__(self, indices: list[int], order: DataOrder | None = None) -> Batch | None:
        enc: list[EncodedRow] = []
        ids: list[str] = []
        images: list[str] = []
        for i in indices:
            row = self.rows[i]
            try:
                enc.append(encode_row(self.processor, row, self.pixels))
                ids.append(row.id)
                images.append(str(row.image))
            except (ImageError, OSError, ValueError) as e:
                if order is not None:
                    order.bad.add(i)
                msg = " ".join(str(e).split())
                if self.on_problem is not None:
                    self.on_problem(problem_row(row.image, row.line, "image_runtime", msg))
                say(f"skipped row {row.id}: {msg}")
        if not enc:
            return None
        batch = collate(enc, self.pad_id, ids, image_token_id=self.image_token_id)
        if self.features is not None:
            batch.image_features = mx.concatenate([
                self.features(key, e.pixel_values, e.image_grid_thw)
                for key, e in zip(images, enc)])
        return batch


# ---------------------------------------------------------------- validation


def validation_loss(model: nn.Module, encoder: Encoder, batch_size: int) -> float | None:
    total, count = 0.0, 0
    n = len(encoder.rows)
    for s in range(0, n, batch_size):
        batch = encoder(list(range(s, min(n, s + batch_size))))
        if batch is None:
            continue
        loss = sft_loss_sum(model, batch)
        mx.eval(loss)
        total += float(loss.item())
        count += batch.n_supervised
    return total / count if count else None


def _finite_or_none(x):
    # SRCC/PLCC are undefined (NaN) with fewer than 2 scored answers; JSON gets null.
    return x if isinstance(x, float) and math.isfinite(x) else None


def validate(model: nn.Module, processor, encoder: Encoder, cfg: SFTConfig,
             model_path: Path) -> dict:
    """Val loss, and SRCC/PLCC/format rate of generated answers on rows that carry a MOS."""
    from qponder_mlx.evaluate import evaluate
    from qponder_mlx.labels import Sample
    from qponder_mlx.scoring import ScoreConfig, Scorer

    was_training = model.training
    model.eval()  # no LoRA dropout while measuring
    try:
        t0 = time.perf_counter()
        out: dict = {"val_loss": validation_loss(model, encoder, cfg.batch_size)}
        samples = [Sample(id=r.id, image=r.image, mos=r.mos) for r in encoder.rows
                   if r.mos is not None]
        if samples:
            loaded = LoadedModel(model, processor, cfg.model, model_path, adapter=None,
                                 identity="training")
            scorer = Scorer(loaded, ScoreConfig(
                mode="reason", batch_size=cfg.val_batch_size, pixels=encoder.pixels,
                sampling=gen.SamplingConfig(max_tokens=cfg.val_max_tokens)))
            report = evaluate(scorer, samples, progress=False)
            out.update(srcc=_finite_or_none(report.metrics.get("srcc")),
                       plcc=_finite_or_none(report.metrics.get("plcc")),
                       format_rate=report.format_rate, n_scored=report.n_scored,
                       n_val=len(samples))
        out["val_seconds"] = round(time.perf_counter() - t0, 3)
        return out
    finally:
        model.train(was_training)


# ---------------------------------------------------------------- the run


def _fmt_gb(x: float) -> str:
    return f"{x:.2f}GB" if x >= 1 else f"{x * 1000:.0f}MB"


def run_sft(cfg: SFTConfig, *, resume: bool = False, loaded: LoadedModel | None = None,
            on_step: Callable[[int, dict], None] | None = None,
            world: World | None = None) -> Path:
    """Train (or resume) an SFT run; returns the run folder.

    `loaded` skips loading the model (tests, benches; it must be a fresh base). `on_step(step,
    info)` runs after every optimizer step, checkpoint included (benches time steps with it;
    raising from it stops the run like a crash would). Under `mlx.launch` each rank trains on
    its share of every global batch and only rank 0 writes files (see train/distributed.py).
    A stop signal raises `runner.RunStopped` once the step's checkpoint is saved.
    """
    cfg.validate()
    world = world or init_world()
    run = Run(cfg, "sft", resume=resume, world=world, must_match=RESUME_MUST_MATCH)

    loaded = loaded or load_model(cfg.model)
    model, processor = loaded.model, loaded.processor
    tok = processor.tokenizer
    pixels = PixelPolicy(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)

    # Data before LoRA/quantization: a bad file fails before any model preparation.
    model_type = model.config.model_type  # where an mlx-vlm dataset row's image goes
    rows, problems = read_sft_rows(cfg.data, tok, pixels, cfg.max_seq_len,
                                   model_type=model_type)
    rows = with_fast_answers(rows, tok, cfg.fast_share, cfg.seed)
    # The seeded shuffle permutes row positions: put the rows in a canonical order first, so that
    # the same rows give the same run whatever order a concurrent writer (distill) left them in.
    rows.sort(key=lambda r: (r.id, r.answer_ids, str(r.image)))
    run.record_problems([problem_row(p.file, p.line, p.kind, p.message) for p in problems])
    say(f"train data {cfg.data}: {problem_summary(len(rows), problems)}")
    for p in problems[:10]:
        say(f"  skipped {p}")
    if len(problems) > 10:
        say(f"  ... {len(problems) - 10} more in {run.problems_path}")
    if not rows:
        first = f" — first: {problems[0]}" if problems else ""
        raise SFTDataError(f"{cfg.data}: no usable training rows ({len(problems)} "
                           f"skipped){first}")
    val_rows: list[SFTRow] = []
    if cfg.val_data:
        val_rows, vprobs = read_sft_rows(cfg.val_data, tok, pixels, cfg.max_seq_len,
                                         model_type=model_type)
        say(f"val data {cfg.val_data}: {problem_summary(len(val_rows), vprobs)}")
        if cfg.val_samples:
            val_rows = val_rows[:cfg.val_samples]

    mx.random.seed(cfg.seed)  # LoRA A matrices come from the global RNG
    adapter_cfg = attach_lora(model, cfg.lora, quantize_bits=cfg.quantize_base,
                              group_size=cfg.quantize_group_size)
    if cfg.grad_checkpoint:
        enable_grad_checkpoint(model.language_model.model.layers)
    optimizer, schedule = make_optimizer(cfg, cfg.iters)
    order = run.data_order([r.length for r in rows], cfg.batch_size, cfg.seed)
    run.restore(model, optimizer, adapter_cfg)
    run.begin()
    image_token = model.config.image_token_id if cfg.share_prefix else None
    features = tower_features(model, cfg.vision_cache)  # after attach_lora: knows what trains
    encoder = Encoder(processor, rows, pixels, tok.pad_token_id or 0, run.problem, image_token,
                      features)
    val_encoder = Encoder(processor, val_rows, pixels, tok.pad_token_id or 0,
                          image_token_id=image_token, features=features)
    value_and_grad = nn.value_and_grad(model, sft_loss_sum)
    n_params = sum(a.size for _, a in tree_flatten(model.trainable_parameters()))
    say(f"LoRA r{cfg.lora.rank} on {len(adapter_cfg['lora_parameters']['keys'])} layers, "
        f"{n_params / 1e6:.2f}M trainable parameters"
        + (f", base quantized to {cfg.quantize_base} bits" if cfg.quantize_base else ""))

    def step(n: int) -> StepOutcome:
        t_step = time.perf_counter()
        mx.random.seed(ckpt_mod.step_seed(cfg.seed, n))  # LoRA dropout, resumable
        lr = float(schedule(optimizer.step).item())
        grads, loss_sum, n_sup, n_tok = None, mx.array(0.0), 0, 0
        for _ in range(cfg.grad_accum):
            batch = _next_batch(encoder, order, world)
            if batch is None:  # this rank's share of a short last batch is empty
                ls, g = mx.array(0.0), zeros_like_tree(model.trainable_parameters())
            else:
                ls, g = value_and_grad(model, batch)
                n_sup += batch.n_supervised
                n_tok += batch.n_tokens
            grads = add_trees(grads, g)
            loss_sum = loss_sum + ls
            mx.eval(grads, loss_sum)
        # Sums over all ranks, then one normalisation: the update equals one process on the
        # whole global batch.
        grads = world.sum_tree(grads)
        tot = world.sum({"loss": loss_sum.item(), "sup": n_sup, "tok": n_tok})
        n_sup, n_tok = int(tot["sup"]), int(tot["tok"])
        grads = scale_tree(grads, 1.0 / n_sup)
        loss = tot["loss"] / n_sup
        applied, norm = guarded_update(model, optimizer, mx.array(loss), grads, cfg.grad_clip)
        dt = time.perf_counter() - t_step
        return StepOutcome(applied, loss, {"learning_rate": lr, "grad_norm": norm,
                                           "tokens": n_tok, "supervised_tokens": n_sup,
                                           "seconds": dt},
                           {"loss": f"{loss:.4f}", "tok_s": f"{n_tok / dt:.0f}",
                            "mem": _fmt_gb(peak_memory_gb())})

    def report(outcomes: list[StepOutcome]) -> dict:
        window = Window()
        for o in outcomes:
            m = o.metrics
            window.add(o.loss, m["supervised_tokens"], m["tokens"], m["grad_norm"], m["seconds"])
        return {"learning_rate": outcomes[-1].metrics["learning_rate"], **window.row()}

    last_val: dict = {}

    def validate_at(n: int) -> None:
        nonlocal last_val
        if val_rows and world.is_main and (n % cfg.steps_per_eval == 0 or n == cfg.iters):
            last_val = validate(model, processor, val_encoder, cfg, loaded.path)
            run.log.append({"step": n, "kind": "val", **last_val})
            say(f"step {n} val: " + " ".join(
                f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                for k, v in last_val.items()))

    def save(n: int) -> None:
        run.save(n, model, adapter_cfg, optimizer, order)

    model.train()
    mx.reset_peak_memory()
    bad = train_loop(run, LoopSettings(cfg.iters, cfg.steps_per_report, cfg.steps_per_save,
                                       cfg.max_bad_steps, cfg.progress),
                     step, save, report=report, after_step=validate_at, on_step=on_step)
    run.finish({"skipped_steps": bad, "train_rows": len(rows),
                "skipped_rows": len(problems) + len(order.bad), "last_val": last_val})
    return run.dir


def _next_batch(encoder: Encoder, order: DataOrder, world: World) -> Batch | None:
    """This rank's share of the next global batch that encodes on every rank.

    Rows whose image fails at run time are dropped on the rank that met them; the ranks then
    agree on the union of dropped rows, so every rank keeps the same data order.
    """
    while True:
        known = len(order.bad)
        mine = world.shard(order.next())
        batch = encoder(mine, order) if mine else None
        if world.size > 1:
            flags = world.sum({"failed": float(bool(mine) and batch is None),
                               "new_bad": float(len(order.bad) - known)}, "data-order sync")
            if flags["new_bad"]:
                order.bad = world.union(order.bad, len(order.lengths))
            if flags["failed"]:
                continue  # some rank has nothing to train on: everyone takes the next batch
        elif batch is None:
            continue
        return batch
