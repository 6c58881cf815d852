"""Batched prefill/decode must give exactly what stock mlx-vlm gives, row by row."""

import numpy as np
import pytest
from PIL import Image

from qponder_mlx import generate as gen
from qponder_mlx.prompts import chat_messages


def _images(n, size=(112, 84), seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8"))
            for _ in range(n)]


@pytest.fixture(scope="module")
def prompt(tiny_loaded):
    return tiny_loaded.tokenizer.apply_chat_template(
        chat_messages(), tokenize=False, add_generation_prompt=True)


def test_batched_greedy_equals_stock_generate(tiny_loaded, prompt):
    from mlx_vlm import generate

    m, proc = tiny_loaded.model, tiny_loaded.processor
    imgs = _images(3)
    cfg = gen.SamplingConfig(max_tokens=16)
    stops = gen.stop_tokens(m, proc.tokenizer)
    stops.banned = []  # stock generate does not ban the vision placeholders
    ours = gen.decode(m, gen.prefill(m, gen.encode(proc, [prompt] * 3, imgs)), cfg, stops)
    for img, c in zip(imgs, ours):
        ref = generate(m, proc, prompt, image=[img], max_tokens=16, temperature=0.0, verbose=False)
        assert c.token_ids == list(ref.token_ids)[:len(c.token_ids)]
        assert len(c.token_ids) >= len(ref.token_ids) - 1
    # different images must give different answers, or the test above proves little
    assert len({tuple(c.token_ids) for c in ours}) > 1


def test_logprobs_match_a_full_forward(tiny_loaded, prompt):
    """The per-token log-probs from the KV-cached decode equal a no-cache forward pass."""
    import mlx.core as mx

    m, proc = tiny_loaded.model, tiny_loaded.processor
    (img,) = _images(1, seed=3)
    (c,), = gen.generate_rows(m, proc, [prompt], [img], gen.SamplingConfig(max_tokens=8))
    inputs = gen.encode(proc, [prompt], [img])
    ids = mx.concatenate([inputs["input_ids"], mx.array([c.token_ids])], axis=1)
    logits = m(ids, inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"]).logits
    lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    L = inputs["input_ids"].shape[1]
    full = [lp[0, L - 1 + i, t].item() for i, t in enumerate(c.token_ids)]
    np.testing.assert_allclose(c.logprobs, full, atol=1e-4)


def test_repeat_cache_gives_identical_greedy_rows(tiny_loaded, prompt):
    m, proc = tiny_loaded.model, tiny_loaded.processor
    imgs = _images(2, seed=1)
    cfg = gen.SamplingConfig(max_tokens=12)
    single = gen.generate_rows(m, proc, [prompt] * 2, imgs, cfg)
    grouped = gen.generate_rows(m, proc, [prompt] * 2, imgs, cfg, n=4)
    for (s,), group in zip(single, grouped):
        assert len(group) == 4
        assert all(g.token_ids == s.token_ids for g in group)


def test_sampling_varies_within_a_group(tiny_loaded, prompt):
    import mlx.core as mx

    m, proc = tiny_loaded.model, tiny_loaded.processor
    mx.random.seed(0)
    (group,) = gen.generate_rows(m, proc, [prompt], _images(1), gen.SamplingConfig(
        max_tokens=12, temperature=1.0), n=6)
    assert len({tuple(c.token_ids) for c in group}) > 1


def test_early_stop_and_row_dropping_leave_other_rows_unchanged(tiny_loaded, prompt):
    m, proc = tiny_loaded.model, tiny_loaded.processor
    cfg = gen.SamplingConfig(max_tokens=20)
    stops = gen.stop_tokens(m, proc.tokenizer)
    # Find images where some row emits a token that no other row emits, and make that token a
    # stop token: that row must stop right there, the others must not change.
    for seed in range(20):
        imgs = _images(4, seed=seed)
        base = gen.decode(m, gen.prefill(m, gen.encode(proc, [prompt] * 4, imgs)), cfg, stops)
        found = [(r, i, t) for r, c in enumerate(base) for i, t in enumerate(c.token_ids)
                 if all(t not in o.token_ids for k, o in enumerate(base) if k != r)]
        if found:
            break
    row, pos, tok = found[0]
    stops2 = gen.StopTokens(stop=stops.stop | {tok}, banned=stops.banned)
    out = gen.decode(m, gen.prefill(m, gen.encode(proc, [prompt] * 4, imgs)), cfg, stops2)
    assert out[row].token_ids == base[row].token_ids[:pos + 1]
    assert out[row].finish_reason == "stop"
    for k in range(4):
        if k != row:
            assert out[k].token_ids == base[k].token_ids and out[k].finish_reason == "length"


def test_banned_tokens_are_never_sampled(tiny_loaded, prompt):
    m, proc = tiny_loaded.model, tiny_loaded.processor
    imgs = _images(1, seed=4)
    cfg = gen.SamplingConfig(max_tokens=10)
    stops = gen.stop_tokens(m, proc.tokenizer)
    assert m.config.image_token_id in stops.banned
    base = gen.decode(m, gen.prefill(m, gen.encode(proc, [prompt], imgs)), cfg, stops)[0]
    banned = gen.StopTokens(stop=stops.stop, banned=stops.banned + [base.token_ids[0]])
    out = gen.decode(m, gen.prefill(m, gen.encode(proc, [prompt], imgs)), cfg, banned)[0]
    assert base.token_ids[0] not in out.token_ids


def test_bucket_by_length_groups_equal_lengths_in_stable_order():
    lengths = [5, 7, 5, 5, 7, 9]
    assert gen.bucket_by_length(lengths, 2) == [[0, 2], [1, 4], [3], [5]]
    assert sorted(i for b in gen.bucket_by_length(lengths, 10) for i in b) == list(range(6))


def test_prefix_cache_gives_the_same_logits_and_answers(tiny_loaded, prompt):
    """The shared text before the image, computed once, changes nothing in the results."""
    import mlx.core as mx

    m, proc = tiny_loaded.model, tiny_loaded.processor
    prefix = gen.PrefixCache(m.config.image_token_id)
    inputs = gen.encode(proc, [prompt] * 3, _images(3, seed=7))
    n = prefix.length(inputs["input_ids"])
    assert n > 50  # the whole instruction comes before the image
    assert inputs["input_ids"][0, n - 1].item() == m.config.vision_start_token_id
    plain, cached = gen.prefill(m, inputs), gen.prefill(m, inputs, prefix)
    np.testing.assert_allclose(np.array(cached.logits), np.array(plain.logits), atol=1e-4)
    for a, b in zip(plain.cache, cached.cache):
        np.testing.assert_allclose(np.array(a.state[0]), np.array(b.state[0]), atol=1e-4)
    stops = gen.stop_tokens(m, proc.tokenizer)
    cfg = gen.SamplingConfig(max_tokens=12)
    assert ([c.token_ids for c in gen.decode(m, plain, cfg, stops)]
            == [c.token_ids for c in gen.decode(m, cached, cfg, stops)])
    assert mx.array_equal(gen.prefill(m, inputs, prefix).logits, cached.logits)


def test_decode_cache_is_sized_once_for_the_tokens_to_come(tiny_loaded, prompt, monkeypatch):
    """The decode cache never regrows (mlx-vlm's KVCache would add 256 slots at the first step)
    and ends full: capacity = prompt + the max_tokens - 1 tokens fed back, also after rows drop."""
    from mlx_vlm.models.cache import KVCache

    m, proc = tiny_loaded.model, tiny_loaded.processor
    cfg = gen.SamplingConfig(max_tokens=12)
    stops = gen.stop_tokens(m, proc.tokenizer)
    imgs = _images(2, seed=5)
    inputs = gen.encode(proc, [prompt] * 2, imgs)
    base = gen.decode(m, gen.prefill(m, inputs), cfg, stops)
    # stop row 0 early on a token row 1 never emits: row 1 then runs alone (a row drop)
    pos, tok = next((i, t) for i, t in enumerate(base[0].token_ids[1:], 1)
                    if t not in base[1].token_ids)
    stops2 = gen.StopTokens(stop=stops.stop | {tok}, banned=stops.banned)

    seen, selects = [], []
    update, select = KVCache.update_and_fetch, gen._select_rows

    def spy_update(self, k, v):
        if self.keys is not None:  # None: the prefill's fresh cache
            seen.append((self.offset, self.keys.shape[2], self.keys.shape[0]))
        return update(self, k, v)

    def spy_select(cache, rows, room):
        selects.append(room)
        return select(cache, rows, room)

    monkeypatch.setattr(KVCache, "update_and_fetch", spy_update)
    monkeypatch.setattr(gen, "_select_rows", spy_select)
    out = gen.decode(m, gen.prefill(m, inputs), cfg, stops2)
    monkeypatch.undo()

    L = inputs["input_ids"].shape[1]
    assert out[0].token_ids == base[0].token_ids[:pos + 1] and out[1].token_ids == base[1].token_ids
    assert len(selects) == 2 and selects[0] == cfg.max_tokens - 1  # the start and one row drop
    decode_updates = [s for s in seen if s[0] >= L]  # the prefill's own updates come first
    assert all(cap == L + cfg.max_tokens - 1 for _, cap, _ in decode_updates)  # never regrown
    assert decode_updates[-1][0] + 1 == L + cfg.max_tokens - 1  # the last slot is the last used
    assert decode_updates[-1][2] == 1 and decode_updates[0][2] == 2  # the drop really happened

    # caches that grow the stock way (room 0: 256 more slots when full) give the same bits
    monkeypatch.setattr(gen, "_select_rows", lambda cache, rows, room: select(cache, rows, 0))
    grown = gen.decode(m, gen.prefill(m, inputs), cfg, stops2)
    assert [c.token_ids for c in grown] == [c.token_ids for c in out]
    assert [c.logprobs for c in grown] == [c.logprobs for c in out]
