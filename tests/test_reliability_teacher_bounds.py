"""A teacher server that never stops talking, talks too slowly, lies about usage, or has a
password in its URL: every request ends within its deadline and size cap, an over-long reply is
rejected (never kept), usage counts are advisory, and the password never reaches the output.

The servers are raw sockets on 127.0.0.1 (tests/reliability/fault_servers.py), each run under a
deadline of a second or two.
"""

from __future__ import annotations

import json
import time
import tracemalloc
from pathlib import Path

import pytest
from PIL import Image
from qponder_mlx.cli.main import app
from reliability.fault_servers import Behaviour, chat_body, free_port, serve
from typer.testing import CliRunner

from qponder_mlx.distill import DistillConfig, TeacherReply
from qponder_mlx.distill.distill_job import run_distill
from qponder_mlx.distill.openai_teacher import OpenAIConfig, OpenAITeacher, reply_cap
from qponder_mlx.distill.teachers import FatalTeacherError, TeacherError, TransientTeacherError
from qponder_mlx.io import read_jsonl
from qponder_mlx.labels import read_labels

GOOD = ("<think>The photo is sharp with little noise and balanced exposure overall.</think>"
        "<answer>3.00</answer>")


def teacher(url: str, *, max_tokens: int = 64, timeout_s: float = 10.0) -> OpenAITeacher:
    return OpenAITeacher(OpenAIConfig(url=url, model="m", max_tokens=max_tokens,
                                      timeout_s=timeout_s))


def ask(t: OpenAITeacher) -> TeacherReply:
    from qponder_mlx.distill.teacher_prompts import teacher_prompt

    return t.ask("data:image/png;base64,AAAA", None, teacher_prompt("blind", 3.0))


def label_set(root: Path, n: int = 2) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with (root / "labels.jsonl").open("w") as f:
        for i in range(n):
            Image.new("RGB", (32, 32), (10 * i, 80, 120)).save(root / f"i{i}.png")
            f.write(json.dumps({"image": f"i{i}.png", "mos": 3.0, "id": f"s{i}"}) + "\n")
    return root / "labels.jsonl"


# --------------------------------------------------------------------------------------------
# 4. endless, trickling and huge replies


def test_an_endless_reply_is_cut_at_the_size_cap(tmp_path):
    with serve(Behaviour("endless")) as srv:
        t = teacher(srv.url, max_tokens=64)
        tracemalloc.start()
        t0 = time.perf_counter()
        with pytest.raises(TeacherError) as exc:
            ask(t)
        took = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        t.close()
    assert exc.value.code == "too_long" and not isinstance(exc.value, TransientTeacherError)
    assert f"{reply_cap(64):,} bytes" in exc.value.reason
    assert took < 3.0 and peak < 4 * reply_cap(64) + (1 << 20)


def test_a_declared_50mb_reply_is_refused_without_reading_it():
    with serve(Behaviour("huge")) as srv:
        t = teacher(srv.url)
        with pytest.raises(TeacherError) as exc:
            ask(t)
        t.close()
    assert exc.value.code == "too_long"


def test_a_trickling_reply_is_cut_at_the_deadline():
    with serve(Behaviour("trickle", gap_s=0.05)) as srv:
        t = teacher(srv.url, timeout_s=1.0)
        t0 = time.perf_counter()
        with pytest.raises(TransientTeacherError) as exc:
            ask(t)
        took = time.perf_counter() - t0
        t.close()
    assert exc.value.code == "timeout" and "did not end within 1 s" in exc.value.reason
    assert 0.95 < took < 1.6  # the deadline plus at most one gap between bytes


def test_distill_against_an_endless_server_rejects_and_keeps_nothing(tmp_path):
    labels = label_set(tmp_path / "set")
    samples, _ = read_labels(labels)
    cfg = DistillConfig(teacher_url="x", teacher_model="m", max_tokens=64, max_retries=0,
                        concurrency=2, timeout_s=5.0)
    out = tmp_path / "d.jsonl"
    with serve(Behaviour("endless")) as srv:
        t = teacher(srv.url, max_tokens=64)
        t0 = time.perf_counter()
        result = run_distill(samples, t, cfg, out, progress=False)
        t.close()
    assert time.perf_counter() - t0 < 5.0
    assert result.new == {"rejected": 2}
    assert list(read_jsonl(out)) == []
    dropped = list(read_jsonl(tmp_path / "d.rejected.jsonl"))
    assert {r["code"] for r in dropped} == {"too_long"}


def test_an_over_long_answer_from_any_teacher_is_rejected_not_kept(tmp_path):
    class Chatty:
        model, max_concurrency = "chatty", None

        def prepare(self, sample):
            return None

        def ask(self, image, sample, prompt):
            # A valid answer drowned in 50,000 words: far over what 64 tokens can hold.
            return TeacherReply(text=GOOD.replace("overall.", "overall. " + "very " * 50000))

        def close(self):
            pass

    samples, _ = read_labels(label_set(tmp_path / "set", 1))
    cfg = DistillConfig(teacher_url="x", teacher_model="chatty", max_tokens=64)
    result = run_distill(samples, Chatty(), cfg, tmp_path / "d.jsonl", progress=False)
    assert result.new == {"rejected": 1}
    (row,) = read_jsonl(tmp_path / "d.rejected.jsonl")
    assert row["code"] == "too_long" and len(row["attempt_details"][0]["text"]) <= 4000


# --------------------------------------------------------------------------------------------
# 15. usage counts are advisory


@pytest.mark.parametrize("usage, tokens", [
    ('{"prompt_tokens": 1e999, "completion_tokens": 5}', (0, 5)),  # 1e999 parses as inf
    ('{"prompt_tokens": NaN, "completion_tokens": -Infinity}', (0, 0)),
    ('{"prompt_tokens": -3, "completion_tokens": "12"}', (0, 0)),
    ('{"prompt_tokens": 1e300, "completion_tokens": true}', (0, 0)),
    ('{"prompt_tokens": 812.0, "completion_tokens": 40}', (812, 40)),
])
def test_bad_usage_counts_never_discard_a_valid_answer(usage, tokens, tmp_path):
    with serve(Behaviour("fixed", body=chat_body(GOOD, usage))) as srv:
        t = teacher(srv.url)
        reply = ask(t)
        assert reply.text == GOOD and (reply.prompt_tokens, reply.completion_tokens) == tokens
        samples, _ = read_labels(label_set(tmp_path / "set", 1))
        cfg = DistillConfig(teacher_url=srv.url, teacher_model="m")
        result = run_distill(samples, t, cfg, tmp_path / "d.jsonl", progress=False)
        t.close()
    assert result.new == {"kept": 1}


# --------------------------------------------------------------------------------------------
# 14. a password in the teacher URL is never printed


def test_a_password_in_the_url_never_reaches_a_message(tmp_path):
    password = "hunter2-pass-xyz"
    with serve(Behaviour("fixed", status=404, body=b'{"error": "no such model"}')) as srv:
        url = srv.url.replace("http://", f"http://bob:{password}@")
        t = teacher(url)
        assert password not in repr(t)
        with pytest.raises(FatalTeacherError) as exc:
            ask(t)
        t.close()
        assert password not in exc.value.reason and "***@127.0.0.1" in exc.value.reason
        labels = label_set(tmp_path / "set", 1)
        res = CliRunner().invoke(app, ["distill", "--data", str(labels), "--out",
                                       str(tmp_path / "d.jsonl"), "--teacher-url", url,
                                       "--teacher-model", "m", "--max-retries", "0"])
    assert res.exit_code == 2 and password not in res.output and "***@" in res.output
    # A server echoing the URL (with its userinfo) in an error body; a refused connection.
    echo = f'{{"error": "bad request to {url}"}}'.encode()
    with serve(Behaviour("fixed", status=500, body=echo)) as srv:
        url = srv.url.replace("http://", f"http://bob:{password}@")
        t = teacher(url)
        with pytest.raises(TransientTeacherError) as exc:
            ask(t)
        t.close()
    assert password not in exc.value.reason
    t = teacher(f"http://bob:{password}@127.0.0.1:{free_port()}/v1", timeout_s=2.0)
    with pytest.raises(TransientTeacherError) as exc:
        ask(t)
    t.close()
    assert password not in exc.value.reason
    for p in tmp_path.rglob("*"):
        assert not p.is_file() or password.encode() not in p.read_bytes(), p


# --------------------------------------------------------------------------------------------
# 6. numeric options are checked before anything runs


@pytest.mark.parametrize("command, args, message", [
    ("score", ["--max-tokens", "-5"], "--max-tokens -5: must be at least 1"),
    ("score", ["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    ("score", ["--max-pixels", "-1"], "--max-pixels -1: must be at least 1"),
    ("eval", ["--max-tokens", "-5"], "--max-tokens -5: must be at least 1"),
    ("eval", ["--limit", "0"], "--limit 0: must be at least 1"),
    ("distill", ["--max-tokens", "-5"], "max_tokens: must be >= 1"),
    ("distill", ["--limit", "-1"], "--limit -1: must be at least 1"),
    ("distill", ["--temperature", "nan"], "temperature: must be >= 0"),
    ("distill", ["--timeout", "inf"], "timeout_s: must be a finite number"),
])
def test_bad_numbers_fail_in_one_line_before_any_work(command, args, message, tmp_path,
                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)  # where score's default --db would appear
    labels = label_set(tmp_path / "set", 1)
    where = {"score": [str(tmp_path / "set")],
             "eval": ["--data", str(labels)],
             "distill": ["--data", str(labels), "--out", str(tmp_path / "d.jsonl"),
                         "--teacher-url", "http://127.0.0.1:9/v1", "--teacher-model", "m"]}
    res = CliRunner().invoke(app, [command, *where[command], *args,
                                   "--model" if command != "distill" else "--teacher-model",
                                   "/nonexistent/model"])
    errs = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert res.exit_code == 2 and len(errs) == 1 and message in errs[0], res.output
    assert not (tmp_path / "d.jsonl").exists() and not (tmp_path / "results.sqlite").exists()
