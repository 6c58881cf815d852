"""A new user's first hour: errors that name the cause, honest summaries, the flags people type
from mlx-lm habit, and progress lines in a log. Tiny model, small images, a few seconds each."""

from __future__ import annotations

import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
from distill_server import Reply, ScriptedServer, answer, write_index_image
from PIL import Image
from qponder_mlx.cli.main import app
from typer.testing import CliRunner

from qponder_mlx.distill.distill_job import UNREACHABLE_STOP_AFTER, _UnreachableGuard
from qponder_mlx.distill.teachers import UNREACHABLE


def run_cli(*args) -> tuple[int, str]:
    res = CliRunner().invoke(app, [str(a) for a in args])
    if res.exception and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.output  # stdout and stderr, interleaved (click 8.2+)


def label_set(root: Path, n: int, mos: float = 3.0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with (root / "labels.jsonl").open("w") as f:
        for i in range(n):
            write_index_image(root / f"img_{i:02d}.png", i)
            f.write(json.dumps({"image": f"img_{i:02d}.png", "mos": mos, "id": f"s{i:02d}"})
                    + "\n")
    return root / "labels.jsonl"


def free_port() -> int:
    with socket.socket() as s:  # bound, then closed: nothing listens there afterwards
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# distill: a teacher that is down, a run that keeps nothing


def test_distill_stops_after_a_handful_when_the_teacher_is_down(tmp_path):
    labels = label_set(tmp_path / "data", 24)
    out = tmp_path / "d.jsonl"
    url = f"http://127.0.0.1:{free_port()}/v1"
    t0 = time.monotonic()
    code, log = run_cli("distill", "--data", labels, "--out", out, "--teacher-url", url,
                        "--teacher-model", "t", "--max-retries", "1", "--concurrency", "2")
    took = time.monotonic() - t0
    errors = [x for x in log.splitlines() if x.startswith("error:")]
    assert code == 2 and len(errors) == 1, log
    assert f"teacher at {url}/chat/completions is not reachable — is the server running?" \
        in errors[0]
    # 24 samples x (1 try + a 0.5-1 s back-off + 1 try) at concurrency 2 would take >= 6 s; the
    # run stops after UNREACHABLE_STOP_AFTER samples (2 rounds of back-off, < 2 s).
    assert took < 5.0, took
    # None of them is marked failed: the next run asks them all again.
    rejected = out.with_name("d.rejected.jsonl")
    assert not out.exists() and (not rejected.exists() or rejected.read_text() == "")


def test_unreachable_guard_releases_rows_once_the_teacher_answers():
    down = {"id": "a", "status": "failed", "code": UNREACHABLE, "reason": "cannot connect"}
    other = {"id": "b", "status": "rejected", "code": "score_error"}
    g = _UnreachableGuard(UNREACHABLE_STOP_AFTER)
    assert g.check(down) == [] and not g.down
    assert g.check(other) == [down, other]  # the server answered: a later outage is retried
    assert g.check(down) == [down] and not g.down  # ... and written as failed, never held
    g = _UnreachableGuard(2)
    g.check(down)
    g.check(down)
    assert g.down


def test_distill_that_keeps_nothing_says_so(tmp_path):
    labels = label_set(tmp_path / "data", 3, mos=1.0)
    out = tmp_path / "d.jsonl"
    with ScriptedServer(default=Reply(answer(4.5))) as srv:  # always 3.5 from the MOS
        code, log = run_cli("distill", "--data", labels, "--out", out, "--teacher-url",
                            srv.url, "--teacher-model", "t")
    assert code == 0, log
    assert "kept: 0 — nothing written" in log and not out.exists()
    assert f"rejected/failed: {out.with_name('d.rejected.jsonl')}" in log


# --------------------------------------------------------------------------------------------
# export: a format rate of 0 is a warning, not a number in the middle of the summary


def test_export_warns_loudly_when_the_format_rate_is_zero(capsys):
    from qponder_mlx.cli.cmd_export import _warn_no_format

    def manifest(bundle, reference):
        return {"agreement": {"reason": {"format_rate": {"bundle": bundle,
                                                         "reference": reference}}}}

    _warn_no_format(manifest(0.0, 0.0))
    err = capsys.readouterr().err
    assert err.startswith("warning: format rate 0.0") and "--mode fast" in err
    assert "reference 0.0" in err and len(err.splitlines()) == 1
    _warn_no_format(manifest(0.0, 0.75))
    assert "quantization" in capsys.readouterr().err
    for quiet in (manifest(0.5, 0.5), manifest(None, None), {}):  # fine, or not measured
        _warn_no_format(quiet)
        assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------------------------
# score: the summary, the store key, --rescore, `qponder top`, the report

SMALL = ["--min-pixels", "3136", "--max-pixels", "12544"]


def photos(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(
            folder / f"p{i}.png")
    return folder


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_score_summary_stats_new_settings_and_rescore(tiny_model_dir, tmp_path):
    lib, db, out = photos(tmp_path / "lib", 7), tmp_path / "r.sqlite", tmp_path / "r.jsonl"
    base = ["score", lib, "--model", tiny_model_dir, "--mode", "fast", "--db", db,
            "--no-progress", "--jsonl", out]
    code, log = run_cli(*base, *SMALL)
    assert code == 0, log
    rows = read_jsonl(out)
    s = sorted((r["score"], r["path"]) for r in rows)
    v = [x for x, _ in s]
    assert (f"scores: mean {statistics.fmean(v):.2f}, median {statistics.median(v):.2f}, "
            f"min {min(v):.2f}, max {max(v):.2f} over 7 photos") in log
    lines = log.splitlines()
    i = lines.index("worst 5:")
    assert lines[i + 1:i + 6] == [f"  {x:.2f}  {p}" for x, p in s[:5]]

    # Pixels are part of the store key: new settings score again, and the summary says why.
    code, log = run_cli(*base, "--min-pixels", "3136", "--max-pixels", "6272")
    assert "7 files: 7 scored, 0 cached" in log
    assert "new scorer settings for this store (--min/--max-pixels 3136-12544 -> 3136-6272)" \
        in log and "7 earlier results are kept" in log
    code, log = run_cli(*base, *SMALL)  # the first settings: all still there
    assert "7 files: 0 scored, 7 cached" in log and "new scorer" not in log
    first = {r["path"]: r["scored_at"] for r in read_jsonl(out)}
    code, log = run_cli(*base, *SMALL, "--rescore")
    assert "7 files: 7 scored, 0 cached" in log and "new scorer" not in log, log
    assert "--rescore: 7 stored results of these files are scored again" in log
    again = {r["path"]: r["scored_at"] for r in read_jsonl(out)}
    assert all(again[p] > first[p] for p in first)

    # `qponder top` reads the same store without a model, the most recent scorer by default.
    code, log = run_cli("top", "--db", db, "--worst", "2", "--best", "1", "--scorer",
                        "px3136-12544")
    assert code == 0, log
    lines = log.splitlines()
    assert lines[lines.index("worst 2:") + 1:][:2] == [f"  {x:.2f}  {p}" for x, p in s[:2]]
    assert lines[lines.index("best 1:") + 1] == f"  {s[-1][0]:.2f}  {s[-1][1]}"
    code, log = run_cli("top", "--db", tmp_path / "none.sqlite")
    assert code == 2 and "no such results store" in log and not (tmp_path / "none.sqlite").exists()


def test_report_links_thumbnails_and_skips_an_empty_histogram(tiny_model_dir, tmp_path):
    lib = photos(tmp_path / "my lib", 2)
    (lib / "bad.png").write_text("not a png")
    report = tmp_path / "r.html"
    code, log = run_cli("score", lib, "--model", tiny_model_dir, "--mode", "fast", *SMALL,
                        "--db", tmp_path / "r.sqlite", "--no-progress", "--report", report)
    page = report.read_text()
    links = re.findall(r'<a class="orig" href="([^"]+)"><img ', page)
    assert sorted(unquote(urlsplit(u).path) for u in links) == [str(lib / "p0.png"),
                                                                str(lib / "p1.png")]
    assert all(u.startswith("file:///") and " " not in u for u in links)
    assert 'id="histogram"' in page
    # Nothing scored: the report lists the failure and draws no empty histogram.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jpg").write_bytes(b"")
    code, log = run_cli("score", bad, "--model", tiny_model_dir, "--mode", "fast", *SMALL,
                        "--db", tmp_path / "r.sqlite", "--no-progress", "--report", report)
    page = report.read_text()
    assert code == 1 and 'id="histogram"' not in page and "empty file" in page


# --------------------------------------------------------------------------------------------
# --help: one default style, one example per command, the flags mlx-lm users type


def _leaves(cmd, path=()):
    if hasattr(cmd, "commands"):  # a group (typer may carry its own copy of click)
        for name, sub in cmd.commands.items():
            yield from _leaves(sub, (*path, name))
    else:
        yield path, cmd


def test_every_help_has_an_example_and_one_default_style():
    import typer.main

    root = typer.main.get_command(app)
    assert "Example: qponder " in root.help
    leaves = list(_leaves(root))
    assert len(leaves) >= 12
    for path, cmd in leaves:
        examples = [x for x in cmd.help.splitlines() if x.strip().startswith("Example: ")]
        assert len(examples) == 1, path
        assert examples[0].strip().startswith(f"Example: qponder {' '.join(path)}"), path
        for p in cmd.params:
            # Defaults appear only as typer's own `[default: ...]`, never in the help prose.
            assert "default" not in (getattr(p, "help", None) or "").lower(), (path, p.name)


def test_shown_defaults_match_the_config_defaults():
    import typer.main
    from qponder_mlx.export.config import ExportConfig

    from qponder_mlx.distill.config import DistillConfig
    from qponder_mlx.grpo.config import GRPOConfig
    from qponder_mlx.train.config import SFTConfig

    cmds = {path: cmd for path, cmd in _leaves(typer.main.get_command(app))}

    def shown(path, name):
        return next(p.show_default for p in cmds[path].params if p.name == name)

    d = DistillConfig()
    for name in ("teacher", "mode", "max_score_error", "samples_per_image", "concurrency",
                 "temperature", "max_tokens", "max_pixels", "timeout_s", "max_retries"):
        assert shown(("distill",), name) == str(getattr(d, name)), name
    e = ExportConfig()
    for name in ("out", "bits", "q_mode", "reason_max_tokens", "batch_size", "target",
                 "reason_images"):
        assert shown(("export",), name) == str(getattr(e, name)), name
    assert shown(("export",), "min_pixels").startswith(f"{e.min_pixels} ")
    assert shown(("export",), "max_pixels").startswith(f"{e.max_pixels} ")
    s, g = SFTConfig(), GRPOConfig()
    assert shown(("train",), "iters") == f"sft {s.iters}, grpo {g.iters}"
    assert shown(("train",), "batch_size") == f"sft {s.batch_size}, grpo {g.batch_size}"
    lr = shown(("train",), "learning_rate").replace(",", "").split()
    assert (float(lr[1]), float(lr[3])) == (s.learning_rate, g.learning_rate)
    for name, value in (("grad_accum", s.grad_accum), ("max_seq_len", s.max_seq_len),
                        ("lora_rank", s.lora.rank), ("lora_alpha", s.lora.alpha),
                        ("lora_dropout", s.lora.dropout), ("seed", s.seed),
                        ("min_pixels", s.min_pixels), ("max_pixels", s.max_pixels)):
        assert float(shown(("train",), name)) == value, name
    assert (s.min_pixels, s.max_pixels) == (g.min_pixels, g.max_pixels)


def test_mlx_lm_flag_names_are_accepted():
    import typer.main

    cmds = {path: cmd for path, cmd in _leaves(typer.main.get_command(app))}

    def opts(path):
        return {o for p in cmds[path].params for o in getattr(p, "opts", [])}

    for path in (("score",), ("eval",), ("export",), ("distill",),
                 ("bundle", "resize-parity")):
        assert "--adapter-path" in opts(path), path
    for path in (("score",), ("eval",)):
        assert {"--max-tokens", "--temperature", "--seed"} <= opts(path), path
    assert {"--grad-accumulation-steps", "--max-seq-length", "--iters", "--learning-rate",
            "--batch-size", "--seed"} <= opts(("train",))


def test_temperature_and_seed_make_sampled_scores_repeatable(tiny_model_dir, tmp_path):
    lib, out = photos(tmp_path / "lib", 3), tmp_path / "r.jsonl"
    base = ["score", lib, "--model", tiny_model_dir, *SMALL, "--max-tokens", "6",
            "--temperature", "1.0", "--db", tmp_path / "r.sqlite", "--no-progress",
            "--jsonl", out, "--rescore"]

    def texts(seed):
        code, log = run_cli(*base, "--seed", seed)
        assert code in (0, 1) and "3 files: " in log, log  # a random model: maybe no score
        return [r["text"] for r in read_jsonl(out)]

    a = texts(3)
    assert texts(3) == a and texts(4) != a
    assert all(r["identity"].endswith("t6@1") for r in read_jsonl(out))


# --------------------------------------------------------------------------------------------
# Progress in a log (stdout not a terminal: CliRunner's is not), and only rank 0 under mlx.launch

PLAIN = re.compile(r"^(?P<what>.+?) (?P<done>\d+)/(?P<total>\d+) \(\d+%\) .*elapsed \S+")


def progress_lines(log: str) -> dict[str, list[tuple[int, int]]]:
    out: dict[str, list[tuple[int, int]]] = {}
    for line in log.splitlines():
        if m := PLAIN.match(line):
            out.setdefault(m["what"], []).append((int(m["done"]), int(m["total"])))
    return out


def test_score_eval_distill_print_plain_progress_lines_in_a_log(tiny_model_dir, tmp_path):
    lib = photos(tmp_path / "lib", 12)
    code, log = run_cli("score", lib, "--model", tiny_model_dir, "--mode", "fast", *SMALL,
                        "--db", tmp_path / "r.sqlite", "--report", tmp_path / "r.html")
    seen = progress_lines(log)
    # The first item, then every 10 (1 % of the total, at least 10), and the end.
    assert seen["hashing"] == [(1, 12), (11, 12), (12, 12)], log
    assert seen["scoring (fast)"][-1] == (12, 12) and seen["thumbnails"][-1] == (12, 12)

    labels = tmp_path / "lib" / "labels.jsonl"
    labels.write_text("".join(json.dumps({"image": f"p{i}.png", "mos": 1 + i / 3}) + "\n"
                              for i in range(12)))
    code, log = run_cli("eval", "--data", labels, "--model", tiny_model_dir, "--mode", "fast",
                        *SMALL, "--batch-size", "4")
    assert code == 0 and progress_lines(log)["eval (fast)"] == [(1, 12), (11, 12), (12, 12)]

    data = label_set(tmp_path / "set", 3)
    with ScriptedServer() as srv:
        code, log = run_cli("distill", "--data", data, "--out", tmp_path / "d.jsonl",
                            "--teacher-url", srv.url, "--teacher-model", "t")
    assert code == 0 and progress_lines(log)["distill (blind, t)"][-1] == (3, 3), log
    assert "kept=3" in log


def test_under_mlx_launch_only_rank_zero_prints(tmp_path):
    script = (
        "import os, sys\n"
        "from qponder_mlx.cli.main import quiet_unless_rank_zero\n"
        "from qponder_mlx.progress import progress_bar, say\n"
        "print(quiet_unless_rank_zero(os.environ), file=sys.stderr)\n"
        "say('a message'); print('a summary')\n"
        "with progress_bar(2, 'steps') as advance:\n"
        "    advance(); advance()\n"
        "print('error: still shown', file=sys.stderr)\n")
    for rank, shown in (("0", True), ("1", False)):
        env = {k: v for k, v in os.environ.items() if not k.endswith("_RANK")}
        res = subprocess.run([sys.executable, "-c", script], env={**env, "MLX_RANK": rank},
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert ("a summary" in res.stdout and "steps 2/2" in res.stdout) == shown, res.stdout
        assert ("a message" in res.stderr) == shown and "error: still shown" in res.stderr
        assert res.stderr.startswith(str(not shown))
        if not shown:
            assert res.stdout == ""
