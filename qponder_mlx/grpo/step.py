"""One GRPO step: rollout → rewards → group advantages → μ clipped policy-gradient updates.

The loss of the whole batch is accumulated image by image (each image's G completions share one
prompt forward, see rollout.completion_logps); `reduce_tokens` is given the whole batch's row and
token counts, so the summed per-image losses and gradients equal the full-batch ones exactly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_map_with_path, tree_unflatten
from PIL import Image

from qponder_mlx import generate as gen
from qponder_mlx.grpo.config import GRPOConfig
from qponder_mlx.grpo.loss import group_advantages, per_token_terms, reduce_tokens
from qponder_mlx.grpo.rewards import combine
from qponder_mlx.grpo.rollout import (
    PromptState,
    Rollout,
    completion_logps,
    logps_after_prompt,
    pad_completions,
    prompt_state,
    rollout,
)
from qponder_mlx.prompts import ParsedResponse, parse_response
from qponder_mlx.train.distributed import World
from qponder_mlx.train.loop import guarded_update, zeros_like_tree
from qponder_mlx.train.lora import adapters_disabled

# (rollout, parsed texts, MOS per completion) -> (total reward (B·G,), {component: (B·G,)})
RewardFn = Callable[[Rollout, list[ParsedResponse], np.ndarray],
                    tuple[np.ndarray, dict[str, np.ndarray]]]
# (G, T) mask of one image's counted completion tokens, its completions, the tokenizer -> the
# mask the loss uses (an experiment may leave tokens out of the loss; default: all counted)
TokenMask = Callable[[mx.array, list[gen.Completion], object], mx.array]


@dataclass
class StepResult:
    metrics: dict[str, float]
    rollout: Rollout
    skipped: bool  # a NaN/inf loss or gradient: no update was applied


def default_reward_fn(cfg: GRPOConfig, group_size: int, judge) -> RewardFn:
    """The configured rewards; the judge (blind re-scoring) runs once over the whole batch."""
    def fn(ro, parsed, mos):
        text_scores = None
        if cfg.rewards.needs_judge():
            text_scores = judge([p.reasoning for p in parsed])
        return combine(parsed, mos, group_size, cfg.rewards, text_scores)
    return fn


def _token_loss(lp, mask, adv, old, ref, cfg: GRPOConfig, n_rows, n_tokens):
    """The loss of some completion rows (normalised by the whole batch's counts) and the masked
    sums its metrics are made of."""
    old = mx.stop_gradient(lp) if old is None else old
    per_token, parts = per_token_terms(lp, old, ref, adv, beta=cfg.beta,
                                       epsilon_low=cfg.epsilon_low,
                                       epsilon_high=cfg.epsilon_high)
    loss = reduce_tokens(per_token, mask, cfg.loss_type, n_rows=n_rows, n_tokens=n_tokens,
                         max_completion_length=cfg.max_completion_length)
    m = mask.astype(mx.float32)
    sums = {k: mx.stop_gradient((v * m).sum()) for k, v in parts.items()}
    # -Σ p log p needs the full distribution; report the mean negative log-prob of the sampled
    # tokens instead (an entropy estimate at no extra cost).
    sums["neg_logp"] = mx.stop_gradient((-lp * m).sum())
    return loss, sums


def _image_loss(model, inputs, ids, mask, adv, old, ref, cfg: GRPOConfig, n_rows, n_tokens):
    lp = completion_logps(model, inputs, ids, temperature=cfg.temperature)
    return _token_loss(lp, mask, adv, old, ref, cfg, n_rows, n_tokens)


def row_chunks(mask: mx.array, rows: int) -> list[tuple[mx.array, int]]:
    """Completion rows in chunks of at most `rows`, shortest first, each with the width that
    holds its rows' last counted token. A group is padded to its longest completion; a chunk of
    short ones needs none of that padding (positions past a row's last counted token add
    nothing to the loss and, attention being causal, change nothing before them)."""
    m = np.asarray(mask) != 0
    last = np.where(m.any(axis=1), m.shape[1] - np.argmax(m[:, ::-1], axis=1), 1)
    order = np.argsort(last, kind="stable")
    return [(mx.array(order[r0:r0 + rows]), int(last[order[r0:r0 + rows]].max()))
            for r0 in range(0, len(order), rows)]


def image_loss_and_grads(model, inputs, ids, mask, adv, old, ref, cfg: GRPOConfig, n_rows,
                         n_tokens, state: PromptState | None = None):
    """One image's loss, metric sums and LoRA gradient.

    With `cfg.loss_rows` >= G: one backward pass over the whole group. Smaller: the prompt's
    state (`state`: the rollout's prefill under the same weights; else the prompt runs once
    without a graph), the completions are differentiated `loss_rows` rows at a time with
    respect to the LoRA weights *and* the prompt's keys/values/last logits, and one vector-
    Jacobian product through the prompt adds its share — the same gradient (tested) with only
    `loss_rows` completions' activations alive at a time, each chunk cut to its own length
    (`row_chunks`).
    """
    g = ids.shape[0]
    if cfg.loss_rows >= g:
        # Cut to the last counted token like the chunks below (`frozen_logps` fills only that).
        (_, w), = row_chunks(mask, g)
        (loss, sums), grads = nn.value_and_grad(model, _image_loss)(
            model, inputs, ids[:, :w], mask[:, :w], adv, None if old is None else old[:, :w],
            None if ref is None else ref[:, :w], cfg, n_rows, n_tokens)
        return loss.item(), sums, grads

    names, params = map(list, zip(*tree_flatten(model.trainable_parameters())))

    def set_params(p):
        model.update(tree_unflatten(list(zip(names, p))))

    def prompt_outputs(*p):
        set_params(p)
        first, keys, values, _ = prompt_state(model, inputs)
        return [first, *keys, *values]

    first, keys, values, start = state or prompt_state(model, inputs)  # no graph is kept
    mx.eval(first, keys, values, start)

    def chunk_loss(p, first, keys, values, sl_ids, sl_mask, sl_adv, sl_old, sl_ref):
        set_params(p)
        lp = logps_after_prompt(model, first, keys, values, start, sl_ids,
                                temperature=cfg.temperature)
        return _token_loss(lp, sl_mask, sl_adv, sl_old, sl_ref, cfg, n_rows, n_tokens)

    vg = mx.value_and_grad(chunk_loss, argnums=(0, 1, 2, 3))
    total, sums = 0.0, {}
    gp = gf = gk = gv = None
    for rows, w in row_chunks(mask, cfg.loss_rows):
        (loss, s), (dp, df, dk, dv) = vg(
            params, first, keys, values, ids[rows, :w], mask[rows, :w], adv[rows],
            None if old is None else old[rows, :w], None if ref is None else ref[rows, :w])
        gp = dp if gp is None else [a + b for a, b in zip(gp, dp)]
        gk = dk if gk is None else [a + b for a, b in zip(gk, dk)]
        gv = dv if gv is None else [a + b for a, b in zip(gv, dv)]
        gf = df if gf is None else gf + df
        mx.eval(loss, s, gp, gf, gk, gv)
        total += loss.item()
        for k, v in s.items():
            sums[k] = sums.get(k, 0.0) + v
    _, d_prompt = mx.vjp(prompt_outputs, params, [gf, *gk, *gv])
    grads = [a + b for a, b in zip(gp, d_prompt)]
    mx.eval(grads)
    set_params(params)
    flat = dict(zip(names, grads))
    # Same tree shape as the one-pass gradient (modules without trainable weights included).
    return total, sums, tree_map_with_path(lambda path, _: flat[path],
                                           model.trainable_parameters())


def frozen_logps(model, inputs, ids: mx.array, mask: mx.array, cfg: GRPOConfig,
                 state: PromptState | None = None) -> mx.array:
    """(G, T) log-probs of one image's completions under the model as it is, without a graph,
    `loss_rows` rows at a time (memory), each chunk cut to its length (`row_chunks`): 0 past a
    chunk's last counted token, which no loss reads."""
    first, keys, values, start = state or prompt_state(model, inputs)
    out = mx.zeros(ids.shape, dtype=mx.float32)
    for rows, w in row_chunks(mask, cfg.loss_rows):
        out[rows, :w] = logps_after_prompt(model, first, keys, values, start, ids[rows, :w],
                                           temperature=cfg.temperature)
        mx.eval(out)
    return out


def grpo_step(model, processor, prompt: str, images: Sequence[Image.Image],
              mos: Sequence[float], cfg: GRPOConfig, optimizer, reward_fn: RewardFn,
              world: World | None = None, reference=adapters_disabled,
              token_mask: TokenMask | None = None) -> StepResult:
    """Rollout B images × G samples, score them, and update the model μ times.

    `reference(model)` is a context manager under which the model is the KL reference policy.
    `token_mask` may take completion tokens out of the loss (default: every sampled token).

    Under data parallelism `images` is this rank's share of the global batch (groups are never
    split, so rewards and advantages stay local); token counts, gradients and metrics are summed
    over ranks, so every rank applies the same update. A rank may hold no image this step.
    """
    world = world or World(None)
    g = cfg.group_size
    t0 = time.perf_counter()
    sampling = gen.SamplingConfig(max_tokens=cfg.max_completion_length,
                                  temperature=cfg.temperature, top_p=cfg.top_p)
    ro = rollout(model, processor, prompt, list(images), g, sampling, max_rows=cfg.max_rows)
    t1 = time.perf_counter()

    parsed = [parse_response(t) for t in ro.texts]
    mos_rows = np.repeat(np.asarray(mos, dtype=np.float64), g)
    rewards, parts = reward_fn(ro, parsed, mos_rows) if ro.texts else (np.zeros(0), {})
    adv = group_advantages(mx.array(rewards, dtype=mx.float32), g, scale=cfg.scale_rewards)
    t2 = time.perf_counter()

    pad = processor.tokenizer.pad_token_id or 0
    batch = [pad_completions(group, pad) for group in ro.completions]
    if token_mask is not None:
        batch = [(ids, token_mask(m, group, processor.tokenizer))
                 for (ids, m), group in zip(batch, ro.completions)]
    counts = world.sum({"rows": len(ro.texts),
                        "tokens": sum(int(m.sum().item()) for _, m in batch)})
    n_rows, n_tokens = int(counts["rows"]), int(counts["tokens"])
    advs = [adv[i * g:(i + 1) * g] for i in range(len(images))]

    # μ > 1 reuses the rollout: the ratio is against the policy that sampled it.
    # Until the first update the policy is the one that sampled: its prompt states are the
    # rollout's, so no prompt runs again for it.
    states = ro.prompt_states or [None] * len(images)
    old = ([frozen_logps(model, ro.inputs[i], *batch[i], cfg, states[i])
            for i in range(len(images))] if cfg.num_iterations > 1 else None)
    ref = None
    if cfg.beta:
        with reference(model):
            ref = [frozen_logps(model, ro.inputs[i], *batch[i], cfg)
                   for i in range(len(images))]

    skipped = False
    totals: dict[str, float] = {}
    loss_value, norm = 0.0, 0.0
    for it in range(cfg.num_iterations):
        grads, loss_value, totals = zeros_like_tree(model.trainable_parameters()), 0.0, {}
        for i in range(len(images)):
            loss, sums, gi = image_loss_and_grads(
                model, ro.inputs[i], batch[i][0], batch[i][1], advs[i],
                None if old is None else old[i], None if ref is None else ref[i],
                cfg, n_rows, n_tokens, states[i] if it == 0 else None)
            grads = tree_map(mx.add, grads, gi)
            mx.eval(grads, sums)
            loss_value += loss
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + v.item()
        grads = world.sum_tree(grads)
        summed = world.sum({"loss": loss_value, **{f"t.{k}": v for k, v in totals.items()}})
        loss_value = summed["loss"]
        totals = {k[2:]: v for k, v in summed.items() if k.startswith("t.")}
        applied, norm = guarded_update(model, optimizer, mx.array(loss_value), grads,
                                       cfg.grad_clip)
        if not applied:  # NaN/inf: nothing is written into the adapters or the optimizer
            skipped = True
            break
    t3 = time.perf_counter()

    metrics = world.mean_metrics(
        _metrics(ro, parsed, rewards, parts, mos_rows, totals, n_tokens, loss_value, g),
        len(ro.texts))
    # Token-level sums were already global: undo the per-rank averaging for them.
    metrics.update({k: v for k, v in _token_metrics(totals, n_tokens).items()})
    metrics["loss"] = loss_value
    metrics.update(grad_norm=norm, time_rollout=t1 - t0, time_reward=t2 - t1, time_update=t3 - t2,
                   peak_memory_gb=mx.get_peak_memory() / 1e9, skipped=float(skipped))
    return StepResult(metrics, ro, skipped)


def _token_metrics(totals: dict[str, float], n_tokens: int) -> dict[str, float]:
    n = max(n_tokens, 1)
    out = {"clip_ratio_low": totals.get("low_clip", 0.0) / n,
           "clip_ratio_high": totals.get("high_clip", 0.0) / n,
           "neg_logp": totals.get("neg_logp", 0.0) / n}
    out["clip_ratio"] = out["clip_ratio_low"] + out["clip_ratio_high"]
    if "kl" in totals:
        out["kl"] = totals["kl"] / n
    return out


def _metrics(ro: Rollout, parsed, rewards, parts, mos_rows, totals, n_tokens,
             loss_value, group_size: int) -> dict[str, float]:
    scores = np.array([np.nan if p.score is None else p.score for p in parsed])
    has = ~np.isnan(scores)
    out = {"loss": loss_value, "reward_mean": float(np.mean(rewards)),
           "reward_std": float(np.std(rewards)),
           # the mean of the divisors `scale="group"` uses: set against reward_std it says how
           # much group scaling magnifies the within-group differences over batch scaling
           "reward_group_std": (float(np.std(np.reshape(rewards, (-1, group_size)), axis=1,
                                             ddof=1).mean()) if group_size > 1 and len(rewards)
                                else 0.0),
           "format_rate": float(np.mean([p.format_ok for p in parsed])),
           "score_rate": float(has.mean()),
           "score_mae": float(np.abs(scores[has] - mos_rows[has]).mean()) if has.any() else
           float("nan"),
           "completion_length": float(np.mean([len(c.token_ids) for grp in ro.completions
                                               for c in grp])),
           **_token_metrics(totals, n_tokens)}
    for k, v in parts.items():
        out[f"reward_{k}_mean"] = float(np.mean(v))
        out[f"reward_{k}_std"] = float(np.std(v))
    return out
