"""`qponder distill` end to end: against the real mlx_vlm.server, a scripted OpenAI-compatible
server (faults, filtering, resume after kill -9) and the in-process local teacher."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path

import pytest
from PIL import Image
from qponder_mlx.cli.main import app
from scipy import stats
from typer.testing import CliRunner

from qponder_mlx.distill import (
    TEACHER_PROMPT_VERSION,
    DistillConfig,
    RetryPolicy,
    TeacherError,
    TeacherReply,
    TransientTeacherError,
    build_teacher,
    call_with_retries,
    leaks_reference,
    parse_retry_after,
    run_distill,
    teacher_prompt,
)
from qponder_mlx.distill.openai_teacher import image_data_url
from qponder_mlx.io import read_jsonl
from qponder_mlx.labels import Sample
from qponder_mlx.prompts import (
    PROMPT_VERSION,
    SYSTEM_PROMPT,
    USER_PROMPT,
    chat_messages,
    format_response,
)

sys.path.insert(0, str(Path(__file__).parent))
from distill_server import (  # noqa: E402
    Drop,
    Raw,
    Reply,
    ScriptedServer,
    Stall,
    Status,
    answer,
    index_of,
    user_text,
    write_index_image,
)

KEY_ENV = "QPONDER_TEST_TEACHER_KEY"
REASONING = "The photo is sharp with little noise, balanced exposure and natural colour."


@pytest.fixture
def secret() -> str:
    # A fresh value per test, so finding it anywhere can only mean we leaked it.
    return f"sk-test-{random.getrandbits(64):016x}"


def make_set(root: Path, mos: list[float]) -> Path:
    """Solid-colour images whose red value is their index (the scripted server reads it)."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / "labels.jsonl").open("w") as f:
        for i, m in enumerate(mos):
            write_index_image(root / f"img_{i:02d}.png", i)
            f.write(json.dumps({"image": f"img_{i:02d}.png", "mos": m, "id": f"s{i:02d}"}) + "\n")
    return root / "labels.jsonl"


def rows(path: Path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for r in read_jsonl(path):
        assert r["id"] not in out, f"duplicate id {r['id']} in {path}"
        out[r["id"]] = r
    return out


def files(out: Path) -> tuple[dict, dict, dict]:
    kept, dropped = rows(out), rows(out.with_name(out.stem + ".rejected.jsonl"))
    assert not set(kept) & set(dropped), "an id is both kept and rejected"
    summary = json.loads(out.with_name(out.stem + ".summary.json").read_text())
    return kept, dropped, summary


def assert_no_secret(secret: str, folder: Path, *logs: str) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            assert secret.encode() not in p.read_bytes(), f"API key found in {p}"
    for log in logs:
        assert secret not in log, "API key found in the command output"


def invoke(args: list[str], env: dict | None = None):
    result = CliRunner().invoke(app, ["distill", *map(str, args)], env=env)
    return result, result.output + (result.stderr if result.stderr_bytes is not None else "")


# --------------------------------------------------------------------------------------------
# Prompts, retry policy, images


def test_teacher_prompts_cover_the_dimensions_and_hide_the_mos_in_blind_mode():
    blind, guided = teacher_prompt("blind", 3.4), teacher_prompt("guided", 3.4)
    for p in (blind, guided):
        text = p.user.lower()
        for aspect in ("focus", "sharpness", "noise", "exposure", "dynamic range", "colour",
                       "compression", "artifacts", "composition"):
            assert aspect in text
        assert "<think>" in p.user and "<answer>X.XX</answer>" in p.user
        assert p.version == TEACHER_PROMPT_VERSION and p.system
    assert "3.40" in guided.user and "3.4" not in blind.user and blind.user != USER_PROMPT
    with pytest.raises(ValueError, match="mode"):
        teacher_prompt("coached", 3.0)
    assert leaks_reference("Given the MOS of 3.4, the photo is fair.")
    assert leaks_reference("Human raters found it blurry.")
    assert not leaks_reference("The image is sharp; the most visible flaw is mild noise.")


def test_retry_after_parsing_and_backoff_bounds():
    assert parse_retry_after("3") == 3.0 and parse_retry_after(" 0.5 ") == 0.5
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
    date = format_datetime(now + timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(date, now=now.timestamp()) == pytest.approx(30.0)
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None

    policy, rng = RetryPolicy(max_retries=5, backoff_s=0.5, max_backoff_s=3.0), random.Random(0)
    for retry in range(6):
        nominal = min(3.0, 0.5 * 2**retry)  # 0.5, 1, 2, 3 (capped), 3, 3
        for _ in range(200):
            assert nominal / 2 <= policy.delay(retry, None, rng) <= nominal
    assert 4.0 <= policy.delay(0, 4.0, rng) <= 4.4  # Retry-After wins, never shortened

    calls, waits = [], []

    def flaky():
        calls.append(1)
        raise TransientTeacherError("HTTP 503", "http_503")

    with pytest.raises(TeacherError, match=r"gave up after 6 tries") as e:
        call_with_retries(flaky, policy, rng=rng, wait=waits.append)
    assert len(calls) == 6 and len(waits) == 5 and not isinstance(e.value, TransientTeacherError)


def test_image_data_url_passes_jpeg_through_and_downscales_rotated_or_large(tmp_path):
    import base64
    import io

    jpg = tmp_path / "a.jpg"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(jpg, quality=70)
    url = image_data_url(jpg, max_pixels=10_000)
    assert url.startswith("data:image/jpeg;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == jpg.read_bytes()  # not re-compressed

    big = tmp_path / "big.png"
    Image.new("RGB", (400, 100), (0, 0, 255)).save(big)
    url = image_data_url(big, max_pixels=10_000)
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as im:
        assert im.width * im.height <= 10_000 and abs(im.width / im.height - 4) < 0.1

    rotated = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° CW to display": stored 40x30, shown 30x40
    Image.new("RGB", (40, 30), (0, 200, 0)).save(rotated, exif=exif)
    url = image_data_url(rotated, max_pixels=10_000)
    assert url.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as im:
        assert im.size == (30, 40)


# --------------------------------------------------------------------------------------------
# Scripted server: every fault ends kept, rejected or failed-with-reason


FAULTS = {  # index: (mos, script, expected status, expected code)
    0: (3.0, [Reply(answer(3.2))], "kept", None),
    1: (3.0, [Reply(answer(4.5))], "rejected", "score_error"),
    2: (2.0, [Status(500), Status(503), Reply(answer(2.1))], "kept", None),
    3: (2.0, [Status(500)], "failed", "http_500"),
    4: (4.0, [Status(429, {"Retry-After": "1"}), Reply(answer(4.0))], "kept", None),
    5: (4.0, [Stall(2.0), Reply(answer(3.9))], "kept", None),
    6: (3.5, [Drop(), Reply(answer(3.5))], "kept", None),
    7: (3.5, [Raw(b"<html>502 Bad Gateway</html>")], "failed", "malformed"),
    8: (3.5, [Reply("")], "rejected", "empty"),
    9: (3.5, [Reply("The score is 3.5")], "rejected", "bad_format"),
    10: (3.5, [Status(400, body='{"error": "image too large"}')], "failed", "http_400"),
    11: (3.5, [Stall(3.0)], "failed", "timeout"),
    12: (3.5, [Reply("<think>Fine.</think><answer>3.50</answer>")], "rejected", "no_reasoning"),
}


def test_faults_end_kept_rejected_or_failed_with_bounded_retries(tmp_path, secret):
    labels = make_set(tmp_path / "data", [m for m, *_ in FAULTS.values()])
    toml = tmp_path / "distill.toml"
    toml.write_text("[distill]\nbackoff_s = 0.05\nmax_backoff_s = 0.2\ntimeout_s = 0.5\n"
                    "max_retries = 2\nconcurrency = 1\nmode = \"guided\"\n")
    out = tmp_path / "out" / "distill.jsonl"
    with ScriptedServer({i: s for i, (_, s, *_) in FAULTS.items()}, api_key=secret) as srv:
        t0 = time.monotonic()
        result, log = invoke(["--data", labels, "--out", out, "--config", toml,
                              "--teacher-url", srv.url, "--teacher-model", "teacher-x",
                              "--api-key-env", KEY_ENV, "--concurrency", 4, "--mode", "blind"],
                             env={KEY_ENV: secret})
        elapsed = time.monotonic() - t0
    assert result.exit_code == 0, log
    kept, dropped, summary = files(out)
    assert set(kept) | set(dropped) == {f"s{i:02d}" for i in FAULTS}
    for i, (_, _, status, code) in FAULTS.items():
        row = kept.get(f"s{i:02d}") or dropped[f"s{i:02d}"]
        assert row.get("status", "kept") == status, (i, row)
        assert row.get("code") == code, (i, row)
        if status != "kept":
            assert row["reason"], (i, row)
    # Retries are bounded (1 + max_retries calls) and only transient faults are retried.
    assert [srv.count(i) for i in (0, 2, 3, 4, 5, 6, 7, 10, 11)] == [1, 3, 3, 2, 2, 2, 1, 1, 3]
    t429 = srv.times(4)
    assert t429[1] - t429[0] >= 1.0  # Retry-After: 1 honoured
    assert "gave up after 3 tries" in dropped["s03"]["reason"]
    assert elapsed < 15
    # The flag beat the TOML's mode, and blind prompts never showed the MOS.
    assert all(r["mode"] == "blind" for r in [*kept.values(), *dropped.values()])
    assert not any("Human observers rated" in user_text(s.body) for s in srv.seen)

    k = kept["s00"]
    assert k["images"] == [str((tmp_path / "data" / "img_00.png").resolve())]
    assert k["messages"] == chat_messages(USER_PROMPT, SYSTEM_PROMPT,
                                          answer=format_response(REASONING, 3.2))
    assert (k["teacher_score"], k["mos"], k["score_error"]) == (3.2, 3.0, 0.2)
    assert (k["teacher_model"], k["prompt_version"], k["student_prompt_version"]) == \
        ("teacher-x", TEACHER_PROMPT_VERSION, PROMPT_VERSION)
    assert k["tokens"] == {"prompt": 100, "completion": 50} and k["latency_s"] >= 0

    # Summary, recomputed by hand: 9 answered attempts at 100 + 50 tokens each.
    assert (summary["kept"], summary["rejected"], summary["failed"]) == (5, 4, 4)
    assert summary["tokens"] == {"prompt": 900, "completion": 450, "total": 1350}
    scored = {0: 3.2, 1: 4.5, 2: 2.1, 4: 4.0, 5: 3.9, 6: 3.5, 12: 3.5}
    pred, mos = list(scored.values()), [FAULTS[i][0] for i in scored]
    assert summary["teacher_vs_mos"]["n"] == 7
    assert summary["teacher_vs_mos"]["srcc"] == pytest.approx(stats.spearmanr(pred, mos)[0],
                                                              abs=1e-4)
    assert summary["teacher_vs_mos"]["plcc"] == pytest.approx(stats.pearsonr(pred, mos)[0],
                                                              abs=1e-4)
    assert "kept 5" in log and "rejected 4" in log
    assert_no_secret(secret, tmp_path, log)


def test_wrong_key_stops_the_run_without_writing_or_echoing_it(tmp_path, secret):
    labels = make_set(tmp_path / "data", [3.0, 3.0, 3.0])
    out = tmp_path / "out" / "d.jsonl"
    with ScriptedServer(api_key="the-right-key") as srv:
        result, log = invoke(["--data", labels, "--out", out, "--teacher-url", srv.url,
                              "--teacher-model", "t", "--api-key-env", KEY_ENV],
                             env={KEY_ENV: secret})
    assert result.exit_code == 2 and "401" in log and "--api-key-env" in log
    assert not list(read_jsonl(out)) and not list(read_jsonl(out.with_name("d.rejected.jsonl")))
    assert_no_secret(secret, tmp_path, log)

    result, log = invoke(["--data", labels, "--out", out, "--teacher-url", srv.url,
                          "--teacher-model", "t", "--api-key-env", "QPONDER_UNSET_VAR_X"],
                         env={"QPONDER_UNSET_VAR_X": ""})
    assert result.exit_code == 2 and "QPONDER_UNSET_VAR_X is not set" in log
    result, log = invoke(["--data", labels, "--out", out, "--teacher-model", "t"])
    assert result.exit_code == 2 and "--teacher-url" in log


def test_samples_per_image_keeps_the_closest_agreeing_answer(tmp_path):
    mos = [3.0, 3.0]
    labels = make_set(tmp_path / "data", mos)
    scripts = {
        0: [Reply(answer(3.45)), Reply(answer(2.9)), Reply(answer(3.2)), Reply(answer(4.9))],
        1: [Reply(answer(4.8)), Reply("no tags"), Reply(answer(1.0))],
    }
    out = tmp_path / "out.jsonl"
    with ScriptedServer(scripts) as srv:
        result, log = invoke(["--data", labels, "--out", out, "--teacher-url", srv.url,
                              "--teacher-model", "t", "--samples-per-image", 3,
                              "--concurrency", 2])
    assert result.exit_code == 0, log
    kept, dropped, summary = files(out)
    assert srv.count(0) == 3 and srv.count(1) == 3  # exactly k answers asked per image
    k = kept["s00"]
    assert k["teacher_score"] == 2.9 and k["teacher_scores"] == [3.45, 2.9, 3.2]
    assert k["messages"][-1]["content"] == format_response(REASONING, 2.9)
    assert k["attempts"] == 3 and k["tokens_spent"] == {"prompt": 300, "completion": 150}
    r = dropped["s01"]
    assert r["status"] == "rejected" and [a["code"] for a in r["attempt_details"]] == \
        ["score_error", "bad_format", "score_error"]
    assert "attempt 1:" in r["reason"] and "attempt 3:" in r["reason"]
    # Teacher agreement uses the mean of each image's scores: (3.45+2.9+3.2)/3 and (4.8+1)/2.
    assert summary["teacher_vs_mos"]["mae"] == pytest.approx(
        (abs((3.45 + 2.9 + 3.2) / 3 - 3) + abs((4.8 + 1.0) / 2 - 3)) / 2, abs=1e-4)


def test_guided_mode_shows_the_mos_and_drops_reasoning_that_cites_it(tmp_path):
    mos = [1.8, 4.2, 3.3]
    labels = make_set(tmp_path / "data", mos)

    def echo(body):  # a teacher that explains the rating it was given
        score = float(re.search(r"rated the technical quality of this photo (\d\.\d\d)",
                                user_text(body)).group(1))
        if index_of(body) == 2:
            return Reply(answer(score, "Given the MOS, the photo must be fair; it looks soft."))
        return Reply(answer(score + 0.1))

    out = tmp_path / "g.jsonl"
    with ScriptedServer(default=echo) as srv:
        result, log = invoke(["--data", labels, "--out", out, "--teacher-url", srv.url,
                              "--teacher-model", "t", "--mode", "guided"])
    assert result.exit_code == 0, log
    kept, dropped, _ = files(out)
    assert {i: kept[i]["teacher_score"] for i in kept} == {"s00": 1.9, "s01": 4.3}
    assert dropped["s02"]["code"] == "leak" and kept["s00"]["mode"] == "guided"
    # The student's row carries the student prompt, never the teacher's (which held the MOS).
    user = kept["s00"]["messages"][1]["content"]
    assert [p for p in user if p["type"] == "text"][0]["text"] == USER_PROMPT


class OneFileBackend:
    """A backend written against the `Teacher` protocol alone, as a new one would be."""

    model, max_concurrency = "scripted-in-test", 2

    def prepare(self, sample):
        return Image.open(sample.image).size  # the payload is whatever `ask` wants

    def ask(self, image, sample, prompt):
        if sample.id == "s01":
            raise ZeroDivisionError("backend bug")
        return TeacherReply(answer(sample.mos), prompt_tokens=7, completion_tokens=3)

    def close(self):
        pass


def test_backends_plug_in_and_a_bad_image_or_backend_bug_stays_one_sample(tmp_path):
    make_set(tmp_path / "data", [2.0, 3.0, 4.0])
    (tmp_path / "data" / "img_02.png").write_bytes(b"\x89PNG truncated")
    samples = [Sample(f"s{i:02d}", (tmp_path / "data" / f"img_{i:02d}.png").resolve(), m)
               for i, m in enumerate([2.0, 3.0, 4.0])]
    cfg = DistillConfig(teacher="local", teacher_model="x")  # `teacher` only picks a builder
    result = run_distill(samples, OneFileBackend(), cfg, tmp_path / "o.jsonl", progress=False)
    kept, dropped, summary = files(tmp_path / "o.jsonl")
    assert set(kept) == {"s00"} and kept["s00"]["teacher_model"] == "scripted-in-test"
    assert dropped["s01"]["code"] == "error" and "ZeroDivisionError" in dropped["s01"]["reason"]
    assert dropped["s02"]["code"] == "image" and "img_02.png" in dropped["s02"]["reason"]
    assert result.new == {"kept": 1, "failed": 2} and summary["tokens"]["total"] == 10


# --------------------------------------------------------------------------------------------
# Resume


def _comparable(table: dict[str, dict]) -> dict[str, dict]:
    def strip(row: dict) -> dict:
        row = {k: v for k, v in row.items() if k != "latency_s"}
        if "attempt_details" in row:
            row["attempt_details"] = [{k: v for k, v in a.items() if k != "latency_s"}
                                      for a in row["attempt_details"]]
        return row

    return {k: strip(v) for k, v in table.items()}


def test_kill_9_mid_run_then_rerun_matches_an_uninterrupted_run(tmp_path, secret):
    n = 30
    mos = [1.0 + (i % 9) * 0.5 for i in range(n)]
    labels = make_set(tmp_path / "data", mos)
    # Deterministic per sample: keep, reject (too far) or fail (HTTP 400, not retried).
    scripts = {i: [[Reply(answer(mos[i] + 0.25)), Reply(answer(min(5.0, mos[i] + 1.5))),
                    Status(400)][i % 3]] for i in range(n)}
    args = ["--data", labels, "--teacher-model", "t", "--api-key-env", KEY_ENV,
            "--concurrency", 3]

    ref = tmp_path / "ref" / "d.jsonl"
    with ScriptedServer(scripts, api_key=secret) as srv:
        result, ref_log = invoke([*args, "--out", ref, "--teacher-url", srv.url],
                                 env={KEY_ENV: secret})
    assert result.exit_code == 0, ref_log

    out = tmp_path / "run" / "d.jsonl"
    rejected = out.with_name("d.rejected.jsonl")
    with ScriptedServer(scripts, api_key=secret, delay=0.1) as slow:
        cmd = [sys.executable, "-m", "qponder_mlx.cli.main", "distill", *map(str, args),
               "--out", str(out), "--teacher-url", slow.url]
        log_path = tmp_path / "killed.log"
        with log_path.open("w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, KEY_ENV: secret})
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                done = len(list(read_jsonl(out))) + len(list(read_jsonl(rejected)))
                if done >= 8 or proc.poll() is not None:
                    break
                time.sleep(0.02)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
        before = set(rows(out)) | set(rows(rejected))
        assert 8 <= len(before) < n
        with out.open("a") as f:
            f.write('{"id": "s29", "images": ["torn wri')  # a write cut by the kill
        resumed_at = time.monotonic()
        result, log = invoke([*args, "--out", out, "--teacher-url", slow.url],
                             env={KEY_ENV: secret})
        assert result.exit_code == 0, log
        assert f"resumed: {len(before)} of {n}" in log
        asked_again = {f"s{s.index:02d}" for s in slow.seen if s.t >= resumed_at}
    assert not asked_again & before, "finished samples were asked again"

    kept, dropped, summary = files(out)
    ref_kept, ref_dropped, ref_summary = files(ref)
    assert _comparable(kept) == _comparable(ref_kept)
    assert _comparable(dropped) == _comparable(ref_dropped)
    assert len(kept) + len(dropped) == n and summary == ref_summary
    assert_no_secret(secret, tmp_path, log, ref_log, log_path.read_text())


def test_resume_refuses_other_settings_and_retry_failed_asks_again(tmp_path):
    labels = make_set(tmp_path / "data", [3.0, 3.0])
    out = tmp_path / "d.jsonl"
    base = ["--data", labels, "--out", out, "--teacher-model", "t"]
    with ScriptedServer({1: [Status(400), Reply(answer(3.1))]}) as srv:
        result, log = invoke([*base, "--teacher-url", srv.url])
        assert result.exit_code == 0, log
        _, dropped, _ = files(out)
        assert dropped["s01"]["status"] == "failed"

        result, log = invoke([*base, "--teacher-url", srv.url])  # nothing left to do
        assert result.exit_code == 0 and srv.count(1) == 1 and "resumed: 2 of 2" in log

        result, log = invoke([*base, "--teacher-url", srv.url, "--mode", "guided"])
        assert result.exit_code == 2 and "mode 'blind'" in log

        result, log = invoke([*base, "--teacher-url", srv.url, "--retry-failed"])
        assert result.exit_code == 0, log
    kept, dropped, summary = files(out)
    assert set(kept) == {"s00", "s01"} and dropped == {} and srv.count(1) == 2
    assert (summary["kept"], summary["failed"]) == (2, 0)


# --------------------------------------------------------------------------------------------
# The SFT rows load in mlx-vlm's own SFT dataset


def test_kept_rows_load_in_mlx_vlm_sft_dataset(tmp_path, tiny_loaded):
    from mlx_vlm.trainer.datasets import load
    from mlx_vlm.trainer.vlm.sft.dataset import VisionDataset

    labels = make_set(tmp_path / "data", [3.0])
    out = tmp_path / "sft" / "train.jsonl"
    with ScriptedServer() as srv:
        cfg = DistillConfig(teacher_url=srv.url, teacher_model="t")
        teacher = build_teacher(cfg)
        run_distill([Sample("s00", (labels.parent / "img_00.png").resolve(), 3.0)], teacher,
                    cfg, out, progress=False)
        teacher.close()
    ds = VisionDataset(load(out), tiny_loaded.model.config, tiny_loaded.processor,
                       config={"train_on_completions": True})
    item = ds[0]
    assert item["pixel_values"] is not None and item["input_ids"].ndim == 1
    tok = tiny_loaded.tokenizer
    ids = item["input_ids"].tolist()
    target = [t for t, m in zip(ids, item["completion_mask"].tolist()) if m]
    assert tok.decode(target, skip_special_tokens=True).strip() == answer(3.0, REASONING)
    image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
    assert image_pad in ids and USER_PROMPT[:40] in tok.decode(ids)


# --------------------------------------------------------------------------------------------
# Real servers and models


@pytest.fixture(scope="module")
def mlx_vlm_server(tiny_model_dir, tmp_path_factory):
    """The real `mlx_vlm.server` serving the tiny model, with an API key (from its env)."""
    from reliability.procs import served

    with served(tiny_model_dir, tmp_path_factory.mktemp("server")) as srv:
        yield srv


def test_real_mlx_vlm_server_end_to_end(mlx_vlm_server, cc0_labels, tmp_path):
    srv = mlx_vlm_server
    out = tmp_path / "real.jsonl"
    args = ["--data", cc0_labels, "--out", out, "--limit", 3, "--teacher-url", srv["url"],
            "--teacher-model", srv["model"], "--api-key-env", KEY_ENV, "--max-tokens", 24,
            "--max-pixels", 112 * 112, "--concurrency", 2, "--timeout", 60]
    result, log = invoke(args, env={KEY_ENV: srv["key"]})
    assert result.exit_code == 0, log
    kept, dropped, summary = files(out)
    assert len(kept) + len(dropped) == 3 == summary["total"]
    # A random model writes garbage: every sample must still end with a status and a reason.
    for r in dropped.values():
        assert r["status"] in ("rejected", "failed") and r["reason"] and r["code"]
    answered = [a for r in dropped.values() for a in r["attempt_details"]
                if a["code"] in ("empty", "bad_format", "no_reasoning", "score_error")]
    assert answered, dropped  # the server did answer ...
    assert all(a["tokens"]["prompt"] > 0 for a in answered)  # ... and reported real usage
    assert all(0 < a["tokens"]["completion"] <= 24 for a in answered if a["text"])
    assert_no_secret(srv["key"], tmp_path, log)

    args[args.index(out)] = tmp_path / "wrong-key.jsonl"  # a fresh run, not a resume
    result, log = invoke(args, env={KEY_ENV: "sk-wrong-key-123"})  # rejected by the server
    assert result.exit_code == 2 and "401" in log and "sk-wrong-key-123" not in log


def test_local_teacher_in_process(tiny_model_dir, cc0_labels, tmp_path):
    out = tmp_path / "local.jsonl"
    result, log = invoke(["--data", cc0_labels, "--out", out, "--limit", 2, "--teacher", "local",
                          "--teacher-model", tiny_model_dir, "--max-tokens", 8,
                          "--max-pixels", 56 * 56, "--temperature", 0])
    assert result.exit_code == 0, log
    kept, dropped, summary = files(out)
    assert len(kept) + len(dropped) == 2
    for r in dropped.values():
        assert r["teacher_model"] == str(tiny_model_dir) and r["reason"]
        (a,) = r["attempt_details"]
        assert a["tokens"]["prompt"] > 4 and 1 <= a["tokens"]["completion"] <= 8
