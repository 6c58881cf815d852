"""End-to-end SFT on the tiny model: overfit, exact resume, QLoRA, outputs, bad input."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from qponder_mlx import generate as gen
from qponder_mlx.images import PixelPolicy, load_image
from qponder_mlx.model import load_model
from qponder_mlx.testing.sft_sets import CC0_IMAGES, cc0_sft_rows, sft_row, write_jsonl
from qponder_mlx.train.checkpoint import CheckpointError, list_checkpoints
from qponder_mlx.train.config import SFTConfig, load_config
from qponder_mlx.train.sft import run_sft
from qponder_mlx.train.sft_rows import SFTDataError, read_sft_rows

IMAGES = sorted(CC0_IMAGES.iterdir())
SMALL = {"min_pixels": 56 * 56, "max_pixels": 112 * 112}


def _cfg(tmp_path, model_dir, data, out="run", **kw) -> SFTConfig:
    base = {"model": str(model_dir), "data": str(data), "out": str(tmp_path / out),
            "batch_size": 2, "warmup": 0, "learning_rate": 1e-3, "steps_per_report": 1,
            "steps_per_save": 1000, "progress": False, **SMALL}
    return load_config(SFTConfig, None, {**base, **kw})


def _pixels():
    return PixelPolicy(**SMALL)


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _adapter(run_dir):
    return mx.load(str(run_dir / "adapters" / "adapters.safetensors"))


def _greedy(loaded, rows, pixels, max_tokens=40):
    loaded.model.eval()
    out = []
    for r in rows:
        (c,), = gen.generate_rows(loaded.model, loaded.processor, [r.prompt],
                                  [pixels.resize(load_image(r.image))],
                                  gen.SamplingConfig(max_tokens=max_tokens))
        out.append(c.text)
    return out


def test_overfits_two_images_to_their_exact_answers(tmp_path, tiny_model_dir):
    answers = ["<think>The photo is sharp and well focused.</think><answer>4.20</answer>",
               "<think>The image is blurry, soft and out of focus.</think><answer>1.50</answer>"]
    data = write_jsonl(tmp_path / "two.jsonl", [sft_row(IMAGES[0], answers[0]),
                                                 sft_row(IMAGES[13], answers[1])])
    cfg = _cfg(tmp_path, tiny_model_dir, data, iters=30, lr_schedule="constant",
               steps_per_report=10)
    loaded = load_model(str(tiny_model_dir))
    rows, _ = read_sft_rows(data, loaded.tokenizer, _pixels(), 4096)
    assert _greedy(loaded, rows, _pixels()) != answers  # the random model does not know them
    run_sft(cfg, loaded=loaded)
    assert _greedy(loaded, rows, _pixels()) == answers
    losses = [r["loss"] for r in _jsonl(tmp_path / "run" / "metrics.jsonl")]
    assert losses[-1] < losses[0] - 1.0


def test_resume_is_exact_and_run_folder_is_complete(tmp_path, tiny_model_dir):
    """10 steps straight == 5 steps, a crash, --resume, 5 more (adapter weights, atol 1e-5).

    Dropout, warmup + cosine and a data order crossing epochs are all on, so the RNG, schedule
    and cursor must all be restored for this to hold.
    """
    data = write_jsonl(tmp_path / "train.jsonl", cc0_sft_rows(5))
    val = write_jsonl(tmp_path / "val.jsonl", cc0_sft_rows(3, start=20))
    common = dict(iters=10, warmup=2, steps_per_save=5, **{"lora.dropout": 0.1},
                  val_data=str(val), steps_per_eval=5, val_max_tokens=8)
    straight = run_sft(_cfg(tmp_path, tiny_model_dir, data, out="a", **common))

    class Crash(Exception):
        pass

    def crash_after_5(step, info):
        if step == 5:
            raise Crash

    cfg_b = _cfg(tmp_path, tiny_model_dir, data, out="b", **common)
    with pytest.raises(Crash):
        run_sft(cfg_b, on_step=crash_after_5)
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["step_0000005"]
    with pytest.raises(CheckpointError, match="pass --resume"):
        run_sft(cfg_b)  # never silently overwrite a run
    resumed = run_sft(cfg_b, resume=True)

    a, b = _adapter(straight), _adapter(resumed)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(np.array(b[k]), np.array(a[k]), atol=1e-5, err_msg=k)
    assert any(float(mx.abs(v).max()) > 0 for k, v in a.items() if k.endswith("lora_b"))

    rows_a = _jsonl(straight / "metrics.jsonl")
    rows_b = _jsonl(resumed / "metrics.jsonl")
    train_a = [(r["step"], round(r["loss"], 5)) for r in rows_a if r["kind"] == "train"]
    train_b = [(r["step"], round(r["loss"], 5)) for r in rows_b if r["kind"] == "train"]
    assert train_a == train_b and [s for s, _ in train_a] == list(range(1, 11))
    vals = [r for r in rows_a if r["kind"] == "val"]
    assert [r["step"] for r in vals] == [5, 10]
    assert {"val_loss", "srcc", "plcc", "format_rate", "n_val"} <= vals[-1].keys()
    assert vals[-1]["n_val"] == 3 and vals[-1]["val_loss"] > 0
    for name in ("config.json", "curves.html", "summary.json", "adapters/adapter_config.json"):
        assert (straight / name).exists(), name
    assert json.loads((straight / "config.json").read_text())["lora"]["dropout"] == 0.1
    assert "<polyline" in (straight / "curves.html").read_text()
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["resumed_from"] == 5 and summary["steps"] == 10

    # a resume with different model-shaping settings is refused with one line
    bad = _cfg(tmp_path, tiny_model_dir, data, out="b", **{**common, "lora.rank": 4})
    with pytest.raises(CheckpointError, match="lora"):
        run_sft(bad, resume=True)


def test_grad_accumulation_equals_the_bigger_batch(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "two.jsonl", cc0_sft_rows(2))
    one = run_sft(_cfg(tmp_path, tiny_model_dir, data, out="b2", iters=1, batch_size=2))
    two = run_sft(_cfg(tmp_path, tiny_model_dir, data, out="b1x2", iters=1, batch_size=1,
                       grad_accum=2))
    # The step's loss and gradient norm see the gradient's scale (Adam's update does not).
    (ra,), (rb,) = ([r for r in _jsonl(d / "metrics.jsonl") if r["kind"] == "train"]
                    for d in (one, two))
    assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)
    assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4)
    a, b = _adapter(one), _adapter(two)
    moved = [k for k in a if k.endswith("lora_b")]
    assert any(float(mx.abs(a[k]).max()) > 0 for k in moved)
    # Adam's first step from B = 0 writes lr·g/(|g| + eps): ±lr wherever |g| >> eps. Where |g| is
    # near eps (~1e-9) the summation order of the BLAS (batched vs two single rows) decides the
    # value, so those few entries are left out; they must stay few.
    n_all = n_near_eps = 0
    for k in a:
        x, y = np.array(a[k]), np.array(b[k])
        near_eps = np.abs(x) < 0.5 * np.abs(x).max() if k in moved else np.zeros(x.shape, bool)
        np.testing.assert_allclose(y[~near_eps], x[~near_eps], atol=1e-5, err_msg=k)
        n_all, n_near_eps = n_all + x.size, n_near_eps + int(near_eps.sum())
    assert n_near_eps < 0.01 * n_all, (n_near_eps, n_all)


def test_row_order_in_the_file_does_not_change_the_run(tmp_path, tiny_model_dir):
    """distill appends rows as its workers finish: the same rows in another order must train the
    same adapter (the seeded shuffle works on a canonical order, not on file positions)."""
    rows = cc0_sft_rows(4)
    fwd = run_sft(_cfg(tmp_path, tiny_model_dir, write_jsonl(tmp_path / "a.jsonl", rows),
                       out="fwd", iters=2))
    rev = run_sft(_cfg(tmp_path, tiny_model_dir, write_jsonl(tmp_path / "b.jsonl", rows[::-1]),
                       out="rev", iters=2))
    a, b = _adapter(fwd), _adapter(rev)
    assert any(float(mx.abs(a[k]).max()) > 0 for k in a if k.endswith("lora_b"))
    for k in a:
        np.testing.assert_array_equal(np.array(b[k]), np.array(a[k]), err_msg=k)


def test_qlora_runs_and_lowers_the_loss(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "two.jsonl", cc0_sft_rows(2))
    run = run_sft(_cfg(tmp_path, tiny_model_dir, data, out="q", iters=8, quantize_base=4,
                       lr_schedule="constant"))
    losses = [r["loss"] for r in _jsonl(run / "metrics.jsonl")]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.3
    config = json.loads((run / "adapters" / "adapter_config.json").read_text())
    assert config["base_quantization"] and all(
        k.startswith("language_model.") for k in config["base_quantization"])


def test_bad_rows_are_skipped_and_reported_and_empty_data_fails(tmp_path, tiny_model_dir,
                                                                capsys):
    truncated = tmp_path / "truncated.png"
    shutil.copy(IMAGES[1], truncated)
    raw = truncated.read_bytes()
    truncated.write_bytes(raw[:len(raw) // 3])  # header fine, pixels cut: fails only on decode
    good = cc0_sft_rows(2)
    data = write_jsonl(tmp_path / "mixed.jsonl", [
        *good, sft_row(tmp_path / "missing.jpg", "x"),
        {"images": [str(IMAGES[0])], "messages": good[0]["messages"][:-1]},
        sft_row(truncated, good[0]["messages"][-1]["content"], row_id="trunc"),
        "not json"])
    run = run_sft(_cfg(tmp_path, tiny_model_dir, data, iters=3))
    problems = _jsonl(run / "data_problems.jsonl")
    kinds = sorted(p["kind"] for p in problems)
    assert kinds == ["image", "image_runtime", "json", "no_assistant"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train_rows"] == 3 and summary["skipped_rows"] == 4
    err = capsys.readouterr()
    assert "3 usable rows, 3 skipped" in err.out + err.err

    empty = write_jsonl(tmp_path / "empty.jsonl", ["not json", sft_row(tmp_path / "no.jpg", "x")])
    with pytest.raises(SFTDataError, match="no usable training rows.*first:"):
        run_sft(_cfg(tmp_path, tiny_model_dir, empty, out="empty", iters=2))


def test_qlora_on_an_already_quantized_base(tmp_path, tiny_model_dir):
    """A 4-bit base (mlx_vlm.convert -q) trains as is, and stock mlx-vlm reloads the adapter on
    that base with the trainer's logits."""
    from mlx_vlm import load
    from mlx_vlm.convert import convert

    from qponder_mlx.train.sft_rows import encode_row

    q4 = tmp_path / "q4"
    convert(str(tiny_model_dir), str(q4), quantize=True, q_bits=4, q_group_size=64)
    data = write_jsonl(tmp_path / "two.jsonl", cc0_sft_rows(2))
    loaded = load_model(str(q4))
    run = run_sft(_cfg(tmp_path, q4, data, out="q4run", iters=6, lr_schedule="constant"),
                  loaded=loaded)
    losses = [r["loss"] for r in _jsonl(run / "metrics.jsonl")]
    assert losses[-1] < losses[0]
    config = json.loads((run / "adapters" / "adapter_config.json").read_text())
    assert config["base_quantization"]  # recorded, and matched (not redone) on reload

    rows, _ = read_sft_rows(data, loaded.tokenizer, _pixels(), 4096)
    enc = encode_row(loaded.processor, rows[0], _pixels())
    ids = mx.array(enc.input_ids)[None]
    loaded.model.eval()
    ours = loaded.model(ids, enc.pixel_values, image_grid_thw=enc.image_grid_thw).logits
    stock, _ = load(str(q4), adapter_path=str(run / "adapters"))
    theirs = stock(ids, enc.pixel_values, image_grid_thw=enc.image_grid_thw).logits
    np.testing.assert_allclose(np.array(theirs), np.array(ours), atol=1e-5)
